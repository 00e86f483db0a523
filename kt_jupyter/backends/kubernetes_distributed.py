"""Distributed computes on Kubernetes: apply, wait for every rank, reach each one, find again, delete.

A pytorch compute is a headless Service and a StatefulSet
(:mod:`kt_jupyter.manifests_distributed` says why), a ray compute a KubeRay
``RayCluster``; both come with the same token Secret, source ConfigMap and
NetworkPolicy as a single kernel (:mod:`kt_jupyter.manifests`), the policy
also admitting the ranks to each other. :func:`launch_group` applies them
server-side through the Kubernetes backend's client and waits, with a watch
on the compute's pods and this attempt's events, until every rank's pod is
Ready (ray: the head's, where the pod kernel runs): the group is ready when
all ranks are. What no waiting cures (an image that is not there, OOMKilled,
a crash loop, unschedulable past its grace) ends the wait as one error that
names the rank, and the workload is deleted so nothing holds resources.
Each rank is then reached like a single kernel: through the backend's
connector (a port-forward from outside the cluster), with a watch on its pod
for liveness.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..compute import POD_KERNEL_PORT, Compute
from ..distributed import DistributedConfig, rank_name
from ..errors import (
    BackendUnavailable,
    ComputeSpecError,
    KtError,
    KubernetesAPIError,
    LaunchError,
    NotFoundError,
)
from ..manifests import (
    SPEC_ANNOTATION,
    label_selector,
    network_policy,
    selector_labels,
    supporting_objects,
)
from ..manifests_distributed import (
    build_headless_service,
    build_raycluster,
    build_statefulset,
)
from ..pod_security import notebook_peer
from ..startup import notebook_install_env
from . import KernelHandle, KernelInfo
from . import kubernetes_events as ev
from .kubernetes_api import ApiStatusError, KubeApi
from .kubernetes_launch import CLOCK_CHECK_S, PodJudge
from .kubernetes_live import LiveKernel
from .kubernetes_objects import (
    NETWORK_POLICY_ENV,
    TEMPLATE_HASH_ANNOTATION,
    network_policy_wanted,
    pod_kernel_source_files,
    stamp_template,
)
from .kubernetes_watch import WatchThread
from .portforward import PodTarget

#: The KubeRay release a RayCluster here needs (``authOptions`` token mode; overwrite-container-cmd came in 1.1).
KUBERAY_MIN_VERSION = "1.5.0"
#: KubeRay's label saying which kind of Ray node a pod is.
RAY_NODE_TYPE_LABEL = "ray.io/node-type"
#: Seconds ``delete_group`` waits for the pods to go, beyond their grace period.
DELETE_WAIT_S = 60.0


def group_objects(compute: Compute, token: str) -> list[dict[str, Any]]:
    """Every object of a distributed compute in apply order, the workload (stamped with its template hash) last."""
    config = compute.distributed_config
    if config is None:
        raise ComputeSpecError(f"compute {compute.name!r} is not distributed")
    install_env = notebook_install_env(compute)
    files = None if compute.freeze else pod_kernel_source_files()
    objects = supporting_objects(compute, token, files, install_env)
    if config.framework == "pytorch":
        objects.append(build_headless_service(compute))
    peer = notebook_peer() if network_policy_wanted() else None
    if peer is not None:
        policy = network_policy(compute, peer)
        policy["spec"]["ingress"].append({"from": [{"podSelector": {"matchLabels": selector_labels(compute)}}]})
        objects.append(policy)  # the notebook, and the ranks to each other (rendezvous, collectives, Ray)
    if config.framework == "pytorch":
        workload = build_statefulset(compute, source_files=files, install_env=install_env)
        stamp_template(workload)
    else:
        workload = build_raycluster(compute, source_files=files, install_env=install_env)
        stamp_template({"spec": {"template": workload["spec"]["headGroupSpec"]["template"]}})
    return objects + [workload]


def _template_hash(workload: dict[str, Any]) -> str:
    spec = workload["spec"]
    template = spec["headGroupSpec"]["template"] if workload["kind"] == "RayCluster" else spec["template"]
    return template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]


def _rank_of(compute: Compute, pod: dict[str, Any], ray: bool) -> int | None:
    """The rank a pod of the group is (ray: the head is rank 0, workers are not ranks here), or None."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if ray:
        return 0 if labels.get(RAY_NODE_TYPE_LABEL) == "head" else None
    prefix, name = f"{compute.service_name}-", ev.name_of(pod)
    suffix = name[len(prefix):] if name.startswith(prefix) else ""
    return int(suffix) if suffix.isascii() and suffix.isdigit() else None


class GroupWaiter(PodJudge):
    """One launch attempt of a group: its events (watched from before the apply) and pods, until all are Ready.
    A pod is judged as a single kernel's is (:class:`~kt_jupyter.backends.kubernetes_launch.PodJudge`), named by
    its rank."""

    def __init__(self, kube: KubeApi, compute: Compute, say: Callable[[str], None]) -> None:
        super().__init__(kube, compute, say)
        self.config: DistributedConfig = compute.distributed_config  # type: ignore[assignment]
        self.ray = self.config.framework == "ray"

    def _who(self, pod: dict[str, Any]) -> str:
        rank = _rank_of(self.compute, pod, self.ray)
        if rank is None:
            return f"Ray worker pod {ev.name_of(pod)} of {self.compute.name!r}"
        return f"worker rank {rank} ({rank_name(self.compute.name, rank)})"

    def _label(self, pod: dict[str, Any]) -> str:
        rank = _rank_of(self.compute, pod, self.ray)
        return rank_name(self.compute.name, rank) if rank is not None else ev.name_of(pod)

    def _prefix(self, pod: dict[str, Any]) -> str:
        return f"{self._who(pod)}: "

    def _fail(self, error: LaunchError, pod: dict[str, Any]) -> LaunchError:
        return type(error)(f"{self._who(pod)} did not start, so none of the {self.config.workers} workers of "
                           f"{self.compute.name!r} runs: {error}")

    def wait(self, expected_hash: str, deadline: float) -> list[dict[str, Any]]:
        """The Ready pod of every rank, rank order (ray: the head's); raise the first failure, naming its rank."""
        self.watches.append(WatchThread(self.kube, "Pod", self.compute.namespace, self.updates, "pod",
                                        label_selector=label_selector(self.compute)))
        wanted = 1 if self.ray else self.config.workers
        while True:
            now = time.monotonic()
            ready = {r: p for p in self.pods.values() if ev.is_ready(p)
                     and (r := _rank_of(self.compute, p, self.ray)) is not None and r < wanted}
            if len(ready) == wanted:
                return [ready[r] for r in range(wanted)]
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
                continue  # events only add detail
            if tag == "event":
                self._on_event(obj)
            else:
                self._on_pod(kind, obj, expected_hash)

    def _on_pod(self, kind: str, pod: dict[str, Any], expected_hash: str) -> None:
        name = ev.name_of(pod)
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        mine = annotations.get(TEMPLATE_HASH_ANNOTATION) == expected_hash or \
            (self.ray and _rank_of(self.compute, pod, True) is None)  # Ray workers: another template
        if kind == "DELETED" or ev.is_terminating(pod) or not mine:
            self.pods.pop(name, None)
            return
        self.pods[name] = pod
        for line in ev.pod_progress(pod):
            self.tell(f"{self._who(pod)}: {line}")
        self._judge(pod)

    def _on_event(self, event: dict[str, Any]) -> None:
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "Pod" or involved.get("name") not in self.pods:
            return
        pod = self.pods[involved["name"]]
        if involved.get("uid") != (pod.get("metadata") or {}).get("uid"):
            return
        self.events.append(event)
        self._note_pod_event(event, pod)

    def _timeout(self) -> LaunchError:
        pods = sorted(self.pods.values(), key=ev.name_of)
        return ev.timeout_error(self.compute.name, self.compute.launch_timeout_s, pods, self.events)


class RankKernel(LiveKernel):
    """A rank's pod as a :class:`~kt_jupyter.backends.kubernetes_live.LiveKernel`: gone sentences name the group's
    workload, not a Deployment."""

    def __init__(self, kube: KubeApi, compute: Compute, pod: dict[str, Any], forward: Any, kind: str,
                 workload: str) -> None:
        super().__init__(kube, compute, pod, forward)
        self.kind, self.workload = kind, workload

    def _why_deleted(self) -> str:
        try:
            workload = self.kube.get(self.kind, self.workload, self.compute.namespace)
        except KtError:
            return "is gone"
        if workload is None or (workload.get("metadata") or {}).get("deletionTimestamp"):
            return f"was deleted with its {self.kind} (`%kt down`, or kubectl)"
        return f"was deleted or evicted (its {self.kind} is starting it again)"


def _backend() -> Any:
    from . import get_backend

    return get_backend("kubernetes")


def _apply(kube: KubeApi, compute: Compute, obj: dict[str, Any]) -> dict[str, Any]:
    try:
        return kube.apply(obj)
    except ApiStatusError as exc:
        if obj["kind"] != "NetworkPolicy" or exc.status != 403:
            raise
        raise KubernetesAPIError(
            f"Kubernetes forbids creating the NetworkPolicy that lets only this notebook, and the workers each "
            f"other, reach compute {compute.name!r} ({exc.message}); ask your admin to allow networkpolicies in "
            f"namespace {compute.namespace!r}, or set {NETWORK_POLICY_ENV}=0") from None
    except NotFoundError:
        if obj["kind"] != "RayCluster":
            raise
        raise BackendUnavailable(
            f"compute {compute.name!r} needs the KubeRay operator (the ray.io/v1 RayCluster resource), which this "
            f"cluster does not have: ask your cluster admin to install KubeRay {KUBERAY_MIN_VERSION} or later "
            "(`helm install kuberay-operator kuberay/kuberay-operator`), or use framework='pytorch'") from None


def launch_group(compute: Compute, *, on_event: Callable[[str], None] | None = None) -> list[KernelHandle]:
    """Apply a distributed compute's objects, wait until every rank is Ready, and reach each one (rank order)."""
    config = compute.distributed_config
    if config is None:
        raise ComputeSpecError(f"compute {compute.name!r} is not distributed")
    say = on_event or (lambda _m: None)
    backend = _backend()
    with backend._lock:
        backend._known.setdefault(compute.name, compute)
    kube = backend._kube(compute)
    t0 = time.monotonic()
    token = backend._token(kube, compute)
    objects = group_objects(compute, token)
    workload = objects[-1]
    say(f"applying {', '.join(o['kind'] for o in objects)} for {compute.service_name!r} in namespace "
        f"{compute.namespace!r}: {config.workers} {config.framework} workers")
    waiter = GroupWaiter(kube, compute, say)
    try:
        try:
            for obj in objects:
                _apply(kube, compute, obj)
            pods = waiter.wait(_template_hash(workload), t0 + compute.launch_timeout_s)
        except BackendUnavailable:
            raise  # nothing was made of the workload (no KubeRay), or the cluster is gone
        except BaseException as exc:
            _stop_workload(kube, compute, workload["kind"])
            if isinstance(exc, KtError):
                raise type(exc)(f"{exc}\nIts {workload['kind']} was deleted so it holds no resources; "
                                f"`%kt down {compute.name}` removes the rest.") from None
            if isinstance(exc, Exception):
                raise LaunchError(f"waiting for the workers of {compute.name!r} failed: {exc}") from None
            raise
    finally:
        waiter.stop()
    handles = [_handle(kube, compute, rank, pod, token, workload["kind"]) for rank, pod in enumerate(pods)]
    what = "the Ray head (its workers join it)" if config.framework == "ray" else f"all {len(pods)} workers"
    say(f"{what} of {compute.name!r} ready in {time.monotonic() - t0:.1f} s")
    return handles


def _stop_workload(kube: KubeApi, compute: Compute, kind: str) -> None:
    try:
        kube.delete(kind, compute.service_name, compute.namespace, propagation="Foreground")
    except KtError:
        pass  # the launch error is what matters


def pod_started(pod: dict[str, Any]) -> float:
    """When ``pod`` started (whole seconds, as the API says it), 0.0 if it has not."""
    from .kubernetes import _epoch

    return _epoch((pod.get("status") or {}).get("startTime"))


def _handle(kube: KubeApi, compute: Compute, rank: int, pod: dict[str, Any], token: str, kind: str) -> KernelHandle:
    backend = _backend()
    name = rank_name(compute.name, rank)
    target = PodTarget(compute.namespace, ev.name_of(pod), compute.service_name, POD_KERNEL_PORT)
    rank_compute = compute.with_overrides(name=name, distributed=None)
    live = RankKernel(kube, rank_compute, pod, backend._connector_for(compute).open(target), kind,
                      compute.service_name)
    spec = dict(compute.to_dict(), name=name)  # keeps the group's settings: that is how a rank is known as one
    return KernelHandle(
        name=name, backend="kubernetes", url=live.forward.url, token=token, pid=None, started=pod_started(pod),
        where=f"pod {live.pod} on node {ev.node_of(pod)} (namespace {compute.namespace})",
        spec=spec, liveness=live.liveness, close_hook=live.close,
        bulk_resolver=lambda port: backend._bulk_address(rank_compute, live, port))


@dataclass
class RunningGroup:
    """A distributed compute found in the cluster (by any process): what runs, and its Ready rank pods."""

    #: the workload: ``StatefulSet`` or ``RayCluster``
    kind: str
    #: the group compute that was applied (from the workload's ``kt.dev/spec`` annotation)
    running: Compute
    #: the Ready pod of each rank, rank order (ray: the head); empty while some rank is not Ready
    pods: list[dict[str, Any]]
    #: the compute's token ('' when its Secret is missing)
    token: str = field(repr=False, default="")

    @property
    def config(self) -> DistributedConfig:
        """The running group's framework, worker count and options."""
        return self.running.distributed_config  # type: ignore[return-value]


def find_group(compute: Compute) -> RunningGroup | None:
    """The distributed compute of ``compute``'s name and namespace in the cluster, or None. Connects nothing."""
    backend = _backend()
    kube = backend._kube(compute)
    for kind in ("StatefulSet", "RayCluster"):  # no RayCluster resource (no KubeRay): None
        try:
            workload = kube.get(kind, compute.service_name, compute.namespace)
        except ApiStatusError as exc:
            if exc.status != 403:
                raise
            continue  # not allowed to read them: then nobody with these rights made one (a single kernel's user)
        if workload is None or (workload.get("metadata") or {}).get("deletionTimestamp"):
            continue
        try:
            running = Compute.from_dict(json.loads(workload["metadata"]["annotations"][SPEC_ANNOTATION]))
        except (KeyError, ValueError, TypeError, KtError):
            continue  # not one of ours
        config = running.distributed_config
        if config is None:
            continue
        secret = kube.get("Secret", f"{compute.service_name}-token", compute.namespace)
        token = ((secret or {}).get("data") or {}).get("token")
        ray = config.framework == "ray"
        pods = [p for p in kube.list("Pod", compute.namespace, label_selector=label_selector(compute))
                if ev.is_ready(p) and not ev.is_terminating(p)]
        wanted = 1 if ray else config.workers
        by_rank = {r: p for p in pods if (r := _rank_of(running, p, ray)) is not None and r < wanted}
        ready = [by_rank[r] for r in range(wanted)] if len(by_rank) == wanted and token else []
        return RunningGroup(kind, running, ready, base64.b64decode(token).decode() if token else "")
    return None


def connect_ranks(compute: Compute, group: RunningGroup) -> list[KernelHandle]:
    """A handle on each Ready rank of a running group (a forward and a liveness watch each), rank order."""
    kube = _backend()._kube(compute)
    return [_handle(kube, compute, r, pod, group.token, group.kind) for r, pod in enumerate(group.pods)]


def rank_status(name: str, rank: int) -> KernelInfo:
    """The state of one rank of the distributed compute ``name`` (its pod's, as for a single kernel); ray: rank 0
    is the head. NotFoundError when no such group or rank exists."""
    backend = _backend()
    compute = backend._compute_for(name)
    kube = backend._kube(compute)
    found = find_group(compute)
    ray = found is not None and found.config.framework == "ray"
    if found is None or not 0 <= rank < (1 if ray else found.config.workers):
        raise NotFoundError(f"no rank {rank} of a distributed Kubernetes compute named {name!r} in namespace "
                            f"{compute.namespace!r}; `%kt list` shows what runs")
    workload = kube.get(found.kind, compute.service_name, compute.namespace) or {}
    pods = [p for p in kube.list("Pod", compute.namespace, label_selector=label_selector(compute))
            if _rank_of(compute, p, ray) == rank]
    return backend._info(kube, rank_name(name, rank), compute.namespace, found.kind, workload, pods)  # as for one


#: A rank's compute name, ``{group}-r{rank}`` (:func:`~kt_jupyter.distributed.rank_name`).
_RANK_NAME_RE = re.compile(r"^(?P<group>.+)-r(?P<rank>[0-9]+)$")


def rank_pods_of_name(name: str) -> list[dict[str, Any]]:
    """The pods of the rank ``name`` (``NAME-rR``) of a distributed compute, for its logs; [] when it is none."""
    match = _RANK_NAME_RE.match(name)
    if not match:
        return []
    compute = _backend()._compute_for(match["group"])
    found = find_group(compute)
    if found is None:
        return []
    pods = _backend()._kube(compute).list("Pod", compute.namespace, label_selector=label_selector(compute))
    return [p for p in pods if _rank_of(compute, p, found.config.framework == "ray") == int(match["rank"])]


def status_of_name(name: str) -> KernelInfo | None:
    """The state of ``name`` when it is a distributed compute (ready once every rank is; else the first rank that
    is not, named) or one of its ranks (``NAME-rR``); None when it is neither."""
    match = _RANK_NAME_RE.match(name)
    if match:
        try:
            return rank_status(match["group"], int(match["rank"]))
        except NotFoundError:
            pass  # a compute of its own that happens to end in -rN
    compute = _backend()._compute_for(name)
    found = find_group(compute)
    if found is None:
        return None
    ranks = [rank_status(name, r) for r in range(1 if found.config.framework == "ray" else found.config.workers)]
    return group_info(name, found.kind, found.running, compute, ranks)


def group_info(name: str, kind: str, running: Compute, compute: Compute, ranks: list[KernelInfo]) -> KernelInfo:
    """The distributed compute ``name`` as one compute: ready once every rank is, else the first rank that is
    not, named (``ranks``: each rank's own state; ray: the head's only)."""
    config = running.distributed_config
    assert config is not None
    behind = next((r for r in ranks if r.phase != "ready"), None)
    detail = f"{config.workers} {config.framework} workers ({', '.join(r.name for r in ranks)})"
    if behind is not None:
        detail += f"; {behind.name} is {behind.phase}" + (f": {behind.detail}" if behind.detail else "")
    return KernelInfo(name=name, backend="kubernetes", phase="ready" if behind is None else behind.phase,
                      where=f"{config.workers} {config.framework} workers: {kind} {compute.service_name} "
                            f"(namespace {compute.namespace})",
                      started=min(r.started for r in ranks), spec=running.to_dict(), detail=detail)


def delete_group(name: str, namespace: str | None = None, grace_period_s: float = 5.0) -> bool:
    """Delete the group's workload (foreground: its pods go first) and every object labelled as the compute's;
    return once the workload and its pods have left the API (a relaunch never meets them). False when nothing
    existed."""
    backend = _backend()
    compute = backend._compute_for(name, namespace)
    kube = backend._kube(compute)
    updates: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    watches, left = [], set()
    try:
        for kind in ("StatefulSet", "RayCluster"):  # no RayCluster resource (no KubeRay): nothing deleted
            watches.append(WatchThread(kube, kind, compute.namespace, updates, kind,
                                       field_selector=f"metadata.name={compute.service_name}"))
            if kube.delete(kind, compute.service_name, compute.namespace, max(1.0, grace_period_s),
                           propagation="Foreground"):
                left.add(kind)
        existed = backend.delete(name, grace_period_s) or bool(left)  # pods, Services, Secret, ConfigMap...
        deadline = time.monotonic() + max(1.0, grace_period_s) + DELETE_WAIT_S
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KtError(f"the {', '.join(sorted(left))} of {name!r} was still being deleted after "
                              f"{DELETE_WAIT_S:g} s; `kubectl get statefulsets,rayclusters,pods -n "
                              f"{compute.namespace}` shows why")
            try:
                tag, kind, obj = updates.get(timeout=remaining)
            except queue.Empty:
                continue
            if kind == "DELETED":
                left.discard(tag)
            elif kind == "ERROR" and tag in left:
                raise obj
        return existed
    finally:
        for watch in watches:
            watch.stop()
