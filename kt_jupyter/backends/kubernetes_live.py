"""A pod kernel this process reaches in a cluster: its forward, and a watch on its pod for liveness.

The client asks ``liveness()`` whenever a connection drops and before each
cell; it must be cheap, so a background watch on the one pod feeds a queue
and ``liveness()`` only drains it: no API request while the pod lives. When
the pod is deleted, evicted or its container restarts, the answer is a
sentence that says what happened (with the last log lines of a restarted
container) — the state the notebook relied on is gone either way. A Job's pod
that ends by itself (its ``inactivity_ttl``) is gone too, with its Job's word
for it (:func:`job_stopped_idle`).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from ..compute import Compute
from ..manifests import CONTAINER_NAME
from . import kubernetes_events as ev
from .kubernetes_api import KubeApi
from .kubernetes_objects import workload_kind
from .kubernetes_watch import WatchThread
from .kubernetes_workloads import job_condition, job_stopped_idle, workload_stopped
from .portforward import Forward

#: Log lines quoted in the liveness sentence of a restarted container.
LOG_LINES_IN_ERRORS = 20


class LiveKernel:
    """The pod a handle points at: reached through ``forward``, watched for its end."""

    def __init__(self, kube: KubeApi, compute: Compute, pod: dict[str, Any], forward: Forward) -> None:
        self.kube, self.compute = kube, compute
        self.pod = ev.name_of(pod)
        self.node = ev.node_of(pod)
        self.uid = (pod.get("metadata") or {}).get("uid")
        self.restarts = ev.restart_count(pod)
        self.forward = forward
        #: Other pod ports reached for this pod (the debugger's), by port; closed with the pod's forward.
        self.extra_forwards: dict[int, Forward] = {}
        self.gone: str | None = None
        self._events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._watch_failed = False
        self._watch = WatchThread(kube, "Pod", compute.namespace, self._events, "live",
                                  resource_version=(pod.get("metadata") or {}).get("resourceVersion"),
                                  known=[pod], field_selector=f"metadata.name={self.pod}")

    def liveness(self) -> str | None:
        """None while the pod kernel lives; else a sentence saying how it ended (no I/O while it lives)."""
        with self._lock:
            while self.gone is None:
                try:
                    _tag, kind, obj = self._events.get_nowait()
                except queue.Empty:
                    break
                if kind == "ERROR":
                    self._watch_failed = True
                else:
                    self._observe(kind, obj)
            if self.gone is None and self._watch_failed:  # no watch: ask directly
                self._observe("MODIFIED", self.kube.get("Pod", self.pod, self.compute.namespace))
            if self.gone is not None:
                self._watch.stop()  # nothing more to learn about this pod
            return self.gone

    def wait_gone(self, timeout_s: float) -> str | None:
        """Block until the pod kernel is gone (its liveness sentence), or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.liveness() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                item = self._events.get(timeout=remaining)
            except queue.Empty:
                return None
            self._events.put(item)  # liveness() drains and judges it
        return self.gone

    def _observe(self, kind: str, pod: dict[str, Any] | None) -> None:
        name = self.compute.name
        if pod is None or kind == "DELETED" or (pod.get("metadata") or {}).get("uid") != self.uid \
                or ev.is_terminating(pod):
            self.gone = ev.gone_sentence(name, self.pod, self._why_deleted())
        elif (pod.get("status") or {}).get("phase") == "Succeeded":  # a Job's kernel that stopped itself
            ttl_s = self.compute.inactivity_ttl_s or 0
            self.gone = ev.gone_sentence(name, self.pod, f"stopped itself (idle for its inactivity_ttl of "
                                                         f"{ttl_s:g} s) and its Job completed, freeing its node")
        elif (pod.get("status") or {}).get("phase") == "Failed":
            status = pod.get("status") or {}
            self.gone = ev.gone_sentence(name, self.pod, f"failed ({status.get('reason') or 'Failed'}: "
                                                         f"{status.get('message') or 'no detail'})")
        elif ev.restart_count(pod) > self.restarts:
            logs, why = self.kube.pod_log_or_why(self.pod, self.compute.namespace, CONTAINER_NAME,
                                                 LOG_LINES_IN_ERRORS, previous=True)
            self.gone = ev.gone_sentence(name, self.pod, f"{ev.restart_reason(pod)} and was restarted by "
                                                         "Kubernetes", logs, why)

    def _why_deleted(self) -> str:
        kind = workload_kind(self.compute)
        try:
            dep = self.kube.get(kind, self.compute.service_name, self.compute.namespace)
        except Exception:
            return "is gone"
        if dep is None or (dep.get("metadata") or {}).get("deletionTimestamp"):
            return f"was deleted with its {kind} (`%kt down`, or kubectl)"
        failed = job_condition(dep, "Failed") if kind == "Job" else None
        if failed is not None:
            return f"failed for good: its Job gave up ({failed.get('message') or 'Failed'})"
        if kind == "Job" and job_condition(dep, "Complete") is not None:
            return f"was {job_stopped_idle(dep)}: its Job completed"
        if workload_stopped(kind, dep):
            return ("was stopped: its Deployment was scaled to 0 (suspend)" if kind == "Deployment"
                    else "was stopped: its Job was suspended")
        return f"was deleted or evicted (its {kind} is starting a new pod)"

    def close(self, why: str | None = None) -> None:
        """Stop the watch and the forward; ``why`` (this process stopped the pod) becomes the liveness answer."""
        with self._lock:
            if why and self.gone is None:
                self.gone = ev.gone_sentence(self.compute.name, self.pod, why)
        self._watch.stop()
        self.forward.close()
        for extra in list(self.extra_forwards.values()):
            extra.close()
        self.extra_forwards.clear()
