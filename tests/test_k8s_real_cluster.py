"""The Kubernetes backend against what a real cluster does that a kind fake would not (issue 16, items 1-6, 10).

Each test teaches the fake cluster (``tests/k8s_fake``) one real behaviour —
a watch cache that forgets, a scheduler that says Unschedulable at once and
an autoscaler that answers later, a registry's 429, a webhook timeout, a
namespace that enforces Pod Security, events of a neighbour with a longer
name, a kubelet that cannot be reached for logs — and checks that the
backend waits for what the cluster still resolves and fails, clearly and at
once, on what it never will.
"""

from __future__ import annotations

import threading
import time

import pytest
from k8s_fake import FakeNode, FakeNodeGroup
from k8s_fake.cluster import FLAKY_IMAGE, NS, Lines, fake_cluster, finished, launch_in_thread, run_cell
from k8s_fake.store import POD_SECURITY_LABEL

from kt_jupyter.backends.kubernetes_launch import UNSCHEDULABLE_GRACE_ENV, unschedulable_grace_s
from kt_jupyter.compute import Compute, Image
from kt_jupyter.errors import (
    ComputeSpecError,
    CrashLoopError,
    KubernetesAPIError,
    LaunchTimeoutError,
    OOMKilledError,
    UnschedulableError,
)

GATED_IMAGE = "ghcr.io/example/gated:1.0"
GPU_NODE = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "4"}
QUOTA_REFUSAL = ('pods "tester-x-5d8f9c7b4-" is forbidden: exceeded quota: gpu-quota, requested: '
                 'nvidia.com/gpu=1, used: nvidia.com/gpu=4, limited: nvidia.com/gpu=4')
WEBHOOK_TIMEOUT = ('Internal error occurred: failed calling webhook "validate.kyverno.svc-fail": failed to call '
                   'webhook: Post "https://kyverno-svc.kyverno.svc:443/validate/fail?timeout=10s": context deadline '
                   'exceeded')


@pytest.fixture
def cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster whose autoscaler has a CPU-only node group (a GPU pod can never be placed)."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


@pytest.fixture
def gpu_cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster of one CPU node whose autoscaler may add up to 4 GPU nodes."""
    groups = [FakeNodeGroup("eks-gpu-nodes", labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                            allocatable=GPU_NODE, max_size=4)]
    with fake_cluster(tmp_path, monkeypatch, node_groups=groups) as cluster:
        yield cluster


@pytest.fixture
def bare_cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster of one CPU node and no autoscaler (nodes come only when a person adds them)."""
    with fake_cluster(tmp_path, monkeypatch, node_groups=[]) as cluster:
        yield cluster


def k8s(name: str, **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **kw)



# ---------------------------------------------------------------------- item 2: watches outlive the watch cache


def test_watches_survive_410_expired_and_bookmarks_keep_them_fresh(cluster):
    """Reopened from a version the watch cache forgot: in-stream 410, re-list, go on (launch and liveness)."""
    store = cluster.store
    cluster.kubelet.pull_gates[GATED_IMAGE] = gate = threading.Event()
    compute = k8s("w410", image=GATED_IMAGE)
    messages: list[str] = []
    thread, outcome = launch_in_thread(cluster, compute, messages)
    watching = 4  # events, replicasets, pods and the Deployment itself: all open before the window moves
    store.wait_for(lambda: "ContainerCreating" in str(cluster.pods(compute))
                   and len(cluster.api.open_watches) >= watching, 20)

    def churn() -> None:  # changes the compute's watches do not see move the window past their version
        for i in range(8):
            store.create("configmaps", "elsewhere", {"metadata": {"name": f"c{i}-{time.monotonic_ns()}"}})

    def expired() -> list[dict]:
        return [r for r in store.requests if r.get("expired")]

    def reopened(ended: set) -> bool:
        return not ended & cluster.api.open_watches and len(cluster.api.open_watches) >= watching

    store.history_window = 5  # from now on, a few changes elsewhere make the watches' versions too old
    churn()
    ended = cluster.api.end_watches(bookmark=True)  # a graceful end: a bookmark first, so no 410
    assert len(ended) == watching
    store.wait_for(lambda: reopened(ended), 10)
    assert not expired()

    churn()
    ended = cluster.api.end_watches()  # an API server restart: no bookmark, the watches' versions are too old now
    store.wait_for(lambda: len(expired()) >= watching and reopened(ended), 10)
    gate.set()
    handle = finished(thread, outcome)
    assert {r["path"].rsplit("/", 1)[-1] for r in expired()} >= {"pods", "events", "replicasets"}
    assert run_cell(handle, "6 * 7") == {"text/plain": "42"}

    # the liveness watch of the running kernel recovers the same way, and still sees the pod go
    churn()
    cluster.api.end_watches()
    store.wait_for(lambda: any(r["query"].get("fieldSelector", "").startswith("metadata.name=")
                               for r in expired()), 10)
    assert handle.liveness() is None
    pod = cluster.pods(compute)[0]["metadata"]["name"]
    store.delete("pods", NS, pod, grace_period_s=0)
    assert "was deleted or evicted" in cluster.backend.wait_gone("w410", 20)


def test_any_failure_while_waiting_scales_down_and_says_why(cluster):
    cluster.store.denied.add(("watch", "pods"))
    compute = k8s("nowatch")
    with pytest.raises(KubernetesAPIError) as info:
        cluster.backend.launch(compute)
    text = str(info.value)
    assert text.startswith("Kubernetes forbids watching Pods in namespace kt-test") and "scaled to 0" in text
    assert cluster.deployment(compute)["spec"]["replicas"] == 0


# ---------------------------------------------------------------------- item 3: Unschedulable is a state


def test_gpu_pod_waits_for_the_autoscaler_and_runs_on_the_new_node(gpu_cluster):
    messages: list[str] = []
    t0 = time.monotonic()
    handle = gpu_cluster.backend.launch(k8s("train", gpus=1), on_event=messages.append)
    elapsed_s = time.monotonic() - t0
    text = "\n".join(messages)
    assert "waiting for a node: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." in text
    assert "the cluster autoscaler is adding a node: pod triggered scale-up: [{eks-gpu-nodes 0->1 (max: 4)}]" in text
    assert "on node eks-gpu-nodes-1" in handle.where and elapsed_s < 30
    assert run_cell(handle, "'on a GPU node'") == {"text/plain": "'on a GPU node'"}


def test_unschedulable_waits_for_a_node_a_person_adds(bare_cluster, monkeypatch):
    monkeypatch.setenv(UNSCHEDULABLE_GRACE_ENV, "60")
    compute = k8s("manual", gpus=1)
    messages = Lines("waiting for a node: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu")
    thread, outcome = launch_in_thread(bare_cluster, compute, messages)
    assert messages.seen.wait(20)
    assert not outcome  # still waiting: no autoscaler says anything, and the grace is long
    bare_cluster.kubelet.add_node(FakeNode("gpu-by-hand", {"kubernetes.io/hostname": "gpu-by-hand"}, GPU_NODE))
    assert "on node gpu-by-hand" in finished(thread, outcome).where


def test_unschedulable_grace_ends_the_wait_quoting_the_scheduler(bare_cluster, monkeypatch):
    monkeypatch.setenv(UNSCHEDULABLE_GRACE_ENV, "0.5")
    compute = k8s("nogpu", gpus=1)
    with pytest.raises(UnschedulableError) as info:
        bare_cluster.backend.launch(compute)
    text = str(info.value)
    assert "no node has enough nvidia.com/gpu (asked for 1)" in text
    assert "The scheduler said: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." in text
    assert "still unschedulable after" in text and UNSCHEDULABLE_GRACE_ENV in text and "scaled to 0" in text
    assert bare_cluster.deployment(compute)["spec"]["replicas"] == 0


def test_unschedulable_grace_setting(monkeypatch):
    monkeypatch.delenv(UNSCHEDULABLE_GRACE_ENV, raising=False)
    assert unschedulable_grace_s(900) == 600 and unschedulable_grace_s(120) == 120  # never beyond launch_timeout
    monkeypatch.setenv(UNSCHEDULABLE_GRACE_ENV, "30")
    assert unschedulable_grace_s(900) == 30
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(UNSCHEDULABLE_GRACE_ENV, bad)
        with pytest.raises(ComputeSpecError, match=f"{UNSCHEDULABLE_GRACE_ENV} must be a number of seconds"):
            unschedulable_grace_s(900)


# ---------------------------------------------------------------------- item 4: transient failures are retried


def test_a_registry_429_is_retried_by_the_kubelet(cluster):
    messages: list[str] = []
    handle = cluster.backend.launch(k8s("flaky", image=FLAKY_IMAGE), on_event=messages.append)
    assert any("image pull failed; the kubelet retries it (ErrImagePull:" in m and "429 Too Many Requests" in m
               for m in messages)
    assert run_cell(handle, "1 + 1") == {"text/plain": "2"}


def test_a_webhook_timeout_is_retried_by_the_replicaset_controller(cluster):
    cluster.kubelet.create_failures.append(WEBHOOK_TIMEOUT)
    messages: list[str] = []
    cluster.backend.launch(k8s("hooked"), on_event=messages.append)
    assert any(m.startswith("FailedCreate: Error creating: Internal error occurred: failed calling webhook")
               for m in messages)


def test_pod_security_rejection_is_final_and_quotes_the_violations(cluster):
    """Fake side of item 10: the namespace enforces restricted; a non-compliant pod is refused, a compliant one not."""
    cluster.store.namespace_labels[NS] = {POD_SECURITY_LABEL: "restricted"}
    kube = cluster.backend._kube(k8s("ps"))
    container = {"name": "main", "image": "python:3.11-slim", "command": ["sleep", "1"]}
    loose = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose", "namespace": NS},
             "spec": {"containers": [container]}}
    with pytest.raises(KubernetesAPIError) as info:
        kube.create(loose)
    assert ('pods "loose" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false '
            '(container "main" must set securityContext.allowPrivilegeEscalation=false), unrestricted capabilities '
            '(container "main" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or '
            'container "main" must set securityContext.runAsNonRoot=true), seccompProfile (pod or container "main" '
            'must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")') in str(info.value)
    tight = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tight", "namespace": NS}, "spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [dict(container, securityContext={"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}})]}}
    assert kube.create(tight) is True

    # through a Deployment: the ReplicaSet's FailedCreate, and the launch ends at once on it
    privileged = {"spec": {"template": {"spec": {"containers": [{"name": "pod-kernel",
                                                                  "securityContext": {"privileged": True}}]}}}}
    compute = k8s("priv", service_template=privileged)
    t0 = time.monotonic()
    with pytest.raises(UnschedulableError) as info:
        cluster.backend.launch(compute)
    text = str(info.value)
    assert "Kubernetes refused to create its pod (the namespace enforces a Pod Security level" in text
    assert f'Error creating: pods "{compute.service_name}-' in text
    assert 'violates PodSecurity "restricted:latest"' in text
    assert 'privileged (container "pod-kernel" must not set securityContext.privileged=true)' in text
    assert time.monotonic() - t0 < 15 and cluster.deployment(compute)["spec"]["replicas"] == 0
    [event] = [e for e in cluster.events("FailedCreate")][:1]
    assert event["involvedObject"]["kind"] == "ReplicaSet" and event["type"] == "Warning"


# ---------------------------------------------------------------------- item 5: only this attempt's events


def test_a_neighbour_with_a_longer_name_does_not_lend_its_events(cluster):
    big = k8s("train-big")
    kube = cluster.backend._kube(big)
    token = cluster.backend._token(kube, big)
    cluster.kubelet.create_failures.append(QUOTA_REFUSAL)  # final, for train-big's ReplicaSet
    for obj in cluster.backend.manifests(big, token):
        kube.apply(obj)
    cluster.store.wait_for(lambda: cluster.events("FailedCreate"), 20)
    handle = cluster.backend.launch(k8s("train"))  # tester-train: its pods' names are a prefix of tester-train-big's
    assert run_cell(handle, "'mine'") == {"text/plain": "'mine'"}


def test_a_quick_relaunch_does_not_fail_on_the_previous_attempt_s_event(cluster):
    compute = k8s("again")
    cluster.kubelet.create_failures.append(QUOTA_REFUSAL)
    with pytest.raises(UnschedulableError, match="ResourceQuota"):
        cluster.backend.launch(compute)
    handle = cluster.backend.launch(compute)  # the quota was freed; the same ReplicaSet still carries the event
    assert run_cell(handle, "'second try'") == {"text/plain": "'second try'"}


# ---------------------------------------------------------------------- item 6: errors survive missing logs


def test_crash_loop_without_log_rights_still_says_what_happened(cluster):
    cluster.store.denied.add(("get", "pods/log"))  # a user without pods/log
    with pytest.raises(CrashLoopError) as info:
        cluster.backend.launch(k8s("crash", image=Image().run_bash("exit 3")))
    text = str(info.value)
    assert "CrashLoopBackOff; last run: Error, exit code 3" in text
    assert "(logs unavailable: HTTP 403:" in text and 'cannot get resource "pods/log"' in text


def test_oom_and_timeout_when_no_kubelet_answers_for_logs(cluster):
    cluster.store.kubelet_unreachable = True
    with pytest.raises(OOMKilledError) as info:
        cluster.backend.launch(k8s("tiny", memory="24Mi"))
    text = str(info.value)
    assert "more memory than its limit (24Mi) (OOMKilled). Exit code 137." in text
    assert "(logs unavailable: HTTP 500: Get \"https://10.0.0.5:10250/containerLogs/kt-test/" in text
    assert "no preferred addresses found; known addresses: []" in text

    with pytest.raises(LaunchTimeoutError) as info:
        cluster.backend.launch(k8s("stuck", image=Image().run_bash("sleep 60"), launch_timeout=2))
    text = str(info.value)
    assert "was not ready within 2 s" in text and "container running" in text
    assert "Normal Started pod/" in text and "(logs unavailable: HTTP 500:" in text


def test_the_backend_checks_every_name_it_is_given(kt_home):
    from kt_jupyter.backends.kubernetes import KubernetesBackend

    backend = KubernetesBackend()  # no cluster needed: the name is refused before any request
    for call in (lambda n: backend.status(n), lambda n: backend.delete(n), lambda n: backend.find(n),
                 lambda n: backend.logs(n), lambda n: backend.suspend(n)):
        with pytest.raises(ComputeSpecError, match="is not a valid compute name"):
            call("../kube-system/x")
