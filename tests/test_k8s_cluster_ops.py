"""The Kubernetes backend against a real cluster's rules, continued (issue 16, items 7, 8, 14 and the policy/queue
follow-ups of 9-10).

The fake (``tests/k8s_fake``) is taught each behaviour first: a NetworkPolicy
kind an ``edit`` user may be refused, Kueue's scheduling gate, deletion with
grace 0 (the object vanishes while its container still runs) and foreground
propagation (the owner stays, with a finalizer, until its pods are gone).
"""

from __future__ import annotations

import time

import pytest
from ipshell import run
from IPython.core.error import UsageError
from k8s_fake import FakePortForwardConnector
from k8s_fake.cluster import MISSING_IMAGE, NS, SLOW_IMAGE, Lines, fake_cluster, finished, launch_in_thread
from k8s_fake.kubelet import FORCE_DELETE_GRACE_S
from k8s_fake.store import KUEUE_GATE

from kt_jupyter import connection as conn_mod
from kt_jupyter.backends.kubernetes import KubernetesBackend
from kt_jupyter.compute import Compute
from kt_jupyter.errors import ComputeSpecError, ImagePullError, KubernetesAPIError, LaunchError
from kt_jupyter.manifests import label_selector


@pytest.fixture
def cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster; the `kubernetes` backend of this process (get_backend) uses it."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


def k8s(name: str, **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **kw)


# ---------------------------------------------------------------------- NetworkPolicy (item 10 follow-up)


def test_network_policy_is_applied_deleted_and_an_edit_refusal_says_what_to_do(cluster, monkeypatch):
    compute = k8s("fenced")
    cluster.backend.launch(compute)
    (policy,) = cluster.objects("networkpolicies", label_selector(compute))
    assert policy["spec"]["podSelector"]["matchLabels"]["kt.dev/compute"] == compute.service_name
    assert policy["spec"]["ingress"] == []  # from outside the cluster only the port-forward reaches the pod
    assert not any("ports" in rule for rule in policy["spec"]["ingress"])  # no port list: the bulk port too
    assert cluster.backend.delete("fenced") is True
    assert not cluster.objects("networkpolicies", label_selector(compute))

    cluster.store.denied.add(("patch", "networkpolicies"))  # a namespace that does not let users create them
    with pytest.raises(KubernetesAPIError) as info:
        cluster.backend.launch(k8s("refused"))
    text = str(info.value)
    assert "ask your admin to allow networkpolicies" in text and "KT_NETWORK_POLICY=0" in text
    assert "`%kt down refused` deletes them" in text
    monkeypatch.setenv("KT_NETWORK_POLICY", "off")
    cluster.backend.launch(k8s("open"))
    assert not cluster.objects("networkpolicies", label_selector(k8s("open")))


# ---------------------------------------------------------------------- Kueue's scheduling gate (item 9 follow-up)


def test_a_pod_kueue_holds_is_waited_for_until_its_queue_admits_it(cluster):
    cluster.store.kueue_queues.add("team-a")
    compute = k8s("queued", queue="team-a", launch_timeout=60)
    lines = Lines("waiting for queue 'team-a' to admit it")
    thread, outcome = launch_in_thread(cluster, compute, lines)
    assert lines.seen.wait(30), lines
    (pod,) = cluster.pods(compute)
    assert pod["spec"]["schedulingGates"] == [{"name": KUEUE_GATE}] and thread.is_alive()
    info = cluster.backend.status("queued")
    assert info.phase == "launching" and "waiting for queue 'team-a' to admit it" in info.detail
    cluster.store.admit(NS, pod["metadata"]["name"])
    handle = finished(thread, outcome)
    assert handle.where.startswith(f"pod {pod['metadata']['name']} on node fake-node-1")


# ---------------------------------------------------------------------- item 8: deletion as Kubernetes means it


def test_the_fake_force_delete_frees_the_api_object_before_the_container(cluster):
    """What a real API server does with gracePeriodSeconds=0: the pod leaves the API, its container stops later."""
    compute = k8s("forced")
    cluster.backend.launch(compute)
    (pod,) = cluster.pods(compute)
    name = pod["metadata"]["name"]
    runtime = cluster.kubelet.pods[(NS, name)]
    process = cluster.process(compute)
    # what the kubelet finds when it comes to stop the container (its own thread, some time after the delete:
    # a check here, right after the delete returns, would race with it)
    found: list[tuple[bool, bool, float]] = []
    real_stop = runtime.stop

    def stop(grace_s: float) -> None:
        found.append((cluster.store.get("pods", NS, name) is None, process.is_running(), grace_s))
        real_stop(grace_s)

    runtime.stop = stop
    cluster.store.delete("pods", NS, name, grace_period_s=0)
    assert cluster.store.get("pods", NS, name) is None
    runtime.thread.join(15)
    assert runtime.runs[-1].proc.poll() is not None
    # gone from the API first; the container, still holding what it holds, stopped only after that
    assert found == [(True, True, FORCE_DELETE_GRACE_S)]


def test_relaunch_after_a_kernel_death_never_force_deletes_and_waits_for_the_old_container(cluster):
    compute = k8s("phoenix")
    conn = conn_mod.connect(compute)
    conn.run_cell("x = 1", {})
    (old,) = cluster.pods(compute)
    runtime = cluster.kubelet.pods[(NS, old["metadata"]["name"])]
    created: list[tuple[str, bool]] = []  # (pod, whether every container of the old pod had ended by then)

    def on_change(kind: str, plural: str, obj: dict) -> None:
        if plural == "pods" and kind == "ADDED":
            created.append((obj["metadata"]["name"], all(r.proc.poll() is not None for r in runtime.runs)))

    cluster.store.listeners.append(on_change)
    cluster.process(compute).kill()  # the pod kernel dies; Kubernetes restarts the container
    assert cluster.backend.wait_gone("phoenix", 30) is not None
    lines: list[str] = []
    conn_mod.connect(compute, on_event=lines.append)  # notices the death, deletes, launches anew
    assert any("variables are lost" in line for line in lines)
    grace = [g for plural, _name, g, _prop in cluster.store.deletions if plural == "pods"]
    assert grace and all(g is not None and g >= 1 for g in grace), grace  # never a force delete
    assert [prop for plural, _n, _g, prop in cluster.store.deletions if plural == "deployments"] == ["Foreground"]
    assert len(created) == 1 and created[0][1], created  # one new pod, placed after the old container ended


def test_a_launch_stops_at_once_when_its_deployment_is_deleted(cluster):
    compute = k8s("doomed", image=SLOW_IMAGE, launch_timeout=120)
    lines = Lines("pulling image")
    thread, outcome = launch_in_thread(cluster, compute, lines)
    assert lines.seen.wait(30), lines
    started = time.monotonic()
    assert KubernetesBackend(connector=FakePortForwardConnector(cluster.kubelet)).delete("doomed") is True
    with pytest.raises(LaunchError, match="'doomed' was deleted while its launch waited for it"):
        finished(thread, outcome, 30)
    assert time.monotonic() - started < 20
    scales = [r for r in cluster.store.requests if r["path"].endswith("/scale")]
    assert not scales and cluster.deployment(compute) is None  # nothing to scale down: it is gone


def test_down_and_status_find_a_kubernetes_compute_whatever_the_default_backend(cluster, ip, capsys):
    result = ip.run_cell(f"%%kt --backend kubernetes --name broken --image {MISSING_IMAGE}\nx = 1")
    assert isinstance(result.error_in_exec, ImagePullError)
    assert "`%kt down broken` deletes it" in str(result.error_in_exec)
    capsys.readouterr()
    run(ip, "%kt status broken")  # the default backend is local: the compute is found on Kubernetes
    assert "compute 'broken' (kubernetes)" in capsys.readouterr().out
    run(ip, "%kt down broken")
    assert "broken (kubernetes): stopped and deleted" in capsys.readouterr().out
    assert cluster.deployment(k8s("broken")) is None


# ---------------------------------------------------------------------- item 7: one spec per name, in every process


def test_another_process_asking_for_another_spec_gets_a_clear_error(cluster, ip):
    cluster.backend.launch(k8s("sized", memory="512Mi", inactivity_ttl="1h"))
    other = KubernetesBackend(connector=FakePortForwardConnector(cluster.kubelet))  # a restarted notebook
    with pytest.raises(ComputeSpecError) as info:
        other.launch(k8s("sized", memory="1Gi", gpus=None))
    assert "compute 'sized' is already running with memory='512Mi' (not '1Gi')" in str(info.value)
    assert "`%kt down sized`" in str(info.value)
    same = other.launch(k8s("sized"))  # asking for nothing in particular reuses it, and says what runs
    assert same.spec["memory"] == "512Mi" and same.spec["inactivity_ttl"] == 3600
    with pytest.raises(UsageError, match=r"memory='512Mi' \(not '1Gi'\)"):
        run(ip, "%%kt --backend kubernetes --name sized --memory 1Gi\nx = 1")
    assert len(cluster.pods(k8s("sized"))) == 1


def test_relaunch_after_a_kernel_death_keeps_the_original_spec(cluster):
    """The next cell after a kernel died relaunches it as it was launched (memory, TTL), not with defaults."""
    conn_mod.connect(k8s("keep", memory="512Mi", inactivity_ttl="1h")).run_cell("x = 1", {})
    cluster.process(k8s("keep")).kill()
    assert cluster.backend.wait_gone("keep", 30) is not None
    conn = conn_mod.connect(k8s("keep"))
    assert conn.compute.memory == "512Mi" and conn.compute.inactivity_ttl_s == 3600
    assert cluster.pods(k8s("keep"))[0]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "512Mi"
    conn.session.close_quietly()
