"""FakeJobController: the fake cluster's Job controller (batch/v1), and its pods' restart policy (a test double).

Registered with :class:`~k8s_fake.kubelet.FakeKubelet` for ``jobs`` (see
:func:`install`), it does at the wire what the real controller does for a
non-indexed Job of ``completions``/``parallelism`` 1 (kt_jupyter's only kind):

* it creates the pod (``generateName: {job}-``) with an owner reference to
  the Job (``controller: true``) and the labels
  ``batch.kubernetes.io/job-name`` / ``batch.kubernetes.io/controller-uid``
  (and their legacy ``job-name`` / ``controller-uid``), a ``SuccessfulCreate``
  event, or ``FailedCreate`` with the API's message (retried);
* it keeps ``status``: ``startTime``, ``active``, ``ready``, ``succeeded``,
  ``failed``, and ``completionTime`` with the conditions ``SuccessCriteriaMet``
  + ``Complete`` (reason ``CompletionsReached``) once the pod succeeded, or
  ``FailureTarget`` + ``Failed`` (reason ``BackoffLimitExceeded``, its active
  pod deleted) once the failures pass ``backoffLimit`` (default 6) — with
  ``restartPolicy: OnFailure`` the container restarts count, as in Kubernetes;
* ``spec.suspend: true`` deletes the active pod and sets ``Suspended``
  (``JobSuspended``); ``false`` again sets it False (``JobResumed``), resets
  ``startTime`` and creates a new pod;
* a Job deleted in the foreground keeps its ``deletionTimestamp`` until its
  pods are gone; a Job gone from the API has its pods deleted (the garbage collector).

``ttlSecondsAfterFinished``, indexed Jobs and pod failure policies are not
modelled (kt_jupyter uses none of them).

:class:`FakeJobPodRuntime` is the kubelet's side: a container that exits is
restarted only as the pod's ``restartPolicy`` says (``OnFailure``: only a
failure; ``Never``: never); otherwise the pod ends ``Succeeded`` (exit 0) or
``Failed``, its container stays terminated, and the scheduler no longer counts
its requests (a finished pod holds no GPU).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from .pod_runtime import FakePodRuntime, _FakeContainerRun
from .store import now_rfc3339

if TYPE_CHECKING:
    from .kubelet import FakeKubelet

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
#: The default of ``spec.backoffLimit``.
DEFAULT_BACKOFF_LIMIT = 6
#: Pod phases after which a pod runs nothing and holds no node resources.
TERMINAL_PHASES = ("Succeeded", "Failed")


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _true(job: dict[str, Any], kind: str) -> bool:
    return (_condition(job, kind) or {}).get("status") == "True"


def _phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or ""


class FakeJobPodRuntime(FakePodRuntime):
    """A Job's pod on the fake node: its container restarts only as ``restartPolicy`` says."""

    def _await_listening(self, run: _FakeContainerRun, read_fd: int, limit_bytes: float | None) -> None:
        super()._await_listening(run, read_fd, limit_bytes)
        code = run.proc.wait()
        policy = self.spec.get("restartPolicy", "Always")
        if self.stopping.is_set() or policy == "Always" or (policy == "OnFailure" and code != 0):
            return  # deleted, or the pod worker restarts the container as it does for any pod
        self._terminate_pod(run, code)
        self.stopping.wait()  # the finished pod stays in the API, its container terminated, until it is deleted

    def _terminate_pod(self, run: _FakeContainerRun, code: int) -> None:
        """The kubelet's status for a pod whose container ended for good: phase Succeeded or Failed."""
        exit_code = 128 + (-code) if code < 0 else code
        reason = "OOMKilled" if run.oom_killed else ("Completed" if code == 0 else "Error")

        def mutate(pod: dict[str, Any]) -> None:
            status = pod.setdefault("status", {})
            prev = (status.get("containerStatuses") or [{}])[0]
            started = ((prev.get("state") or {}).get("running") or {}).get("startedAt", now_rfc3339())
            cs = dict(prev, ready=False, started=False, restartCount=self.restarts,
                      state={"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": started,
                                            "finishedAt": now_rfc3339()}})
            status["containerStatuses"] = [cs]
            status["phase"] = "Succeeded" if code == 0 else "Failed"
            conds = [c for c in status.get("conditions", []) if c["type"] not in ("Ready", "ContainersReady")]
            status["conditions"] = conds + [
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted"},
                {"type": "Ready", "status": "False", "reason": "PodCompleted"}]
        self._update(mutate)


class FakeJobController:
    """The Job controller (``job-controller``) of the fake cluster; the kubelet's thread calls it."""

    def __init__(self, kubelet: "FakeKubelet") -> None:
        self.kubelet, self.store = kubelet, kubelet.store

    # -- FakeController

    def owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The Job controlling ``pod``, as stored now."""
        ns = pod["metadata"]["namespace"]
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Job" and ref.get("controller"):
                job = self.store.get("jobs", ns, ref["name"])
                if job is not None and job["metadata"]["uid"] == ref["uid"]:
                    return job
        return None

    def deleted(self, job: dict[str, Any]) -> None:
        """The garbage collector: a Job gone from the API takes its pods along."""
        for pod in self._pods(job):
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", job["metadata"]["namespace"], pod["metadata"]["name"])

    def reconcile(self, job: dict[str, Any]) -> None:
        """Move the Job toward its spec: one pod while it should run, its status and conditions."""
        job = self.store.get("jobs", job["metadata"]["namespace"], job["metadata"]["name"])
        if job is None:
            return
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        pods = self._pods(job)
        if job["metadata"].get("deletionTimestamp"):  # foreground deletion: the pods go first, then the Job
            self.deleted(job)
            if not pods:
                self.store.remove("jobs", ns, name)
            return
        spec = job.get("spec") or {}
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        active = [p for p in live if _phase(p) not in TERMINAL_PHASES]
        succeeded = sum(1 for p in pods if _phase(p) == "Succeeded")
        failed = sum(1 for p in pods if _phase(p) == "Failed")
        restarts = sum(int(cs.get("restartCount") or 0) for p in pods
                       for cs in (p.get("status") or {}).get("containerStatuses") or [])
        finished = _true(job, "Complete") or _true(job, "Failed")
        conditions: list[dict[str, Any]] = []
        now = now_rfc3339()
        if finished or spec.get("suspend"):
            for pod in active:
                self.store.delete("pods", ns, pod["metadata"]["name"])
            active = []
        elif failed + restarts > int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)):
            message = "Job has reached the specified backoff limit"
            conditions = [self._cond("FailureTarget", "BackoffLimitExceeded", message, now),
                          self._cond("Failed", "BackoffLimitExceeded", message, now)]
            for pod in active:
                self.store.delete("pods", ns, pod["metadata"]["name"])
            active = []
            self._event(job, "BackoffLimitExceeded", message, "Warning")
        elif succeeded >= int(spec.get("completions", 1)):
            message = "Reached expected number of succeeded pods"
            conditions = [self._cond("SuccessCriteriaMet", "CompletionsReached", message, now),
                          self._cond("Complete", "CompletionsReached", message, now)]
            self._event(job, "Completed", "Job completed")
        elif not active and int(spec.get("parallelism", 1)) > 0:
            pod = self._create_pod(job)
            active = [pod] if pod is not None else []
        self._update_status(job, active, succeeded, failed, conditions, now)

    # -- parts

    @staticmethod
    def _cond(kind: str, reason: str, message: str, now: str) -> dict[str, Any]:
        return {"type": kind, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": now, "lastTransitionTime": now}

    def _pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        return [p for p in self.store.list("pods", job["metadata"]["namespace"])
                if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]

    def _event(self, job: dict[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        self.kubelet.event(job["metadata"]["namespace"], "Job", job["metadata"]["name"], job["metadata"]["uid"],
                           reason, message, type_, component="job-controller")

    def _create_pod(self, job: dict[str, Any]) -> dict[str, Any] | None:
        template = job["spec"]["template"]
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        meta = copy.deepcopy(template.get("metadata") or {})
        meta["generateName"] = f"{name}-"
        meta["labels"] = dict(meta.get("labels") or {}, **{JOB_NAME_LABEL: name, CONTROLLER_UID_LABEL: uid,
                                                           "job-name": name, "controller-uid": uid})
        pod = self.kubelet.create_pod(job, meta, template["spec"], component="job-controller",
                                      retry=lambda: self.kubelet.requeue("jobs", job), runtime=FakeJobPodRuntime)
        if pod is not None:
            self._event(job, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}")
        return pod

    def _update_status(self, job: dict[str, Any], active: list[dict[str, Any]], succeeded: int, failed: int,
                       finishing: list[dict[str, Any]], now: str) -> None:
        suspended = bool((job.get("spec") or {}).get("suspend"))
        ready = sum(1 for p in active if any(c.get("type") == "Ready" and c.get("status") == "True"
                                             for c in (p.get("status") or {}).get("conditions") or []))

        def mutate(obj: dict[str, Any]) -> None:
            status = obj.setdefault("status", {})
            prev = _condition(obj, "Suspended")
            conds = [c for c in status.get("conditions") or [] if c["type"] != "Suspended"]
            if suspended and not (_true(obj, "Complete") or _true(obj, "Failed")):
                conds.append(prev if prev and prev["status"] == "True"
                             else self._cond("Suspended", "JobSuspended", "Job suspended", now))
            elif prev is not None and prev["status"] == "True":  # resumed: the Job's clock starts again
                conds.append(dict(self._cond("Suspended", "JobResumed", "Job resumed", now), status="False"))
                status["startTime"] = now
            elif prev is not None:
                conds.append(prev)
            conds += finishing
            status.update(conditions=conds, active=len(active), ready=ready, succeeded=succeeded, failed=failed)
            if not suspended and "startTime" not in status:
                status["startTime"] = now
            if any(c["type"] == "Complete" for c in finishing):
                status["completionTime"] = now
            for key in ("conditions", "active", "succeeded", "failed"):
                if not status[key]:
                    status.pop(key)
        self.store.update("jobs", job["metadata"]["namespace"], job["metadata"]["name"], mutate)


def install(kubelet: "FakeKubelet") -> FakeJobController:
    """Register a Job controller with ``kubelet`` (before it starts) and return it."""
    controller = kubelet.controllers["jobs"] = FakeJobController(kubelet)
    return controller
