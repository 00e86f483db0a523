"""Kubernetes backend: a compute is a Deployment or a Job (one pod kernel pod), a Service and a token Secret.

``launch`` applies every object of :func:`kt_jupyter.manifests.build_all`
with server-side apply (field manager ``kt-jupyter``, force), so running it
again changes nothing or exactly what changed. The pod gets ``pod_kernel``
from a ConfigMap (a stock Python image works) or from a prebuilt image
(``pod_kernel/Dockerfile``, ``freeze=True``). Readiness is a watch on this
attempt's ReplicaSets, pods and events (:mod:`~kt_jupyter.backends.kubernetes_launch`),
bounded by ``launch_timeout``: what the cluster still resolves (Unschedulable
while an autoscaler adds a node, a retried pull or create) is waited for and
shown; what it never will becomes one error each
(:mod:`~kt_jupyter.backends.kubernetes_events`), and any failure while
waiting scales the Deployment to 0 and says so. The notebook reaches the
pod kernel through a port-forward from outside the cluster or the Service's
DNS name from inside one (:mod:`~kt_jupyter.backends.portforward`), and its
bulk channel (big values as plain TCP, port ``POD_KERNEL_BULK_PORT``) the same
way, so a 1 GB push never squeezes through WebSocket frames.

The token lives only in the Secret: ``find`` reads it back, so another
notebook (or this one after a restart) reaches the same warm kernel by name.
``suspend`` scales to 0 and ``resume`` back; ``delete`` removes everything
carrying the compute's label (its PersistentVolumeClaims only when asked).
A compute with ``inactivity_ttl`` runs as a single-kernel Job instead
(:func:`~kt_jupyter.backends.kubernetes_objects.build_job`): its pod kernel
exits 0 once idle, the Job completes and its pod ends, so the node and its GPU
are free, with no RBAC beyond a namespace's ``edit`` role; ``status`` says it
stopped idle, the next launch of that name starts it again, and ``suspend`` /
``resume`` set the Job's ``spec.suspend``.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from ..compute import POD_KERNEL_PORT, Compute
from ..errors import ComputeSpecError, KtError, KubernetesAPIError, LaunchError, NotFoundError
from ..k8s_fields import dns1123_label
from ..manifests import (
    COMPUTE_LABEL,
    CONTAINER_NAME,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    POD_KERNEL_BULK_PORT,
    SPEC_ANNOTATION,
    build_secret,
    compute_from_deployment,
    label_selector,
    token_secret_name,
)
from ..names import check_compute_name
from . import KernelHandle, KernelInfo, spec_mismatch, spec_mismatch_error
from . import kubernetes_events as ev
from . import kubernetes_knative as knative  # an autoscaled compute is a Knative Service
from .kubernetes_api import ApiStatusError, KubeApi, load_api_client
from .kubernetes_distributed_list import listed as distributed_listed  # a StatefulSet or RayCluster per group
from .kubernetes_launch import LaunchWaiter
from .kubernetes_live import LiveKernel
from .kubernetes_objects import TEMPLATE_HASH_ANNOTATION, WORKLOAD_KINDS, backend_objects, workload_kind
from .kubernetes_workloads import (
    DELETE_WAIT_S,
    clear_way,
    find_workload,
    job_condition,
    job_stopped_idle,
    set_suspended,
    wait_deleted,
    workload_stopped,
)
from .portforward import Connector, PodTarget, default_connector

#: The least grace a pod gets: never a force delete (grace 0), which frees the API object before the container.
MIN_GRACE_S = 1.0
#: Kinds ``delete`` removes besides the workloads and Pods, in order.
_OTHER_KINDS = ("Service", "NetworkPolicy", "Secret", "ConfigMap")


def _epoch(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0


class KubernetesBackend:
    """Pod kernels as Deployments (or Jobs, with ``inactivity_ttl``) in a Kubernetes cluster.

    ``api_client`` (a ``kubernetes.client.ApiClient``) and ``connector`` are
    for callers with their own configuration and for tests; by default the
    configuration comes from ``compute.kubeconfig_path``, ``$KUBECONFIG``,
    ``~/.kube/config`` or the pod's service account, and the connector from
    :func:`~kt_jupyter.backends.portforward.default_connector`.
    """

    name = "kubernetes"

    def __init__(self, *, api_client: Any = None, connector: Connector | None = None) -> None:
        self._api_client = api_client
        self._connector = connector
        self._apis: dict[str, KubeApi] = {}
        self._connectors: dict[str, Connector] = {}
        self._known: dict[str, Compute] = {}
        self._live: dict[tuple[str, str], LiveKernel] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ clients

    def _kube(self, compute: Compute) -> KubeApi:
        key = compute.kubeconfig_path or ""
        with self._lock:
            if key not in self._apis:
                client = self._api_client or load_api_client(compute.kubeconfig_path)
                self._apis[key] = KubeApi(client)
            return self._apis[key]

    def _connector_for(self, compute: Compute) -> Connector:
        if self._connector is not None:
            return self._connector
        key = compute.kubeconfig_path or ""
        with self._lock:
            if key not in self._connectors:
                self._connectors[key] = default_connector(lambda: load_api_client(compute.kubeconfig_path))
            return self._connectors[key]

    def _compute_for(self, name: str, namespace: str | None = None) -> Compute:
        """The compute of that name: every public method taking a name starts here, so the name is checked here."""
        check_compute_name(name)
        known = self._known.get(name)
        if known is not None and namespace in (None, known.namespace):
            return known
        return Compute(name=name, backend="kubernetes", namespace=namespace)

    # ------------------------------------------------------------------ launch

    def manifests(self, compute: Compute, token: str) -> list[dict[str, Any]]:
        """Every object :meth:`launch` applies, in order (see :mod:`~kt_jupyter.backends.kubernetes_objects`)."""
        return backend_objects(compute, token)

    def launch(self, compute: Compute, *, keep: bool = False,
               on_event: Callable[[str], None] | None = None) -> KernelHandle:
        """Apply the compute's objects and wait until its pod kernel is ready (or reuse the running one).

        ``keep`` changes nothing here: pods outlive the notebook; ``inactivity_ttl`` stops idle ones.
        """
        if compute.deployment_mode == "knative":  # an autoscaled compute is a Knative Service (kubernetes_knative)
            return knative.launch(self, compute, on_event)
        say = on_event or (lambda _msg: None)
        ns, svc = compute.namespace, compute.service_name
        with self._lock:
            self._known[compute.name] = compute
        kube = self._kube(compute)
        running = self._find(kube, compute)
        if running is not None:
            mismatch = spec_mismatch(compute, running.spec)  # from its annotation: any process launched it
            if mismatch:
                raise spec_mismatch_error(compute.name, mismatch)
            say(f"reusing the running pod kernel {compute.name!r} ({running.where})")
            return running
        t0 = time.monotonic()
        token = self._token(kube, compute)
        objects = self.manifests(compute, token)
        workload = objects[-1]
        expected_hash = workload["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
        resume = clear_way(kube, compute, expected_hash, say)
        say(f"applying {', '.join(o['kind'] for o in objects)} for {svc!r} in namespace {ns!r}")
        waiter = LaunchWaiter(kube, compute, say)  # events from now on: none of an earlier attempt
        try:
            applied = self._apply(kube, compute, objects)
            if resume:
                applied = set_suspended(kube, compute, False)
            try:
                pod = waiter.wait(applied, workload["kind"], expected_hash, t0 + compute.launch_timeout_s)
            except BaseException as exc:
                raise self._launch_failed(kube, compute, exc, say, stop=not waiter.workload_deleted) from None
        finally:
            waiter.stop()
        handle = self._handle(kube, compute, pod, token)
        say(f"pod kernel {compute.name!r} ready in {time.monotonic() - t0:.1f} s on node {ev.node_of(pod)} "
            f"({self._live[(ns, svc)].forward.description})")
        return handle

    @staticmethod
    def _apply(kube: KubeApi, compute: Compute, objects: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply every object, the workload last; what failed is one error saying what to do."""
        for obj in objects:
            try:
                applied = kube.apply(obj)
            except KubernetesAPIError as exc:
                if obj["kind"] == "NetworkPolicy" and isinstance(exc, ApiStatusError) and exc.status == 403:
                    raise KubernetesAPIError(
                        f"Kubernetes forbids creating the NetworkPolicy that lets only this notebook reach "
                        f"compute {compute.name!r} ({exc.message}); ask your admin to allow networkpolicies in "
                        f"namespace {compute.namespace!r}, or set KT_NETWORK_POLICY=0.\nThe objects applied "
                        f"before it stay (labelled as this compute's): `%kt down {compute.name}` deletes them.") \
                        from None
                raise KubernetesAPIError(f"{exc}\nThe objects applied before it stay (labelled as this "
                                         f"compute's): `%kt down {compute.name}` deletes them.") from None
        return applied

    def _launch_failed(self, kube: KubeApi, compute: Compute, exc: BaseException,
                       say: Callable[[str], None], *, stop: bool = True) -> BaseException:
        """Stop the compute's workload after any failure while waiting (a Deployment scaled to 0, a Job
        suspended); the error to raise, saying so."""
        if not stop:  # its workload is gone: nothing holds resources
            return exc
        kind = workload_kind(compute)
        done = "scaled to 0" if kind == "Deployment" else "suspended"
        try:
            if kind == "Deployment":
                kube.scale(compute.service_name, compute.namespace, 0)
            else:
                set_suspended(kube, compute, True)
            note = (f"\nIts {kind} was {done} so it holds no resources; running the cell again "
                    f"retries, `%kt down {compute.name}` deletes it.")
        except Exception as stop_exc:
            note = f"\nIts {kind} could not be {done} ({stop_exc}); `%kt down {compute.name}` deletes it."
        if not isinstance(exc, Exception):  # KeyboardInterrupt: the user stopped the wait
            say(f"launch of {compute.name!r} interrupted.{note}")
            return exc
        if isinstance(exc, ApiStatusError):
            return KubernetesAPIError(f"{exc}{note}")
        if isinstance(exc, KtError):
            return type(exc)(f"{exc}{note}")
        return LaunchError(f"waiting for compute {compute.name!r} failed: {type(exc).__name__}: {exc}{note}")

    def _token(self, kube: KubeApi, compute: Compute) -> str:
        """The compute's token: the existing Secret's, else a new one created atomically (first writer wins)."""
        import secrets as random

        name, ns = token_secret_name(compute), compute.namespace
        for _attempt in range(3):
            secret = kube.get("Secret", name, ns)
            if secret is not None:
                data = (secret.get("data") or {}).get("token")
                if data:
                    return base64.b64decode(data).decode()
                raise KubernetesAPIError(f"Secret {ns}/{name} has no 'token' key; delete it "
                                         f"(`%kt down {compute.name}`) and run the cell again")
            kube.create(build_secret(compute, random.token_urlsafe(32)))  # loses to a racing launch: read theirs
        raise KubernetesAPIError(f"could not create or read the token Secret {ns}/{name}")

    # ------------------------------------------------------------------ handles

    def _handle(self, kube: KubeApi, compute: Compute, pod: dict[str, Any], token: str) -> KernelHandle:
        key = (compute.namespace, compute.service_name)
        uid = (pod.get("metadata") or {}).get("uid")
        with self._lock:
            live = self._live.get(key)
            if live is None or live.uid != uid or live.liveness() is not None:
                if live is not None:
                    live.close()
                target = PodTarget(compute.namespace, ev.name_of(pod), compute.service_name, POD_KERNEL_PORT)
                live = self._live[key] = LiveKernel(kube, compute, pod, self._connector_for(compute).open(target))
        return KernelHandle(
            name=compute.name, backend=self.name, url=live.forward.url, token=token, pid=None,
            started=_epoch((pod.get("status") or {}).get("startTime")),
            where=f"pod {live.pod} on node {ev.node_of(pod)} (namespace {compute.namespace})",
            spec=compute.to_dict(), liveness=live.liveness, close_hook=live.close,
            bulk_resolver=lambda port: self._bulk_address(compute, live, port),
            path_error=lambda: live.forward.last_error,
        )

    def _bulk_address(self, compute: Compute, live: LiveKernel, port: int) -> tuple[str, int] | None:
        """Where the pod's bulk channel (``port``, as its pod kernel announces it) is reached from here.

        Big values then travel as plain TCP through their own forward (or the
        Service), not as WebSocket frames through the kernel's. A port-forward
        reaches any pod port; the Service only :data:`POD_KERNEL_BULK_PORT`
        (else None: the WebSocket carries them). Opened once per pod and port.
        """
        connector = self._connector_for(compute)
        if port != POD_KERNEL_BULK_PORT and not getattr(connector, "reaches_pod_loopback", True):
            return None
        with self._lock:
            if live.gone is not None:
                return None
            forward = live.extra_forwards.get(port)
            if forward is None:
                target = PodTarget(compute.namespace, live.pod, compute.service_name, port)
                forward = live.extra_forwards[port] = connector.open(target)
        where = urlsplit(forward.url)
        return (where.hostname, where.port) if where.hostname and where.port else None

    def _find(self, kube: KubeApi, compute: Compute) -> KernelHandle | None:
        ns = compute.namespace
        found = find_workload(kube, compute)
        if found is None or workload_stopped(*found):
            return None
        dep = found[1]
        ready = [p for p in kube.list("Pod", ns, label_selector=label_selector(compute)) if ev.is_ready(p)]
        secret = kube.get("Secret", token_secret_name(compute), ns)
        token = (secret or {}).get("data", {}).get("token")
        if not ready or not token:
            return None
        spec = (dep.get("metadata") or {}).get("annotations", {}).get(SPEC_ANNOTATION)
        running = compute
        if spec:
            # an annotation this version cannot read: the running spec is taken as asked
            with contextlib.suppress(Exception):
                running = compute_from_deployment(dep)
        handle = self._handle(kube, compute if compute.name in self._known else running, ready[0],
                              base64.b64decode(token).decode())
        handle.spec = running.to_dict()  # what runs, whatever this process asked for
        return handle

    def find(self, name: str, namespace: str | None = None) -> KernelHandle | None:
        """The running (ready) kernel of that name, reattached by reading its token Secret; else None."""
        compute = self._compute_for(name, namespace)
        kube = self._kube(compute)
        return self._find(kube, compute) or knative.find(self, kube, compute)

    def get_if_exists(self, compute: Compute) -> KernelHandle | None:
        """The running kernel of ``compute`` (its name and namespace), or None; launches nothing."""
        with self._lock:
            self._known.setdefault(compute.name, compute)
        kube = self._kube(compute)
        return self._find(kube, compute) or knative.find(self, kube, compute)

    # ------------------------------------------------------------------ inspect

    def _namespaces(self) -> list[str]:
        default = Compute(name="default", backend="kubernetes").namespace
        return list(dict.fromkeys([default] + [c.namespace for c in self._known.values()]))

    def list(self) -> list[KernelInfo]:
        """This user's computes (Deployments, Jobs, autoscaled Knative Services, distributed computes) in the default
        namespace and in those this process launched into."""
        out = []
        selector = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        username = Compute(name="default", backend="kubernetes").username

        def owned(obj: dict[str, Any]) -> str | None:
            """The compute name of one of this user's kt_jupyter objects, else None."""
            name = ((obj.get("metadata") or {}).get("labels") or {}).get(NAME_LABEL, "")
            try:
                check_compute_name(name)
            except ComputeSpecError:
                return None  # not a name kt_jupyter gives: not ours
            return name if ev.name_of(obj) == dns1123_label(f"{username}-{name}") else None

        for ns in self._namespaces():
            compute = Compute(name="default", backend="kubernetes", namespace=ns)
            kube = self._kube(compute)
            pods = kube.list("Pod", ns, label_selector=selector)
            for kind, dep in [(k, o) for k in WORKLOAD_KINDS for o in kube.list(k, ns, label_selector=selector)]:
                name = owned(dep)
                if name is None:
                    continue
                labels = (dep.get("metadata") or {}).get("labels") or {}
                mine = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(COMPUTE_LABEL)
                        == labels.get(COMPUTE_LABEL)]
                out.append(self._info(kube, name, ns, kind, dep, mine))
            out += knative.listed(self, kube, ns, owned)
            out += distributed_listed(self, kube, ns, owned)  # each StatefulSet / RayCluster once
        return out

    def _info(self, kube: KubeApi, name: str, ns: str, kind: str, dep: dict[str, Any],
              pods: builtins.list[dict[str, Any]]) -> KernelInfo:  # builtins: list is a method here
        spec_json = ((dep.get("metadata") or {}).get("annotations") or {}).get(SPEC_ANNOTATION)
        try:
            spec = json.loads(spec_json) if spec_json else {}
        except ValueError:
            spec = {}
        pods = [p for p in pods if not ev.is_terminating(p)]
        ready = [p for p in pods if ev.is_ready(p)]
        pod = ready[0] if ready else pods[0] if pods else None
        where = f"pod {ev.name_of(pod)} on node {ev.node_of(pod) or '(unscheduled)'} (namespace {ns})" if pod \
            else f"namespace {ns}"
        started = _epoch((pod.get("status") or {}).get("startTime")) if pod else \
            _epoch((dep.get("metadata") or {}).get("creationTimestamp"))
        failed = job_condition(dep, "Failed") if kind == "Job" else None
        if failed is not None:
            phase, detail = "failed", (f"its Job failed ({failed.get('reason') or 'Failed'}: "
                                       f"{failed.get('message') or 'no detail'}); run a cell to start it again, "
                                       f"`%kt logs {name}` shows its last output")
        elif kind == "Job" and job_condition(dep, "Complete") is not None:
            phase, detail = "stopped", f"{job_stopped_idle(dep)}; run a cell to start it again"
        elif workload_stopped(kind, dep):
            phase, detail = "stopped", ("suspended: 0 replicas" if kind == "Deployment" else "suspended") + \
                " (resume, or run a cell, to start it)"
        elif ready:
            phase, detail = "ready", ""
        else:
            failure = ev.diagnose_pod(name, pod, pull_detail=self._pull_detail(kube, pod)) if pod else None
            gated = ev.gated_message(pod, (pod.get("metadata", {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)) \
                if pod else None
            waiting = ev.unschedulable_message(pod) if pod else None
            phase, detail = ("failed", failure.message) if failure else \
                ("launching", gated or (f"waiting for a node: {waiting}" if waiting else ""))
        return KernelInfo(name=name, backend=self.name, phase=phase, where=where, started=started, spec=spec,
                          detail=detail)

    @staticmethod
    def _pull_detail(kube: KubeApi, pod: dict[str, Any]) -> str:
        """The registry's answer to the pod's last failed pull (from its events), '' when it is not failing one."""
        waiting = ((ev.container_status(pod) or {}).get("state") or {}).get("waiting") or {}
        uid = (pod.get("metadata") or {}).get("uid")
        if waiting.get("reason") not in ev.IMAGE_PULL_REASONS or not uid:
            return ""
        try:
            events = kube.list("Event", ev.namespace_of(pod), field_selector=f"involvedObject.uid={uid}")
        except KtError:
            return ""  # events only add detail
        events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        details = [d for d in map(ev.pull_failure_detail, events) if d]
        return details[-1] if details else ""

    def status(self, name: str) -> KernelInfo:
        """One compute's state: ready, launching, failed (with why) or stopped."""
        autoscaled = knative.status_of_name(self, name)
        if autoscaled is not None:
            return autoscaled
        compute = self._compute_for(name)
        kube = self._kube(compute)
        found = find_workload(kube, compute)
        if found is None:
            from .kubernetes_distributed import status_of_name as group_status  # a distributed compute, a rank
            group = group_status(name)
            if group is not None:
                return group
            raise NotFoundError(f"no Kubernetes compute named {name!r} in namespace {compute.namespace!r}; "
                                "`%kt list` shows those that exist")
        return self._info(kube, name, compute.namespace, *found,
                          kube.list("Pod", compute.namespace, label_selector=label_selector(compute)))

    def pods(self, name: str) -> builtins.list[dict[str, Any]]:  # builtins: list is a method here
        """The compute's pods, as the API returns them."""
        compute = self._compute_for(name)
        pods = self._kube(compute).list("Pod", compute.namespace, label_selector=label_selector(compute))
        if not pods:
            from .kubernetes_distributed import rank_pods_of_name  # NAME-rR: one rank of a distributed compute

            pods = rank_pods_of_name(name)
        return pods

    def wait_gone(self, name: str, timeout_s: float) -> str | None:
        """Block until the pod kernel this process reaches for ``name`` is gone; its liveness sentence.

        None when it still runs after ``timeout_s`` (or this process reaches no kernel of that name).
        """
        compute = self._compute_for(name)
        with self._lock:
            live = self._live.get((compute.namespace, compute.service_name))
        return None if live is None else live.wait_gone(timeout_s)

    def _current_pod(self, name: str) -> tuple[KubeApi, Compute, dict[str, Any]]:
        compute = self._compute_for(name)
        kube = self._kube(compute)
        pods = [p for p in self.pods(name) if not ev.is_terminating(p)]
        if not pods:
            raise NotFoundError(f"compute {name!r} has no pod in namespace {compute.namespace!r} "
                                "(not launched, suspended, or deleted)")
        pods.sort(key=lambda p: (ev.is_ready(p), (p.get("metadata") or {}).get("creationTimestamp") or ""))
        return kube, compute, pods[-1]

    def logs(self, name: str, tail: int | None = 100) -> str:
        """The pod kernel container's last ``tail`` log lines (its previous run's when it just restarted)."""
        kube, compute, pod = self._current_pod(name)
        pod_name = ev.name_of(pod)
        text = kube.pod_log(pod_name, compute.namespace, CONTAINER_NAME, tail)
        if not text.strip() and ev.restart_count(pod):
            text = kube.pod_log(pod_name, compute.namespace, CONTAINER_NAME, tail, previous=True)
        return text.rstrip("\n")

    def follow_logs(self, name: str) -> Iterator[str]:
        """New output of the pod kernel's log, as it comes."""
        kube, compute, pod = self._current_pod(name)
        return kube.follow_log(ev.name_of(pod), compute.namespace, CONTAINER_NAME)

    def forward_port(self, name: str, remote_port: int) -> int:
        """A local 127.0.0.1 port that reaches ``remote_port`` on the pod kernel's loopback (debugpy's).

        The same connector as the kernel's own port opens it (a port-forward
        outside the cluster), once per pod and port; it closes with the pod's
        forward. The Service DNS connector cannot reach a pod's loopback.
        """
        compute = self._compute_for(name)
        connector = self._connector_for(compute)
        if not getattr(connector, "reaches_pod_loopback", True):
            raise KtError(
                f"debugpy listens on the pod's loopback (port {remote_port}), which this notebook reaches only "
                "through a port-forward, not through the Service it uses inside the cluster; run "
                f"`kubectl port-forward -n {compute.namespace} pod/<pod> <local>:{remote_port}` from a machine "
                "that can, or run the notebook outside the cluster, or set KT_K8S_CONNECT=port-forward "
                "(its service account must be allowed pods/portforward); "
"or use breakpoint() in the cell (pdb in the notebook)")
        key = (compute.namespace, compute.service_name)
        with self._lock:
            live = self._live.get(key)
        if live is None or live.liveness() is not None:
            if self.find(name, compute.namespace) is None:
                raise NotFoundError(f"compute {name!r} has no ready pod in namespace {compute.namespace!r}")
            with self._lock:
                live = self._live[key]
        with self._lock:
            forward = live.extra_forwards.get(remote_port)
            if forward is None:
                target = PodTarget(compute.namespace, live.pod, compute.service_name, remote_port)
                forward = live.extra_forwards[remote_port] = connector.open(target)
        where = urlsplit(forward.url)
        if where.hostname != "127.0.0.1" or not where.port:
            raise KtError(f"the connector reaches pod port {remote_port} at {forward.url}, not on 127.0.0.1")
        return where.port

    # ------------------------------------------------------------------ suspend / resume / delete

    def _forget_live(self, compute: Compute, why: str) -> None:
        with self._lock:
            live = self._live.pop((compute.namespace, compute.service_name), None)
        if live is not None:
            live.close(why)

    def suspend(self, name: str) -> None:
        """Scale the compute to 0 replicas (suspend its Job): the pod (and its state) goes; the objects and
        token stay."""
        compute = self._compute_for(name)
        kube = self._kube(compute)
        found = find_workload(kube, compute)
        if found is None:
            raise NotFoundError(f"no Kubernetes compute named {name!r} in namespace {compute.namespace!r}")
        if found[0] == "Deployment":
            kube.scale(compute.service_name, compute.namespace, 0)
            self._forget_live(compute, "was stopped: suspended (its Deployment was scaled to 0)")
        else:
            set_suspended(kube, compute, True)
            self._forget_live(compute, "was stopped: suspended (its Job was suspended)")

    def resume(self, name: str, on_event: Callable[[str], None] | None = None) -> KernelHandle:
        """Scale a suspended compute back up (re-applying its recorded spec) and wait until it is ready."""
        compute = self._compute_for(name)
        found = find_workload(self._kube(compute), compute)
        if found is None:
            raise NotFoundError(f"no Kubernetes compute named {name!r} in namespace {compute.namespace!r}")
        if name not in self._known:
            compute = compute_from_deployment(found[1])
        return self.launch(compute, on_event=on_event)

    def delete(self, name: str, grace_period_s: float = 5.0, *, volumes: bool = False) -> bool:
        """Delete everything carrying the compute's label; False if there was nothing.

        Never a force delete: pods get at least :data:`MIN_GRACE_S` (SIGTERM,
        then SIGKILL after ``grace_period_s``), since a pod deleted with grace 0
        leaves the API at once while its container still holds its GPU, and the
        next pod would be placed on it. The Deployment goes in the foreground
        (it stays, with a finalizer, until its ReplicaSets and pods are gone, so
        nothing recreates a pod meanwhile; a Job likewise), and this waits until
        the pods and the workload are gone, so a new launch of the same name
        never meets them. PersistentVolumeClaims (your data) stay unless ``volumes``.
        """
        compute = self._compute_for(name)
        kube = self._kube(compute)
        ns, selector = compute.namespace, label_selector(compute)
        grace_s = max(MIN_GRACE_S, grace_period_s)
        self._forget_live(compute, "was deleted (delete / `%kt down`)")
        knative.delete(self, kube, compute, grace_s)
        existed = False
        pods = kube.list("Pod", ns, label_selector=selector)  # before their workload goes, to set their grace
        workloads = [(k, o) for k in WORKLOAD_KINDS for o in kube.list(k, ns, label_selector=selector)]
        for kind, obj in workloads:
            existed |= kube.delete(kind, ev.name_of(obj), ns, grace_s, propagation="Foreground")
        for pod in pods:
            kube.delete("Pod", ev.name_of(pod), ns, grace_s)
        for kind in _OTHER_KINDS + (("PersistentVolumeClaim",) if volumes else ()):
            for obj in kube.list(kind, ns, label_selector=selector):
                existed |= kube.delete(kind, ev.name_of(obj), ns)
        if pods or workloads:
            wait_deleted(kube, compute, grace_s + DELETE_WAIT_S)
        return existed
