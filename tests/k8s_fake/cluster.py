"""A whole fake cluster for a test: API server, kubelet, autoscaler, and the real backend pointed at them.

:func:`fake_cluster` is what the tests' ``cluster`` fixtures yield from: a
:class:`~k8s_fake.FakeKubeApiServer` with a kubeconfig in ``$KUBECONFIG``,
a :class:`~k8s_fake.FakeKubelet` (one CPU node) with the Job controller
(:mod:`k8s_fake.jobs`), by default a
:class:`~k8s_fake.FakeClusterAutoscaler` whose only node group is CPU-only
(a GPU pod gets ``NotTriggerScaleUp``, as on a cluster without GPU nodes), and
the process's ``kubernetes`` backend, with only its connector swapped for
:class:`~k8s_fake.FakePortForwardConnector`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import yaml

from kt_jupyter import backends as backends_mod
from kt_jupyter import connection as conn_mod
from kt_jupyter.backends.kubernetes import KubernetesBackend
from kt_jupyter.compute import Compute
from kt_jupyter.manifests import label_selector

from .api_server import FakeKubeApiServer
from .autoscaler import FakeClusterAutoscaler, FakeNodeGroup
from .jobs import install as install_job_controller
from .kubelet import FakeKubelet
from .statefulsets import FakeStatefulSetController

NS = "kt-test"
MISSING_IMAGE = "ghcr.io/example/does-not-exist:1.0"
SLOW_IMAGE = "ghcr.io/example/huge-image:1.0"
FLAKY_IMAGE = "docker.io/library/python:3.12-slim"
#: Seconds the stand-in autoscaler takes to react to an Unschedulable pod (the real one: about 10 s).
AUTOSCALER_DELAY_S = 0.3


class FakeCluster:
    """The fake API server, its fake kubelet, and the real backend pointed at them."""

    def __init__(self, api: FakeKubeApiServer, kubelet: FakeKubelet, backend: KubernetesBackend) -> None:
        self.api, self.kubelet, self.backend = api, kubelet, backend
        self.store = api.store

    def objects(self, plural: str, selector: str | None = None) -> list[dict]:
        """Objects of a resource in the test namespace."""
        return self.store.list(plural, NS, selector)

    def deployment(self, compute: Compute) -> dict | None:
        """The compute's Deployment, or None."""
        return self.store.get("deployments", NS, compute.service_name)

    def job(self, compute: Compute) -> dict | None:
        """The compute's Job (a compute with ``inactivity_ttl``), or None."""
        return self.store.get("jobs", NS, compute.service_name)

    def pods(self, compute: Compute, live_only: bool = True) -> list[dict]:
        """The compute's pods (without those being deleted, unless ``live_only`` is False)."""
        pods = self.objects("pods", label_selector(compute))
        return [p for p in pods if not (live_only and p["metadata"].get("deletionTimestamp"))]

    def process(self, compute: Compute) -> psutil.Process:
        """The container process of the compute's first pod."""
        pod = self.pods(compute)[0]
        return psutil.Process(self.kubelet.pid(NS, pod["metadata"]["name"]))

    def events(self, reason: str | None = None) -> list[dict]:
        """The namespace's events (of one reason)."""
        return [e for e in self.objects("events") if reason in (None, e.get("reason"))]


@contextmanager
def fake_cluster(tmp_path: Path, monkeypatch: Any, *, node_groups: list[FakeNodeGroup] | None = None,
                 **kubelet_kwargs: Any) -> Iterator[FakeCluster]:
    """Start a fake cluster; the ``kubernetes`` backend of this process (get_backend) uses it until the end."""
    from .kubelet import FakePortForwardConnector

    with FakeKubeApiServer() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(api.kubeconfig(NS)))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        for var in ("KUBERNETES_SERVICE_HOST", "KT_NAMESPACE", "KT_LAUNCH_TIMEOUT", "KT_UNSCHEDULABLE_GRACE"):
            monkeypatch.delenv(var, raising=False)
        options = dict(missing_images={MISSING_IMAGE}, slow_images={SLOW_IMAGE}, flaky_images={FLAKY_IMAGE},
                       restart_backoff_s=0.2)
        kubelet = FakeKubelet(api, tmp_path / "node", **{**options, **kubelet_kwargs})
        install_job_controller(kubelet)
        FakeStatefulSetController.install(kubelet)
        kubelet.start()
        groups = [FakeNodeGroup("cpu-nodes", max_size=2)] if node_groups is None else node_groups
        if groups:
            FakeClusterAutoscaler(kubelet, groups, delay_s=AUTOSCALER_DELAY_S)
        backend = KubernetesBackend(connector=FakePortForwardConnector(kubelet))
        monkeypatch.setitem(backends_mod._instances, "kubernetes", backend)
        try:
            yield FakeCluster(api, kubelet, backend)
        finally:
            for conn in conn_mod.connections():
                conn_mod.disconnect(conn.name)
            for live in list(backend._live.values()):
                live.close()
            kubelet.stop()


class Lines(list):
    """Progress lines; ``seen`` is set once one contains ``text`` (on_event runs in the launching thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def append(self, line: str) -> None:
        super().append(line)
        if self.text in line:
            self.seen.set()


def launch_in_thread(cluster: "FakeCluster", compute: Compute, lines: list[str]) -> tuple[threading.Thread, dict]:
    """Launch ``compute`` on the cluster's backend in a thread; the dict gets ``handle`` or ``error``."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["handle"] = cluster.backend.launch(compute, on_event=lines.append)
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: dict, timeout_s: float = 60) -> Any:
    """The launch's handle once its thread ends (its error raised here)."""
    thread.join(timeout_s)
    assert not thread.is_alive(), "the launch did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["handle"]


def run_cell(handle: Any, code: str) -> dict:
    """Run ``code`` in the kernel behind ``handle`` through a session of its own; the result's mime bundle."""
    session = handle.session()
    session.connect()
    try:
        return session.execute(code).data
    finally:
        session.close()
