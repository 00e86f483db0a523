"""An idle compute frees its node (and GPU) with a namespace's ``edit`` rights alone: it runs as a Job.

Against the fake cluster (:mod:`k8s_fake`), whose Job controller
(:mod:`k8s_fake.jobs`) behaves as the real one at the wire: a compute with
``inactivity_ttl`` is a single-kernel Job; its pod kernel exits 0 once idle,
the Job completes, its pod ends ``Succeeded`` and the scheduler no longer
counts its GPU. The user may not touch RBAC (``edit`` excludes Roles and
RoleBindings, modelled by refusing those verbs), and needs to.
"""

from __future__ import annotations

import pytest
from k8s_fake import FakeNode
from k8s_fake.cluster import MISSING_IMAGE, NS, fake_cluster, run_cell

from kt_jupyter.compute import Compute
from kt_jupyter.errors import ImagePullError
from kt_jupyter.manifests import label_selector

#: One node with one GPU: a second GPU pod fits only once the first has let go of it.
GPU_NODE = FakeNode("gpu-node-1", {"kubernetes.io/hostname": "gpu-node-1"},
                    {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"})
#: What a namespace's ``edit`` ClusterRole does not allow: anything on Roles and RoleBindings.
EDIT_ROLE_DENIES = {(verb, plural) for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
                    for plural in ("roles", "rolebindings")}


@pytest.fixture
def cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster with one one-GPU node, no autoscaler, and a user with only the ``edit`` role."""
    with fake_cluster(tmp_path, monkeypatch, node=GPU_NODE, node_groups=[]) as cluster:
        cluster.store.denied |= EDIT_ROLE_DENIES
        yield cluster


def k8s(name: str, **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **kw)


def job_done(cluster, compute: Compute, kind: str = "Complete") -> bool:
    job = cluster.job(compute) or {}
    return any(c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])



def test_idle_gpu_compute_ends_its_job_and_frees_the_gpu_with_edit_rights_alone(cluster):
    compute = k8s("idle", gpus=1, inactivity_ttl=1)
    handle = cluster.backend.launch(compute)
    assert run_cell(handle, "6 * 7") == {"text/plain": "42"}
    assert cluster.deployment(compute) is None and cluster.job(compute)["spec"]["backoffLimit"] >= 1
    [pod] = cluster.pods(compute)
    assert pod["spec"]["restartPolicy"] == "OnFailure" and "serviceAccountName" not in pod["spec"]
    container = cluster.kubelet.pods[(NS, pod["metadata"]["name"])].runs[-1].proc

    # idle for its TTL: the kernel exits 0, the Job completes, its pod ends and lets go of the GPU
    cluster.store.wait_for(lambda: job_done(cluster, compute), 30)
    [done] = cluster.pods(compute)
    assert done["status"]["phase"] == "Succeeded" and done["metadata"]["name"] == pod["metadata"]["name"]
    assert container.poll() == 0  # the kernel exited by itself, cleanly: nothing runs in the pod
    assert cluster.job(compute)["status"]["completionTime"]
    why = cluster.backend.wait_gone("idle", 10)
    assert why == handle.liveness() and "stopped itself (idle for its inactivity_ttl of 1 s)" in why
    info = cluster.backend.status("idle")
    assert info.phase == "stopped" and "stopped: idle for" in info.detail and "(inactivity_ttl 1 s)" in info.detail
    assert cluster.backend.find("idle") is None
    assert [(i.name, i.phase) for i in cluster.backend.list()] == [("idle", "stopped")]

    # no restart loop: nothing starts again over two more TTLs
    with pytest.raises(TimeoutError):
        cluster.store.wait_for(lambda: len(cluster.pods(compute, live_only=False)) != 1
                               or cluster.pods(compute)[0]["status"]["phase"] != "Succeeded", 2.5)
    # the GPU is free: another one-GPU compute fits on the one-GPU node while the finished pod is still listed
    other = cluster.backend.launch(k8s("other", gpus=1))
    assert run_cell(other, "1 + 1") == {"text/plain": "2"}
    cluster.backend.delete("other", grace_period_s=1)

    # the next cell on that name launches it again: a new Job, same token
    messages: list[str] = []
    again = cluster.backend.launch(compute, on_event=messages.append)
    assert any("replacing Job" in m and "its Job has finished" in m for m in messages)
    assert again.token == handle.token and run_cell(again, "'back'") == {"text/plain": "'back'"}
    assert [p["metadata"]["name"] for p in cluster.pods(compute)] != [pod["metadata"]["name"]]
    assert not cluster.objects("roles") and not cluster.objects("rolebindings")
    assert not [r for r in cluster.store.requests if "rbac.authorization.k8s.io" in r["path"]]


def test_a_job_compute_suspends_resumes_and_goes_down(cluster):
    compute = k8s("nap", inactivity_ttl="1h")
    handle = cluster.backend.launch(compute)
    cluster.backend.suspend("nap")
    assert cluster.job(compute)["spec"]["suspend"] is True
    cluster.store.wait_for(
        lambda: not cluster.pods(compute, live_only=False) and job_done(cluster, compute, "Suspended"), 15)
    assert "was stopped: suspended (its Job was suspended)" in handle.liveness()
    info = cluster.backend.status("nap")
    assert info.phase == "stopped" and "suspended" in info.detail

    resumed = cluster.backend.resume("nap")
    assert cluster.job(compute)["spec"]["suspend"] is False and resumed.token == handle.token
    assert run_cell(resumed, "'fresh'") == {"text/plain": "'fresh'"}

    assert cluster.backend.delete("nap", grace_period_s=1) is True
    selector = label_selector(compute)
    assert not any(cluster.objects(k, selector) for k in ("jobs", "pods", "services", "secrets", "configmaps"))
    assert ("jobs", compute.service_name, 1, "Foreground") in cluster.store.deletions


def test_a_failed_job_launch_suspends_the_job_and_says_so(cluster):
    compute = k8s("badimg", image=MISSING_IMAGE, inactivity_ttl="1h")
    with pytest.raises(ImagePullError) as info:
        cluster.backend.launch(compute)
    assert f"cannot pull the image {MISSING_IMAGE!r}" in str(info.value)
    assert "Its Job was suspended so it holds no resources" in str(info.value)
    assert cluster.job(compute)["spec"]["suspend"] is True
    cluster.store.wait_for(lambda: not cluster.pods(compute, live_only=False), 15)
    assert cluster.backend.status("badimg").phase == "stopped"


def test_the_fake_job_controller_restarts_crashes_in_place_then_gives_up(cluster):
    """The fake's Job controller, as the real one: OnFailure restarts count toward backoffLimit."""
    spec = {"containers": [{"name": "c", "image": "python:3.12-slim",
                            "command": ["/bin/sh", "-c", "echo --host :: >/dev/null; exit 3"]}],
            "restartPolicy": "OnFailure"}
    cluster.store.create("jobs", NS, {"metadata": {"name": "crash"},
                                      "spec": {"backoffLimit": 1, "template": {"spec": spec}}})
    job = cluster.store.wait_for(lambda: _failed(cluster.store.get("jobs", NS, "crash")), 30)
    assert (job["reason"], job["message"]) == ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    cluster.store.wait_for(lambda: not cluster.objects("pods"), 15)  # the Job deletes its crash-looping pod
    events = {(e["involvedObject"]["kind"], e["reason"]) for e in cluster.events()}
    assert {("Job", "SuccessfulCreate"), ("Job", "BackoffLimitExceeded")} <= events


def _failed(job: dict) -> dict | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c["type"] == "Failed" and c["status"] == "True"), None)
