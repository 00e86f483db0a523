"""The seed's remaining Compute API: autoscale (a Knative Service checked against Knative's CRD schema),
deployment_mode / autoscaling_config / distributed_config / endpoint, rsync, ssh and client_port."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from kt_jupyter import k8s_fields
from kt_jupyter.autoscaling import HPA_CLASS, KPA_CLASS, AutoscalingConfig
from kt_jupyter.compute import POD_KERNEL_PORT, Compute
from kt_jupyter.errors import ComputeSpecError
from kt_jupyter.k8s_fields import Secret, Volume
from kt_jupyter.knative import build_knative_service, knative_objects, required_feature_flags
from kt_jupyter.manifests import SPEC_ANNOTATION, build_deployment, compute_from_deployment

KNATIVE_CRD = Path(__file__).resolve().parent / "schemas" / "serving.knative.dev_services.yaml"
INSTALL_ENV = {"PIP_INDEX_URL": "https://pypi.example/simple"}


@pytest.fixture(autouse=True)
def no_real_cluster_config(tmp_path, monkeypatch):
    """Namespace lookups see only files under tmp_path; no KT_* settings leak in from the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("KUBECONFIG", "KT_NAMESPACE", "KT_LAUNCH_TIMEOUT", "KT_GPU_ANTI_AFFINITY", "KT_POD_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(k8s_fields, "SERVICE_ACCOUNT_NAMESPACE_PATH", tmp_path / "no-serviceaccount")


# ---------------------------------------------------------------------- the CRD schema, as the API server applies it

def _strict(node: dict) -> dict:
    """The CRD's structural schema as JSON Schema: unknown fields are errors unless the schema preserves them,
    int-or-string is either."""
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = _strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    return node


@pytest.fixture(scope="module")
def knative_schema() -> Draft7Validator:
    crd = yaml.safe_load(KNATIVE_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(validator: Draft7Validator, obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def autoscaled(**kw) -> Compute:
    base = {"name": "svc", "backend": "kubernetes", "namespace": "ml"}
    return Compute(**{**base, **kw}).autoscale(min_replicas=0, max_replicas=10, target_concurrency=5)


# ---------------------------------------------------------------------- autoscale(): validation

def test_autoscale_is_chainable_changes_the_compute_and_sets_the_mode():
    c = Compute(name="svc", backend="kubernetes", namespace="ml")
    assert c.deployment_mode == "deployment" and c.autoscaling_config is None and c.distributed_config is None
    assert c.endpoint == f"ws://tester-svc.ml.svc.cluster.local:{POD_KERNEL_PORT}"
    same = c.autoscale(min_replicas=0, max_replicas=10, target_concurrency=5, window="1m",
                       scale_to_zero_pod_retention_period="10m", container_concurrency=4)
    assert same is c and c.deployment_mode == "knative" and c.distributed_config is None
    assert c.endpoint == "ws://tester-svc.ml.svc.cluster.local"  # Knative's ingress, port 80
    assert c.autoscaling_config.to_dict() == {
        "min_replicas": 0, "max_replicas": 10, "metric": "concurrency", "target": 5.0, "window_s": 60,
        "scale_to_zero_pod_retention_period_s": 600, "container_concurrency": 4, "autoscaler_class": KPA_CLASS}
    # it travels with copies, to_dict/from_dict (REST) and the manifest's spec annotation
    assert c.with_overrides(cpus=1).autoscaling_config == c.autoscaling_config
    assert Compute.from_dict(c.to_dict()) == c
    assert "autoscaling=" in repr(c)


@pytest.mark.parametrize("kwargs, says", [
    ({"min_replicas": -1}, "min_replicas must be a whole number >= 0"),
    ({"max_replicas": 2.5}, "max_replicas must be a whole number"),
    ({"min_replicas": 5, "max_replicas": 2}, "min_replicas (5) is above max_replicas (2)"),
    ({"target_concurrency": 0}, "target_concurrency must be a number above 0"),
    ({"target_concurrency": True}, "target_concurrency must be a number"),
    ({"target_concurrency": 5, "metric": "rps"}, "give either target_concurrency, or metric and target"),
    ({"metric": "gpu"}, "metric must be one of concurrency, rps, cpu, memory"),
    ({"metric": "cpu", "autoscaler_class": "kpa"}, "needs autoscaler_class='hpa'"),
    ({"metric": "rps", "autoscaler_class": "hpa"}, "scales on cpu or memory, not 'rps'"),
    ({"metric": "cpu", "min_replicas": 0}, "the HPA cannot scale to zero"),
    ({"metric": "cpu", "window": "60s"}, "window is a setting of Knative's own autoscaler"),
    ({"window": "5s"}, "window must be between 6 s and 3600 s"),
    ({"window": "1.5m"}, None),  # 90 s: fine
    ({"window": "6.5s"}, "must be whole seconds"),
    ({"scale_down_delay": "2h"}, "scale_down_delay must be between 0 s and 3600 s"),
    ({"scale_to_zero_pod_retention_period": "soon"}, "cannot read 'soon' as a duration"),
    ({"target_utilization": 150}, "target_utilization must be a number above 0 and at most 100"),
    ({"autoscaler_class": "keda"}, "autoscaler_class must be 'kpa'"),
    ({"initial_replicas": "1"}, "initial_replicas must be a whole number"),
    ({"container_concurrency": -2}, "container_concurrency must be a whole number >= 0"),
    ({"min_replica": 1}, "unknown setting 'min_replica'; did you mean 'min_replicas'?"),
    ({"concurrency": 1}, "unknown setting 'concurrency'; did you mean 'target_concurrency'?"),
])
def test_autoscale_validates_every_setting_at_the_call(kwargs, says):
    c = Compute(name="svc", backend="kubernetes", namespace="ml")
    if says is None:
        assert c.autoscale(**kwargs).autoscaling_config.window_s == 90
        return
    with pytest.raises(ComputeSpecError) as err:
        c.autoscale(**kwargs)
    assert says in str(err.value)
    assert c.autoscaling_config is None  # a refused call changes nothing


@pytest.mark.parametrize("params, says", [
    ({"replicas": 3}, "compute has replicas=3; drop replicas"),
    ({"inactivity_ttl": "30m"}, "drop inactivity_ttl and use min_replicas=0"),
    ({"env_vars": {"PORT": "1"}}, "Knative sets PORT"),
])
def test_autoscale_refuses_settings_knative_cannot_honour(params, says):
    with pytest.raises(ComputeSpecError) as err:
        Compute(backend="kubernetes", **params).autoscale(max_replicas=3)
    assert says in str(err.value)
    with pytest.raises(ComputeSpecError) as err:  # the same through a spec sent over REST
        Compute.from_dict({**Compute(backend="kubernetes").to_dict(), **params, "autoscaling": {"max_replicas": 3}})
    assert says in str(err.value)


def test_a_local_compute_refuses_autoscaling_with_what_to_do():
    with pytest.raises(ComputeSpecError) as err:
        Compute(name="svc").autoscale(max_replicas=3)
    assert "needs Knative Serving on a Kubernetes cluster" in str(err.value)
    assert "Compute(backend='kubernetes', ...).autoscale(...)" in str(err.value)
    with pytest.raises(ComputeSpecError, match="backend is 'local'"):
        autoscaled().with_overrides(backend="local")


def test_autoscaling_from_a_dict_is_validated_again():
    with pytest.raises(ComputeSpecError, match="unknown setting 'max'"):
        AutoscalingConfig.from_dict({"max": 3})
    with pytest.raises(ComputeSpecError, match="autoscaling must be a dict"):
        Compute(autoscaling=[1])
    with pytest.raises(ComputeSpecError, match="min_replicas must be a whole number"):
        Compute(autoscaling={"min_replicas": "lots"})


def test_hpa_metric_picks_the_hpa_class_and_annotations_are_knatives():
    config = AutoscalingConfig.from_arguments(metric="cpu", target=800, min_replicas=1, max_replicas=4,
                                              target_utilization=70, scale_down_delay="5m", initial_replicas=2)
    assert config.autoscaler_class == HPA_CLASS
    assert config.annotations() == {
        "autoscaling.knative.dev/class": HPA_CLASS, "autoscaling.knative.dev/initial-scale": "2",
        "autoscaling.knative.dev/max-scale": "4", "autoscaling.knative.dev/metric": "cpu",
        "autoscaling.knative.dev/min-scale": "1", "autoscaling.knative.dev/scale-down-delay": "300s",
        "autoscaling.knative.dev/target": "800", "autoscaling.knative.dev/target-utilization-percentage": "70"}


# ---------------------------------------------------------------------- the Knative Service

def test_knative_service_passes_the_crd_schema_and_keeps_the_deployments_pod(knative_schema):
    c = autoscaled(cpus="1", memory="2Gi", gpus=1, gpu_type="L4", working_dir="/app", queue="team-a",
                   secrets=["hf-token", Secret(name="aws", mount_path="/secrets/aws")],
                   volumes=[Volume(name="data", size="10Gi", mount_path="/data")],
                   env_vars={"MODE": "serve"}, tolerations=[{"key": "spot", "operator": "Exists"}],
                   priority_class_name="high", service_account_name="runner")
    service = build_knative_service(c, source_files={"pod_kernel/x.py": "x = 1\n"}, install_env=INSTALL_ENV)
    assert schema_errors(knative_schema, service) == []
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    assert service["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    assert Compute.from_dict(json.loads(service["metadata"]["annotations"][SPEC_ANNOTATION])) == c

    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/max-scale"] == "10"
    assert annotations["autoscaling.knative.dev/target"] == "5"
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    assert annotations["serving.knative.dev/progress-deadline"] == "900s"  # launch_timeout: a slow first install
    # the Deployment's pod, changed only where Knative's webhook insists
    pod = copy.deepcopy(build_deployment(c, source_files={"pod_kernel/x.py": "x = 1\n"},
                                         install_env=INSTALL_ENV)["spec"]["template"])
    container = pod["spec"]["containers"][0]
    container["ports"] = [{"name": "http1", "containerPort": POD_KERNEL_PORT, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe"):
        del container[probe]["httpGet"]["port"]
    pod["spec"]["timeoutSeconds"] = 600
    knative_only = {k for k in annotations if k.startswith(("autoscaling.knative.dev/", "serving.knative.dev/"))}
    assert {k: v for k, v in annotations.items() if k not in knative_only} == pod["metadata"]["annotations"]
    assert template["spec"] == pod["spec"]
    assert template["metadata"]["labels"] == pod["metadata"]["labels"]
    assert required_feature_flags(service) == [
        "kubernetes.podspec-affinity", "kubernetes.podspec-emptydir", "kubernetes.podspec-persistent-volume-claim",
        "kubernetes.podspec-priorityclassname", "kubernetes.podspec-securitycontext",
        "kubernetes.podspec-tolerations"]


def test_the_schema_check_refuses_what_the_api_server_would(knative_schema):
    service = build_knative_service(autoscaled(), install_env=INSTALL_ENV)
    deployment_like = copy.deepcopy(service)
    deployment_like["spec"]["replicas"] = 3  # a Deployment field: Knative's CRD has no such thing
    assert any("replicas" in e for e in schema_errors(knative_schema, deployment_like))
    bad_probe = copy.deepcopy(service)
    bad_probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 1.5
    assert schema_errors(knative_schema, bad_probe)


def test_knative_objects_replace_the_deployment_and_our_service(knative_schema):
    c = autoscaled(volumes=[Volume(name="data", size="1Gi", mount_path="/data")])
    c_with_concurrency = autoscaled().autoscale(max_replicas=2, container_concurrency=1)
    objects = knative_objects(c, "tok", {"pod_kernel/x.py": "x = 1\n"}, install_env=INSTALL_ENV)
    assert [(o["apiVersion"], o["kind"]) for o in objects] == [
        ("v1", "Secret"), ("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim"), ("serving.knative.dev/v1", "Service")]
    assert schema_errors(knative_schema, objects[-1]) == []
    one = build_knative_service(c_with_concurrency, install_env=INSTALL_ENV)
    assert one["spec"]["template"]["spec"]["containerConcurrency"] == 1
    assert schema_errors(knative_schema, one) == []
    with pytest.raises(ComputeSpecError, match="is not autoscaled"):
        build_knative_service(Compute(backend="kubernetes", namespace="ml"))


def test_a_deployments_compute_is_not_autoscaled():
    c = Compute(name="svc", backend="kubernetes", namespace="ml")
    assert compute_from_deployment(build_deployment(c, install_env={})).deployment_mode == "deployment"


# ---------------------------------------------------------------------- rsync

def _tree(root: Path) -> None:
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a.py").write_text("A = 1\n")
    (root / "src" / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 40)  # 10 KiB: several pieces
    (root / "src" / "skip.pyc").write_bytes(b"\0")
    (root / "notes.txt").write_text("hello\n")


def _pod_files(pod: Path) -> dict[str, bytes]:
    return {p.relative_to(pod).as_posix(): p.read_bytes() for p in sorted(pod.rglob("*")) if p.is_file()}


def test_rsync_sends_only_changes_with_progress_and_keeps_deleted_files(tmp_path, monkeypatch, cleanup_connections):
    import kt_jupyter.rsync as rsync_mod

    monkeypatch.setattr(rsync_mod, "PIECE_BYTES", 4096)
    here, pod = tmp_path / "here", tmp_path / "pod"
    pod.mkdir()
    _tree(here)
    monkeypatch.chdir(here)
    compute = Compute(name="rs", working_dir=str(pod))  # the pod kernel's working directory
    seen = []
    first = compute.rsync(["src", "notes.txt"], exclude=["*.pyc"], progress=lambda *p: seen.append(p))
    assert first.dest == str(pod) and first.unchanged == 0
    assert sorted(first.sent) == ["notes.txt", "src/a.py", "src/sub/blob.bin"]
    assert first.bytes_sent == 10240 + 6 + 6
    assert _pod_files(pod) == {"notes.txt": b"hello\n", "src/a.py": b"A = 1\n",
                               "src/sub/blob.bin": bytes(range(256)) * 40}
    assert seen[-1] == (10252, 10252, 3, 3) and len(seen) >= 3  # pieces of 4 KiB: progress along the way
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)

    again = compute.rsync(["src", "notes.txt"], exclude=["*.pyc"], progress=False)
    assert (again.sent, again.bytes_sent, again.unchanged) == ([], 0, 3)

    (here / "src" / "a.py").write_text("A = 2  # changed\n")
    (here / "src" / "new.py").write_text("NEW = 1\n")
    (here / "src" / "sub" / "blob.bin").unlink()
    third = compute.rsync(["src", "notes.txt"], exclude=["*.pyc"], progress=False)
    assert sorted(third.sent) == ["src/a.py", "src/new.py"] and third.unchanged == 1 and third.deleted == []
    assert (pod / "src" / "sub" / "blob.bin").exists()  # plain rsync keeps what was deleted here
    assert compute.rsync("src", delete=True, exclude=["*.pyc"], progress=False).deleted == ["src/sub/blob.bin"]
    assert (pod / "notes.txt").exists()  # outside the synced directory: untouched by delete

    # contents of a directory ("src/"), into a dest under the working directory
    into = compute.rsync("src/", dest="lib", exclude=["*.pyc"], progress=False)
    assert into.dest == str(pod / "lib") and sorted(into.sent) == ["a.py", "new.py"]
    assert (pod / "lib" / "a.py").read_text() == "A = 2  # changed\n"


def test_rsync_on_a_json_only_compute_sends_bytes_as_text(tmp_path, monkeypatch, cleanup_connections, capsys):
    here, pod = tmp_path / "here", tmp_path / "pod"
    pod.mkdir()
    _tree(here)
    monkeypatch.chdir(here)
    compute = Compute(name="rsj", working_dir=str(pod), allowed_serialization=["json"])
    result = compute.rsync(here / "src" / "sub")
    assert result.sent == ["sub/blob.bin"] and (pod / "sub" / "blob.bin").read_bytes() == bytes(range(256)) * 40
    assert capsys.readouterr().err.endswith("rsync: 1/1 files, 0.0/0.0 MB\n")
    with pytest.raises(Exception, match="does not exist here"):
        compute.rsync("missing-dir")


def test_pod_side_rsync_refuses_paths_outside_its_destination(tmp_path, monkeypatch):
    from pod_kernel import rsync as pod_rsync

    monkeypatch.chdir(tmp_path)
    for rel in ("../escape", "/etc/passwd", "a/../../b", "", "x.kt-rsync-part"):
        with pytest.raises(ValueError, match="rsync"):
            pod_rsync.write(None, [[rel, 0, 1, 0o644, b"x"]])
    with pytest.raises(ValueError, match="dest"):
        pod_rsync.need("../up", {})
    (tmp_path / "outside").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="symlink"):
        pod_rsync.write(None, [["link/f", 0, 1, 0o644, b"x"]])
    with pytest.raises(ValueError, match="does not fit"):
        pod_rsync.write(None, [["f", 0, 1, 0o644, b"too long"]])
    assert list((tmp_path / "outside").iterdir()) == []
