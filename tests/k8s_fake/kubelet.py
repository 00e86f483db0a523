"""FakeKubelet: the deployment controller, scheduler and kubelet of a one-node fake cluster (a test double).

It watches :class:`~k8s_fake.api_server.FakeStore` in-process. For a
Deployment it creates the Pods (Recreate strategy, owner references, a
``pod-template-hash`` label); it "schedules" a pod against one
:class:`FakeNode`'s allocatable resources and labels (so asking for a GPU on
the GPU-less node is Unschedulable, with the scheduler's wording); it "pulls"
the image (names in ``missing_images`` fail with ErrImagePull then
ImagePullBackOff, names in ``slow_images`` never finish); then it runs the
container's real command as a **local process** — for kt_jupyter that is the
startup script from the manifests, which ``exec``s the real
``python -m pod_kernel`` from the ConfigMap's files — with the container's
env (the token comes from the Secret through ``secretKeyRef``), and reports
the pod Ready once the process is listening.

Where no real part can run here, the fake stands in, and says so:

* no mount namespace: volumes are directories under ``workdir``; for kt's two
  mounts (the source ConfigMap and the cache emptyDir) the fake sets the
  ``KT_SRC_DIR`` / ``KT_CACHE_DIR`` overrides the startup script reads;
* no network namespace: the command's ``--host 0.0.0.0`` becomes
  ``--host 127.0.0.1`` and ``KT_PORT=0`` lets the pod kernel pick a free
  port, which it reports on ``KT_READY_FD``; :class:`FakePortForwardConnector`
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
from typing import Any, Iterator

from kt_jupyter.backends.portforward import Forward, PodTarget
from kt_jupyter.compute import POD_KERNEL_PORT

from .api_server import FakeKubeApiServer
from .pod_runtime import FakeNode, FakePodRuntime, quantity
from .store import now_rfc3339

__all__ = ["FakeKubelet", "FakeNode", "FakePodRuntime", "FakePortForwardConnector"]


class FakeKubelet:
    """Deployment controller + scheduler + kubelet of the fake cluster; pods are local processes."""

    def __init__(self, api: FakeKubeApiServer, workdir: Path, *, node: FakeNode | None = None,
                 missing_images: set[str] | None = None, slow_images: set[str] | None = None,
                 restart_backoff_s: float = 0.3) -> None:
        self.api, self.store, self.workdir = api, api.store, workdir
        self.node = node or FakeNode()
        self.missing_images = set(missing_images or ())
        self.slow_images = set(slow_images or ())
        self.restart_backoff_s = restart_backoff_s
        self.pods: dict[tuple[str, str], FakePodRuntime] = {}
        self._changes: "queue.Queue[tuple[str, str, dict[str, Any]] | None]" = queue.Queue()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)

    # -- lifecycle

    def start(self) -> "FakeKubelet":
        """Start reacting to the store's changes."""
        self.store.listeners.append(self._on_change)
        self.store.log_source = self.log
        self.store.log_follower = self.follow_log
        self.store.port_resolver = lambda ns, pod, _port: self.local_port(ns, pod)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reacting; kill every container process."""
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)
        self._changes.put(None)
        self._thread.join(timeout=10)
        for pod in list(self.pods.values()):
            pod.kill_all()
        for pod in list(self.pods.values()):
            pod.thread.join(timeout=10)

    def _on_change(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        if plural in ("deployments", "pods"):
            self._changes.put((kind, plural, obj))

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
            meta = obj["metadata"]
            pod = self.pods.get((meta["namespace"], meta["name"]))
            if kind == "MODIFIED" and meta.get("deletionTimestamp") and pod is not None:
                pod.stop(float(meta.get("deletionGracePeriodSeconds", 30)))
            if kind in ("DELETED", "MODIFIED"):
                owner = self._owner(obj)
                if owner is not None:
                    self._reconcile(owner)

    # -- the deployment controller's part

    def _owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Deployment":
                dep = self.store.get("deployments", pod["metadata"]["namespace"], ref["name"])
                if dep is not None and dep["metadata"]["uid"] == ref["uid"]:
                    return dep
        return None

    def _owned(self, dep: dict[str, Any]) -> list[dict[str, Any]]:
        ns, uid = dep["metadata"]["namespace"], dep["metadata"]["uid"]
        return [p for p in self.store.list("pods", ns)
                if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])]

    def _reconcile(self, dep: dict[str, Any]) -> None:
        dep = self.store.get("deployments", dep["metadata"]["namespace"], dep["metadata"]["name"])
        if dep is None:
            return
        ns = dep["metadata"]["namespace"]
        template = dep["spec"]["template"]
        thash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        desired = int(dep["spec"].get("replicas", 1))
        pods = self._owned(dep)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        old = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") != thash]
        current = [p for p in live if p["metadata"]["labels"].get("pod-template-hash") == thash]
        for pod in old:  # Recreate: every old pod goes before a new one starts
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", ns, pod["metadata"]["name"])
        if not old:
            for _ in range(desired - len(current)):
                self._create_pod(dep, template, thash)
        for pod in sorted(current, key=lambda p: p["metadata"]["creationTimestamp"])[desired:]:
            self.store.delete("pods", ns, pod["metadata"]["name"])
        ready = sum(1 for p in live if any(c["type"] == "Ready" and c["status"] == "True"
                                           for c in (p.get("status") or {}).get("conditions") or []))

        def status(obj: dict[str, Any]) -> None:
            obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": len(live),
                             "updatedReplicas": len(current), "readyReplicas": ready, "availableReplicas": ready}
        self.store.update("deployments", ns, dep["metadata"]["name"], status)

    def _create_pod(self, dep: dict[str, Any], template: dict[str, Any], thash: str) -> None:
        ns = dep["metadata"]["namespace"]
        suffix = hashlib.sha256(f"{next(self._ids)}".encode()).hexdigest()[:5]
        meta = copy.deepcopy(template.get("metadata") or {})
        meta["name"] = f"{dep['metadata']['name']}-{thash}-{suffix}"
        meta.setdefault("labels", {})["pod-template-hash"] = thash
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"],
                                    "uid": dep["metadata"]["uid"], "controller": True}]
        pod = self.store.create("pods", ns, {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                             "spec": copy.deepcopy(template["spec"]),
                                             "status": {"phase": "Pending"}})
        runtime = FakePodRuntime(self, pod)
        self.pods[(ns, meta["name"])] = runtime
        runtime.thread.start()

    def _collect_garbage(self, dep: dict[str, Any]) -> None:
        uid = dep["metadata"]["uid"]
        for pod in self.store.list("pods", dep["metadata"]["namespace"]):
            if any(r.get("uid") == uid for r in pod["metadata"].get("ownerReferences") or []) \
                    and not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])

    # -- the scheduler's part

    def unschedulable_reason(self, pod: FakePodRuntime) -> str | None:
        """The scheduler's message when the pod does not fit the node, else None."""
        selector = pod.spec.get("nodeSelector") or {}
        if any(self.node.labels.get(k) != v for k, v in selector.items()):
            return ("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: "
                    "0/1 nodes are available: 1 Preemption is not helpful for scheduling.")
        used: dict[str, float] = {}
        for other in self.pods.values():
            if other is pod or other.stopping.is_set() or not other.runs:
                continue
            for res, qty in ((other.container.get("resources") or {}).get("requests") or {}).items():
                used[res] = used.get(res, 0) + quantity(qty)
        asks = {**((pod.container.get("resources") or {}).get("requests") or {}),
                **{k: v for k, v in ((pod.container.get("resources") or {}).get("limits") or {}).items()
                   if k not in ("memory", "cpu", "ephemeral-storage")}}
        short = [res for res, qty in sorted(asks.items())
                 if quantity(qty) + used.get(res, 0) > quantity(self.node.allocatable.get(res, "0"))]
        if short:
            return ("0/1 nodes are available: " + ", ".join(f"1 Insufficient {r}" for r in short) +
                    ". preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.")
        return None

    # -- events, logs, ports

    def event(self, ns: str, kind: str, name: str, uid: str, reason: str, message: str,
              type_: str = "Normal") -> None:
        """Record an Event about an object, as the kubelet and scheduler do."""
        stamp = now_rfc3339()
        self.store.create("events", ns, {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{next(self._ids):x}"},
            "involvedObject": {"kind": kind, "name": name, "namespace": ns, "uid": uid},
            "reason": reason, "message": message, "type": type_, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "kubelet", "host": self.node.name}})

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

    def local_port(self, ns: str, pod: str) -> int:
        """Where the pod's pod kernel listens on 127.0.0.1 (its current run)."""
        runtime = self.pods.get((ns, pod))
        port = runtime.runs[-1].port if runtime and runtime.runs else None
        if port is None:
            raise ConnectionError(f"fake kubelet: pod {ns}/{pod} has no listening container")
        return port

    def pid(self, ns: str, pod: str) -> int:
        """The process id of the pod's current container run."""
        return self.pods[(ns, pod)].runs[-1].proc.pid


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

        The pod kernel's own port maps to where the fake pod's process listens;
        any other port (debugpy's) is the pod's loopback port, and the fake
        pod's loopback is this machine's: 127.0.0.1 and the same port, as a
        real port-forward reaches it.
        """
        self.opened.append(target)
        port = (self.kubelet.local_port(target.namespace, target.pod) if target.port == POD_KERNEL_PORT
                else target.port)
        return Forward(f"ws://127.0.0.1:{port}", f"fake port-forward -> pod {target.pod} at 127.0.0.1:{port}")
