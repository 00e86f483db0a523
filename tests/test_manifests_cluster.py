"""What a real GPU cluster needs from our manifests: GPU types as clusters label nodes, Kueue/KAI
queues, requests and /dev/shm for GPU pods, quiet /healthz probes, Pod Security ``restricted``
(checked by the fake's admission, which words violations as the real API server does), a
NetworkPolicy, and the notebook's package index and proxy settings."""

from __future__ import annotations

import base64
import json

import pytest
from k8s_fake.admission import forbidden_message, pod_security_violations
from kubernetes_validate.utils import validate
from test_manifests import (K8S_VERSION, MATRIX, SOURCE, TOKEN, container_of, deployment_of, k8s,  # noqa: F401
                            no_real_cluster_config)

from kt_jupyter.compute import Compute
from kt_jupyter.errors import ComputeSpecError
from kt_jupyter.gpus import (GFD_PRODUCT_LABEL, GKE_ACCELERATOR_LABEL, GPU_MODELS, KARPENTER_GPU_MEMORY_LABEL,
                             KARPENTER_GPU_NAME_LABEL)
from kt_jupyter.image import Image
from kt_jupyter.manifests import (SPEC_ANNOTATION, build_all, build_deployment, build_secret,
                                  compute_from_deployment, network_policy)
from kt_jupyter.pod_security import NotebookPeer, notebook_peer


def terms_of(compute: Compute) -> list[dict]:
    pod = build_deployment(compute)["spec"]["template"]["spec"]
    return pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


def matches(labels: dict[str, str], terms: list[dict]) -> bool:
    """The scheduler's reading of required nodeSelectorTerms: any term, all of its expressions."""
    def one(e: dict) -> bool:
        present, value = e["key"] in labels, labels.get(e["key"])
        return {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
                "Exists": present, "DoesNotExist": not present}[e["operator"]]
    return any(all(one(e) for e in t["matchExpressions"]) for t in terms)


# ---------------------------------------------------------------------- GPU types

#: Labels real GPU nodes carry: GPU Feature Discovery, GKE, Karpenter on EKS.
NODES = {
    "gfd-a100-80": {GFD_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.present": "true"},
    "gfd-a100-40-pcie": {GFD_PRODUCT_LABEL: "NVIDIA-A100-PCIE-40GB", "nvidia.com/gpu.present": "true"},
    "gke-a100": {GKE_ACCELERATOR_LABEL: "nvidia-tesla-a100"},
    "gke-a100-80": {GKE_ACCELERATOR_LABEL: "nvidia-a100-80gb"},
    "karpenter-p4de": {KARPENTER_GPU_NAME_LABEL: "a100", KARPENTER_GPU_MEMORY_LABEL: "81920"},
    "gfd-h100": {GFD_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.present": "true"},
    "gke-h100": {GKE_ACCELERATOR_LABEL: "nvidia-h100-80gb"},
    "gfd-t4": {GFD_PRODUCT_LABEL: "Tesla-T4", "nvidia.com/gpu.present": "true"},
    "karpenter-g4dn": {KARPENTER_GPU_NAME_LABEL: "t4"},
    "gke-l4": {GKE_ACCELERATOR_LABEL: "nvidia-l4"},
    "cpu": {"kubernetes.io/hostname": "cpu-1"},
}


@pytest.mark.parametrize("gpu_type, nodes", [
    ("A100", {"gfd-a100-80", "gfd-a100-40-pcie", "gke-a100", "gke-a100-80", "karpenter-p4de"}),
    ("a100-80gb", {"gfd-a100-80", "gke-a100-80", "karpenter-p4de"}),
    ("h100", {"gfd-h100", "gke-h100"}),
    ("T4", {"gfd-t4", "karpenter-g4dn"}),
    ("L4", {"gke-l4"}),
    ("Tesla-T4", {"gfd-t4"}),  # one known label value: that label only
    ("nvidia.com/gpu.product: NVIDIA-A100-PCIE-40GB", {"gfd-a100-40-pcie"}),
    ("karpenter.k8s.aws/instance-gpu-name=t4", {"karpenter-g4dn"}),
])
def test_gpu_type_schedules_on_the_nodes_that_have_it(gpu_type, nodes):
    compute = k8s(gpu_type=gpu_type)
    assert {name for name, labels in NODES.items() if matches(labels, terms_of(compute))} == nodes
    assert "nodeSelector" not in build_deployment(compute)["spec"]["template"]["spec"]
    assert validate(build_deployment(compute), K8S_VERSION, strict=True)


def test_gpu_type_is_normalised_and_round_trips():
    assert [k8s(gpu_type=t).gpu_type for t in ("a100", " H100 ", "a100-80GB", "nvidia.com/gpu.product : X-1")] == \
        ["A100", "H100", "A100-80GB", "nvidia.com/gpu.product=X-1"]
    for gpu_type in ("A100", "Tesla-T4", "cloud.google.com/gke-accelerator=nvidia-l4", "A100-40GB"):
        dep = build_deployment(k8s(gpu_type=gpu_type, cpus=1, memory="4Gi"))
        del dep["metadata"]["annotations"][SPEC_ANNOTATION]  # read it back from the fields
        assert compute_from_deployment(dep).gpu_type in (k8s(gpu_type=gpu_type).gpu_type, "nvidia-l4")


@pytest.mark.parametrize("kw, needle", [
    ({"gpu_type": "A1000"}, "gpu_type 'A1000' is not a GPU kt_jupyter knows (T4, L4, L40S, A10G, A10, P4, P100, "
                            "V100, A100, A100-40GB, A100-80GB, H100, H200, B200); name your nodes' label instead, "
                            "e.g. gpu_type='nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB'"),
    ({"gpu_type": "nvidia.com/gpu.product:"}, "names the label 'nvidia.com/gpu.product' but no value"),
    ({"gpu_type": "bad key!: x"}, "gpu_type: 'bad key!' is not a valid key"),
    ({"gpu_type": "A100", "node_selector": {GKE_ACCELERATOR_LABEL: "nvidia-l4"}},
     "gpu_type='A100' and node_selector['cloud.google.com/gke-accelerator']='nvidia-l4' contradict each other"),
])
def test_gpu_type_errors(kw, needle):
    with pytest.raises(ComputeSpecError) as err:
        k8s(**kw)
    assert needle in str(err.value)


def test_a_node_selector_may_narrow_a_gpu_type():
    assert k8s(gpu_type="A100", node_selector={GFD_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}).gpu_type == "A100"


def test_gpu_anti_affinity_keeps_off_gpu_nodes_of_every_scheme():
    compute = k8s(cpus=1, gpu_anti_affinity=True)
    assert {name for name, labels in NODES.items() if matches(labels, terms_of(compute))} == {"cpu"}
    assert matches({"nvidia.com/gpu.present": "false"}, terms_of(compute))


def test_every_known_gpu_model_has_a_gfd_product():
    assert all(model.products for model in GPU_MODELS.values())


# ---------------------------------------------------------------------- queues, requests, /dev/shm

def test_queue_is_kueue_by_default_and_kai_when_asked():
    dep = build_deployment(k8s(queue="team-a", gpus=1))
    assert dep["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert dep["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "schedulerName" not in dep["spec"]["template"]["spec"]
    for compute in (k8s(queue="team-a", gpu_memory="4Gi"),
                    k8s(queue="team-a", gpus=1, service_template={"spec": {"template": {"spec": {
                        "schedulerName": "kai-scheduler"}}}})):
        dep = build_deployment(compute)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["kai.scheduler/queue"] == "team-a" and "kueue.x-k8s.io/queue-name" not in json.dumps(dep)
        assert dep["spec"]["template"]["spec"]["schedulerName"] == "kai-scheduler"


def test_gpu_pod_is_not_best_effort_and_has_a_sized_shm():
    dep = build_deployment(k8s(gpus=2))
    assert container_of(dep)["resources"] == {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"},
                                              "limits": {"nvidia.com/gpu": "2"}}
    shm = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "8Gi"}
    given = container_of(build_deployment(k8s(gpus=1, cpus="500m", memory="2Gi")))["resources"]
    assert given["requests"] == {"cpu": "500m", "memory": "2Gi", "nvidia.com/gpu": "1"}


# ---------------------------------------------------------------------- probes

@pytest.mark.parametrize("launch_timeout", [60, 901, "2h"])
def test_startup_probe_covers_the_launch_timeout_and_readiness_is_http(launch_timeout):
    compute = k8s(launch_timeout=launch_timeout)
    c = container_of(build_deployment(compute))
    startup, ready = c["startupProbe"], c["readinessProbe"]
    assert startup["httpGet"] == ready["httpGet"] == {"path": "/healthz", "port": "kernel"}
    covered_s = startup["failureThreshold"] * startup["periodSeconds"]
    assert compute.launch_timeout_s <= covered_s < compute.launch_timeout_s + startup["periodSeconds"]
    assert ready["periodSeconds"] >= 5 and "livenessProbe" not in c


# ---------------------------------------------------------------------- Pod Security

@pytest.mark.parametrize("case", [c for c in MATRIX if c != "service-template"])
def test_every_pod_is_admitted_under_pod_security_restricted(case):
    dep = deployment_of(build_all(k8s(**MATRIX[case]), TOKEN, SOURCE))
    assert pod_security_violations(dep["spec"]["template"], "restricted") == []


def test_a_service_template_that_breaks_restricted_is_named_as_the_api_server_would():
    dep = build_deployment(k8s(**MATRIX["service-template"]))
    template = dep["spec"]["template"]
    assert pod_security_violations(template, "baseline") == ["host namespaces (hostIPC=true)"]
    assert pod_security_violations(template, "restricted") == [
        "host namespaces (hostIPC=true)",
        'allowPrivilegeEscalation != false (container "sidecar" must set securityContext.allowPrivilegeEscalation=false)',
        'unrestricted capabilities (container "sidecar" must set securityContext.capabilities.drop=["ALL"])']


def test_the_pod_before_hardening_is_rejected_with_the_real_message():
    template = build_deployment(k8s())["spec"]["template"]
    del template["spec"]["securityContext"], template["spec"]["containers"][0]["securityContext"]
    violations = pod_security_violations(template)
    assert forbidden_message("tester-t-5d8f-x", violations) == (
        'pods "tester-t-5d8f-x" is forbidden: violates PodSecurity "restricted:latest": '
        'allowPrivilegeEscalation != false (container "pod-kernel" must set '
        'securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "pod-kernel" must '
        'set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or container "pod-kernel" must '
        'set securityContext.runAsNonRoot=true), seccompProfile (pod or container "pod-kernel" must set '
        'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    assert pod_security_violations(template, "baseline") == []


def test_a_deliberately_bad_pod_lists_every_violation():
    bad = {"spec": {
        "hostNetwork": True, "hostPID": True,
        "securityContext": {"runAsNonRoot": False, "runAsUser": 0, "seccompProfile": {"type": "Unconfined"}},
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}, {"name": "ok", "emptyDir": {}},
                    {"name": "nfs", "nfs": {"server": "x", "path": "/"}}],
        "initContainers": [{"name": "init", "securityContext": {"privileged": True, "runAsUser": 0}}],
        "containers": [
            {"name": "main", "ports": [{"containerPort": 80, "hostPort": 80}],
             "securityContext": {"allowPrivilegeEscalation": False,
                                 "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN", "NET_BIND_SERVICE"]}}},
            {"name": "side", "securityContext": {"capabilities": {"add": ["CHOWN"]}}}],
    }}
    assert pod_security_violations(bad, "baseline") == [
        'non-default capabilities (container "main" must not include "SYS_ADMIN" in securityContext.capabilities.add)',
        "host namespaces (hostNetwork=true, hostPID=true)",
        'hostPath volumes (volume "root")',
        'hostPort (container "main" uses hostPort 80)',
        'privileged (container "init" must not set securityContext.privileged=true)',
        'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")']
    assert pod_security_violations(bad, "restricted") == [
        "host namespaces (hostNetwork=true, hostPID=true)",
        'hostPort (container "main" uses hostPort 80)',
        'privileged (container "init" must not set securityContext.privileged=true)',
        'allowPrivilegeEscalation != false (containers "init", "side" must set '
        'securityContext.allowPrivilegeEscalation=false)',
        'unrestricted capabilities (containers "init", "side" must set securityContext.capabilities.drop=["ALL"]; '
        'containers "main", "side" must not include "CHOWN", "SYS_ADMIN" in securityContext.capabilities.add)',
        'restricted volume types (volumes "root", "nfs" use restricted volume types "hostPath", "nfs")',
        "runAsNonRoot != true (pod must not set securityContext.runAsNonRoot=false\n"  # two details: "\n", as real
        'pod or containers "init", "main", "side" must set securityContext.runAsNonRoot=true)',
        'runAsUser=0 (pod and container "init" must not set runAsUser=0)',
        'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")']
    assert pod_security_violations(bad, "privileged") == []


# ---------------------------------------------------------------------- NetworkPolicy

def test_network_policy_admits_only_the_notebook(tmp_path):
    compute = k8s(name="train")
    sa = tmp_path / "namespace"
    sa.write_text("jhub\n")
    hub = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JUPYTERHUB_API_URL": "http://hub:8081/hub/api"}
    peer = notebook_peer(hub, service_account_path=sa)
    assert peer == NotebookPeer(in_cluster=True, labels={"component": "singleuser-server"}, namespace="jhub")
    policy = network_policy(compute, peer)
    assert validate(policy, K8S_VERSION, strict=True)
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"kt.dev/compute": "tester-train"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"component": "singleuser-server"}},
                               "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jhub"}}}]}]}
    mine = notebook_peer({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KT_NOTEBOOK_SELECTOR": "app=nb,user=alice",
                          "KT_NOTEBOOK_NAMESPACE": "ml"}, service_account_path=sa)
    assert network_policy(compute, mine)["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"app": "nb", "user": "alice"}}}]}]  # same namespace as the pod
    outside = network_policy(compute, notebook_peer({}))
    assert outside["spec"]["ingress"] == []  # port-forward only: no pod may connect
    objects = build_all(compute, TOKEN, SOURCE, peer=peer)
    assert [o["kind"] for o in objects][-2:] == ["NetworkPolicy", "Deployment"]
    assert objects[-2]["metadata"]["labels"]["kt.dev/component"] == "network-policy"
    with pytest.raises(ComputeSpecError, match="KT_NOTEBOOK_SELECTOR"):
        notebook_peer({"KUBERNETES_SERVICE_HOST": "x", "KT_NOTEBOOK_SELECTOR": "no-equals"})


# ---------------------------------------------------------------------- package index and proxies

def test_the_notebook_s_index_and_proxy_reach_the_pod_through_the_secret(monkeypatch):
    url = "https://bob:s3cr3t@pypi.corp.example/simple"
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "")  # empty: not passed on
    compute = k8s(env_vars={"HTTPS_PROXY": "http://mine:8080"})  # the compute's own env wins
    objects = build_all(compute, TOKEN, SOURCE)
    secret, dep = objects[0], deployment_of(objects)
    assert base64.b64decode(secret["data"]["PIP_INDEX_URL"]).decode() == url
    assert set(secret["data"]) == {"token", "PIP_INDEX_URL"}
    env = {e["name"]: e for e in container_of(dep)["env"]}
    assert env["PIP_INDEX_URL"] == {"name": "PIP_INDEX_URL", "valueFrom": {"secretKeyRef": {
        "name": "tester-t-token", "key": "PIP_INDEX_URL"}}}
    assert env["HTTPS_PROXY"] == {"name": "HTTPS_PROXY", "value": "http://mine:8080"}
    assert "s3cr3t" not in json.dumps(dep) and "NO_PROXY" not in env
    assert build_secret(compute, TOKEN, {})["data"] == {"token": base64.b64encode(TOKEN.encode()).decode()}


def test_kt_pod_image_makes_a_prebuilt_image_the_default(monkeypatch):
    monkeypatch.setenv("KT_POD_IMAGE", "ghcr.io/org/kt-pod-kernel:py3.11")
    assert container_of(build_deployment(k8s()))["image"] == "ghcr.io/org/kt-pod-kernel:py3.11"
    assert Image(image_id="python:3.12-slim").image_id == "python:3.12-slim"  # an explicit image still wins
    monkeypatch.setenv("KT_POD_IMAGE", "Not An Image")
    with pytest.raises(ComputeSpecError, match=r"KT_POD_IMAGE \(environment variable\): 'Not An Image' is not"):
        k8s()


def test_hostile_node_affinity_read_back_is_checked_not_trusted():
    dep = build_deployment(k8s(cpus=1))
    del dep["metadata"]["annotations"][SPEC_ANNOTATION]
    pod = dep["spec"]["template"]["spec"]
    pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": ["junk"]}}}
    assert compute_from_deployment(dep).gpu_type is None
    pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = [
        {"matchExpressions": [{"key": GFD_PRODUCT_LABEL, "operator": "In", "values": ["$(id); x"]}]}]
    with pytest.raises(ComputeSpecError, match="is not a valid label value"):
        compute_from_deployment(dep)
