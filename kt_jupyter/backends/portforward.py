"""How the notebook reaches a pod kernel in a cluster: a connector per situation.

Outside the cluster, :class:`PortForwardConnector` does what ``kubectl
port-forward`` does: a listener on ``127.0.0.1`` (a free port) in a
background thread, and for each accepted connection a port-forward stream
through the API server to the pod's port, bytes pumped both ways: our own
``v4.channel.k8s.io`` client (:mod:`~kt_jupyter.backends.portforward_ws`),
or the official ``kubernetes.stream.portforward`` where a kubeconfig setting
needs it (it is slow for big values). Inside the cluster (a notebook in JupyterHub on
Kubernetes), :class:`ServiceDNSConnector` uses the Service's DNS name and
nothing runs locally.

A connector is anything with ``open(target) -> Forward``; the backend takes
one as a parameter, so tests can hand it another (they do, and name it a fake).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .portforward_ws import PortForwardError, open_stream, pump, unsupported_reason

log = logging.getLogger("kt_jupyter.portforward")

#: Bytes read from either side per pump step.
PUMP_CHUNK_BYTES = 1 << 20
#: Connections waiting to be accepted by the local listener.
LISTEN_BACKLOG = 16
#: ``KT_K8S_CONNECT``: force ``port-forward`` or ``service`` instead of guessing from the environment.
CONNECT_ENV = "KT_K8S_CONNECT"


@dataclass(frozen=True)
class PodTarget:
    """The pod kernel to reach: its pod, its Service, the port it listens on."""

    namespace: str
    pod: str
    service: str
    port: int


@dataclass
class Forward:
    """A reachable address for a pod kernel (``ws://host:port``) and how to stop reaching it."""

    url: str
    description: str
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    #: Why the last forwarded connection failed or ended (a port-forward's refusal or error channel), or "".
    last_error: str = ""


class Connector(Protocol):
    """Turns a :class:`PodTarget` into a :class:`Forward`."""

    def open(self, target: PodTarget) -> Forward:
        """Start reaching ``target``; the Forward's ``close`` stops it."""


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (the kubelet sets ``KUBERNETES_SERVICE_HOST``)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class ServiceDNSConnector:
    """Inside the cluster: ``ws://{service}.{namespace}.svc.cluster.local:{port}``."""

    #: A Service reaches the pod's network interface, never its loopback (where debugpy listens).
    reaches_pod_loopback = False

    def __init__(self, cluster_domain: str = "cluster.local") -> None:
        self.cluster_domain = cluster_domain

    def open(self, target: PodTarget) -> Forward:
        """The Service's DNS name; nothing to start or stop."""
        host = f"{target.service}.{target.namespace}.svc.{self.cluster_domain}"
        return Forward(f"ws://{host}:{target.port}", f"Service {host}:{target.port}")


class PortForwardConnector:
    """Outside the cluster: a local 127.0.0.1 listener forwarding through the API server to the pod.

    ``api_client_factory`` returns a ``kubernetes.client.ApiClient``; each
    connection's stream takes its URL, TLS and (fresh) bearer token from that
    client's configuration. Where our stream cannot honour a setting
    (:func:`~kt_jupyter.backends.portforward_ws.unsupported_reason`) the
    official ``kubernetes.stream.portforward`` is used: it swaps ``call_api``
    on the client it is given while it opens the stream, so it gets its own
    client (never the one the watches use) and opens one at a time.
    """

    #: A port-forward connects inside the pod's network namespace: its loopback ports are reachable.
    reaches_pod_loopback = True

    def __init__(self, api_client_factory: Callable[[], Any]) -> None:
        self._factory = api_client_factory
        self._client: Any = None
        self._core: Any = None
        self._open_lock = threading.Lock()
        self._fallback_said = False

    def _configuration(self) -> Any:
        with self._open_lock:
            if self._client is None:
                self._client = self._factory()
            return self._client.configuration

    def _forward_official(self, conn: socket.socket, target: PodTarget, stopped: threading.Event) -> str:
        """Pump ``conn`` through ``kubernetes.stream.portforward``; the error channel's text, if any."""
        from kubernetes import client
        from kubernetes.stream import portforward

        with self._open_lock:
            if self._core is None:
                self._core = client.CoreV1Api(self._client)
            pf = portforward(self._core.connect_get_namespaced_pod_portforward, target.pod, target.namespace,
                             ports=str(target.port))
        remote = pf.socket(target.port)
        try:
            _pump(conn, remote, stopped)
        finally:
            with contextlib.suppress(OSError):
                remote.close()
            with contextlib.suppress(Exception):  # closing a dead stream must not raise
                pf.close()
        return pf.error(target.port) or ""

    def _forward(self, conn: socket.socket, target: PodTarget, stopped: threading.Event) -> str:
        """Pump ``conn`` to the pod until either ends; why it ended, when the API server said."""
        cfg = self._configuration()
        reason = unsupported_reason(cfg)
        if reason is None:
            with open_stream(cfg, target.namespace, target.pod, target.port) as ws:
                return pump(conn, ws, target.port, stopped)
        if not self._fallback_said:
            self._fallback_said = True
            log.warning("port-forward through the official Kubernetes client (slow for big values): %s", reason)
        return self._forward_official(conn, target, stopped)

    def open(self, target: PodTarget) -> Forward:
        """Listen on 127.0.0.1:<free port>; every connection there becomes a stream to the pod."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(LISTEN_BACKLOG)
        port = listener.getsockname()[1]
        stopped = threading.Event()
        active: set[socket.socket] = set()
        lock = threading.Lock()

        def serve(conn: socket.socket) -> None:
            with lock:
                active.add(conn)
            try:
                error = self._forward(conn, target, stopped)
            except Exception as exc:  # the client sees a closed connection and asks the backend why
                error = str(exc) if isinstance(exc, PortForwardError) else f"{type(exc).__name__}: {exc}"
            finally:
                with lock:
                    active.discard(conn)
            if error:  # said before the local client sees the end, so whoever asks why finds it
                if error != forward.last_error:  # once, not once per retry of the client
                    log.warning("port-forward to pod %s/%s: %s", target.namespace, target.pod, error)
                forward.last_error = error
            with contextlib.suppress(OSError):
                conn.close()

        def accept() -> None:
            while not stopped.is_set():
                try:
                    conn, _addr = listener.accept()
                except OSError:
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=serve, args=(conn,), name=f"kt-pf-{target.pod}", daemon=True).start()

        def close() -> None:
            stopped.set()
            with contextlib.suppress(OSError):
                listener.close()
            with lock:
                for conn in list(active):
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)

        forward = Forward(f"ws://127.0.0.1:{port}",
                          f"port-forward 127.0.0.1:{port} -> pod {target.pod}:{target.port}", close)
        threading.Thread(target=accept, name=f"kt-pf-accept-{target.pod}", daemon=True).start()
        return forward


def _pump(a: socket.socket, b: Any, stopped: threading.Event) -> None:
    """Copy bytes both ways between two sockets until either side closes (the official client's socket pair)."""
    peers = {a: b, b: a}
    while not stopped.is_set():
        readable, _, _ = select.select([a, b], [], [], 1.0)
        for src in readable:
            try:
                data = src.recv(PUMP_CHUNK_BYTES)
            except OSError:
                return
            if not data:
                return
            try:
                peers[src].sendall(data)
            except OSError:
                return


def default_connector(api_client_factory: Callable[[], Any]) -> Connector:
    """Service DNS inside a cluster, a port-forward outside; ``KT_K8S_CONNECT`` overrides the guess."""
    choice = os.environ.get(CONNECT_ENV, "").strip().lower()
    if choice == "service" or (not choice and in_cluster()):
        return ServiceDNSConnector()
    return PortForwardConnector(api_client_factory)
