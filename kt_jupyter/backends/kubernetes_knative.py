"""Autoscaled computes on Kubernetes: a Knative Serving ``Service`` instead of a Deployment.

:class:`~kt_jupyter.backends.kubernetes.KubernetesBackend` hands a compute
with ``deployment_mode == "knative"`` (``Compute(...).autoscale(...)``) to
:func:`launch`; its ``find``, ``status`` and ``delete`` ask :func:`find`,
:func:`status` and :func:`delete` about names that have no Deployment.

- **Launch**: the token Secret, the source ConfigMap and the PVCs are applied
  as for a Deployment, then the Knative Service
  (:func:`kt_jupyter.knative.knative_objects`) with server-side apply. Knative
  makes a Revision of it and a Deployment of the Revision; its pods carry the
  compute's labels and ``serving.knative.dev/revision``. Readiness is the
  Service's ``Ready`` condition plus a Ready pod of its latest Revision; a
  ``False`` condition (``RevisionFailed`` after ``ContainerMissing``, a
  progress deadline) or a pod failure that waiting will not cure is one error
  with Knative's reason and message.
- **Connect**: to a pod of the Revision, through the same connector as a
  Deployment's pod (a port-forward from outside the cluster). That path goes
  around Knative's activator and queue-proxy, so Knative does not count a
  notebook's session as a request: with ``min_replicas=0`` it scales the
  compute to zero once its stable window passes, and the kernel and its state
  go with the pod. Launch says so; a later launch of a compute found at zero
  pods starts a fresh one (deleting and re-creating the Service) and says so.
- **Knative missing**: the API answers 404 for ``services.serving.knative.dev``
  when Knative Serving is not installed; that is one message naming it.
- **Delete**: the Knative Service in the foreground (its Revisions, their
  Deployments and pods go with it), waiting until its pods have left.
"""

from __future__ import annotations

import base64
import json
import queue
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..compute import Compute
from ..errors import BackendUnavailable, KtError, KubernetesAPIError, LaunchError, NotFoundError
from ..knative import API_VERSION, knative_objects, required_feature_flags
from ..manifests import CONTAINER_NAME, MANAGED_BY, MANAGED_BY_LABEL, SPEC_ANNOTATION, label_selector, token_secret_name
from . import SPEC_KEYS, KernelHandle, KernelInfo, spec_mismatch, spec_mismatch_error
from . import kubernetes_events as ev
from .kubernetes_api import FIELD_MANAGER, ApiStatusError, KubeApi
from .kubernetes_objects import pod_kernel_source_files
from .kubernetes_watch import WatchThread

if TYPE_CHECKING:
    from .kubernetes import KubernetesBackend

#: Most seconds between two reads of the Knative Service's status while waiting (pod changes wake it sooner).
STATUS_POLL_S = 1.0
#: Seconds ``delete`` waits for the Service and its pods to leave, beyond the pods' grace period.
DELETE_WAIT_S = 60.0
REVISION_LABEL = "serving.knative.dev/revision"
_PREFIX = "/apis/" + API_VERSION


def _path(namespace: str, name: str | None = None) -> str:
    return f"{_PREFIX}/namespaces/{namespace}/services" + (f"/{name}" if name else "")


def knative_missing(compute: Compute) -> BackendUnavailable:
    """The error for a cluster without Knative Serving (the API has no ``services.serving.knative.dev``)."""
    return BackendUnavailable(
        f"compute {compute.name!r} is autoscaled (autoscale(...) makes a Knative Service), but this cluster has no "
        "Knative Serving: the API has no services.serving.knative.dev. Ask your admin to install Knative Serving "
        "(https://knative.dev/docs/install/), or drop autoscale() to run the compute as a Deployment")


def get_service(kube: KubeApi, compute: Compute, *, required: bool = False) -> dict[str, Any] | None:
    """The compute's Knative Service, or None. Without Knative Serving: None, or with ``required`` the error."""
    ns, svc = compute.namespace, compute.service_name
    try:  # the collection, not the object: only a missing resource type answers it with 404
        reply = kube.request("GET", _path(ns), action=f"reading Knative Service {ns}/{svc}",
                             query={"fieldSelector": f"metadata.name={svc}"})
    except NotFoundError:
        if required:
            raise knative_missing(compute) from None
        return None
    return next(iter(reply.get("items") or []), None)


def _conditions(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = service.get("status") or {}
    if status.get("observedGeneration") != (service.get("metadata") or {}).get("generation"):
        return {}  # Knative has not looked at this generation yet
    return {c.get("type", ""): c for c in status.get("conditions") or []}


def _pods(kube: KubeApi, compute: Compute, revision: str | None = None) -> list[dict[str, Any]]:
    selector = label_selector(compute) + (f",{REVISION_LABEL}={revision}" if revision else "")
    return [p for p in kube.list("Pod", compute.namespace, label_selector=selector) if not ev.is_terminating(p)]


def _epoch(timestamp: str | None) -> float:
    try:
        return datetime.fromisoformat(timestamp or "").timestamp()
    except ValueError:
        return 0.0


def _running_spec(service: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(((service.get("metadata") or {}).get("annotations") or {}).get(SPEC_ANNOTATION) or "{}")
    except ValueError:
        return {}


def zero_sentence(compute: Compute) -> str:
    """What scale-to-zero did to a compute, said plainly."""
    return (f"Knative scaled compute {compute.name!r} to zero (autoscale min_replicas=0, no requests it could "
            "see): its pod is gone, and the kernel's state (variables, imports) with it")


def _handle(backend: KubernetesBackend, kube: KubeApi, compute: Compute, pod: dict[str, Any],
            token: str) -> KernelHandle:
    """The Deployment path's handle for a Revision's pod; when the pod ends because Knative scaled the compute to
    zero (its Service is still there, with no pods), its liveness sentence says that."""
    handle = backend._handle(kube, compute, pod, token)
    config = compute.autoscaling_config
    liveness = handle.liveness
    if config is None or config.min_replicas or liveness is None:
        return handle
    verdict: list[str] = []

    def knative_liveness() -> str | None:
        gone = liveness()
        if gone is None or verdict:
            return verdict[0] if verdict and gone is not None else gone
        try:
            service = get_service(kube, compute)
            zero = service is not None and not service["metadata"].get("deletionTimestamp") \
                and not _pods(kube, compute)
        except KtError:
            zero = False
        verdict.append(f"{zero_sentence(compute)}. The next %%kt cell starts a new one." if zero else gone)
        return verdict[0]

    handle.liveness = knative_liveness
    return handle


def _token_of(kube: KubeApi, compute: Compute) -> str | None:
    secret = kube.get("Secret", token_secret_name(compute), compute.namespace)
    data = ((secret or {}).get("data") or {}).get("token")
    return base64.b64decode(data).decode() if data else None


# ---------------------------------------------------------------------- the backend's hooks

def find(backend: KubernetesBackend, kube: KubeApi, compute: Compute) -> KernelHandle | None:
    """The running (ready) kernel of an autoscaled compute of that name, else None."""
    service = get_service(kube, compute)
    if service is None or (service.get("metadata") or {}).get("deletionTimestamp"):
        return None
    ready = [p for p in _pods(kube, compute) if ev.is_ready(p)]
    token = _token_of(kube, compute) if ready else None
    if not token:
        return None
    spec = _running_spec(service)
    if compute.name not in backend._known and spec:
        compute = Compute.from_dict({**spec, "namespace": compute.namespace})
    handle = _handle(backend, kube, compute, ready[0], token)
    handle.spec = spec or compute.to_dict()
    return handle


def status(backend: KubernetesBackend, kube: KubeApi, compute: Compute) -> KernelInfo | None:
    """An autoscaled compute's state (None when it has no Knative Service)."""
    service = get_service(kube, compute)
    if service is None:
        return None
    ns = compute.namespace
    pods = _pods(kube, compute)
    ready = [p for p in pods if ev.is_ready(p)]
    pod = ready[0] if ready else pods[0] if pods else None
    where = f"pod {ev.name_of(pod)} on node {ev.node_of(pod) or '(unscheduled)'} (namespace {ns}, Knative)" \
        if pod else f"Knative Service {service['metadata']['name']} (namespace {ns})"
    cond = _conditions(service).get("Ready") or {}
    if cond.get("status") == "False":
        phase, detail = "failed", f"{cond.get('reason')}: {cond.get('message')}"
    elif cond.get("status") == "True" and not pods:
        phase, detail = "stopped", f"{zero_sentence(compute)}; the next cell starts a new one"
    elif cond.get("status") == "True" and ready:
        phase, detail = "ready", ""
    else:
        failure = ev.diagnose_pod(compute.name, pod) if pod else None
        phase, detail = ("failed", failure.message) if failure else ("launching", cond.get("message") or "")
    started = _epoch((pod.get("status") or {}).get("startTime")) if pod else 0.0
    return KernelInfo(name=compute.name, backend="kubernetes", phase=phase, where=where, started=started,
                      spec=_running_spec(service), detail=detail)


def listed(backend: KubernetesBackend, kube: KubeApi, namespace: str,
           owned: Callable[[dict[str, Any]], str | None]) -> list[KernelInfo]:
    """The state of each autoscaled compute of this user in ``namespace`` (none without Knative Serving).
    ``owned(service)`` is the compute name when the object is this user's kt_jupyter compute, else None."""
    try:
        reply = kube.request("GET", _path(namespace), action=f"listing Knative Services in namespace {namespace}",
                             query={"labelSelector": f"{MANAGED_BY_LABEL}={MANAGED_BY}"})
    except NotFoundError:
        return []  # no Knative Serving here: nothing autoscaled to list
    out = []
    for service in reply.get("items") or []:
        name = owned(service)
        if name is not None:
            info = status(backend, kube, Compute(name=name, backend="kubernetes", namespace=namespace))
            if info is not None:
                out.append(info)
    return out


def status_of_name(backend: KubernetesBackend, name: str) -> KernelInfo | None:
    """:func:`status` of the compute of that name (None when it is not an autoscaled one)."""
    compute = backend._compute_for(name)
    return status(backend, backend._kube(compute), compute)


def launch(backend: KubernetesBackend, compute: Compute,
           on_event: Callable[[str], None] | None = None) -> KernelHandle:
    """Apply the compute's Knative Service (and what it needs), wait for a ready pod of its Revision, connect."""
    say = on_event or (lambda _msg: None)
    ns, svc = compute.namespace, compute.service_name
    connector = backend._connector_for(compute)
    if not getattr(connector, "reaches_pod_loopback", True):
        raise BackendUnavailable(
            f"autoscaled compute {compute.name!r}: this notebook reaches pod kernels through Services inside the "
            "cluster, and a Knative Service routes only port 80 through Knative's ingress; set "
            "KT_K8S_CONNECT=port-forward (its service account must be allowed pods/portforward)")
    with backend._lock:
        backend._known[compute.name] = compute
    kube = backend._kube(compute)
    existing = get_service(kube, compute, required=True)
    if existing is not None:
        mismatch = spec_mismatch(compute, _running_spec(existing), SPEC_KEYS + ("autoscaling",))
        if mismatch:
            raise spec_mismatch_error(compute.name, mismatch)
        running = find(backend, kube, compute)
        if running is not None:
            say(f"reusing the running pod kernel {compute.name!r} ({running.where})")
            return running
        if _conditions(existing).get("Ready", {}).get("status") == "True" and not _pods(kube, compute):
            say(f"{zero_sentence(compute)}. Starting a new one")
            delete(backend, kube, compute, grace_s=1.0)
    t0 = time.monotonic()
    token = backend._token(kube, compute)
    objects = knative_objects(compute, token, pod_kernel_source_files())
    service = objects[-1]
    say(f"applying {', '.join(o['kind'] for o in objects[:-1])} and a Knative Service for {svc!r} in namespace "
        f"{ns!r}")
    flags = required_feature_flags(service)
    if flags:
        say(f"Knative must have these flags enabled in its config-features ConfigMap: {', '.join(flags)}")
    config = compute.autoscaling_config
    if config is not None and not config.min_replicas:
        say("min_replicas=0: Knative does not see this notebook's session as a request (it reaches the pod "
            "directly), so it scales the compute to zero after its stable window and the kernel state is lost "
            "then; use min_replicas=1 to keep it")
    try:
        for obj in objects[:-1]:
            kube.apply(obj)
        kube.request("PATCH", _path(ns, svc), action=f"applying Knative Service {ns}/{svc}",
                     query={"fieldManager": FIELD_MANAGER, "force": True}, body=json.dumps(service).encode(),
                     content_type="application/apply-patch+yaml")
        pod = _wait_ready(kube, compute, say, t0 + compute.launch_timeout_s)
    except BaseException as exc:
        note = f"\nWhat was applied stays (labelled as this compute's); `%kt down {compute.name}` deletes it."
        if isinstance(exc, NotFoundError):
            raise knative_missing(compute) from None
        if isinstance(exc, ApiStatusError) and "must not set the field" in exc.message:
            raise KubernetesAPIError(
                f"Knative Serving on this cluster refused compute {compute.name!r}'s pod: {exc.message}.\nKnative "
                "admits those pod fields only with flags in its config-features ConfigMap (namespace "
                f"knative-serving): {', '.join(f'{flag}: enabled' for flag in flags)}; ask your admin to set them "
                "(`kubectl edit configmap config-features -n knative-serving`), or leave out the options that "
                f"need them.{note}") from None
        if isinstance(exc, LaunchError):
            raise type(exc)(f"{exc}{note}") from None
        if isinstance(exc, KubernetesAPIError):
            raise KubernetesAPIError(f"{exc}{note}") from None
        raise
    handle = _handle(backend, kube, compute, pod, token)
    say(f"pod kernel {compute.name!r} ready in {time.monotonic() - t0:.1f} s on node {ev.node_of(pod)} "
        f"(Knative revision {(pod['metadata'].get('labels') or {}).get(REVISION_LABEL)})")
    return handle


def _wait_ready(kube: KubeApi, compute: Compute, say: Callable[[str], None], deadline: float) -> dict[str, Any]:
    """The first Ready pod of the Service's latest Revision once the Service is Ready; raise on what will not heal."""
    updates: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    watch = WatchThread(kube, "Pod", compute.namespace, updates, "pod", label_selector=label_selector(compute))
    said: set[str] = set()
    try:
        while True:
            service = get_service(kube, compute, required=True) or {}
            conds = _conditions(service)
            ready = conds.get("Ready") or {}
            if ready.get("status") == "False":
                raise LaunchError(f"Knative cannot run compute {compute.name!r}: {ready.get('reason')}: "
                                  f"{ready.get('message')}")
            revision = (service.get("status") or {}).get("latestCreatedRevisionName")
            for pod in _pods(kube, compute, revision) if revision else []:
                if ready.get("status") == "True" and ev.is_ready(pod):
                    return pod
                failure = ev.diagnose_pod(compute.name, pod)
                if failure is not None:
                    logs, why = kube.pod_log_or_why(ev.name_of(pod), compute.namespace, CONTAINER_NAME, 50) \
                        if failure.wants_logs else ("", "")
                    raise failure.exception(logs, why)
                for line in ev.pod_progress(pod):
                    if line not in said:
                        said.add(line)
                        say(line)
            message = ready.get("message")
            if message and message not in said:
                said.add(message)
                say(f"Knative: {message}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(f"compute {compute.name!r} was not ready within {compute.launch_timeout_s:g} s; "
                                  f"Knative says: {ready.get('reason') or 'no status yet'}: "
                                  f"{message or '(nothing)'}")
            try:
                _tag, kind, obj = updates.get(timeout=min(STATUS_POLL_S, remaining))
                if kind == "ERROR":
                    raise obj
            except queue.Empty:
                pass
    finally:
        watch.stop()


def delete(backend: KubernetesBackend, kube: KubeApi, compute: Compute, grace_s: float) -> bool:
    """Delete the compute's Knative Service (foreground) and wait until it and its pods have left; False if none."""
    service = get_service(kube, compute)
    if service is None:
        return False
    ns, svc = compute.namespace, compute.service_name
    pods = _pods(kube, compute)
    updates: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    watch = WatchThread(kube, "Pod", ns, updates, "pod", label_selector=label_selector(compute), replay=False)
    try:
        try:
            kube.request("DELETE", _path(ns, svc), action=f"deleting Knative Service {ns}/{svc}",
                         body={"propagationPolicy": "Foreground"})
        except NotFoundError:
            return False
        for pod in pods:  # their grace period ours, not the ReplicaSet's default
            kube.delete("Pod", ev.name_of(pod), ns, grace_s)
        deadline = time.monotonic() + grace_s + DELETE_WAIT_S
        while get_service(kube, compute) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KubernetesAPIError(f"Knative Service {ns}/{svc} of compute {compute.name!r} was still being "
                                         f"deleted after {grace_s + DELETE_WAIT_S:g} s; `kubectl get ksvc,pods -n "
                                         f"{ns}` shows why")
            try:
                updates.get(timeout=min(STATUS_POLL_S, remaining))
            except queue.Empty:
                pass
    finally:
        watch.stop()
    return True
