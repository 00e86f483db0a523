"""Compute: every seed parameter validated and normalised at construction, with errors that help;
namespace resolution; round trips; Image; delegation to the backend (through a fake backend)."""

from __future__ import annotations

import json
import sys

import pytest

import kt_jupyter.backends as backends_mod
from kt_jupyter import k8s_fields
from kt_jupyter.backends import KernelInfo
from kt_jupyter.compute import DEFAULT_LAUNCH_TIMEOUT_S, Compute
from kt_jupyter.errors import BackendUnavailable, ComputeSpecError, NotFoundError
from kt_jupyter.image import DEFAULT_IMAGE_ID, Image, images
from kt_jupyter.k8s_fields import LoggingConfig, Secret, Volume, dns1123_label, resolve_namespace

SEED_PARAMETERS = (
    "cpus", "memory", "disk_size", "gpus", "gpu_type", "gpu_memory", "shared_memory_limit", "namespace", "labels",
    "annotations", "node_selector", "tolerations", "service_account_name", "service_template", "image", "env_vars",
    "secrets", "volumes", "working_dir", "queue", "priority_class_name", "replicas", "freeze", "inactivity_ttl",
    "launch_timeout", "image_pull_policy", "gpu_anti_affinity", "logging_config", "kubeconfig_path",
    "allowed_serialization",
)


@pytest.fixture(autouse=True)
def no_real_cluster_config(tmp_path, monkeypatch):
    """Namespace lookups see only files under tmp_path; no KT_* settings leak in from the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KT_HOME", str(tmp_path / "home" / ".kt"))
    for var in ("KUBECONFIG", "KT_NAMESPACE", "KT_LAUNCH_TIMEOUT", "KT_GPU_ANTI_AFFINITY", "KT_POD_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(k8s_fields, "SERVICE_ACCOUNT_NAMESPACE_PATH", tmp_path / "no-serviceaccount")
    return tmp_path


def spec_error(**kw) -> str:
    with pytest.raises(ComputeSpecError) as err:
        Compute(**kw)
    return str(err.value)


# ---------------------------------------------------------------------- parameters and defaults

def test_every_seed_parameter_is_a_constructor_parameter():
    names = Compute.parameter_names()
    assert names[:2] == ("name", "backend")
    assert set(SEED_PARAMETERS) <= set(names)
    assert set(names) - set(SEED_PARAMETERS) == {"name", "backend", "autoscaling", "distributed"}  # autoscale(), distribute()
    assert len(names) == len(SEED_PARAMETERS) + 4


def test_defaults():
    c = Compute()
    assert (c.name, c.backend) == ("default", "local")
    for attr in ("cpus", "memory", "disk_size", "gpus", "gpu_type", "gpu_memory", "shared_memory_limit",
                 "service_account_name", "working_dir", "queue", "priority_class_name", "image_pull_policy",
                 "kubeconfig_path", "inactivity_ttl", "cpu_cores", "memory_bytes"):
        assert getattr(c, attr) is None, attr
    assert c.gpu_count == 0 and c.replicas == 1 and c.freeze is False and c.gpu_anti_affinity is False
    assert c.labels == c.annotations == c.node_selector == c.env_vars == c.service_template == {}
    assert c.tolerations == c.secrets == c.volumes == []
    assert c.launch_timeout == c.launch_timeout_s == DEFAULT_LAUNCH_TIMEOUT_S == 900.0
    assert c.allowed_serialization == ["json", "pickle"]
    assert c.image.image_id == DEFAULT_IMAGE_ID == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert c.logging_config == LoggingConfig()
    assert c.resources == {}
    assert c.deployment_mode == "deployment"


def test_resources_normalised():
    c = Compute(cpus="0.5", memory="4096Mi", disk_size="10Gi", gpus="2", gpu_type="A100", shared_memory_limit="1Gi")
    assert (c.cpus, c.cpu_cores) == ("500m", 0.5)
    assert (c.memory, c.memory_bytes) == ("4Gi", 4 * 2**30)
    assert (c.disk_size, c.disk_bytes) == ("10Gi", 10 * 2**30)
    assert (c.gpus, c.gpu_count, c.gpu_type) == ("2", 2, "A100")
    assert (c.shared_memory_limit, c.shm_bytes) == ("1Gi", 2**30)
    assert c.resources == {
        "requests": {"cpu": "500m", "memory": "4Gi", "ephemeral-storage": "10Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "4Gi", "ephemeral-storage": "10Gi", "nvidia.com/gpu": "2"},
    }
    assert Compute(cpus=2).resources == {"requests": {"cpu": "2"}}
    assert Compute(cpus="500m") == Compute(cpus="0.5") == Compute(cpus=0.5)


def test_gpus_zero_means_none():
    assert Compute(gpus=0).gpus is None and Compute(gpus=0).gpu_count == 0
    assert Compute(gpus=0) == Compute()


def test_gpu_type_and_gpu_memory_imply_one_gpu():
    assert Compute(gpu_type="L4").gpu_count == 1
    c = Compute(gpu_memory="4Gi", cpus="1")
    assert (c.gpu_count, c.gpu_memory, c.gpu_memory_bytes) == (1, "4Gi", 4 * 2**30)
    assert "nvidia.com/gpu" not in c.resources.get("limits", {})  # KAI shares the GPU instead


@pytest.mark.parametrize("kw, needle", [
    ({"cpus": "2Gi"}, "cpus: unknown unit 'Gi' in '2Gi'"),
    ({"memory": "4GB"}, "memory: unknown unit 'GB' in '4GB'; use Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal), "
                        "e.g. '4G'"),
    ({"memory": "512m"}, "did you mean '512Mi'"),
    ({"disk_size": "big"}, "disk_size: cannot read 'big' as a quantity; write it like '4Gi'"),
    ({"gpu_memory": "x"}, "gpu_memory: cannot read 'x'"),
    ({"shared_memory_limit": "1.5q"}, "shared_memory_limit: unknown unit 'q'"),
    ({"gpus": "0.5"}, "GPUs are requested whole, e.g. 1; to share one GPU, set gpu_memory"),
    ({"gpus": 0, "gpu_type": "A100"}, "gpu_type asks for a GPU but gpus=0; drop gpu_type or set gpus=1"),
    ({"gpus": 2, "gpu_memory": "4Gi"}, "gpu_memory shares a single GPU, but gpus=2"),
    ({"gpu_type": ""}, "gpu_type must name a GPU product like 'A100'"),
    ({"gpu_type": "A100 80GB"}, "gpu_type: 'A100 80GB' is not a valid label value"),
    ({"memory": "4Gi", "shared_memory_limit": "8Gi"},
     "shared_memory_limit (8Gi) is larger than memory (4Gi); /dev/shm counts against the memory limit"),
    ({"gpu_type": "A100", "node_selector": {"nvidia.com/gpu.product": "L4"}},
     "gpu_type='A100' and node_selector['nvidia.com/gpu.product']='L4' contradict each other"),
])
def test_resource_errors(kw, needle):
    assert needle in spec_error(**kw)


# ---------------------------------------------------------------------- name, backend, service name

@pytest.mark.parametrize("name", ["train", "my_train", "Train.v2", "a", "x" * 63])
def test_valid_names(name):
    assert Compute(name=name).name == name


@pytest.mark.parametrize("name", ["", "-x", "x-", "a b", "a/b", "..", "x" * 64, 3])
def test_invalid_names(name):
    msg = spec_error(name=name)
    assert "name" in msg and repr(name) in msg and "'train'" in msg


def test_backend_must_be_known():
    assert spec_error(backend="docker") == "backend must be one of 'local', 'kubernetes'; got 'docker'"


@pytest.mark.parametrize("user, name, service", [
    ("tester", "default", "tester-default"),
    ("Alice.Smith", "Train_v2", "alice-smith-train-v2"),
    ("bob@corp.com", "x", "bob-corp-com-x"),
    ("1user", "a", "kt-1user-a"),
    ("u", "n" * 63, "u-" + "n" * 61),
    ("__", "weird", "weird"),
])
def test_service_name_is_dns1123(monkeypatch, user, name, service):
    monkeypatch.setenv("KT_USERNAME", user)
    assert Compute(name=name).service_name == service


def test_service_name_falls_back_to_login_name(monkeypatch):
    monkeypatch.delenv("KT_USERNAME", raising=False)
    monkeypatch.setattr("getpass.getuser", lambda: "Jane Doe")
    assert Compute(name="nb").service_name == "jane-doe-nb"


def test_dns1123_label_cleaning():
    assert dns1123_label("A--B__C") == "a-b-c"
    assert dns1123_label("") == "kt"
    assert dns1123_label("9lives") == "kt-9lives"
    assert len(dns1123_label("a" * 100)) == 63
    assert not dns1123_label("a" * 62 + "-b").endswith("-")


def test_endpoint(monkeypatch):
    assert Compute().endpoint is None
    c = Compute(backend="kubernetes", name="train", namespace="ml")
    assert c.endpoint == "ws://tester-train.ml.svc.cluster.local:32300"


# ---------------------------------------------------------------------- kubernetes settings

def test_labels_annotations_node_selector_normalised_and_sorted():
    c = Compute(labels={"team": "ml", "example.com/proj": "llm", "n": 3, "b": True},
                annotations={"prometheus.io/scrape": "true", "note": "any text: at all", "k": 1},
                node_selector={"topology.kubernetes.io/zone": "us-west-2a", "node-pool": "gpu"})
    assert list(c.labels) == sorted(c.labels) and c.labels["n"] == "3" and c.labels["b"] == "true"
    assert c.annotations == {"k": "1", "note": "any text: at all", "prometheus.io/scrape": "true"}
    assert c.node_selector == {"node-pool": "gpu", "topology.kubernetes.io/zone": "us-west-2a"}
    assert Compute(labels="team=ml, env=dev").labels == {"env": "dev", "team": "ml"}


@pytest.mark.parametrize("kw, needle", [
    ({"labels": {"kt.dev/compute": "x"}}, "labels: 'kt.dev/compute' is set by kt_jupyter itself"),
    ({"labels": {"app.kubernetes.io/managed-by": "me"}}, "is set by kt_jupyter itself"),
    ({"labels": {"bad key": "x"}}, "labels: 'bad key' is not a valid key"),
    ({"labels": {"Bad_Prefix/x": "y"}}, "is not a valid key"),
    ({"labels": {"team": "ML research"}}, "labels['team']: 'ML research' is not a valid label value"),
    ({"labels": {"team": "x" * 64}}, "is not a valid label value"),
    ({"labels": ["team"]}, "labels must be a dict like {'team': 'ml-research'}"),
    ({"labels": "team"}, "labels must be a dict or 'key=value,key2=value2'; got 'team'"),
    ({"annotations": {"a": {"nested": 1}}}, "annotations['a'] must be a string"),
    ({"annotations": {"": "x"}}, "annotations: '' is not a valid key"),
    ({"node_selector": {"pool": "a b"}}, "node_selector['pool']: 'a b' is not a valid label value"),
    ({"namespace": "ML_Team"}, "namespace 'ML_Team' is not a valid Kubernetes name"),
    ({"namespace": "x" * 64}, "at most 63 lowercase letters"),
    ({"service_account_name": "My SA"}, "service_account_name 'My SA' is not a valid Kubernetes name"),
    ({"priority_class_name": "High_Priority"}, "priority_class_name 'High_Priority' is not a valid Kubernetes name"),
    ({"queue": "batch jobs"}, "queue: 'batch jobs' is not a valid label value"),
    ({"service_template": "spec: {}"}, "service_template must be a dict shaped like a Deployment"),
    ({"service_template": {"spec": {1, 2}}}, "service_template must hold only JSON values"),
])
def test_kubernetes_setting_errors(kw, needle):
    assert needle in spec_error(**kw)


def test_namespace_error_suggests_a_clean_name():
    assert "e.g. 'ml-team'" in spec_error(namespace="ML_Team")


def test_tolerations_normalised():
    c = Compute(tolerations=[
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "value": "ml-workloads", "effect": "NoSchedule"},
        {"operator": "Exists"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "toleration_seconds": 300},
    ])
    assert c.tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml-workloads", "effect": "NoSchedule"},
        {"operator": "Exists"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
    ]


@pytest.mark.parametrize("tolerations, needle", [
    ({"key": "x"}, "tolerations must be a list of dicts like"),
    (["x"], "tolerations[0] must be a dict like"),
    ([{"key": "x", "colour": "red"}], "tolerations[0]: unknown key 'colour'; a toleration has key, operator"),
    ([{"key": "x", "operator": "In"}], "tolerations[0]: operator must be 'Equal' or 'Exists'; got 'In'"),
    ([{"value": "x"}], "tolerations[0]: operator 'Equal' needs a key"),
    ([{"key": "x", "operator": "Exists", "value": "y"}], "operator 'Exists' takes no value"),
    ([{"key": "x", "effect": "NoRun"}], "effect must be one of NoSchedule, PreferNoSchedule, NoExecute; got 'NoRun'"),
    ([{"key": "x", "effect": "NoSchedule", "tolerationSeconds": 5}], "needs effect 'NoExecute'"),
    ([{"key": "x", "effect": "NoExecute", "tolerationSeconds": "5"}], "tolerationSeconds must be whole seconds"),
    ([{"key": "bad key"}], "tolerations[0].key: 'bad key' is not a valid key"),
])
def test_toleration_errors(tolerations, needle):
    assert needle in spec_error(tolerations=tolerations)


def test_service_template_is_copied():
    template = {"spec": {"template": {"spec": {"hostIPC": True}}}}
    c = Compute(service_template=template)
    template["spec"]["template"]["spec"]["hostIPC"] = False
    assert c.service_template == {"spec": {"template": {"spec": {"hostIPC": True}}}}


# ---------------------------------------------------------------------- image, env, secrets, volumes

def test_image_from_name_image_or_dict():
    assert Compute(image="ghcr.io/org/pod:1.0").image == Image(image_id="ghcr.io/org/pod:1.0")
    img = Image(image_id="python:3.12-slim").pip_install(["numpy"])
    c = Compute(image=img)
    assert c.image == img and c.image is not img
    img.pip_install(["pandas"])  # the compute holds its own copy
    assert len(c.image.steps) == 1
    assert Compute(image=img.to_dict()).image == img


@pytest.mark.parametrize("image, needle", [
    ("Python:3.11", "image: 'Python:3.11' is not a valid image reference"),
    ("python 3.11", "is not a valid image reference"),
    ("", "image must be an image name like 'python:3.11-slim'"),
    (42, "image must be an Image (e.g. Image(image_id='python:3.11-slim')) or an image name; got 42"),
    ({"image_id": "python:3.11", "colour": "red"}, "image: unknown key(s) ['colour']"),
])
def test_image_errors(image, needle):
    assert needle in spec_error(image=image)


def test_env_vars():
    c = Compute(env_vars={"OMP_NUM_THREADS": 4, "PATH": "$PATH:/custom/bin", "DEBUG": True})
    assert c.env_vars == {"DEBUG": "true", "OMP_NUM_THREADS": "4", "PATH": "$PATH:/custom/bin"}


@pytest.mark.parametrize("env, needle", [
    ({"1BAD": "x"}, "env_vars: '1BAD' is not a valid environment variable name"),
    ({"A=B": "x"}, "is not a valid environment variable name"),
    ({"A": None}, "env_vars['A'] must be a string; got None"),
    ({"KT_TOKEN": "x"}, "env_vars: KT_TOKEN is set by kt_jupyter itself"),
    (["A=1"], "env_vars must be a dict like {'OMP_NUM_THREADS': '4'}"),
])
def test_env_var_errors(env, needle):
    assert needle in spec_error(env_vars=env)


def test_secrets_forms():
    c = Compute(secrets=["existing-k8s-secret", Secret.from_provider("aws"), Secret.from_provider("huggingface"),
                         {"name": "db", "env_vars": {"DB_PASSWORD": "password"}},
                         Secret.from_name("certs", mount_path="/etc/certs/")])
    assert [s.name for s in c.secrets] == ["existing-k8s-secret", "kt-aws", "kt-huggingface", "db", "certs"]
    # not under /root (0700): the pod runs as uid 1000; the tools find the files through their variables
    assert c.secrets[1].mount_path == "/var/run/secrets/kt/aws" and c.secrets[2].env_vars == {"HF_TOKEN": "token"}
    assert c.secrets[1].file_env() == {"AWS_SHARED_CREDENTIALS_FILE": "/var/run/secrets/kt/aws/credentials",
                                       "AWS_CONFIG_FILE": "/var/run/secrets/kt/aws/config"}
    assert Secret.from_provider("gcp").file_env() == {
        "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/secrets/kt/gcp/application_default_credentials.json"}
    assert Secret.from_provider("azure").file_env() == {"AZURE_CONFIG_DIR": "/var/run/secrets/kt/azure"}
    assert c.secrets[2].file_env() == {} and c.secrets[4].file_env() == {}
    assert c.secrets[4].mount_path == "/etc/certs"
    assert Compute(secrets="a, b").secrets == [Secret("a"), Secret("b")]


@pytest.mark.parametrize("secrets, needle", [
    (["Bad_Name"], "secrets: name 'Bad_Name' is not a valid Kubernetes name"),
    (["a", "a"], "secrets: 'a' is listed twice"),
    ([{"name": "a", "mount_path": "etc"}], "secret 'a' mount_path must be an absolute path like '/etc/creds'"),
    ([{"name": "a", "env_vars": {"X": "bad key!"}}], "must map an environment variable name to a key of the secret"),
    ([{"name": "a", "colour": 1}], "secrets: Secret.__init__() got an unexpected keyword argument 'colour'"),
    ([3], "secrets must be a Secret, a name or a dict; got 3"),
    ({"a": 1}, "secrets must be a list like ['my-secret', Secret.from_provider('aws')]"),
])
def test_secret_errors(secrets, needle):
    assert needle in spec_error(secrets=secrets)


def test_unknown_secret_provider():
    with pytest.raises(ComputeSpecError, match="unknown secret provider 'dropbox'; known: anthropic, aws"):
        Secret.from_provider("dropbox")


def test_volumes_forms():
    c = Compute(volumes=["pvc-name", Volume.from_name("shared-data", mount_path="/data"),
                         Volume(name="scratch", size="50Gi", mount_path="/scratch", storage_class="fast-ssd"),
                         {"name": "shared", "size": "1T", "access_mode": "ReadWriteMany"}])
    assert [(v.name, v.size, v.mount_path) for v in c.volumes] == [
        ("pvc-name", None, "/mnt/pvc-name"), ("shared-data", None, "/data"), ("scratch", "50Gi", "/scratch"),
        ("shared", "1T", "/mnt/shared")]


@pytest.mark.parametrize("kw, needle", [
    ({"volumes": ["Data"]}, "volumes: name 'Data' is not a valid Kubernetes name"),
    ({"volumes": ["dshm"]}, "volume name 'dshm' is reserved by kt_jupyter"),
    ({"volumes": ["kt-src"]}, "is reserved by kt_jupyter"),
    ({"volumes": [{"name": "d", "size": "10GB"}]}, "volume 'd' size: unknown unit 'GB'"),
    ({"volumes": [{"name": "d", "access_mode": "RWO"}]}, "volume 'd' access_mode must be one of ReadWriteOnce"),
    ({"volumes": [{"name": "d", "storage_class": "Fast SSD"}]},
     "volume 'd' storage_class 'Fast SSD' is not a valid Kubernetes name"),
    ({"volumes": ["a", "a"]}, "volumes: 'a' is listed twice"),
    ({"volumes": [Volume("a", mount_path="/d"), Volume("b", mount_path="/d")]}, "mount path '/d' is used twice"),
    ({"volumes": [Volume("a", mount_path="/dev/shm")]}, "mount path '/dev/shm' is used twice (or is /dev/shm"),
    ({"volumes": [Volume("a", mount_path="/c")], "secrets": [Secret("s", mount_path="/c")]}, "'/c' is used twice"),
    ({"working_dir": "app"}, "working_dir must be an absolute path like '/app'; got 'app'"),
])
def test_volume_and_path_errors(kw, needle):
    assert needle in spec_error(**kw)


# ---------------------------------------------------------------------- behaviour settings

def test_behaviour_settings_normalised():
    c = Compute(replicas="3", freeze="yes", inactivity_ttl="1h30m", launch_timeout="15m",
                image_pull_policy="ifnotpresent", gpu_anti_affinity="true", working_dir="/app",
                queue="high-priority", priority_class_name="critical", kubeconfig_path="~/.kube/other",
                allowed_serialization="json", logging_config={"level": "DEBUG", "grace_period": 1})
    assert (c.replicas, c.freeze, c.gpu_anti_affinity) == (3, True, True)
    assert c.inactivity_ttl == c.inactivity_ttl_s == 5400.0 and c.launch_timeout == 900.0
    assert c.image_pull_policy == "IfNotPresent" and c.allowed_serialization == ["json"]
    assert c.logging_config == LoggingConfig(level="debug", grace_period=1.0)
    assert Compute(inactivity_ttl=1).inactivity_ttl_s == 1.0
    assert Compute(allowed_serialization=["pickle", "json", "json"]).allowed_serialization == ["json", "pickle"]


@pytest.mark.parametrize("kw, needle", [
    ({"replicas": 0}, "replicas must be a whole number >= 1, e.g. 1; got 0"),
    ({"replicas": "two"}, "replicas must be a whole number >= 1"),
    ({"replicas": True}, "replicas must be a whole number like 1; got True"),
    ({"freeze": "maybe"}, "freeze must be True or False; got 'maybe'"),
    ({"gpu_anti_affinity": 2}, "gpu_anti_affinity must be True or False; got 2"),
    ({"gpu_anti_affinity": True, "gpus": 1}, "gpu_anti_affinity=True keeps the pod off GPU nodes, but this compute "
                                             "asks for a GPU"),
    ({"inactivity_ttl": "soon"}, "inactivity_ttl: cannot read 'soon' as a duration"),
    ({"launch_timeout": -1}, "launch_timeout must be a positive duration, e.g. '30m'; got -1"),
    ({"image_pull_policy": "Sometimes"},
     "image_pull_policy must be one of Always, IfNotPresent, Never; got 'Sometimes'"),
    ({"logging_config": {"level": "loud"}}, "logging_config.level must be one of debug, info, warning, error"),
    ({"logging_config": {"grace_period": -1}}, "logging_config.grace_period must be seconds >= 0"),
    ({"logging_config": {"stream_logs": "sure"}}, "logging_config.stream_logs must be True or False"),
    ({"logging_config": "verbose"}, "logging_config must be a LoggingConfig, a name or a dict"),
    ({"kubeconfig_path": ""}, "kubeconfig_path must be a file path like '~/.kube/config'"),
    ({"allowed_serialization": ["xml"]}, "allowed_serialization must be a non-empty subset of ['json', 'pickle']"),
    ({"allowed_serialization": []}, "allowed_serialization must be a non-empty subset"),
])
def test_behaviour_errors(kw, needle):
    assert needle in spec_error(**kw)


def test_launch_timeout_from_environment(monkeypatch):
    monkeypatch.setenv("KT_LAUNCH_TIMEOUT", "1800")
    assert Compute().launch_timeout_s == 1800.0
    assert Compute(launch_timeout=60).launch_timeout_s == 60.0  # explicit wins
    monkeypatch.setenv("KT_LAUNCH_TIMEOUT", "20m")
    assert Compute().launch_timeout_s == 1200.0
    monkeypatch.setenv("KT_LAUNCH_TIMEOUT", "forever")
    assert "KT_LAUNCH_TIMEOUT (environment variable): cannot read 'forever' as a duration" in spec_error()


def test_gpu_anti_affinity_from_environment(monkeypatch):
    monkeypatch.setenv("KT_GPU_ANTI_AFFINITY", "true")
    assert Compute().gpu_anti_affinity is True
    assert Compute(gpu_anti_affinity=False).gpu_anti_affinity is False
    assert Compute(gpus=1).gpu_anti_affinity is True  # from the environment: not an error, not applied to GPU pods
    monkeypatch.setenv("KT_GPU_ANTI_AFFINITY", "perhaps")
    assert "KT_GPU_ANTI_AFFINITY (environment variable) must be True or False" in spec_error()


# ---------------------------------------------------------------------- namespace resolution

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: work
contexts:
- name: home
  context: {cluster: c, namespace: home-ns}
- name: work
  context: {cluster: c, namespace: %s}
"""


def test_namespace_resolution_order(tmp_path):
    home = tmp_path / "u"
    sa = _write(tmp_path / "sa" / "namespace", "pod-ns\n")
    env = {"HOME": str(home)}
    assert resolve_namespace(environ=env, service_account_path=sa) == ("pod-ns", str(sa))
    kube = _write(home / ".kube" / "config", KUBECONFIG % "kube-ns")
    assert resolve_namespace(environ=env, service_account_path=sa) == ("kube-ns", str(kube))
    config = _write(home / ".kt" / "config.yaml", "namespace: kt-config-ns\n")
    assert resolve_namespace(environ=env, service_account_path=sa) == ("kt-config-ns", str(config))
    env["KT_NAMESPACE"] = "env-ns"
    assert resolve_namespace(environ=env, service_account_path=sa) == ("env-ns", "KT_NAMESPACE")
    assert resolve_namespace("explicit-ns", environ=env, service_account_path=sa) == ("explicit-ns", "explicit")
    assert resolve_namespace(environ={"HOME": str(tmp_path / "empty")},
                             service_account_path=tmp_path / "none") == ("default", "default")


def test_namespace_kt_home_and_kubeconfig_overrides(tmp_path):
    env = {"HOME": str(tmp_path / "u"), "KT_HOME": str(tmp_path / "kthome")}
    _write(tmp_path / "u" / ".kt" / "config.yaml", "namespace: ignored\n")
    none = tmp_path / "none"
    a = _write(tmp_path / "a.yaml", "apiVersion: v1\nkind: Config\n")  # no current context: the next file decides
    b = _write(tmp_path / "b.yaml", KUBECONFIG % "from-b")
    env["KUBECONFIG"] = f"{a}:{tmp_path / 'missing.yaml'}:{b}"
    assert resolve_namespace(environ=env, service_account_path=none) == ("from-b", str(b))
    c = _write(tmp_path / "c.yaml", KUBECONFIG % "from-c")
    assert resolve_namespace(environ=env, kubeconfig_path=str(c), service_account_path=none)[0] == "from-c"
    _write(tmp_path / "kthome" / "config.yaml", "namespace: kt-home-ns\nother: 1\n")
    assert resolve_namespace(environ=env, service_account_path=none)[0] == "kt-home-ns"


def test_namespace_context_without_namespace_falls_through(tmp_path):
    kube = _write(tmp_path / "k.yaml", "current-context: x\ncontexts:\n- name: x\n  context: {cluster: c}\n")
    assert resolve_namespace(environ={"HOME": str(tmp_path), "KUBECONFIG": str(kube)},
                             service_account_path=tmp_path / "none") == ("default", "default")


@pytest.mark.parametrize("setup, needle", [
    ("env", "KT_NAMESPACE (environment variable) 'Bad_NS' is not a valid Kubernetes name"),
    ("ktconfig", "namespace in {tmp}/u/.kt/config.yaml 'Bad_NS' is not a valid Kubernetes name"),
    ("kubeconfig", "namespace of the current context in {tmp}/u/.kube/config 'Bad_NS' is not a valid"),
    ("yaml", "cannot read {tmp}/u/.kube/config as YAML"),
])
def test_namespace_errors_name_their_source(tmp_path, setup, needle):
    env = {"HOME": str(tmp_path / "u")}
    if setup == "env":
        env["KT_NAMESPACE"] = "Bad_NS"
    elif setup == "ktconfig":
        _write(tmp_path / "u" / ".kt" / "config.yaml", "namespace: Bad_NS\n")
    elif setup == "kubeconfig":
        _write(tmp_path / "u" / ".kube" / "config", KUBECONFIG % "Bad_NS")
    else:
        _write(tmp_path / "u" / ".kube" / "config", "contexts: [unclosed\n")
    with pytest.raises(ComputeSpecError) as err:
        resolve_namespace(environ=env, service_account_path=tmp_path / "none")
    assert needle.format(tmp=tmp_path) in str(err.value)


def test_namespace_property_is_lazy_and_cached(tmp_path, monkeypatch):
    c = Compute()  # nothing is read at construction
    kube = _write(tmp_path / "home" / ".kube" / "config", KUBECONFIG % "lazy-ns")
    assert c.namespace == "lazy-ns"
    kube.write_text(KUBECONFIG % "changed")
    assert c.namespace == "lazy-ns"
    assert Compute().namespace == "changed"
    monkeypatch.setenv("KT_NAMESPACE", "env-ns")
    assert Compute().namespace == "env-ns" and Compute(namespace="mine").namespace == "mine"
    other = _write(tmp_path / "other.yaml", KUBECONFIG % "other-ns")
    monkeypatch.delenv("KT_NAMESPACE")
    assert Compute(kubeconfig_path=str(other)).namespace == "other-ns"


def test_namespace_property_reads_service_account_file(tmp_path, monkeypatch):
    sa = _write(tmp_path / "sa-namespace", "in-cluster\n")
    monkeypatch.setattr(k8s_fields, "SERVICE_ACCOUNT_NAMESPACE_PATH", sa)
    assert Compute().namespace == "in-cluster"


def test_resolved_namespace_is_not_part_of_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("KT_NAMESPACE", "env-ns")
    c = Compute()
    assert c.namespace == "env-ns" and c.to_dict()["namespace"] is None and c == Compute()


# ---------------------------------------------------------------------- copies, round trips, equality

def rich_compute() -> Compute:
    return Compute(
        name="train", backend="kubernetes", cpus="4", memory="32Gi", disk_size="100Gi", gpus=1, gpu_type="A100",
        shared_memory_limit="16Gi", namespace="ml", labels={"team": "ml"}, annotations={"a/b": "c"},
        node_selector={"pool": "gpu"}, tolerations=[{"key": "dedicated", "operator": "Exists"}],
        service_account_name="runner", service_template={"spec": {"template": {"spec": {"hostIPC": True}}}},
        image=Image(image_id="python:3.11-slim").pip_install(["torch"]).run_bash("echo hi").set_env_vars({"A": "1"}),
        env_vars={"B": "2"}, secrets=["s", Secret.from_provider("huggingface")],
        volumes=["data", Volume("scratch", size="50Gi")], working_dir="/app", queue="q",
        priority_class_name="critical", replicas=2, freeze=True, inactivity_ttl="1h", launch_timeout=1800,
        image_pull_policy="Always", logging_config=LoggingConfig(level="debug"), kubeconfig_path="/k",
        allowed_serialization=["json"],
    )


def test_to_dict_is_json_safe_and_round_trips():
    c = rich_compute()
    data = json.loads(json.dumps(c.to_dict()))
    assert set(data) == set(Compute.parameter_names())
    again = Compute.from_dict(data)
    assert again == c and hash(again) == hash(c) and again.to_dict() == c.to_dict()
    assert Compute.from_dict(Compute().to_dict()) == Compute()


def test_from_dict_errors():
    with pytest.raises(ComputeSpecError, match=r"from_dict: unknown Compute parameter 'cpu'; did you mean 'cpus'\?"):
        Compute.from_dict({"cpu": 1})
    with pytest.raises(ComputeSpecError, match="a Compute spec must be a dict; got list"):
        Compute.from_dict([])
    with pytest.raises(ComputeSpecError, match="unknown Compute parameter 'zzz'; known: name, backend, cpus"):
        Compute.from_dict({"zzz": 1})


def test_with_overrides_returns_a_new_validated_compute():
    base = Compute(cpus=1, env_vars={"A": "1"})
    c = base.with_overrides(memory="2Gi", name="other")
    assert (c.cpus, c.memory, c.name, c.env_vars) == ("1", "2Gi", "other", {"A": "1"})
    assert base.memory is None and base.name == "default"
    # %kt config passes strings
    s = Compute().with_overrides(gpus="1", replicas="2", freeze="yes", image="python:3.12-slim", labels="a=b",
                                 allowed_serialization="json", launch_timeout="60", inactivity_ttl="30m")
    assert (s.gpu_count, s.replicas, s.freeze, s.image.image_id) == (1, 2, True, "python:3.12-slim")
    assert (s.labels, s.allowed_serialization, s.launch_timeout_s, s.inactivity_ttl_s) == (
        {"a": "b"}, ["json"], 60.0, 1800.0)
    with pytest.raises(ComputeSpecError, match=r"with_overrides: unknown Compute parameter 'gpu'; did you mean"):
        base.with_overrides(gpu=1)
    with pytest.raises(ComputeSpecError, match="memory: cannot read"):
        base.with_overrides(memory="lots")


def test_compute_is_immutable():
    c = Compute()
    with pytest.raises(AttributeError, match=r"Compute is immutable; use compute.with_overrides\(cpus=...\)"):
        c.cpus = "2"


def test_equality_and_hash():
    assert Compute(memory="4096Mi") == Compute(memory="4Gi")
    assert Compute(labels={"b": "1", "a": "2"}) == Compute(labels={"a": "2", "b": "1"})
    assert Compute(cpus=1) != Compute(cpus=2)
    assert Compute() != "Compute()"
    assert len({Compute(), Compute(), Compute(cpus=1)}) == 2


def test_repr_shows_what_differs_from_the_default():
    assert repr(Compute()) == "Compute(name='default', backend='local')"
    text = repr(Compute(name="t", cpus="0.5", memory="4Gi", image="python:3.12-slim"))
    assert text == ("Compute(name='t', backend='local', cpus='500m', memory='4Gi', "
                    "image=Image(image_id='python:3.12-slim'))")


def test_magic_line():
    assert Compute().magic_line() == "%%kt"
    c = Compute(name="train", backend="kubernetes", cpus=2, memory="16Gi", gpus=1, gpu_type="A100",
                namespace="ml", image="python:3.12-slim", env_vars={"A": "x y"}, launch_timeout=60,
                inactivity_ttl="30m")
    assert c.magic_line() == ("%%kt --name train --backend kubernetes --cpus 2 --memory 16Gi --gpus 1 "
                              "--gpu-type A100 --namespace ml --image python:3.12-slim --env 'A=x y' "
                              "--launch-timeout 60 --inactivity-ttl 1800")


def test_manifest_and_pod_spec_properties():
    c = Compute(name="t", namespace="ml", cpus=1)
    assert c.manifest["kind"] == "Deployment" and c.manifest["metadata"]["name"] == "tester-t"
    assert c.pod_spec["containers"][0]["resources"] == {"requests": {"cpu": "1"}}


# ---------------------------------------------------------------------- from_template

def test_from_template_round_trips_our_deployment():
    from kt_jupyter.manifests import build_deployment

    c = rich_compute()
    assert Compute.from_template({"resource": build_deployment(c)}) == c
    assert Compute.from_template(build_deployment(c)) == c


def test_from_template_takes_namespace_from_the_object(tmp_path):
    from kt_jupyter.manifests import build_deployment

    manifest = build_deployment(Compute(name="t", namespace="a"))
    manifest["metadata"]["namespace"] = "b"
    assert Compute.from_template({"resource": manifest}).namespace == "b"


def test_from_template_reads_a_foreign_deployment():
    manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "legacy", "namespace": "prod", "labels": {"team": "ml"}},
        "spec": {"replicas": 2, "template": {"spec": {
            "containers": [{"name": "main", "image": "my-registry/img:v1", "imagePullPolicy": "Always",
                            "workingDir": "/srv",
                            "env": [{"name": "A", "value": "1"}, {"name": "S", "valueFrom": {"secretKeyRef": {}}}],
                            "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                                          "limits": {"nvidia.com/gpu": "1"}}}],
            "nodeSelector": {"nvidia.com/gpu.product": "L4", "pool": "a"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "x", "operator": "Exists"}],
            "serviceAccountName": "sa", "priorityClassName": "high"}}},
    }
    c = Compute.from_template({"resource": manifest})
    assert (c.name, c.backend, c.namespace, c.cpus, c.memory, c.gpus, c.gpu_type) == (
        "legacy", "kubernetes", "prod", "2", "8Gi", "1", "L4")
    assert (c.node_selector, c.tolerations, c.labels) == ({"pool": "a"}, [{"key": "x", "operator": "Exists"}],
                                                          {"team": "ml"})
    assert (c.image.image_id, c.image_pull_policy, c.working_dir, c.env_vars, c.replicas) == (
        "my-registry/img:v1", "Always", "/srv", {"A": "1"}, 2)
    assert (c.service_account_name, c.priority_class_name) == ("sa", "high")


@pytest.mark.parametrize("info, needle", [
    ({"resource": {"kind": "Service"}},
     "from_template expects {'resource': <Deployment manifest dict>}; got 'Service'"),
    ({"resource": "yaml text"}, "got 'str'"),
    ("nope", "got 'NoneType'"),
    ({"resource": {"kind": "Deployment", "metadata": {"annotations": {"kt.dev/spec": "{bad"}}}},
     "the kt.dev/spec annotation of None is not JSON"),
])
def test_from_template_errors(info, needle):
    with pytest.raises(ComputeSpecError) as err:
        Compute.from_template(info)
    assert needle in str(err.value)


# ---------------------------------------------------------------------- Image

def test_image_builder_records_steps_as_data():
    img = (Image(image_id="python:3.11-slim").pip_install(["numpy>=2", " pandas "]).run_bash("apt-get update")
           .set_env_vars({"HF_HOME": "/data/hf"}).pip_install("torch", force=True).set_env_vars({"HF_HOME": "/x"}))
    assert [s.kind for s in img.steps] == ["pip_install", "run_bash", "set_env_vars", "pip_install", "set_env_vars"]
    assert img.steps[0].args == (("numpy>=2", "pandas"), False) and img.steps[3].args == (("torch",), True)
    assert img.env_vars == {"HF_HOME": "/x"}
    assert Image.from_dict(json.loads(json.dumps(img.to_dict()))) == img
    assert repr(img).startswith("Image(image_id='python:3.11-slim').pip_install(...).run_bash(...)")


def test_image_setup_hash_is_stable_and_tracks_steps():
    def make() -> Image:
        return Image(image_id="python:3.11-slim").pip_install(["numpy"]).run_bash("echo hi")

    assert make().setup_hash == make().setup_hash and len(make().setup_hash) == 16
    assert make().setup_hash != make().pip_install(["x"]).setup_hash
    assert make().setup_hash != Image().pip_install(["numpy"]).run_bash("echo hi", force=True).setup_hash
    assert make().setup_hash == make().from_docker("python:3.12-slim").setup_hash  # keyed by the steps
    assert Image().setup_hash != Image(install_cmd="uv pip install").setup_hash


def test_image_defaults_and_ready_made_images():
    assert Image().image_id == DEFAULT_IMAGE_ID and Image().steps == ()
    assert Image().from_docker("nvcr.io/nvidia/pytorch:24.08-py3").image_id == "nvcr.io/nvidia/pytorch:24.08-py3"
    assert images.Python312().image_id == "python:3.12-slim"
    for factory in (images.Debian, images.Python311, images.Python313, images.pytorch):
        assert Compute(image=factory()).image == factory()
    digest = "ghcr.io/org/img@sha256:" + "a" * 64
    assert Image(image_id=digest).image_id == digest
    assert Image(image_id="localhost:5001/kpu-torch-server:latest").image_id.endswith(":latest")


@pytest.mark.parametrize("build, needle", [
    (lambda: Image().pip_install([]), "pip_install expects a list of requirements like ['numpy>=2']"),
    (lambda: Image().pip_install(["ok", ""]), "pip_install: '' is not a requirement"),
    (lambda: Image().pip_install(["a\nb"]), "is not a requirement; write one per item"),
    (lambda: Image().run_bash(""), "run_bash expects a shell command like 'apt-get install -y git'"),
    (lambda: Image().set_env_vars({}), "set_env_vars expects a non-empty dict"),
    (lambda: Image().set_env_vars({"9": "x"}), "set_env_vars: '9' is not a valid environment variable name"),
    (lambda: Image().from_docker("UPPER/case"), "image: 'UPPER/case' is not a valid image reference"),
    (lambda: Image().from_docker("repo:tag:tag"), "is not a valid image reference"),
    (lambda: Image(python_path=""), "image python_path must be a path like '/usr/bin/python3'"),
    (lambda: Image(install_cmd=" "), "image install_cmd must be a command like 'uv pip install'"),
    (lambda: Image.from_dict({"steps": [{"kind": "docker_run", "args": []}]}),
     "image: unknown setup step 'docker_run'; known: pip_install, run_bash, set_env_vars"),
])
def test_image_builder_errors(build, needle):
    with pytest.raises(ComputeSpecError) as err:
        build()
    assert needle in str(err.value)


# ---------------------------------------------------------------------- cluster state through the backend

class FakeBackend:
    """Stands in for a backend: records calls, answers from a table."""

    name = "fake"

    def __init__(self, phase: str | None) -> None:
        self.phase = phase
        self.calls: list[tuple] = []

    def status(self, name: str) -> KernelInfo:
        self.calls.append(("status", name))
        if self.phase is None:
            raise NotFoundError(f"no compute {name!r}")
        return KernelInfo(name=name, backend="kubernetes", phase=self.phase)

    def logs(self, name: str, tail: int | None = 100) -> str:
        self.calls.append(("logs", name, tail))
        return "line\n"

    def follow_logs(self, name: str):
        yield "more\n"

    def pods(self, name: str) -> list[dict]:
        return [{"metadata": {"name": f"{name}-abc"}}]


def test_cluster_methods_delegate_to_the_backend(monkeypatch):
    fake = FakeBackend("ready")
    asked = []
    monkeypatch.setattr(backends_mod, "get_backend", lambda name: asked.append(name) or fake)
    c = Compute(name="t", backend="kubernetes")
    assert c.is_up() is True
    assert c.logs(tail=5) == "line\n" and list(c.logs(follow=True)) == ["more\n"]
    assert c.pods() == [{"metadata": {"name": "t-abc"}}]
    assert asked == ["kubernetes"] * 4 and ("logs", "t", 5) in fake.calls
    fake.phase = "launching"
    assert c.is_up() is False
    fake.phase = None
    assert c.is_up() is False


def test_cluster_methods_say_what_a_backend_cannot_do(monkeypatch):
    class Minimal:
        def logs(self, name, tail=100):
            return ""

    monkeypatch.setattr(backends_mod, "get_backend", lambda name: Minimal())
    with pytest.raises(BackendUnavailable, match="the local backend has no pods; use backend='kubernetes'"):
        Compute().pods()
    with pytest.raises(BackendUnavailable, match="the local backend cannot follow logs"):
        Compute().logs(follow=True)


def test_to_dict_spells_a_plain_image_as_its_name():
    assert Compute(image="python:3.12-slim").to_dict()["image"] == "python:3.12-slim"
    assert Compute().to_dict()["image"] == DEFAULT_IMAGE_ID
    assert isinstance(Compute(image=Image().pip_install(["x"])).to_dict()["image"], dict)


@pytest.mark.parametrize("check", [k8s_fields.check_dns_label, k8s_fields.check_label_value,
                                   k8s_fields.check_dns_subdomain])
def test_a_trailing_newline_is_not_part_of_a_valid_name(check):
    """``re.match`` with ``$`` accepts ``"x\\n"``; the checks match the whole value."""
    with pytest.raises(ComputeSpecError):
        check("ml-research\n", "param")
    assert check("ml-research", "param") == "ml-research"
