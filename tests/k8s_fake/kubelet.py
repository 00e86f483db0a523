"""FakeKubelet: the controllers, scheduler and kubelet of a small fake cluster (a test double).

It watches :class:`~k8s_fake.api_server.FakeStore` in-process. For a
Deployment it keeps one ReplicaSet per pod template (``{deployment}-{hash}``,
Recreate strategy, owner references), and the ReplicaSet creates the Pods
(``generateName``, as the real controller does, so the API's admission —
Pod Security — sees them; a refused or failed create is a ``FailedCreate``
Warning event on the ReplicaSet with the API's message, retried after
``restart_backoff_s``; ``create_failures`` injects transient ones such as a
webhook timeout). It "schedules" a pod on the first of its
:class:`FakeNode` s whose labels and allocatable resources fit, else marks it
Unschedulable with the scheduler's wording over all nodes and tries again
when a node is added (see :mod:`k8s_fake.autoscaler`); it "pulls" the image
(names in ``missing_images`` fail with ErrImagePull then ImagePullBackOff,
names in ``flaky_images`` fail once with a registry 429 then succeed, names in
``slow_images`` never finish); then it runs the container's real command as a
**local process** — for kt_jupyter that is the startup script from the
manifests, which ``exec``s the real ``python -m pod_kernel`` from the
ConfigMap's files — with the container's env (the token comes from the Secret
through ``secretKeyRef``), and reports the pod Ready once the process is listening.
Other workload controllers live in their own modules and register in
:attr:`FakeKubelet.controllers` per plural (:class:`FakeController`); they make
pods with :meth:`FakeKubelet.create_pod`.

Where no real part can run here, the fake stands in, and says so:

* no mount namespace: volumes are directories under ``workdir``; for kt's two
  mounts (the source ConfigMap and the cache emptyDir) the fake sets the
  ``KT_SRC_DIR`` / ``KT_CACHE_DIR`` overrides the startup script reads;
* no network namespace: the command's ``--host ::`` (dual-stack,
  :data:`kt_jupyter.startup.KERNEL_HOST`) becomes ``--host 127.0.0.1``, ``KT_PORT=0`` lets the pod
  kernel pick a free port, which it reports on ``KT_READY_FD``, and ``KT_BULK_PORT`` becomes a free
  port the fake picks; :class:`FakePortForwardConnector`
  hands the backend that address instead of a port-forward through the API;
* no cgroup: a sampler kills the process group (SIGKILL) when its RSS
  passes the container's memory limit, and reports ``OOMKilled``;
* restarts follow ``restartPolicy: Always``: the first at once, later ones
  after ``restart_backoff_s`` in ``CrashLoopBackOff``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from kt_jupyter.backends.portforward import Forward, PodTarget
from kt_jupyter.compute import POD_KERNEL_PORT
from kt_jupyter.manifests import POD_KERNEL_BULK_PORT

from .api_server import FakeKubeApiServer
from .pod_runtime import FakeNode, FakePodRuntime, quantity
from .store import FakeApiError, now_rfc3339

__all__ = ["FakeKubelet", "FakeNode", "FakePodRuntime", "FakePortForwardConnector"]

#: Grace the kubelet gives the container of a pod force-deleted from the API (grace 0): it stops it only then.
FORCE_DELETE_GRACE_S = 1.0


class FakeController(Protocol):
    """A workload controller of the fake cluster in its own module, registered in :attr:`FakeKubelet.controllers`
    under the plural it owns (``"jobs"``, ``"statefulsets"``); the kubelet's thread calls it, one change at a time."""

    def reconcile(self, obj: dict[str, Any]) -> None:
        """Make the world match ``obj`` (added or modified, or the owner of a pod that changed)."""

    def deleted(self, obj: dict[str, Any]) -> None:
        """``obj`` left the API: collect what it owned (the garbage collector's part)."""

    def owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The object of this controller's kind that controls ``pod`` (as stored now), or None."""


class FakeKubelet:
    """Deployment and ReplicaSet controllers + scheduler + kubelet of the fake cluster; pods are local processes."""

    def __init__(self, api: FakeKubeApiServer, workdir: Path, *, node: FakeNode | None = None,
                 nodes: list[FakeNode] | None = None, missing_images: set[str] | None = None,
                 slow_images: set[str] | None = None, flaky_images: set[str] | None = None,
                 restart_backoff_s: float = 0.3) -> None:
        self.api, self.store, self.workdir = api, api.store, workdir
        self.nodes: list[FakeNode] = list(nodes or [node or FakeNode()])
        self.missing_images = set(missing_images or ())
        self.slow_images = set(slow_images or ())
        self.flaky_images = set(flaky_images or ())
        #: Pulls of these images finish only once their event is set (a big image, under the test's control).
        self.pull_gates: dict[str, threading.Event] = {}
        self.restart_backoff_s = restart_backoff_s
        #: Messages the next pod creations fail with, one each (a webhook timeout, a quota race).
        self.create_failures: list[str] = []
        #: Told of every pod that turns Unschedulable (:class:`~k8s_fake.autoscaler.FakeClusterAutoscaler`).
        self.autoscaler: Any = None
        self.pods: dict[tuple[str, str], FakePodRuntime] = {}
        #: Workload controllers living in their own modules, by the plural they own (see :class:`FakeController`).
        self.controllers: dict[str, FakeController] = {}
        self.sched_lock = threading.RLock()
        self._changes: "queue.Queue[tuple[str, str, dict[str, Any]] | None]" = queue.Queue()
        self._ids = itertools.count(1)
        self._timers: list[threading.Timer] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)

    @property
    def node(self) -> FakeNode:
        """The first node."""
        return self.nodes[0]

    # -- lifecycle

    def start(self) -> "FakeKubelet":
        """Start reacting to the store's changes."""
        self.store.listeners.append(self._on_change)
        self.store.log_source = self.log
        self.store.log_follower = self.follow_log
        self.store.port_resolver = self.local_port
        from .exec import install_exec  # pods/exec beside the containers, as every real kubelet serves it
        install_exec(self)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reacting; kill every container process."""
        self._stopped = True
        for timer in self._timers:
            timer.cancel()
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)
        self._changes.put(None)
        self._thread.join(timeout=10)
        for pod in list(self.pods.values()):
            pod.kill_all()
        for pod in list(self.pods.values()):
            pod.thread.join(timeout=10)

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` after ``delay_s`` (a controller's requeue or back-off), unless stopped first."""
        if self._stopped:
            return
        timer = threading.Timer(delay_s, lambda: None if self._stopped else action())
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def add_node(self, node: FakeNode) -> None:
        """A node joins (an autoscaler's, or a person's): Unschedulable pods are tried again."""
        with self.sched_lock:
            self.nodes.append(node)
        for pod in list(self.pods.values()):
            pod.reschedule.set()

    def _on_change(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        if plural in ("deployments", "pods") or plural in self.controllers:
            self._changes.put((kind, plural, obj))

    def requeue(self, plural: str, obj: dict[str, Any]) -> None:
        """Reconcile ``obj`` again on the kubelet's thread (a controller's retry)."""
        self._changes.put(("MODIFIED", plural, obj))

    def _loop(self) -> None:
        while True:
            item = self._changes.get()
            if item is None:
                return
            kind, plural, obj = item
            if plural == "deployments":
                if kind == "DELETED":
                    self._collect_garbage(obj)
                else:
                    self._reconcile(obj)
                continue
            if plural != "pods":
                controller = self.controllers[plural]
                controller.deleted(obj) if kind == "DELETED" else controller.reconcile(obj)
                continue
            meta = obj["metadata"]
            pod = self.pods.get((meta["namespace"], meta["name"]))
            if kind == "MODIFIED" and meta.get("deletionTimestamp") and pod is not None:
                pod.stop(float(meta.get("deletionGracePeriodSeconds", 30)))
            elif kind == "DELETED" and pod is not None and not pod.stopping.is_set():
                pod.stop(FORCE_DELETE_GRACE_S)  # force-deleted: gone from the API, the container stops only now
            elif kind == "MODIFIED" and pod is not None and not pod.node_name:
                pod.reschedule.set()  # a lifted scheduling gate (Kueue admitted it): try to place it again
            if kind in ("DELETED", "MODIFIED"):
                owner = self._owner(obj)
                if owner is not None:
                    self._reconcile(owner)
                for controller in list(self.controllers.values()):
                    top = controller.owner(obj)
                    if top is not None:
                        controller.reconcile(top)

    # -- the deployment and replicaset controllers' part

    def _owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The Deployment above a pod (through its ReplicaSet)."""
        ns = pod["metadata"]["namespace"]
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "ReplicaSet":
                rs = self.store.get("replicasets", ns, ref["name"])
                if rs is not None and rs["metadata"]["uid"] == ref["uid"]:
                    for dref in rs["metadata"].get("ownerReferences") or []:
                        dep = self.store.get("deployments", ns, dref["name"])
                        if dep is not None and dep["metadata"]["uid"] == dref["uid"]:
                            return dep
        return None

    def _replicasets(self, dep: dict[str, Any]) -> list[dict[str, Any]]:
        ns, uid = dep["metadata"]["namespace"], dep["metadata"]["uid"]
        return [r for r in self.store.list("replicasets", ns) if owned_by(r, uid)]

    def _pods_of(self, rs: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in self.store.list("pods", rs["metadata"]["namespace"])
                if owned_by(p, rs["metadata"]["uid"])]

    def _reconcile(self, dep: dict[str, Any]) -> None:
        dep = self.store.get("deployments", dep["metadata"]["namespace"], dep["metadata"]["name"])
        if dep is None or self._stopped:
            return
        ns = dep["metadata"]["namespace"]
        if dep["metadata"].get("deletionTimestamp"):
            return self._delete_foreground(dep)
        template = dep["spec"]["template"]
        thash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        desired = int(dep["spec"].get("replicas", 1))
        rs = self._replicaset(dep, template, thash)
        old_pods = []
        for other in self._replicasets(dep):
            if other["metadata"]["uid"] == rs["metadata"]["uid"]:
                continue
            if other["spec"].get("replicas"):
                self.store.merge_patch("replicasets", ns, other["metadata"]["name"], {"spec": {"replicas": 0}})
            old_pods += self._pods_of(other)
        for pod in old_pods:  # Recreate: every old pod goes before a new one starts
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", ns, pod["metadata"]["name"])
        pods = self._pods_of(rs)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if not old_pods:
            if rs["spec"].get("replicas") != desired:
                self.store.merge_patch("replicasets", ns, rs["metadata"]["name"], {"spec": {"replicas": desired}})
            for _ in range(desired - len(live)):
                if not self._create_pod(dep, rs, thash):
                    break
            for pod in sorted(live, key=lambda p: p["metadata"]["creationTimestamp"])[desired:]:
                self.store.delete("pods", ns, pod["metadata"]["name"])
        ready = sum(1 for p in live if any(c["type"] == "Ready" and c["status"] == "True"
                                           for c in (p.get("status") or {}).get("conditions") or []))

        def status(obj: dict[str, Any]) -> None:
            obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1),
                             "replicas": len(live) + len(old_pods), "updatedReplicas": len(live),
                             "readyReplicas": ready, "availableReplicas": ready}
        self.store.update("deployments", ns, dep["metadata"]["name"], status)

    def _replicaset(self, dep: dict[str, Any], template: dict[str, Any], thash: str) -> dict[str, Any]:
        """The Deployment's ReplicaSet for this template, created (replicas 0) the first time."""
        ns, name = dep["metadata"]["namespace"], f"{dep['metadata']['name']}-{thash}"
        rs = self.store.get("replicasets", ns, name)
        if rs is not None:
            return rs
        spec_template = copy.deepcopy(template)
        labels = dict((spec_template.get("metadata") or {}).get("labels") or {}, **{"pod-template-hash": thash})
        spec_template.setdefault("metadata", {})["labels"] = labels
        return self.store.create("replicasets", ns, {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": dep["metadata"]["name"], "uid": dep["metadata"]["uid"],
                                              "controller": True}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": spec_template}})

    def _create_pod(self, dep: dict[str, Any], rs: dict[str, Any], thash: str) -> bool:
        """The ReplicaSet controller creates one pod (``generateName``); a refusal is retried later."""
        meta = copy.deepcopy(rs["spec"]["template"].get("metadata") or {})
        meta["generateName"] = f"{rs['metadata']['name']}-"
        return self.create_pod(rs, meta, rs["spec"]["template"]["spec"], component="replicaset-controller",
                               retry=lambda: self.requeue("deployments", dep)) is not None

    def create_pod(self, owner: dict[str, Any], meta: dict[str, Any], spec: dict[str, Any], *, component: str,
                   retry: Callable[[], None], runtime: type[FakePodRuntime] = FakePodRuntime) -> dict[str, Any] | None:
        """A controller creates a pod (``meta`` names it or gives ``generateName``) controlled by ``owner``, and
        the kubelet starts it as ``runtime``; a refused create (admission, ``create_failures``) is a
        ``FailedCreate`` Warning event on the owner with the API's message, and ``retry`` runs after the back-off."""
        ns, kind = owner["metadata"]["namespace"], owner["kind"]
        meta = dict(copy.deepcopy(meta), ownerReferences=[
            {"apiVersion": owner["apiVersion"], "kind": kind, "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}])
        try:
            if self.create_failures:
                raise FakeApiError(500, "InternalError", self.create_failures.pop(0))
            pod = self.store.create("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                                 "spec": copy.deepcopy(spec), "status": {"phase": "Pending"}})
        except FakeApiError as exc:
            self.event(ns, kind, owner["metadata"]["name"], owner["metadata"]["uid"], "FailedCreate",
                       f"Error creating: {exc.message}", "Warning", component=component)
            self.later(self.restart_backoff_s, retry)
            return None
        pod_runtime = runtime(self, pod)
        self.pods[(ns, pod["metadata"]["name"])] = pod_runtime
        pod_runtime.thread.start()
        return pod

    def _delete_foreground(self, dep: dict[str, Any]) -> None:
        """The garbage collector on a Deployment deleted in the foreground: its ReplicaSets stop making pods,
        its pods are deleted (their own grace), and once none is left the ReplicaSets and the Deployment go."""
        ns = dep["metadata"]["namespace"]
        pods = []
        for rs in self._replicasets(dep):
            if not rs["metadata"].get("deletionTimestamp"):
                self.store.update("replicasets", ns, rs["metadata"]["name"],
                                  lambda o: o["metadata"].update(deletionTimestamp=now_rfc3339(),
                                                                 finalizers=["foregroundDeletion"]))
            pods += self._pods_of(rs)
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", ns, pod["metadata"]["name"])
        if pods:
            return  # each pod's removal reconciles this Deployment again
        for rs in self._replicasets(dep):
            self.store.remove("replicasets", ns, rs["metadata"]["name"])
        self.store.remove("deployments", ns, dep["metadata"]["name"])

    def _collect_garbage(self, dep: dict[str, Any]) -> None:
        """The garbage collector: a deleted Deployment's ReplicaSets and their pods go too."""
        ns, uid = dep["metadata"]["namespace"], dep["metadata"]["uid"]
        for rs in [r for r in self.store.list("replicasets", ns) if owned_by(r, uid)]:
            for pod in self._pods_of(rs):
                if not pod["metadata"].get("deletionTimestamp"):
                    self.store.delete("pods", ns, pod["metadata"]["name"])
            self.store.remove("replicasets", ns, rs["metadata"]["name"])

    # -- the scheduler's part

    def misfit(self, node: FakeNode, pod: FakePodRuntime, *, empty: bool = False) -> list[str]:
        """Why ``pod`` does not fit ``node`` (the scheduler's per-node reasons); [] when it fits."""
        selector = pod.spec.get("nodeSelector") or {}
        if any(node.labels.get(k) != v for k, v in selector.items()) or not affinity_matches(pod.spec, node.labels):
            return ["node(s) didn't match Pod's node affinity/selector"]
        used: dict[str, float] = {}
        for other in [] if empty else self.pods.values():
            if other is pod or other.stopping.is_set() or other.node_name != node.name \
                    or (self.store.get("pods", other.ns, other.name) or {}).get("status", {}).get("phase") \
                    in ("Succeeded", "Failed"):
                continue  # a finished pod holds nothing on its node
            for res, qty in ((other.container.get("resources") or {}).get("requests") or {}).items():
                used[res] = used.get(res, 0) + quantity(qty)
        resources = pod.container.get("resources") or {}
        asks = {**(resources.get("requests") or {}),
                **{k: v for k, v in (resources.get("limits") or {}).items()
                   if k not in ("memory", "cpu", "ephemeral-storage")}}
        return [f"Insufficient {res}" for res, qty in sorted(asks.items())
                if quantity(qty) + used.get(res, 0) > quantity(node.allocatable.get(res, "0"))]

    def place(self, pod: FakePodRuntime) -> tuple[FakeNode | None, str]:
        """The first node the pod fits, or None and the scheduler's message over every node."""
        with self.sched_lock:
            counts: dict[str, int] = {}
            for node in self.nodes:
                reasons = self.misfit(node, pod)
                if not reasons:
                    pod.node_name = node.name
                    return node, ""
                for reason in reasons:
                    counts[reason] = counts.get(reason, 0) + 1
            n = len(self.nodes)
            why = ", ".join(f"{c} {r}" for r, c in sorted(counts.items()))
            resources_only = all(r.startswith("Insufficient") for r in counts)
            preemption = (f"{n} No preemption victims found for incoming pod." if resources_only
                          else f"{n} Preemption is not helpful for scheduling.")
            return None, f"0/{n} nodes are available: {why}. preemption: 0/{n} nodes are available: {preemption}"

    # -- events, logs, ports

    def event(self, ns: str, kind: str, name: str, uid: str, reason: str, message: str,
              type_: str = "Normal", component: str = "kubelet") -> None:
        """Record an Event about an object, as the kubelet, the scheduler and the controllers do."""
        stamp = now_rfc3339()
        self.store.create("events", ns, {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{next(self._ids):x}"},
            "involvedObject": {"kind": kind, "name": name, "namespace": ns, "uid": uid},
            "reason": reason, "message": message, "type": type_, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": component, **({"host": self.node.name} if component == "kubelet" else {})}})

    def log(self, ns: str, pod: str, container: str, previous: bool) -> bytes | None:
        """A container run's log: the current run's, or the one before with ``previous``."""
        runtime = self.pods.get((ns, pod))
        if runtime is None or not runtime.runs:
            return None
        index = len(runtime.runs) - (2 if previous else 1)
        if index < 0:
            return None
        return runtime.runs[index].log_path.read_bytes()

    def follow_log(self, ns: str, pod: str, container: str) -> Iterator[bytes]:
        """New bytes of the current run's log until that run ends (tails the file)."""
        runtime = self.pods.get((ns, pod))
        if runtime is None or not runtime.runs:
            return
        run = runtime.runs[-1]
        with open(run.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            while True:
                data = f.read()
                if data:
                    yield data
                elif run.proc.poll() is not None:
                    return
                else:
                    time.sleep(0.05)  # tailing a file: the fake's stand-in for the kubelet's log stream

    def local_port(self, ns: str, pod: str, port: int = POD_KERNEL_PORT) -> int:
        """Where the pod's ``port`` is on 127.0.0.1: the pod kernel's and its bulk channel's (its current
        run's), else the same port (the fake pod's loopback is this machine's)."""
        if port not in (POD_KERNEL_PORT, POD_KERNEL_BULK_PORT):
            return port
        runtime = self.pods.get((ns, pod))
        run = runtime.runs[-1] if runtime and runtime.runs else None
        local = (run.port if port == POD_KERNEL_PORT else run.bulk_port) if run is not None and run.port else None
        if local is None:
            raise ConnectionError(f"fake kubelet: pod {ns}/{pod} has no listening container")
        return local

    def pid(self, ns: str, pod: str) -> int:
        """The process id of the pod's current container run."""
        return self.pods[(ns, pod)].runs[-1].proc.pid


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether one of ``obj``'s owner references names the object with ``uid``."""
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def affinity_matches(spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether node ``labels`` meet the pod's required node affinity (terms ORed, expressions ANDed)."""
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []

    def holds(expr: dict[str, Any]) -> bool:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        return {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
                "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()

    return not terms or any(all(holds(e) for e in t.get("matchExpressions") or []) for t in terms)


class FakePortForwardConnector:
    """A FAKE connector: hands the backend the fake pod's local address instead of a port-forward.

    Production uses :class:`kt_jupyter.backends.portforward.PortForwardConnector`
    (a stream through the API server); the fake cluster has no API-server
    port-forward, and its pods listen on 127.0.0.1 anyway.
    """

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet
        self.opened: list[PodTarget] = []

    def open(self, target: PodTarget) -> Forward:
        """``ws://127.0.0.1:<the fake pod's port>``; nothing to close.

        The pod kernel's own port and its bulk port map to where the fake pod's process
        listens; any other port (debugpy's) is the pod's loopback port, and the fake
        pod's loopback is this machine's: 127.0.0.1 and the same port, as a
        real port-forward reaches it.
        """
        self.opened.append(target)
        port = self.kubelet.local_port(target.namespace, target.pod, target.port)
        return Forward(f"ws://127.0.0.1:{port}", f"fake port-forward -> pod {target.pod} at 127.0.0.1:{port}")
