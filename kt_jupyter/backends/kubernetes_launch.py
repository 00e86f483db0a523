"""Waiting for one launch attempt of a Kubernetes compute: its objects only, from now on, as a cluster behaves.

:class:`LaunchWaiter` starts watching the namespace's events *before* the
workload (Deployment, or Job) is applied (so nothing of this attempt is missed
and nothing of an earlier one is replayed), then the compute's ReplicaSets and
pods. An event counts only when it is about one of this workload's objects, by
UID (not by name: ``alice-train`` must not take ``alice-train-big``'s events):
the Deployment, its ReplicaSets and their pods, or the Job and its pods.

What a real cluster still resolves is waited for, with the reason shown live:
an Unschedulable pod (autoscalers add nodes; ``KT_UNSCHEDULABLE_GRACE``
bounds it), a pull failure the kubelet retries (a registry's 429), a
FailedCreate the ReplicaSet or Job controller retries (a webhook timeout). What no
waiting cures ends the wait at once, as one error from
:mod:`~kt_jupyter.backends.kubernetes_events`, with the container's log lines
when they help, or why there are none.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import Any

from ..compute import Compute
from ..errors import ComputeSpecError, LaunchError
from ..manifests import CONTAINER_NAME, label_selector
from . import kubernetes_events as ev
from .kubernetes_api import KubeApi
from .kubernetes_objects import TEMPLATE_HASH_ANNOTATION
from .kubernetes_watch import WatchThread
from .kubernetes_workloads import job_condition

#: ``KT_UNSCHEDULABLE_GRACE``: seconds a pod may stay Unschedulable before the launch gives up.
UNSCHEDULABLE_GRACE_ENV = "KT_UNSCHEDULABLE_GRACE"
#: Its default: long enough for a cluster autoscaler to add a GPU node (never beyond launch_timeout).
UNSCHEDULABLE_GRACE_S = 600.0
#: Log lines quoted in errors.
LOG_LINES_IN_ERRORS = 20
#: Events kept for objects not known yet (an event may arrive before its pod does).
PENDING_EVENTS_MAX = 500
#: Seconds between checks of the clocks (grace, lasting pull failures) while nothing arrives.
CLOCK_CHECK_S = 1.0


def unschedulable_grace_s(launch_timeout_s: float) -> float:
    """``KT_UNSCHEDULABLE_GRACE`` (or its default), never beyond ``launch_timeout_s``."""
    raw = os.environ.get(UNSCHEDULABLE_GRACE_ENV, "").strip()
    grace = UNSCHEDULABLE_GRACE_S
    if raw:
        try:
            grace = float(raw)
        except ValueError:
            grace = -1.0
        if not grace >= 0 or grace == float("inf"):
            raise ComputeSpecError(f"{UNSCHEDULABLE_GRACE_ENV} must be a number of seconds >= 0, not {raw!r}")
    return min(grace, launch_timeout_s)


def _uid(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("uid") or ""


def _owners(obj: dict[str, Any]) -> set[str]:
    return {r.get("uid", "") for r in (obj.get("metadata") or {}).get("ownerReferences") or []}


class PodJudge:
    """The watches and the judgement of one launch attempt's pods: what waiting may still cure (an Unschedulable
    pod within its grace, a pull the kubelet retries, a gated pod) is said as progress; what it cannot is raised.

    Shared by :class:`LaunchWaiter` (one pod kernel) and the distributed group's waiter, which names a pod by its
    rank (:meth:`_label`, :meth:`_prefix`) and says which rank kept the group from starting (:meth:`_fail`).
    """

    def __init__(self, kube: KubeApi, compute: Compute, say: Callable[[str], None]) -> None:
        self.kube, self.compute, self._say = kube, compute, say
        self.updates: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.grace_s = unschedulable_grace_s(compute.launch_timeout_s)
        self.watches = [WatchThread(kube, "Event", compute.namespace, self.updates, "event", replay=False)]
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._said: set[str] = set()
        self._scaling_up: set[str] = set()
        self._not_triggered: dict[str, str] = {}
        self._pull_detail: dict[str, str] = {}
        self._pull_since: dict[str, float] = {}
        self._unschedulable_since: dict[str, float] = {}

    def tell(self, line: str | None) -> None:
        """Say a progress line once."""
        if line and line not in self._said:
            self._said.add(line)
            self._say(line)

    def stop(self) -> None:
        """Stop every watch."""
        for watch in self.watches:
            watch.stop()

    # ------------------------------------------------------------------ naming (the group's waiter names ranks)

    def _label(self, pod: dict[str, Any]) -> str:
        """The name a failure of ``pod`` gives: the compute's."""
        return self.compute.name

    def _prefix(self, pod: dict[str, Any]) -> str:
        """What a progress line about ``pod`` starts with: nothing, there is one pod."""
        return ""

    def _fail(self, error: LaunchError, pod: dict[str, Any]) -> LaunchError:
        """The error the launch raises for ``pod``'s failure."""
        return error

    # ------------------------------------------------------------------ judging

    def _note_pod_event(self, event: dict[str, Any], pod: dict[str, Any] | None) -> None:
        """A Pod event of this attempt: what it says of scale-ups and pulls; then judge the pod, if known."""
        uid, reason = (event.get("involvedObject") or {}).get("uid") or "", event.get("reason")
        if ev.is_scale_up_signal(event):
            self._scaling_up.add(uid)
            self._not_triggered.pop(uid, None)
        elif reason == "NotTriggerScaleUp":
            self._not_triggered[uid] = (event.get("message") or "").strip()
        detail = ev.pull_failure_detail(event)
        if detail:
            self._pull_detail[uid] = detail
        if pod is not None:
            self._judge(pod)

    def _judge(self, pod: dict[str, Any]) -> None:
        """Raise the pod's failure when waiting cannot cure it."""
        uid, now, prefix = _uid(pod), time.monotonic(), self._prefix(pod)
        waiting = ((ev.container_status(pod) or {}).get("state") or {}).get("waiting") or {}
        pulling = waiting.get("reason") in ev.IMAGE_PULL_REASONS
        if pulling:
            failing_s = now - self._pull_since.setdefault(uid, now)
        else:
            self._pull_since.pop(uid, None)
            failing_s = 0.0
        failure = ev.diagnose_pod(self._label(pod), pod, pull_detail=self._pull_detail.get(uid, ""),
                                  pull_failing_s=failing_s)
        if failure is not None:
            raise self._fail(self._with_logs(failure, pod), pod)
        if pulling:
            detail = self._pull_detail.get(uid) or waiting.get("message") or "no detail"
            self.tell(f"{prefix}image pull failed; the kubelet retries it ({waiting['reason']}: {detail})")
        gated = ev.gated_message(pod, self.compute.queue)
        if gated:  # Kueue: a state to wait in (the queue admits it when there is quota), not an error
            self.tell(f"{prefix}{gated}")
            return
        message = ev.unschedulable_message(pod)
        if message is None:
            self._unschedulable_since.pop(uid, None)
            return
        self._unschedulable_since.setdefault(uid, now)
        self.tell(f"{prefix}waiting for a node: {message}")
        said = self._not_triggered.get(uid)
        if said is not None and uid not in self._scaling_up and ev.scale_up_hopeless(said) \
                and not self.compute.queue:
            raise self._fail(ev.unschedulable_failure(
                self._label(pod), pod, message,
                f"no node group of the cluster autoscaler can take it: {said}").exception(), pod)

    def _check_clocks(self, now: float) -> None:
        """Grace of an Unschedulable pod, lasting pull failures: the limits that pass while nothing happens."""
        for pod in list(self.pods.values()):
            uid = _uid(pod)
            since = self._unschedulable_since.get(uid)
            if since is not None and not self.compute.queue and now - since >= self.grace_s:
                message = ev.unschedulable_message(pod) or "Unschedulable"
                raise self._fail(ev.unschedulable_failure(self._label(pod), pod, message,
                                                          self._gave_up(now - since)).exception(), pod)
            if uid in self._pull_since:
                self._judge(pod)

    def _gave_up(self, waited_s: float) -> str:
        hint = (f"raise {UNSCHEDULABLE_GRACE_ENV} (seconds) and launch_timeout to wait longer for a node"
                if self.grace_s < self.compute.launch_timeout_s else
                "raise launch_timeout to wait longer for a node")
        return f"still unschedulable after {waited_s:.0f} s; {hint}"

    def _with_logs(self, failure: ev.Failure, pod: dict[str, Any]) -> LaunchError:
        if not failure.wants_logs:
            return failure.exception()
        ns, name = self.compute.namespace, ev.name_of(pod)
        logs, why = self.kube.pod_log_or_why(name, ns, CONTAINER_NAME, LOG_LINES_IN_ERRORS,
                                             previous=failure.previous_logs)
        if not logs.strip() and not why and failure.previous_logs:
            logs, why = self.kube.pod_log_or_why(name, ns, CONTAINER_NAME, LOG_LINES_IN_ERRORS)
        return failure.exception(logs, why)


class LaunchWaiter(PodJudge):
    """The watches and the state of one launch attempt; :meth:`wait` returns the Ready pod or raises."""

    def __init__(self, kube: KubeApi, compute: Compute, say: Callable[[str], None]) -> None:
        super().__init__(kube, compute, say)
        self._uids: set[str] = set()
        self._rs_uids: set[str] = set()
        self._pending: dict[str, list[dict[str, Any]]] = {}
        #: Set when the workload was deleted while waiting (`%kt down` elsewhere, kubectl): nothing to stop.
        self.workload_deleted = False

    # ------------------------------------------------------------------ the wait

    def wait(self, workload: dict[str, Any], kind: str, expected_hash: str, deadline: float) -> dict[str, Any]:
        """Watch the applied ``workload`` (a ``kind``: Deployment or Job), its ReplicaSets and pods until a pod
        of ``expected_hash`` is Ready."""
        ns, selector = self.compute.namespace, label_selector(self.compute)
        self._workload_uid = _uid(workload)
        self._expected = expected_hash
        self._known(self._workload_uid)
        if kind == "Deployment":  # a Job owns its pods itself
            self.watches.append(WatchThread(self.kube, "ReplicaSet", ns, self.updates, "rs",
                                            label_selector=selector))
        self.watches += [WatchThread(self.kube, "Pod", ns, self.updates, "pod", label_selector=selector),
                         WatchThread(self.kube, kind, ns, self.updates, "workload",
                                     field_selector=f"metadata.name={self.compute.service_name}")]
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout()
            self._check_clocks(now)
            try:
                tag, kind, obj = self.updates.get(timeout=min(deadline - now, CLOCK_CHECK_S))
            except queue.Empty:
                continue
            if kind == "ERROR":
                if tag == "pod":
                    raise obj
                self._say(f"(fewer progress lines: {obj})")  # events and ReplicaSets only add detail
                continue
            if tag == "workload":
                self._on_workload(kind, obj)
            elif tag == "event":
                self._on_event(obj)
            elif tag == "rs":
                if kind != "DELETED" and self._workload_uid in _owners(obj):
                    self._rs_uids.add(_uid(obj))
                    self._known(_uid(obj))
            else:
                ready = self._on_pod(kind, obj)
                if ready is not None:
                    return ready

    def _on_workload(self, kind: str, workload: dict[str, Any]) -> None:
        """The applied workload deleted (or being deleted), or its Job finished, while we wait: stop at once,
        saying so."""
        if _uid(workload) != self._workload_uid:
            return  # an earlier one of that name, or a new one a racing launch applied
        name = self.compute.name
        if kind == "DELETED" or (workload.get("metadata") or {}).get("deletionTimestamp"):
            self.workload_deleted = True
            raise LaunchError(f"compute {name!r} was deleted while its launch waited for it "
                              f"(`%kt down {name}` from elsewhere, or kubectl); there is nothing "
                              "left to wait for. Run the cell again to launch it anew.")
        failed = job_condition(workload, "Failed")
        if failed is not None:
            raise LaunchError(f"compute {name!r}: its Job failed before the pod kernel was ready "
                              f"({failed.get('reason') or 'Failed'}: {failed.get('message') or 'no detail'}); "
                              f"`%kt logs {name}` shows its last output. Run the cell again to launch it anew.")
        if job_condition(workload, "Complete") is not None:
            raise LaunchError(f"compute {name!r}: its pod kernel exited (code 0) before it was ready, which "
                              f"completed its Job; `%kt logs {name}` shows its output. Run the cell again to "
                              "launch it anew.")

    def _known(self, uid: str) -> None:
        """``uid`` is one of this attempt's objects: take the events that waited for it."""
        if uid and uid not in self._uids:
            self._uids.add(uid)
            for event in self._pending.pop(uid, []):
                self._take(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        uid = (event.get("involvedObject") or {}).get("uid") or ""
        if uid in self._uids:
            self._take(event)
        elif uid and sum(len(v) for v in self._pending.values()) < PENDING_EVENTS_MAX:
            self._pending.setdefault(uid, []).append(event)

    def _take(self, event: dict[str, Any]) -> None:
        """An event of this attempt: a progress line, and maybe the end of the wait."""
        self.events.append(event)
        self.tell(ev.event_progress(event))
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "Pod":
            failure = ev.refused_failure(self.compute.name, event)
            if failure is not None:
                raise failure.exception()
            return
        uid = involved.get("uid") or ""
        self._note_pod_event(event, next((p for p in self.pods.values() if _uid(p) == uid), None))

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> dict[str, Any] | None:
        name = ev.name_of(pod)
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if kind == "DELETED" or ev.is_terminating(pod) or annotations.get(TEMPLATE_HASH_ANNOTATION) != self._expected:
            self.pods.pop(name, None)
            return None
        self.pods[name] = pod
        self._known(_uid(pod))
        for line in ev.pod_progress(pod):
            self.tell(line)
        if ev.is_ready(pod):
            return pod
        self._judge(pod)
        return None

    def _timeout(self) -> LaunchError:
        pods = list(self.pods.values())
        if not self.compute.queue:
            for pod in pods:
                message = ev.unschedulable_message(pod)
                if message is not None:
                    since = self._unschedulable_since.get(_uid(pod), time.monotonic())
                    return ev.unschedulable_failure(self.compute.name, pod, message,
                                                    self._gave_up(time.monotonic() - since)).exception()
        logs, why = "", ""
        for pod in pods:
            if ((ev.container_status(pod) or {}).get("state") or {}).get("running"):
                logs, why = self.kube.pod_log_or_why(ev.name_of(pod), self.compute.namespace, CONTAINER_NAME,
                                                     LOG_LINES_IN_ERRORS)
        return ev.timeout_error(self.compute.name, self.compute.launch_timeout_s, pods, self.events, logs, why)
