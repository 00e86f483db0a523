"""A compute's workload: its Deployment, or the Job of a compute with ``inactivity_ttl``, as found in the cluster.

Reading a Job's state (its True conditions; stopped when suspended or
finished; the sentence for one its idle kernel completed), finding a compute's
workload whatever kind it runs as, suspending and resuming a Job, clearing the
way before a launch (a finished Job, or the other kind, is deleted first), and
waiting until a compute's pods and workloads have left the API.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..compute import Compute
from ..errors import KubernetesAPIError
from ..manifests import INACTIVITY_TTL_ANNOTATION, label_selector
from . import kubernetes_events as ev
from .kubernetes_api import KubeApi, object_path
from .kubernetes_objects import TEMPLATE_HASH_ANNOTATION, WORKLOAD_KINDS, workload_kind
from .kubernetes_watch import WatchThread

#: Seconds ``delete`` waits for the pods to go, beyond their grace period.
DELETE_WAIT_S = 60.0


def job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The Job's condition of that type (``Complete``, ``Failed``, ``Suspended``) when it is True, else None."""
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == kind and c.get("status") == "True"), None)


def workload_stopped(kind: str, workload: dict[str, Any]) -> bool:
    """Whether the Deployment (0 replicas) or Job (suspended, or finished) runs no pod kernel now."""
    spec = workload.get("spec") or {}
    if kind == "Deployment":
        return not spec.get("replicas")
    return bool(spec.get("suspend")) or any(job_condition(workload, c) for c in ("Complete", "Failed"))


def job_stopped_idle(job: dict[str, Any]) -> str:
    """'stopped: idle for N s (inactivity_ttl T s)' for a Job its pod kernel completed by stopping itself."""
    ttl_s = float(((job.get("metadata") or {}).get("annotations") or {}).get(INACTIVITY_TTL_ANNOTATION) or 0)
    done = (job.get("status") or {}).get("completionTime") or ""
    try:
        since_s = max(0.0, time.time() - datetime.fromisoformat(done).timestamp())
    except ValueError:
        since_s = 0.0
    return f"stopped: idle for {ttl_s + since_s:.0f} s (inactivity_ttl {ttl_s:g} s)"


def find_workload(kube: KubeApi, compute: Compute) -> tuple[str, dict[str, Any]] | None:
    """The compute's Deployment or Job (the kind its spec runs as asked first) and its kind, or None."""
    first = workload_kind(compute)
    for kind in sorted(WORKLOAD_KINDS, key=lambda k: k != first):
        obj = kube.get(kind, compute.service_name, compute.namespace)
        if obj is not None:
            return kind, obj
    return None


def set_suspended(kube: KubeApi, compute: Compute, suspended: bool) -> dict[str, Any]:
    """Set the compute's Job's ``spec.suspend`` (a merge patch); the Job as it is now."""
    ns, svc = compute.namespace, compute.service_name
    return kube.request("PATCH", object_path("Job", ns, svc),
                        action=f"{'suspending' if suspended else 'resuming'} Job {ns}/{svc}",
                        body={"spec": {"suspend": suspended}}, content_type="application/merge-patch+json")


def clear_way(kube: KubeApi, compute: Compute, expected_hash: str, say: Callable[[str], None]) -> bool:
    """Delete what of this name the launch cannot apply over, and wait until it is gone: the other workload
    kind (its ``inactivity_ttl`` changed while it was stopped), or a Job that finished (stopped idle, or
    failed) or runs another pod template (a Job's template cannot change). True when a suspended Job
    stays, for the launch to resume (Kueue resumes a queued one itself, once it admits it)."""
    ns, svc, kind = compute.namespace, compute.service_name, workload_kind(compute)
    resume = False
    for other in WORKLOAD_KINDS:
        existing = kube.get(other, svc, ns)
        if existing is None:
            continue
        if other != kind:
            why = f"it ran as a {other}; with{'' if kind == 'Job' else 'out'} inactivity_ttl it runs as a {kind}"
        elif other == "Job" and (job_condition(existing, "Complete") or job_condition(existing, "Failed")):
            why = "its Job has finished"
        elif other == "Job" and (((existing.get("spec") or {}).get("template") or {}).get("metadata") or {}) \
                .get("annotations", {}).get(TEMPLATE_HASH_ANNOTATION) != expected_hash:
            why = "its Job runs another pod template, which a Job cannot change"
        else:
            resume = other == "Job" and bool((existing.get("spec") or {}).get("suspend")) and not compute.queue
            continue
        say(f"replacing {other} {svc!r}: {why}")
        kube.delete(other, svc, ns, propagation="Foreground")
        wait_deleted(kube, compute, DELETE_WAIT_S)
    return resume


def wait_deleted(kube: KubeApi, compute: Compute, timeout_s: float) -> None:
    """Block until the compute's pods and workloads have left the API (or raise after ``timeout_s``)."""
    updates: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    ns, selector = compute.namespace, label_selector(compute)
    left: dict[tuple[str, str], str] = {}
    watches = []
    try:
        for kind in ("Pod",) + WORKLOAD_KINDS:
            reply = kube.list_reply(kind, ns, label_selector=selector)
            items = reply.get("items") or []
            left.update({(kind, ev.name_of(o)): kind.lower() for o in items})
            if items:
                watches.append(WatchThread(kube, kind, ns, updates, kind,
                                           resource_version=(reply.get("metadata") or {}).get("resourceVersion"),
                                           known=items, label_selector=selector))
        deadline = time.monotonic() + timeout_s
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = ", ".join(f"{k} {n}" for (_kind, n), k in sorted(left.items()))
                raise KubernetesAPIError(f"{what} of compute {compute.name!r} were still terminating after "
                                         f"{timeout_s:g} s; `kubectl get pods,deployments,jobs -n {ns}` shows "
                                         "why")
            try:
                tag, kind, obj = updates.get(timeout=remaining)
            except queue.Empty:
                continue
            if kind == "ERROR":
                raise obj
            if kind == "DELETED":  # objects created after our deletes (a racing launch) are not waited for
                left.pop((tag, ev.name_of(obj)), None)
    finally:
        for watch in watches:
            watch.stop()
