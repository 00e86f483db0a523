"""Compute -> Kubernetes objects: validated against the real OpenAPI schema (kubernetes-validate,
strict), deterministic, labelled as one group, and carrying what the pod kernel needs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from kubernetes_validate.utils import all_versions, latest_version, validate
from packaging.version import Version

from kt_jupyter import k8s_fields
from kt_jupyter.compute import Compute
from kt_jupyter.errors import ComputeSpecError
from kt_jupyter.image import Image
from kt_jupyter.k8s_fields import Secret, Volume
from kt_jupyter.manifests import (
    CACHE_DIR,
    COMPUTE_LABEL,
    GPU_TOLERATION,
    MANAGED_BY_LABEL,
    MAX_SOURCE_BYTES,
    SPEC_ANNOTATION,
    SRC_DIR,
    build_all,
    build_deployment,
    build_secret,
    build_service,
    build_source_configmap,
    build_volume_claims,
    deep_merge,
    label_selector,
    source_hash,
)
from kt_jupyter.startup import INSTALL_ENV_VARS, pinned_deps, startup_script

ROOT = Path(__file__).resolve().parents[1]
#: The newest Kubernetes version the installed kubernetes-validate has schemas for.
K8S_VERSION = latest_version()
#: The oldest Kubernetes version the manifests are for (StatefulSet pods carry their ordinal as a label from 1.28).
OLDEST_K8S_VERSION = "1.28.0"
TOKEN = "s3cret-token-value"
#: The real pod_kernel source, as the backend ships it.
SOURCE = {f"pod_kernel/{p.name}": p.read_text() for p in sorted((ROOT / "pod_kernel").glob("*.py"))}


@pytest.fixture(autouse=True)
def no_real_cluster_config(tmp_path, monkeypatch):
    """Namespace lookups see only files under tmp_path; no KT_* settings leak in from the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KT_HOME", str(tmp_path / "home" / ".kt"))
    monkeypatch.setenv("KT_USERNAME", "tester")
    for var in ("KUBECONFIG", "KT_NAMESPACE", "KT_LAUNCH_TIMEOUT", "KT_GPU_ANTI_AFFINITY", "KT_POD_IMAGE",
                "KUBERNETES_SERVICE_HOST", *INSTALL_ENV_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(k8s_fields, "SERVICE_ACCOUNT_NAMESPACE_PATH", tmp_path / "no-serviceaccount")


def k8s(**kw) -> Compute:
    return Compute(**{"name": "t", "backend": "kubernetes", "namespace": "ml", **kw})


def deployment_of(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "Deployment")


def container_of(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


MATRIX = {
    "defaults": {},
    "cpu-only": {"cpus": "500m", "memory": "1Gi"},
    "gpu+type": {"cpus": 4, "memory": "32Gi", "gpus": 1, "gpu_type": "A100"},
    "multi-gpu+shm": {"gpus": "4", "memory": "64Gi", "shared_memory_limit": "16Gi", "disk_size": "100Gi"},
    "gpu-memory-kai": {"gpu_memory": "4Gi", "cpus": "1", "queue": "high-priority"},
    "shm-only": {"shared_memory_limit": "2Gi"},
    "volumes": {"volumes": ["pvc-name", Volume.from_name("shared", mount_path="/data"),
                           Volume("scratch", size="50Gi", storage_class="fast-ssd"),
                           {"name": "rwx", "size": "1T", "access_mode": "ReadWriteMany"}]},
    "secrets": {"secrets": ["existing", Secret.from_provider("aws"), Secret.from_provider("huggingface"),
                           Secret.from_name("certs", mount_path="/etc/certs")]},
    "tolerations+selector": {"node_selector": {"node.kubernetes.io/instance-type": "g4dn.xlarge"},
                             "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                                              "effect": "NoSchedule"},
                                             {"key": "spot", "operator": "Exists", "effect": "NoExecute",
                                              "tolerationSeconds": 60}]},
    "gpu-with-own-toleration": {"gpus": 1, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    "labels+annotations": {"labels": {"team": "ml", "example.com/project": "llm"},
                           "annotations": {"prometheus.io/scrape": "true", "note": "free text"}},
    "scheduling": {"priority_class_name": "critical", "service_account_name": "runner", "queue": "batch"},
    "anti-affinity": {"cpus": 1, "gpu_anti_affinity": True},
    "image+steps+env": {"image": Image(image_id="ghcr.io/org/base:1.0", python_path="/usr/bin/python3")
                        .pip_install(["numpy>=2", "torch==2.4.0"]).run_bash("apt-get update && apt-get install -y git")
                        .set_env_vars({"HF_HOME": "/data/hf"}).run_bash("echo every start", force=True),
                        "env_vars": {"OMP_NUM_THREADS": "4", "PATH": "$PATH:/custom/bin"},
                        "image_pull_policy": "Always", "working_dir": "/app"},
    "frozen": {"freeze": True, "image": "ghcr.io/org/pod-kernel:1.0"},
    "replicas": {"replicas": 3},
    "ttl+json-only": {"inactivity_ttl": "30m", "allowed_serialization": ["json"], "logging_config": {"level": "debug"}},
    "service-template": {"service_template": {
        "metadata": {"annotations": {"extra": "yes"}},
        "spec": {"revisionHistoryLimit": 2, "template": {"spec": {
            "hostIPC": True, "nodeSelector": {"custom": "value"},
            "containers": [{"name": "pod-kernel", "env": [{"name": "EXTRA", "value": "1"}]},
                           {"name": "sidecar", "image": "busybox:1.36", "command": ["sleep", "infinity"]}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                 "labelSelector": {"matchLabels": {"kt.dev/compute": "x"}}}}]}},
        }}}}},
    "everything": {"cpus": "8", "memory": "64Gi", "disk_size": "200Gi", "gpus": 4, "gpu_type": "H100",
                   "shared_memory_limit": "32Gi", "labels": {"env": "prod"}, "annotations": {"a": "b"},
                   "node_selector": {"node-pool": "gpu-a100"}, "tolerations": [{"key": "gpu-reserved",
                                                                                "operator": "Exists"}],
                   "service_account_name": "sa", "priority_class_name": "critical", "queue": "high",
                   "volumes": [Volume("ckpt", size="1Ti")], "secrets": ["wandb"], "working_dir": "/work",
                   "image": Image().pip_install(["transformers"]), "env_vars": {"A": "1"},
                   "replicas": 2, "inactivity_ttl": 3600, "image_pull_policy": "IfNotPresent"},
}


def test_kubernetes_validate_knows_the_versions_we_validate_against():
    assert Version(K8S_VERSION) >= Version("1.30")  # the floor pyproject.toml asks for
    assert OLDEST_K8S_VERSION in all_versions()


@pytest.mark.parametrize("suspended", [False, True], ids=["running", "suspended"])
@pytest.mark.parametrize("case", list(MATRIX))
def test_every_object_validates_against_the_kubernetes_schema(case, suspended):
    compute = k8s(**MATRIX[case])
    objects = build_all(compute, TOKEN, SOURCE, suspended=suspended)
    for obj in objects + [compute.manifest]:
        # nothing newer than the oldest cluster we serve (a suspended set differs only in its replica count)
        for version in (K8S_VERSION,) if suspended else (OLDEST_K8S_VERSION, K8S_VERSION):
            assert validate(obj, version, strict=True) == ".".join(version.split(".")[:2]), (obj["kind"], version)
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Secret" and kinds[-2:] == ["Service", "Deployment"]
    assert deployment_of(objects)["spec"]["replicas"] == (0 if suspended else compute.replicas)


def test_strict_validation_catches_a_bad_field():
    from kubernetes_validate.utils import ValidationError

    bad = build_deployment(k8s())
    bad["spec"]["template"]["spec"]["containers"][0]["cpuz"] = "1"
    with pytest.raises(ValidationError):
        validate(bad, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------- one group of objects

@pytest.mark.parametrize("case", ["everything", "volumes"])
def test_everything_is_labelled_as_one_compute(case):
    compute = k8s(**MATRIX[case])
    objects = build_all(compute, TOKEN, SOURCE)
    selector = dict(part.split("=") for part in label_selector(compute).split(","))
    assert selector == {MANAGED_BY_LABEL: "kt-jupyter", COMPUTE_LABEL: "tester-t"}
    for obj in objects:
        assert selector.items() <= obj["metadata"]["labels"].items(), obj["kind"]
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"]["kt.dev/name"] == "t"
    dep = deployment_of(objects)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = next(o for o in objects if o["kind"] == "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [o["metadata"]["labels"]["kt.dev/component"] for o in objects] == (
        ["token", "source"] + ["volume"] * len(build_volume_claims(compute)) + ["service", "deployment"])


def test_user_labels_reach_every_object_and_the_pod():
    objects = build_all(k8s(labels={"team": "ml"}), TOKEN, SOURCE)
    for obj in objects:
        assert obj["metadata"]["labels"]["team"] == "ml"
    assert deployment_of(objects)["spec"]["template"]["metadata"]["labels"]["team"] == "ml"


# ---------------------------------------------------------------------- the Deployment

def test_container_runs_the_pod_kernel_with_the_token_from_the_secret():
    objects = build_all(k8s(), TOKEN, SOURCE)
    dep = deployment_of(objects)
    c = container_of(dep)
    assert c["command"][:2] == ["/bin/sh", "-c"]
    assert ("exec \"$KT_PY\" -m pod_kernel --host :: --port \"${KT_PORT:-32300}\" --compute-name t "
            "--allowed-serialization json,pickle --log-level INFO") in c["command"][2]
    assert c["ports"] == [{"name": "kernel", "containerPort": 32300, "protocol": "TCP"},
                          {"name": "bulk", "containerPort": 32301, "protocol": "TCP"}]  # big values, plain TCP
    assert {"name": "KT_BULK_PORT", "value": "32301"} in c["env"]
    assert c["env"][0] == {"name": "KT_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tester-t-token",
                                                                               "key": "token"}}}
    assert c["readinessProbe"]["httpGet"] == c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "kernel"}
    assert "tcpSocket" not in json.dumps(c)
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    secret = objects[0]
    assert secret["metadata"]["name"] == "tester-t-token"
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    for obj in objects[1:]:
        assert TOKEN not in json.dumps(obj)
        assert base64.b64encode(TOKEN.encode()).decode() not in json.dumps(obj)


def test_build_secret_needs_a_token():
    with pytest.raises(ComputeSpecError, match="build_secret needs a non-empty token string"):
        build_secret(k8s(), "")


def test_resources_and_gpu_scheduling():
    dep = build_deployment(k8s(**MATRIX["gpu+type"]))
    pod = dep["spec"]["template"]["spec"]
    assert container_of(dep)["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["key"] for t in terms] == [
        "nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "karpenter.k8s.aws/instance-gpu-name"]
    assert "NVIDIA-A100-SXM4-80GB" in terms[0]["matchExpressions"][0]["values"]
    assert pod["tolerations"] == [GPU_TOLERATION]
    assert "schedulerName" not in pod and "nodeSelector" not in pod


def test_cpu_only_pod_has_no_gpu_bits():
    pod = build_deployment(k8s(cpus=1))["spec"]["template"]["spec"]
    assert container_of({"spec": {"template": {"spec": pod}}})["resources"] == {"requests": {"cpu": "1"}}
    for key in ("nodeSelector", "tolerations", "affinity", "schedulerName", "priorityClassName",
                "serviceAccountName"):
        assert key not in pod


def test_gpu_toleration_is_not_duplicated():
    pod = build_deployment(k8s(**MATRIX["gpu-with-own-toleration"]))["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    pod = build_deployment(k8s(**MATRIX["tolerations+selector"], gpus=1))["spec"]["template"]["spec"]
    assert pod["tolerations"][-1] == GPU_TOLERATION and len(pod["tolerations"]) == 3


def test_gpu_memory_uses_kai_gpu_sharing():
    dep = build_deployment(k8s(**MATRIX["gpu-memory-kai"]))
    pod, meta = dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]
    assert pod["schedulerName"] == "kai-scheduler"
    assert meta["annotations"]["gpu-memory"] == "4096"
    assert meta["labels"]["kai.scheduler/queue"] == "high-priority"
    assert "nvidia.com/gpu" not in json.dumps(container_of(dep).get("resources", {}))
    assert pod["tolerations"] == [GPU_TOLERATION]


def test_shared_memory_volume():
    def shm(**kw):
        dep = build_deployment(k8s(**kw))
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container_of(dep)["volumeMounts"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        return vols["dshm"]["emptyDir"]

    assert shm(shared_memory_limit="2Gi", memory="8Gi") == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert shm(memory="8Gi") == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert shm() == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert shm(gpus=2) == {"medium": "Memory", "sizeLimit": "8Gi"}  # the GPU pod's default memory request


def test_volumes_and_claims():
    compute = k8s(**MATRIX["volumes"])
    dep = build_deployment(compute)
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container_of(dep)["volumeMounts"]}
    assert vols["pvc-name"] == {"name": "pvc-name", "persistentVolumeClaim": {"claimName": "pvc-name"}}
    assert mounts["pvc-name"] == "/mnt/pvc-name" and mounts["shared"] == "/data" and mounts["scratch"] == "/mnt/scratch"
    assert mounts["kt-src"] == SRC_DIR and mounts["kt-cache"] == CACHE_DIR
    claims = build_volume_claims(compute)
    assert [c["metadata"]["name"] for c in claims] == ["scratch", "rwx"]
    assert claims[0]["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
                                 "storageClassName": "fast-ssd"}
    assert claims[1]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secrets_as_env_and_files():
    dep = build_deployment(k8s(**MATRIX["secrets"]))
    c = container_of(dep)
    assert c["envFrom"] == [{"secretRef": {"name": "existing"}}]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "kt-huggingface", "key": "token"}}} in c["env"]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert vols["kt-secret-1"]["secret"] == {"secretName": "kt-aws"}
    assert mounts["kt-secret-1"] == {"name": "kt-secret-1", "mountPath": "/var/run/secrets/kt/aws", "readOnly": True}
    assert {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": "/var/run/secrets/kt/aws/credentials"} in c["env"]
    assert {"name": "AWS_CONFIG_FILE", "value": "/var/run/secrets/kt/aws/config"} in c["env"]
    mine = build_deployment(k8s(**MATRIX["secrets"], env_vars={"AWS_CONFIG_FILE": "/work/aws.cfg"}))
    env = mine["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "AWS_CONFIG_FILE"] == [{"name": "AWS_CONFIG_FILE", "value": "/work/aws.cfg"}]
    assert mounts["kt-secret-3"]["mountPath"] == "/etc/certs"


def test_scheduling_fields():
    pod = build_deployment(k8s(**MATRIX["scheduling"]))["spec"]["template"]
    assert pod["spec"]["priorityClassName"] == "critical"
    assert pod["spec"]["serviceAccountName"] == "runner"
    assert "schedulerName" not in pod["spec"]  # queue alone: Kueue, with the default scheduler
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "batch"


def test_gpu_anti_affinity():
    pod = build_deployment(k8s(**MATRIX["anti-affinity"]))["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term == {"matchExpressions": [
        {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]},
        {"key": "nvidia.com/gpu.product", "operator": "DoesNotExist"},
        {"key": "cloud.google.com/gke-accelerator", "operator": "DoesNotExist"},
        {"key": "karpenter.k8s.aws/instance-gpu-name", "operator": "DoesNotExist"}]}


def test_gpu_anti_affinity_from_environment_skips_gpu_pods(monkeypatch):
    monkeypatch.setenv("KT_GPU_ANTI_AFFINITY", "1")
    assert "affinity" in build_deployment(k8s())["spec"]["template"]["spec"]
    assert "affinity" not in build_deployment(k8s(gpus=1))["spec"]["template"]["spec"]


def test_env_image_settings_and_working_dir():
    dep = build_deployment(k8s(**MATRIX["image+steps+env"]))
    c = container_of(dep)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HOME"] == "/data/hf" and env["OMP_NUM_THREADS"] == "4" and env["PYTHONUNBUFFERED"] == "1"
    assert "PATH" not in env  # it names $PATH: the startup script exports it so the shell expands it
    assert 'export PATH="$PATH:/custom/bin"' in c["command"][2]
    assert (c["image"], c["imagePullPolicy"], c["workingDir"]) == ("ghcr.io/org/base:1.0", "Always", "/app")
    names = [e["name"] for e in c["env"]]
    assert names[:4] == ["KT_TOKEN", "KT_SERVICE_NAME", "PYTHONUNBUFFERED", "KT_BULK_PORT"]
    assert names[4:] == sorted(names[4:])


def test_compute_env_wins_over_image_env():
    c = k8s(image=Image().set_env_vars({"A": "image", "B": "image"}), env_vars={"A": "compute"})
    env = {e["name"]: e.get("value") for e in container_of(build_deployment(c))["env"]}
    assert (env["A"], env["B"]) == ("compute", "image")


def test_annotations_spec_and_ttl():
    compute = k8s(**MATRIX["labels+annotations"], inactivity_ttl="30m")
    dep = build_deployment(compute)
    assert dep["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"note": "free text", "prometheus.io/scrape": "true"}
    assert dep["metadata"]["annotations"]["kt.dev/inactivity-ttl-seconds"] == "1800"
    assert Compute.from_dict(json.loads(dep["metadata"]["annotations"][SPEC_ANNOTATION])) == compute


def test_replicas_and_suspend():
    assert build_deployment(k8s(replicas=3))["spec"]["replicas"] == 3
    assert build_deployment(k8s(replicas=3), suspended=True)["spec"]["replicas"] == 0


# ---------------------------------------------------------------------- source ConfigMap and startup script

def test_source_configmap_carries_the_pod_kernel_package():
    compute = k8s()
    cm = build_source_configmap(compute, SOURCE)
    assert cm["metadata"]["name"] == "tester-t-src"
    assert cm["data"]["pod_kernel__server.py"] == SOURCE["pod_kernel/server.py"]
    assert set(cm["data"]) == {p.replace("/", "__") for p in SOURCE}
    dep = build_deployment(compute, source_files=SOURCE)
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "kt-src")
    assert vol["configMap"]["name"] == "tester-t-src" and vol["configMap"]["optional"] is True
    assert {"key": "pod_kernel____main__.py", "path": "pod_kernel/__main__.py"} in vol["configMap"]["items"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["kt.dev/source-hash"] == source_hash(SOURCE)
    changed = {**SOURCE, "pod_kernel/server.py": SOURCE["pod_kernel/server.py"] + "\n# edited\n"}
    assert source_hash(changed) != source_hash(SOURCE)


@pytest.mark.parametrize("files, needle", [
    ({"/abs/x.py": ""}, "source file path '/abs/x.py' must be relative, like 'pod_kernel/server.py'"),
    ({"../x.py": ""}, "must be relative"),
    ({"a b.py": ""}, "must be relative"),
    ({"x.py": b"bytes"}, "source file 'x.py' must be text"),
    ({"a/b.py": "", "a__b.py": ""}, "source file paths collide"),
    ({"big.py": "x" * (MAX_SOURCE_BYTES + 1)}, ("more than a ConfigMap holds (921600); use a prebuilt pod-kernel "
                                               "image with freeze=True instead")),
    (["x.py"], "source files must be a dict of relative path -> text"),
])
def test_source_configmap_errors(files, needle):
    with pytest.raises(ComputeSpecError) as err:
        build_source_configmap(k8s(), files)
    assert needle in str(err.value)


def test_startup_script_installs_dependencies_idempotently():
    script = startup_script(k8s())
    assert script.startswith("set -e\n")
    assert 'export PYTHONPATH="$KT_SRC_DIR:$KT_CACHE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"' in script
    assert 'export PIP_CACHE_DIR="$KT_CACHE_DIR/pip"' in script
    check = "if ! \"$KT_PY\" -c 'import sys, websockets, cloudpickle, IPython, psutil;"
    install = '--upgrade --target "$KT_CACHE_DIR/site" ' + " ".join(pinned_deps())
    assert check in script and install in script
    assert script.index(check) < script.index(install) < script.index("exec ")
    assert "KT_SETUP_MARKER" not in script  # no image steps, no setup block


def test_startup_script_runs_image_steps_once_per_container():
    compute = k8s(**MATRIX["image+steps+env"])
    script = startup_script(compute)
    h = compute.image.setup_hash
    assert f'KT_SETUP_MARKER="${{KT_MARKER_DIR:-${{TMPDIR:-/tmp}}}}/.kt-setup-{h}"' in script
    assert "[ \"$KT_SETUP_DONE\" = 1 ] || kt_pip_install 'numpy>=2' torch==2.4.0" in script
    assert """[ "$KT_SETUP_DONE" = 1 ] || "$KT_SH" -c 'apt-get update && apt-get install -y git'""" in script
    assert '\n"$KT_SH" -c \'echo every start\'\n' in script  # force=True: every start, unguarded
    assert script.index("touch \"$KT_SETUP_MARKER\"") < script.index("exec ")
    assert script.startswith("set -e\nKT_PY=/usr/bin/python3\n")
    assert build_deployment(compute)["spec"]["template"]["metadata"]["annotations"]["kt.dev/setup-hash"] == h


def test_startup_script_quotes_user_input():
    compute = k8s(name="n", image=Image(install_cmd="uv pip install").pip_install(["a'b"]).run_bash("echo '$HOME'"),
                  env_vars={"X": 'a"`id`$(id)$HOME\\'})
    script = startup_script(compute)
    assert "uv pip install 'a'\"'\"'b'" in script
    assert '''"$KT_SH" -c 'echo '"'"'$HOME'"'"'\'''' in script
    assert 'export X="a\\"\\`id\\`\\$(id)$HOME\\\\"' in script


def test_startup_script_options():
    script = startup_script(k8s(**MATRIX["ttl+json-only"]))
    assert "--allowed-serialization json --log-level DEBUG" in script
    frozen = startup_script(k8s(freeze=True))
    assert "pip install" not in frozen and "freeze=True but the image lacks the pod kernel dependencies" in frozen


def test_frozen_compute_ships_no_source():
    compute = k8s(**MATRIX["frozen"])
    objects = build_all(compute, TOKEN, SOURCE)
    assert [o["kind"] for o in objects] == ["Secret", "Service", "Deployment"]
    dep = deployment_of(objects)
    assert "kt-src" not in json.dumps(dep) and "kt.dev/source-hash" not in json.dumps(dep)


def test_build_all_without_source_relies_on_the_image():
    objects = build_all(k8s(), TOKEN)
    assert [o["kind"] for o in objects] == ["Secret", "Service", "Deployment"]


# ---------------------------------------------------------------------- service, determinism, service_template

def test_service():
    svc = build_service(k8s())
    assert svc["metadata"]["name"] == "tester-t"
    assert svc["spec"] == {"type": "ClusterIP", "selector": {"kt.dev/compute": "tester-t"},
                           "ports": [{"name": "kernel", "port": 32300, "targetPort": "kernel", "protocol": "TCP"},
                                     {"name": "bulk", "port": 32301, "targetPort": "bulk", "protocol": "TCP"}]}


@pytest.mark.parametrize("case", list(MATRIX))
def test_output_is_deterministic(case):
    a = json.dumps(build_all(k8s(**MATRIX[case]), TOKEN, SOURCE))
    b = json.dumps(build_all(k8s(**MATRIX[case]), TOKEN, SOURCE))
    assert a == b


def test_dict_insertion_order_does_not_change_the_output():
    one = k8s(labels={"a": "1", "b": "2"}, env_vars={"X": "1", "Y": "2"}, node_selector={"p": "1", "q": "2"},
              annotations={"m": "1", "n": "2"})
    two = k8s(labels={"b": "2", "a": "1"}, env_vars={"Y": "2", "X": "1"}, node_selector={"q": "2", "p": "1"},
              annotations={"n": "2", "m": "1"})
    reordered_source = dict(reversed(list(SOURCE.items())))
    assert json.dumps(build_all(one, TOKEN, SOURCE)) == json.dumps(build_all(two, TOKEN, reordered_source))


def test_service_template_is_merged_last():
    dep = build_deployment(k8s(**MATRIX["service-template"], gpus=1, gpu_type="L4"))
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["revisionHistoryLimit"] == 2 and pod["hostIPC"] is True
    assert dep["metadata"]["annotations"]["extra"] == "yes" and SPEC_ANNOTATION in dep["metadata"]["annotations"]
    assert pod["nodeSelector"] == {"custom": "value"}
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0] \
        == {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]}]}
    assert [c["name"] for c in pod["containers"]] == ["pod-kernel", "sidecar"]
    main = pod["containers"][0]
    assert main["env"][-1] == {"name": "EXTRA", "value": "1"} and main["env"][0]["name"] == "KT_TOKEN"
    assert main["command"][0] == "/bin/sh" and "podAntiAffinity" in pod["affinity"]


def test_deep_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "l": [{"name": "x", "v": 1}, {"name": "y"}], "keep": 1, "gone": 2}
    overlay = {"a": {"c": [3], "d": 4}, "l": [{"name": "x", "w": 2}, {"name": "z"}], "gone": None, "new": {"k": 1}}
    assert deep_merge(base, overlay) == {
        "a": {"b": 1, "c": [3], "d": 4}, "l": [{"name": "x", "v": 1, "w": 2}, {"name": "y"}, {"name": "z"}],
        "keep": 1, "new": {"k": 1}}
    assert base["a"]["c"] == [1, 2] and base["gone"] == 2  # the base is not changed
    assert deep_merge({"t": [{"key": "a"}]}, {"t": [{"key": "b"}]}) == {"t": [{"key": "b"}]}
