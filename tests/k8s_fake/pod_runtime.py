"""FakePodRuntime: one pod's life on the fake node, its container run as a local process (a test double).

Scheduling against the :class:`FakeNode`, the fake image pull, the
container's env and volumes, the process, the readiness probe, the fake
cgroup's OOM kill, restarts with back-off, and termination with a grace
period — see :mod:`k8s_fake.kubelet` for what stands in for what.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from kt_jupyter.manifests import CACHE_DIR, SRC_DIR
from kt_jupyter.startup import KERNEL_HOST

from .store import SA_TOKEN_PREFIX, now_rfc3339

if TYPE_CHECKING:
    from .kubelet import FakeKubelet

#: How often the fake cgroup samples a container's memory.
OOM_SAMPLE_S = 0.02
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9,
          "T": 10**12, "m": 1e-3, "": 1}


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity as a number (``"500m"`` -> 0.5, ``"1Gi"`` -> 1073741824)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text).strip())
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _free_port() -> int:
    """A port free on 127.0.0.1 now (the fake's stand-in for a pod's own network namespace)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeNode:
    """The fake cluster's only node: its name, labels and allocatable resources."""

    name: str = "fake-node-1"
    labels: dict[str, str] = field(default_factory=lambda: {"kubernetes.io/hostname": "fake-node-1"})
    allocatable: dict[str, str] = field(default_factory=lambda: {"cpu": "8", "memory": "32Gi", "pods": "110"})


class _FakeContainerRun:
    """One run of a container: its process, log file, port once listening."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc, self.log_path = proc, log_path
        self.port: int | None = None
        #: Where this run's bulk channel listens (the pod's fixed bulk port, on a free local port).
        self.bulk_port: int | None = None
        self.oom_killed = False


class FakePodRuntime:
    """One pod's life on the fake node, in its own thread (a test double of the kubelet's pod worker)."""

    def __init__(self, kubelet: "FakeKubelet", pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.ns, self.name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.spec = pod["spec"]
        self.container = self.spec["containers"][0]
        self.dir = kubelet.workdir / self.ns / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[_FakeContainerRun] = []
        self.stopping = threading.Event()
        self.kill_at = float("inf")
        self._stop_lock = threading.Lock()
        self.restarts = 0
        #: The node the scheduler bound the pod to ('' while unscheduled).
        self.node_name = ""
        #: Set when scheduling may now succeed (a node was added) or the pod is stopping.
        self.reschedule = threading.Event()
        self._pulled = False
        self.thread = threading.Thread(target=self._live, name=f"fake-pod-{self.name}", daemon=True)

    # -- status helpers

    def _update(self, mutate: Any) -> None:
        self.kubelet.store.update("pods", self.ns, self.name, mutate)

    def _set_container(self, state: dict[str, Any], ready: bool = False, last: dict[str, Any] | None = None) -> None:
        def mutate(pod: dict[str, Any]) -> None:
            status = pod.setdefault("status", {})
            prev = (status.get("containerStatuses") or [{}])[0]
            image = self.container["image"]
            digest = hashlib.sha256(image.encode()).hexdigest()
            cs = {"name": self.container["name"], "image": image, "ready": ready,
                  "restartCount": self.restarts, "started": "running" in state, "state": state,
                  # the typed client models require imageID; the kubelet sets it once the image is pulled
                  "imageID": f"{image.rsplit(':', 1)[0]}@sha256:{digest}" if self._pulled else "",
                  "lastState": last if last is not None else prev.get("lastState", {})}
            if "running" in state or "terminated" in state:
                cs["containerID"] = f"containerd://{hashlib.sha256(f'{self.uid}{len(self.runs)}'.encode()).hexdigest()}"
            status["containerStatuses"] = [cs]
            if "running" in state:
                status["phase"] = "Running"
            conds = [c for c in status.get("conditions", []) if c["type"] not in ("Ready", "ContainersReady")]
            flag = "True" if ready else "False"
            conds += [{"type": "ContainersReady", "status": flag}, {"type": "Ready", "status": flag}]
            status["conditions"] = conds
        self._update(mutate)

    def _event(self, reason: str, message: str, kind: str = "Normal") -> None:
        self.kubelet.event(self.ns, "Pod", self.name, self.uid, reason, message, kind)

    # -- the pod's life

    def _live(self) -> None:
        try:
            if not self._schedule():
                return
            if not self._pull():
                return
            env = self._env()
            if env is None:
                return
            self._run_containers(env)
        finally:
            self._finish()

    def _schedule(self) -> bool:
        """Bind to the first node that fits; else Unschedulable (with the scheduler's message) until one does."""
        said = None
        while not self.stopping.is_set():
            self.reschedule.clear()
            current = self.kubelet.store.get("pods", self.ns, self.name) or {}
            if (current.get("spec") or {}).get("schedulingGates"):  # the scheduler skips gated pods
                if said != "gated":
                    said = "gated"

                    def gated(pod: dict[str, Any]) -> None:
                        pod.setdefault("status", {}).update(phase="Pending", conditions=[
                            {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                             "message": "Scheduling is blocked due to non-empty scheduling gates"}])
                    self._update(gated)
                self.reschedule.wait()
                continue
            node, why = self.kubelet.place(self)
            if node is not None:
                def bind(pod: dict[str, Any], node: FakeNode = node) -> None:
                    pod["spec"]["nodeName"] = node.name
                    pod.setdefault("status", {}).update(phase="Pending", hostIP="127.0.0.1", startTime=now_rfc3339(),
                                                        conditions=[{"type": "PodScheduled", "status": "True"}])
                self._update(bind)
                self.kubelet.event(self.ns, "Pod", self.name, self.uid, "Scheduled",
                                   f"Successfully assigned {self.ns}/{self.name} to {node.name}",
                                   component="default-scheduler")
                return True
            if why != said:
                said = why

                def pending(pod: dict[str, Any], why: str = why) -> None:
                    pod.setdefault("status", {}).update(phase="Pending", conditions=[
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}])
                self._update(pending)
                self.kubelet.event(self.ns, "Pod", self.name, self.uid, "FailedScheduling", why, "Warning",
                                   component="default-scheduler")
                if self.kubelet.autoscaler is not None:
                    self.kubelet.autoscaler.unschedulable(self)
            self.reschedule.wait()
        return False

    def _pull(self) -> bool:
        image = self.container["image"]
        self._event("Pulling", f'Pulling image "{image}"')
        self._set_container({"waiting": {"reason": "ContainerCreating"}})
        if image in self.kubelet.slow_images:
            self.stopping.wait()
            return False
        gate = self.kubelet.pull_gates.get(image)
        while gate is not None and not gate.wait(OOM_SAMPLE_S * 5):  # a pull that ends when the test says so
            if self.stopping.is_set():
                return False
        if image in self.kubelet.flaky_images and not self.runs:  # a registry's rate limit: the kubelet retries
            ref = image if "/" in image else f"docker.io/library/{image}"
            detail = (f'failed to pull and unpack image "{ref}": failed to copy: httpReadSeeker: failed open: '
                      f'unexpected status code https://registry.example.com/v2/{ref.split("/", 1)[-1].split(":")[0]}'
                      f'/manifests/sha256:0f3c: 429 Too Many Requests - Server message: toomanyrequests: You have '
                      f'reached your pull rate limit.')
            if not self._pull_failed(image, detail) or self.stopping.wait(self.kubelet.restart_backoff_s):
                return False
            self._event("Pulling", f'Pulling image "{image}"')
        if image in self.kubelet.missing_images:
            ref = image if "/" in image else f"docker.io/library/{image}"
            detail = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": failed to '
                      f'resolve reference "{ref}": {ref}: not found')
            if self._pull_failed(image, detail):
                self.stopping.wait()
            return False
        self._event("Pulled", f'Successfully pulled image "{image}" in 0s (fake registry)')
        self._pulled = True
        return True

    def _pull_failed(self, image: str, detail: str) -> bool:
        """A failed pull as the kubelet reports it: ErrImagePull, then after a back-off ImagePullBackOff.

        False when the pod is being stopped meanwhile.
        """
        self._event("Failed", f'Failed to pull image "{image}": {detail}', "Warning")
        self._event("Failed", "Error: ErrImagePull", "Warning")
        self._set_container({"waiting": {"reason": "ErrImagePull", "message": detail}})
        if self.stopping.wait(self.kubelet.restart_backoff_s):
            return False
        self._event("BackOff", f'Back-off pulling image "{image}"', "Normal")
        self._set_container({"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}})
        return True

    def _secret_value(self, name: str, key: str | None) -> dict[str, str] | None:
        secret = self.kubelet.store.get("secrets", self.ns, name)
        if secret is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return data if key is None else ({key: data[key]} if key in data else None)

    def _env(self) -> dict[str, str] | None:
        """The process environment, or None after reporting CreateContainerConfigError."""
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
               "HOME": str(self.dir / "home"), "HOSTNAME": self.name, "LANG": "C.UTF-8"}
        (self.dir / "home").mkdir(exist_ok=True)
        for src in self.container.get("envFrom") or []:
            ref = (src.get("secretRef") or {}).get("name")
            values = self._secret_value(ref, None) if ref else {}
            if values is None:
                return self._config_error(f'secret "{ref}" not found')
            env.update(values)
        for item in self.container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            source = item.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                values = self._secret_value(ref["name"], ref["key"])
                if values is None:
                    return self._config_error(f'secret "{ref["name"]}" not found')
                env[item["name"]] = values[ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": self.name, "metadata.namespace": self.ns,
                                     "status.podIP": "127.0.0.1"}.get(path, "")
        # volumes as directories; kt's two mounts through the overrides its startup script reads
        dirs: dict[str, Path] = {}
        for vol in self.spec.get("volumes") or []:
            d = self.dir / "volumes" / vol["name"]
            d.mkdir(parents=True, exist_ok=True)
            dirs[vol["name"]] = d
            if "configMap" in vol:
                cm = self.kubelet.store.get("configmaps", self.ns, vol["configMap"]["name"])
                if cm is None and not vol["configMap"].get("optional"):
                    return self._config_error(f'configmap "{vol["configMap"]["name"]}" not found')
                data = (cm or {}).get("data") or {}
                items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = d / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
        for mount in self.container.get("volumeMounts") or []:
            if mount["mountPath"] == SRC_DIR:
                env["KT_SRC_DIR"] = str(dirs[mount["name"]])
            elif mount["mountPath"] == CACHE_DIR:
                env["KT_CACHE_DIR"] = str(dirs[mount["name"]])
        sa = self.spec.get("serviceAccountName")
        if sa and self.spec.get("automountServiceAccountToken", True):
            token = self.dir / "serviceaccount-token"
            token.write_text(f"{SA_TOKEN_PREFIX}{self.ns}:{sa}")
            env.update(KT_KUBE_TOKEN_FILE=str(token), KT_KUBE_API=self.kubelet.api.url)
        return env

    def _config_error(self, message: str) -> None:
        self._event("Failed", f"Error: {message}", "Warning")
        self._set_container({"waiting": {"reason": "CreateContainerConfigError", "message": message}})
        self.stopping.wait()
        return None

    def _command(self) -> list[str]:
        argv = list(self.container.get("command") or []) + list(self.container.get("args") or [])
        if not argv:
            raise RuntimeError(f"fake kubelet: container of {self.name} has no command (image entrypoints are "
                               "not emulated)")
        script, bind = argv[-1], f"--host {KERNEL_HOST}"
        if bind not in script:
            raise RuntimeError(f"fake kubelet: expected '{bind}' in the container command, to bind the "
                               "fake pod to 127.0.0.1 instead; the manifests changed")
        argv[-1] = script.replace(bind, "--host 127.0.0.1")
        return argv

    def _run_containers(self, env: dict[str, str]) -> None:
        argv = self._command()
        limit = ((self.container.get("resources") or {}).get("limits") or {}).get("memory")
        limit_bytes = quantity(limit) if limit else None
        last: dict[str, Any] = {}
        while not self.stopping.is_set():
            n = len(self.runs)
            rootfs = self.dir / f"rootfs-{n}"  # a new container filesystem per run
            rootfs.mkdir(exist_ok=True)
            workdir = rootfs / (self.container.get("workingDir") or "/").lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
            read_fd, write_fd = os.pipe()
            bulk_port = _free_port() if "KT_BULK_PORT" in env else None  # no network namespace: not 32301
            run_env = dict(env, KT_PORT="0", KT_READY_FD=str(write_fd), KT_MARKER_DIR=str(rootfs))
            if bulk_port is not None:
                run_env["KT_BULK_PORT"] = str(bulk_port)
            log_path = self.dir / f"{self.container['name']}-{n}.log"
            with open(log_path, "wb") as log, self._stop_lock:  # no start once stop()/kill_all() has begun
                try:
                    if self.stopping.is_set():
                        os.close(read_fd)
                        return
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=run_env, cwd=workdir, pass_fds=(write_fd,), start_new_session=True)
                finally:
                    os.close(write_fd)
                run = _FakeContainerRun(proc, log_path)
                run.bulk_port = bulk_port
                self.runs.append(run)
            started = now_rfc3339()
            self._event("Created", f"Created container {self.container['name']}")
            self._event("Started", f"Started container {self.container['name']}")
            self._set_container({"running": {"startedAt": started}}, last=last)
            sampler = threading.Thread(target=self._sample_memory, args=(run, limit_bytes), daemon=True)
            sampler.start()
            self._await_listening(run, read_fd, limit_bytes)
            code = proc.wait()
            if self.stopping.is_set():
                return
            reason = "OOMKilled" if run.oom_killed else ("Completed" if code == 0 else "Error")
            exit_code = 128 + (-code) if code < 0 else code
            last = {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": started,
                                   "finishedAt": now_rfc3339()}}
            self._set_container(last, last=(self.kubelet.store.get("pods", self.ns, self.name) or {})
                                .get("status", {}).get("containerStatuses", [{}])[0].get("lastState", {}))
            self.restarts += 1
            if n >= 1:  # the second and later exits: back off, as the kubelet does
                self._event("BackOff", f"Back-off restarting failed container {self.container['name']} in pod "
                                       f"{self.name}", "Warning")
                self._set_container({"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {self.kubelet.restart_backoff_s:g}s restarting failed container="
                    f"{self.container['name']} pod={self.name}")}}, last=last)
                if self.stopping.wait(self.kubelet.restart_backoff_s):
                    return

    def _await_listening(self, run: _FakeContainerRun, read_fd: int, limit_bytes: float | None) -> None:
        """Read the pod kernel's ready line, probe its port (the readinessProbe), report Ready."""
        buf = b""
        try:
            while b"\n" not in buf:
                readable, _, _ = select.select([read_fd], [], [])
                data = os.read(read_fd, 4096) if readable else b""
                if not data:
                    return  # the process ended before listening
                buf += data
        finally:
            os.close(read_fd)
        port = json.loads(buf.split(b"\n", 1)[0])["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        if limit_bytes is not None and self._rss(run) > limit_bytes:
            self._oom(run)  # deterministic: over the limit by the time it listens
            return
        if run.proc.poll() is None and not self.stopping.is_set():
            run.port = port
            self._set_container({"running": {"startedAt": now_rfc3339()}}, ready=True)

    @staticmethod
    def _rss(run: _FakeContainerRun) -> int:
        try:
            root = psutil.Process(run.proc.pid)
            return sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
        except psutil.Error:
            return 0

    def _oom(self, run: _FakeContainerRun) -> None:
        run.oom_killed = True
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _sample_memory(self, run: _FakeContainerRun, limit_bytes: float | None) -> None:
        if limit_bytes is None:
            return
        while run.proc.poll() is None:
            if self._rss(run) > limit_bytes:
                self._oom(run)
                return
            time.sleep(OOM_SAMPLE_S)  # the fake cgroup's sampling period, not a test wait

    def stop(self, grace_s: float) -> None:
        """The pod is being deleted: SIGTERM its running container, SIGKILL after ``grace_s``.

        A second delete with a shorter grace period shortens it, as in Kubernetes.
        """
        with self._stop_lock:
            first = not self.stopping.is_set()
            self.kill_at = min(self.kill_at, time.monotonic() + grace_s)
            self.stopping.set()
        self.reschedule.set()
        if first:
            threading.Thread(target=self._terminate, name=f"fake-kill-{self.name}", daemon=True).start()

    def _terminate(self) -> None:
        run = self.runs[-1] if self.runs else None
        if run is None or run.proc.poll() is not None:
            return
        self._event("Killing", f"Stopping container {self.container['name']}")
        try:
            os.killpg(run.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        while run.proc.poll() is None:
            remaining = self.kill_at - time.monotonic()
            if remaining <= 0:
                try:
                    os.killpg(run.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            try:
                run.proc.wait(timeout=min(remaining, 0.1))  # re-read kill_at: a later delete may shorten it
            except subprocess.TimeoutExpired:
                pass

    def _finish(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                self._terminate()
                run.proc.wait()
        if self.stopping.is_set():
            self.kubelet.store.remove("pods", self.ns, self.name)

    def kill_all(self) -> None:
        """Test teardown: SIGKILL whatever runs."""
        with self._stop_lock:
            self.kill_at = 0.0
            self.stopping.set()
            runs = list(self.runs)
        self.reschedule.set()
        for run in runs:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
