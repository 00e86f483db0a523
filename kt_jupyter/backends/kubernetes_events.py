"""What Kubernetes says about a compute's pods, turned into progress lines and one clear error each.

Pure functions over the API's JSON (pods and events as dicts): no I/O, so
every message here is tested without a cluster. The backend feeds them what
its watches see (:mod:`kt_jupyter.backends.kubernetes`) and adds log lines
where a message needs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CrashLoopError, ImagePullError, LaunchError, LaunchTimeoutError, OOMKilledError, UnschedulableError
from ..manifests import CONTAINER_NAME

#: Waiting reasons that mean the image cannot be pulled (yet: the kubelet retries ErrImagePull).
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                      "RegistryUnavailable")
#: Pull failures no retry cures: the image name itself is refused.
IMAGE_PULL_FINAL_REASONS = ("InvalidImageName", "ErrImageNeverPull")
#: What a registry says when the image is not there or not ours to pull: final.
_PULL_FINAL_RE = re.compile(r"not found|manifest unknown|NotFound|unauthorized|Unauthorized|authorization failed|"
                            r"access denied|denied:|repository does not exist|401|403 Forbidden|forbidden",
                            re.IGNORECASE)
#: Seconds a pull may keep failing for a reason we cannot call final before we call it lasting.
PULL_BACKOFF_GRACE_S = 120.0
#: What an autoscaler's NotTriggerScaleUp says when a scale-up may still come (capacity, back-off, limits).
_SCALE_UP_HOPE_RE = re.compile(r"max node group size reached|max cluster|backoff|back-off|in backoff|"
                               r"limit reached|quota|not ready for scale-up|failed scale-up", re.IGNORECASE)
#: FailedCreate messages of transient causes: the ReplicaSet controller retries them.
_CREATE_TRANSIENT_RE = re.compile(r"Operation cannot be fulfilled|deadline exceeded|Timeout|timed out|"
                                  r"connection refused|try again|unavailable|TooManyRequests|"
                                  r"Internal error occurred: failed calling webhook", re.IGNORECASE)
#: Waiting reasons that mean the container cannot be created as specified.
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
#: Events quoted in a timeout message.
EVENTS_IN_ERRORS = 8

_INSUFFICIENT_RE = re.compile(r"Insufficient ([A-Za-z0-9./_-]+)")


@dataclass
class Failure:
    """A launch that cannot succeed: the error type, its message, and whether logs would help."""

    error: type[LaunchError]
    message: str
    pod: str
    wants_logs: bool = False
    previous_logs: bool = False
    reasons: list[str] = field(default_factory=list)

    def exception(self, logs: str = "", logs_unavailable: str = "") -> LaunchError:
        """The error to raise, with the container's last log lines (or why there are none)."""
        text = self.message
        if self.wants_logs:
            text += "\n" + log_section(logs, logs_unavailable)
        return self.error(text)


def log_section(logs: str, unavailable: str = "") -> str:
    """``Last log lines of the container:`` and the lines, or ``(logs unavailable: why)``."""
    if logs.strip():
        return f"Last log lines of the container:\n{indent(logs)}"
    if unavailable:
        return f"Last log lines of the container: (logs unavailable: {unavailable})"
    return "Last log lines of the container:\n  (no output)"


# ---------------------------------------------------------------------- reading a pod

def name_of(obj: dict[str, Any]) -> str:
    """``metadata.name`` of an API object."""
    return (obj.get("metadata") or {}).get("name", "")


def namespace_of(obj: dict[str, Any]) -> str:
    """``metadata.namespace`` of an API object."""
    return (obj.get("metadata") or {}).get("namespace", "")


def container_status(pod: dict[str, Any], name: str = CONTAINER_NAME) -> dict[str, Any] | None:
    """The status of the pod kernel's container (the first container when none has our name)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == name:
            return status
    return statuses[0] if statuses else None


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The pod condition of type ``kind`` (PodScheduled, Ready, ...)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def is_terminating(pod: dict[str, Any]) -> bool:
    """Whether the pod is being deleted."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def is_ready(pod: dict[str, Any]) -> bool:
    """Whether the pod is Ready and not being deleted."""
    cond = condition(pod, "Ready")
    return bool(cond and cond.get("status") == "True" and not is_terminating(pod))


def restart_count(pod: dict[str, Any]) -> int:
    """How often the pod kernel's container was restarted."""
    status = container_status(pod)
    return int((status or {}).get("restartCount") or 0)


def node_of(pod: dict[str, Any]) -> str:
    """The node the pod is bound to ('' while unscheduled)."""
    return (pod.get("spec") or {}).get("nodeName") or ""


def pod_container(pod: dict[str, Any], name: str = CONTAINER_NAME) -> dict[str, Any]:
    """The pod kernel's container spec."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return next((c for c in containers if c.get("name") == name), containers[0])


def memory_limit(pod: dict[str, Any]) -> str | None:
    """The container's memory limit as written in the spec, if any."""
    return ((pod_container(pod).get("resources") or {}).get("limits") or {}).get("memory")


def requested(pod: dict[str, Any], resource: str) -> str | None:
    """What the container asks for of ``resource`` (limit, else request)."""
    res = pod_container(pod).get("resources") or {}
    return (res.get("limits") or {}).get(resource) or (res.get("requests") or {}).get(resource)


def indent(text: str, prefix: str = "  ") -> str:
    """Every line of ``text`` indented."""
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


# ---------------------------------------------------------------------- progress

def pod_progress(pod: dict[str, Any]) -> list[str]:
    """Progress lines the pod's state implies (the backend says each line once)."""
    lines = [f"pod {name_of(pod)} created"]
    if node_of(pod):
        lines.append(f"scheduled on node {node_of(pod)}")
    status = container_status(pod)
    if status and (status.get("state") or {}).get("running"):
        lines.append("container started; waiting for the pod kernel to listen "
                     "(the first start installs its dependencies)")
    return lines


def event_progress(event: dict[str, Any]) -> str | None:
    """A progress line for an event worth showing, else None."""
    reason, message = event.get("reason") or "", (event.get("message") or "").strip()
    if reason == "Scheduled":
        match = re.search(r" to (\S+)$", message)
        return f"scheduled on node {match.group(1)}" if match else f"scheduled: {message}"
    if reason == "Pulling":
        return message[:1].lower() + message[1:] if message else "pulling image"
    if reason == "Pulled":
        return message[:1].lower() + message[1:] if message else "image pulled"
    if reason == "TriggeredScaleUp":
        return f"the cluster autoscaler is adding a node: {message}"
    if reason == "Nominated":
        return f"a node is being started for it (Karpenter): {message}"
    if reason == "FailedScheduling":
        return f"waiting for a node: {message}"
    if reason in ("NotTriggerScaleUp", "BackOff", "Failed", "FailedMount", "FailedAttachVolume", "Evicted",
                  "Preempted", "FailedCreate"):
        return f"{reason}: {message}"
    return None


def is_scale_up_signal(event: dict[str, Any]) -> bool:
    """Whether an event says a node is on its way for the pod (cluster autoscaler, Karpenter)."""
    return event.get("reason") in ("TriggeredScaleUp", "Nominated")


def scale_up_hopeless(message: str) -> bool:
    """Whether a NotTriggerScaleUp says no node group could ever take the pod (not just: not now)."""
    return not _SCALE_UP_HOPE_RE.search(message)


def pull_failure_detail(event: dict[str, Any]) -> str | None:
    """The registry's answer in a kubelet ``Failed`` event about a pull, else None."""
    message = (event.get("message") or "").strip()
    if event.get("reason") == "Failed" and message.startswith("Failed to pull image"):
        return message
    return None


def format_events(events: Iterable[dict[str, Any]], limit: int = EVENTS_IN_ERRORS) -> str:
    """The last ``limit`` events as indented lines: ``Warning FailedScheduling pod/x: message``."""
    def when(ev: dict[str, Any]) -> str:
        return ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp") or \
            (ev.get("metadata") or {}).get("creationTimestamp") or ""

    ordered = sorted(events, key=when)[-limit:]
    if not ordered:
        return "  (no events)"
    lines = []
    for ev in ordered:
        obj = ev.get("involvedObject") or {}
        count = f" (x{ev['count']})" if (ev.get("count") or 1) > 1 else ""
        lines.append(f"  {ev.get('type', 'Normal')} {ev.get('reason', '')} {obj.get('kind', '').lower()}/"
                     f"{obj.get('name', '')}: {(ev.get('message') or '').strip()}{count}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- failures

def _describe_termination(term: dict[str, Any]) -> str:
    code = term.get("exitCode")
    reason = term.get("reason") or "Error"
    text = f"{reason}, exit code {code}"
    if isinstance(code, int) and code > 128:
        text += f" (signal {code - 128})"
    return text


def node_rules(pod: dict[str, Any]) -> str:
    """The pod's node selector and required node affinity, readably: ``{'a': 'b'} and (k in (v1, v2) or ...)``."""
    spec = pod.get("spec") or {}
    parts = [str(spec["nodeSelector"])] if spec.get("nodeSelector") else []
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = [" and ".join(f"{e.get('key')} {e.get('operator', '').lower()} ({', '.join(e.get('values') or [])})"
                          for e in t.get("matchExpressions") or []) for t in required.get("nodeSelectorTerms") or []]
    if terms:
        parts.append("(" + " or ".join(terms) + ")")
    return " and ".join(parts) or "(none)"


def unschedulable_message(pod: dict[str, Any]) -> str | None:
    """The scheduler's message while the pod is Unschedulable (a state: autoscalers may still add a node)."""
    sched = condition(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable" and not node_of(pod):
        return (sched.get("message") or "").strip() or "Unschedulable"
    return None


def gated_message(pod: dict[str, Any], queue: str | None = None) -> str | None:
    """While the pod waits behind scheduling gates (Kueue holds it until its queue admits it): what it waits for."""
    gates = [g.get("name", "?") for g in (pod.get("spec") or {}).get("schedulingGates") or [] if isinstance(g, dict)]
    sched = condition(pod, "PodScheduled")
    gated = sched is not None and sched.get("status") == "False" and sched.get("reason") == "SchedulingGated"
    if node_of(pod) or not (gates or gated):
        return None
    held_by = f" (scheduling gates: {', '.join(gates)})" if gates else ""
    return f"waiting for queue {queue!r} to admit it{held_by}" if queue else \
        f"waiting for its scheduling gates to be lifted{held_by}"


def unschedulable_failure(compute: str, pod: dict[str, Any], message: str, why: str = "") -> Failure:
    """The scheduler's message turned into the resource or rule that is missing; ``why`` we stopped waiting."""
    missing = list(dict.fromkeys(r.rstrip(".,;") for r in _INSUFFICIENT_RE.findall(message)))
    name = name_of(pod)
    if missing:
        asks = ", ".join(f"{r} (asked for {requested(pod, r) or '?'})" for r in missing)
        hint = ("Ask for fewer GPUs or another gpu_type, or check that the cluster has GPU nodes (with the "
                "NVIDIA device plugin)" if any("gpu" in r for r in missing)
                else "Ask for less, or ask your cluster admin for capacity")
        text = (f"compute {compute!r} cannot be scheduled: no node has enough {asks}. {hint}. "
                f"The scheduler said: {message}")
    elif "node affinity/selector" in message or "didn't match Pod's node affinity" in message:
        text = (f"compute {compute!r} cannot be scheduled: no node matches its node selector "
                f"{node_rules(pod)}; check gpu_type / node_selector against "
                f"`kubectl get nodes --show-labels`. The scheduler said: {message}")
    elif "untolerated taint" in message or "had taint" in message:
        text = (f"compute {compute!r} cannot be scheduled: the nodes have taints it does not tolerate; "
                f"add tolerations=[...]. The scheduler said: {message}")
    elif "PersistentVolumeClaim" in message or "persistentvolumeclaim" in message:
        text = (f"compute {compute!r} cannot be scheduled: a volume claim is missing or unbound; "
                f"check volumes=[...] with `kubectl get pvc`. The scheduler said: {message}")
    else:
        text = f"compute {compute!r} cannot be scheduled: {message}"
    if why:
        text += f" ({why})"
    return Failure(UnschedulableError, text + f" (pod {name})", name, reasons=missing)


def diagnose_pod(compute: str, pod: dict[str, Any], *, pull_detail: str = "",
                 pull_failing_s: float = 0.0) -> Failure | None:
    """A failure this pod shows that waiting will not cure, or None.

    Unschedulable is not one (see :func:`unschedulable_message`), nor is a
    pull failure the kubelet may still get past: a registry 429 or timeout.
    A pull fails for good when the registry says the image is not there or
    not ours (in the waiting message or in ``pull_detail``, the kubelet's
    last ``Failed`` event), or after ``pull_failing_s`` of failing reaches
    :data:`PULL_BACKOFF_GRACE_S`.
    """
    if is_terminating(pod) or is_ready(pod):
        return None
    name = name_of(pod)
    status = container_status(pod)
    image = pod_container(pod).get("image", "?")
    if not status:
        return None
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason, message = waiting.get("reason") or "", (waiting.get("message") or "").strip()
    terminated = (status.get("state") or {}).get("terminated") or {}
    last = (status.get("lastState") or {}).get("terminated") or {}
    if reason in IMAGE_PULL_REASONS:
        detail = message if _PULL_FINAL_RE.search(message) else (pull_detail or message)
        lasting = pull_failing_s >= PULL_BACKOFF_GRACE_S
        if reason in IMAGE_PULL_FINAL_REASONS or _PULL_FINAL_RE.search(detail) or lasting:
            still = f" It was still failing after {pull_failing_s:.0f} s of retries." if lasting else ""
            return Failure(ImagePullError, (
                f"compute {compute!r}: Kubernetes cannot pull the image {image!r} ({reason}: "
                f"{detail or 'no detail'}).{still} Check the image name and tag; a private registry needs "
                f"imagePullSecrets (service_template) or a service_account_name that has them. "
                f"Fix the image and run the cell again (pod {name})."), name)
        return None
    if "OOMKilled" in (terminated.get("reason"), last.get("reason")):
        limit = memory_limit(pod)
        how = (f"using more memory than its limit ({limit})" if limit
               else "the node running out of memory (no memory limit was set)")
        bigger = f" (e.g. memory='{_double(limit)}')" if limit else ""
        code = (terminated or last).get("exitCode")
        return Failure(OOMKilledError, (
            f"compute {compute!r}: the pod kernel was killed while starting for {how} (OOMKilled). Exit code "
            f"{code if code is not None else 137}. Ask for more memory{bigger}, or load less at start "
            f"(pod {name})."), name, wants_logs=True, previous_logs=not terminated)
    if reason == "CrashLoopBackOff":
        how = _describe_termination(last) if last else "exited"
        return Failure(CrashLoopError, (
            f"compute {compute!r}: the pod kernel's container keeps exiting while starting "
            f"(CrashLoopBackOff; last run: {how}). Fix what its log below shows (a failing image "
            f"setup step, a missing dependency, a bad command or env) and run the cell again "
            f"(pod {name})."), name, wants_logs=True, previous_logs=True)
    if reason in CONFIG_REASONS:
        return Failure(CrashLoopError, (
            f"compute {compute!r}: Kubernetes cannot create the container ({reason}: {message}). "
            f"A Secret or ConfigMap it names may be missing: check secrets=[...] / env_vars "
            f"(pod {name})."), name)
    return None


def refused_failure(compute: str, event: dict[str, Any]) -> Failure | None:
    """A ReplicaSet's (or Job's) FailedCreate that retries will not cure (PodSecurity, forbidden, quota), else None.

    Webhook timeouts and quota update races are transient: the ReplicaSet
    and Job controllers retry them, so they are progress, not failures.
    """
    if event.get("reason") != "FailedCreate" or event.get("type") != "Warning":
        return None
    message = (event.get("message") or "").strip()
    if _CREATE_TRANSIENT_RE.search(message):
        return None
    if "PodSecurity" in message:
        what = ("the namespace enforces a Pod Security level the pod does not meet; ask your cluster admin, "
                "or use a namespace that admits it")
    elif "quota" in message:
        what = "a ResourceQuota of the namespace is exhausted: ask for less or free some"
    else:
        what = "an admission policy of the cluster refused it"
    return Failure(UnschedulableError, f"compute {compute!r}: Kubernetes refused to create its pod "
                                       f"({what}). It said: {message}", (event.get("involvedObject") or {})
                   .get("name", ""))


def _double(quantity: str) -> str:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity.strip())
    if not match:
        return quantity
    number = float(match.group(1)) * 2
    return f"{number:g}{match.group(2)}"


def timeout_error(compute: str, timeout_s: float, pods: list[dict[str, Any]], events: list[dict[str, Any]],
                  logs: str = "", logs_unavailable: str = "") -> LaunchTimeoutError:
    """Launch timeout, with where each pod got to, the last events and log lines."""
    if pods:
        states = []
        for pod in pods:
            status = container_status(pod) or {}
            state = status.get("state") or {}
            detail = next(iter(state), "") if state else ""
            why = (state.get(detail) or {}).get("reason") if detail else None
            sched = condition(pod, "PodScheduled")
            gated = gated_message(pod)
            if gated:
                where = f"not scheduled: {gated}"
            elif not node_of(pod):
                where = "not scheduled" + (f" ({sched.get('message')})" if sched and sched.get("message") else "")
            else:
                where = f"on node {node_of(pod)}, container {detail or 'not created'}" + (f" ({why})" if why else "")
            states.append(f"  pod {name_of(pod)}: {(pod.get('status') or {}).get('phase', '?')}, {where}")
        where_text = "\n".join(states)
    else:
        where_text = "  no pod was created (see the events)"
    text = (f"compute {compute!r} was not ready within {timeout_s:g} s (launch_timeout; raise it with "
            f"launch_timeout= / --launch-timeout or KT_LAUNCH_TIMEOUT).\n{where_text}\n"
            f"Last events:\n{format_events(events)}")
    if logs.strip() or logs_unavailable:
        text += "\n" + log_section(logs, logs_unavailable)
    return LaunchTimeoutError(text)


def gone_sentence(compute: str, pod: str, why: str, logs: str = "", logs_unavailable: str = "") -> str:
    """The liveness sentence when the pod kernel the notebook used is gone."""
    text = f"pod kernel {compute!r} (pod {pod}) {why}; its variables are lost. The next %%kt cell starts a new one."
    if logs.strip():
        text += f" Last log lines:\n{indent(logs)}"
    elif logs_unavailable:
        text += f" (logs unavailable: {logs_unavailable})"
    return text


def restart_reason(pod: dict[str, Any]) -> str:
    """Why the container last restarted: 'was OOMKilled (memory limit 200Mi)', 'exited (Error, exit code 1)'."""
    last = ((container_status(pod) or {}).get("lastState") or {}).get("terminated") or {}
    if last.get("reason") == "OOMKilled":
        limit = memory_limit(pod)
        return f"was killed for exceeding its memory limit ({limit})" if limit else "was killed: out of memory"
    if last:
        return f"exited ({_describe_termination(last)})"
    return "restarted"
