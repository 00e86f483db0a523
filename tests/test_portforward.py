"""Our own port-forward stream (``v4.channel.k8s.io``) against the fake API server's relay.

The pod's port is a real TCP server on 127.0.0.1 that the fake API server
relays to (its ``port_resolver``), as a kubelet relays to the pod's network
namespace; no pod kernel is needed to test the stream itself. The backend's
use of it (both channels of a real pod kernel) is tested in
test_kubernetes_backend.py.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from k8s_fake import FakeKubeApiServer
from k8s_fake.store import ADMIN_TOKEN

from kt_jupyter.backends import portforward_ws
from kt_jupyter.backends.portforward import PodTarget, PortForwardConnector
from kt_jupyter.backends.portforward_ws import (
    PORTFORWARD_PROTOCOL,
    PortForwardError,
    open_stream,
    stream_options,
    unsupported_reason,
)

NS, POD, PORT = "team", "alice-train-0", 32300
DEADLINE_S = 20.0


class EchoPod:
    """The pod's port: a TCP server echoing what each connection sends (or streaming zeros, ``stream=True``)."""

    def __init__(self, stream: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stream = stream
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connected.set()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.stream:
                    while True:
                        conn.sendall(bytes(1 << 16))
                while data := conn.recv(1 << 20):
                    conn.sendall(data)
            except OSError:
                pass


@pytest.fixture
def api() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        server.store.create("pods", NS, {"metadata": {"name": POD}, "spec": {"containers": [{"name": "kernel"}]}})
        yield server


def _attach(api: FakeKubeApiServer, pod: EchoPod) -> None:
    api.store.port_resolver = lambda ns, name, port: pod.port if (ns, name, port) == (NS, POD, PORT) else None


def _configuration(api: FakeKubeApiServer, token: str = ADMIN_TOKEN) -> Any:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = api.url
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return cfg


def _connector(cfg: Any) -> PortForwardConnector:
    from kubernetes import client

    return PortForwardConnector(lambda: client.ApiClient(cfg))


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        assert k, f"the forward ended after {got} of {n} bytes"
        got += k
    return buf


def _local(forward_url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(forward_url.rsplit(":", 1)[1])), timeout=DEADLINE_S)


def test_bytes_go_both_ways_at_once_through_the_v4_channel_stream(api):
    _attach(api, EchoPod())
    forward = _connector(_configuration(api)).open(PodTarget(NS, POD, "alice-train", PORT))
    blob = bytes(range(256)) * (48 << 10)  # 12 MiB: more than the frames, queues and socket buffers hold
    sock = _local(forward.url)
    sender = threading.Thread(target=sock.sendall, args=(blob,))  # both directions move at the same time
    sender.start()
    back = _recv_exactly(sock, len(blob))
    sender.join()
    assert back == blob
    sock.close()
    forward.close()
    request = next(r for r in api.store.requests if r["path"].endswith("/portforward"))
    assert request["path"] == f"/api/v1/namespaces/{NS}/pods/{POD}/portforward"
    assert request["query"] == {"ports": str(PORT)} and request["user"] == "admin"
    assert forward.last_error == ""


def test_a_pod_gone_mid_transfer_is_a_clean_disconnect_saying_why(api, caplog):
    pod = EchoPod(stream=True)
    _attach(api, pod)
    forward = _connector(_configuration(api)).open(PodTarget(NS, POD, "alice-train", PORT))
    sock = _local(forward.url)
    _recv_exactly(sock, 1 << 20)  # the transfer is under way
    with caplog.at_level(logging.WARNING, logger="kt_jupyter.portforward"):
        assert api.break_portforwards() == 1
        while sock.recv(1 << 20):  # what was in flight, then the end: no hang, no reset
            pass
    sock.close()
    forward.close()
    assert "failed to find sandbox" in forward.last_error
    assert any("failed to find sandbox" in r.getMessage() for r in caplog.records)


def test_a_forbidden_port_forward_names_the_rbac_permission(api, caplog):
    _attach(api, EchoPod())
    api.store.denied.add(("create", "pods/portforward"))
    cfg = _configuration(api)
    with pytest.raises(PortForwardError) as err:
        open_stream(cfg, NS, POD, PORT)
    assert "403" in str(err.value) and "`create pods/portforward`" in str(err.value) and repr(NS) in str(err.value)
    forward = _connector(cfg).open(PodTarget(NS, POD, "alice-train", PORT))
    with caplog.at_level(logging.WARNING, logger="kt_jupyter.portforward"):
        for _ in range(2):  # a client retrying
            sock = _local(forward.url)
            assert sock.recv(1) == b""  # the local client sees the connection close, and the reason is logged
            sock.close()
        forward.close()
    assert "`create pods/portforward`" in forward.last_error
    assert sum("`create pods/portforward`" in r.getMessage() for r in caplog.records) == 1  # once, not per retry


def test_a_session_through_a_refused_port_forward_says_why(api, monkeypatch):
    """The notebook's error names the refusal, not only 'cannot reach pod kernel ... at ws://127.0.0.1:N'."""
    from kt_jupyter.client import Session, transport
    from kt_jupyter.errors import ConnectionLostError

    _attach(api, EchoPod())
    api.store.denied.add(("create", "pods/portforward"))
    forward = _connector(_configuration(api)).open(PodTarget(NS, POD, "alice-train", PORT))
    monkeypatch.setattr(transport, "OPEN_TIMEOUT_S", 1.0)
    session = Session(forward.url, "token", name="train", path_error=lambda: forward.last_error)
    try:
        with pytest.raises(ConnectionLostError, match="cannot reach pod kernel 'train'.*`create pods/portforward`"):
            session.connect()
    finally:
        session.close()
        forward.close()


def test_each_stream_sends_the_token_the_refresh_hook_gives(api):
    pod = EchoPod()
    _attach(api, pod)
    cfg = _configuration(api, token="expired")
    with pytest.raises(PortForwardError, match="401"):
        open_stream(cfg, NS, POD, PORT)
    calls = []

    def refresh(config: Any) -> None:  # what an exec plugin's hook does: a fresh token before each request
        calls.append(1)
        config.api_key["authorization"] = ADMIN_TOKEN

    cfg.refresh_api_key_hook = refresh
    with open_stream(cfg, NS, POD, PORT) as ws:
        assert ws.subprotocol == PORTFORWARD_PROTOCOL
        assert pod.connected.wait(DEADLINE_S)
    assert calls


def test_stream_options_follow_the_official_configuration(tmp_path):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = "https://api.example.test:6443/prefix"
    cfg.verify_ssl = False
    cfg.tls_server_name = "kubernetes.default"
    opts = stream_options(cfg, "team a", POD, PORT)
    assert opts.url == f"wss://api.example.test:6443/prefix/api/v1/namespaces/team%20a/pods/{POD}/portforward" \
        f"?ports={PORT}"
    assert opts.ssl is not None and opts.ssl.verify_mode.name == "CERT_NONE"
    assert opts.server_hostname == "kubernetes.default"
    assert opts.headers == {}  # no token configured: none sent
    with pytest.raises(ValueError):
        stream_options(cfg, NS, POD, 0)
    assert unsupported_reason(cfg) is None
    cfg.proxy, cfg.no_proxy = "http://proxy.corp:3128", "localhost,.example.test"
    if portforward_ws._PROXY_SUPPORTED:  # websockets 15 and later
        assert stream_options(cfg, NS, POD, PORT).extra["proxy"] is True  # bypassed: the environment's, as before
        cfg.no_proxy = "10.0.0.0/8"
        assert stream_options(cfg, NS, POD, PORT).extra["proxy"] == "http://proxy.corp:3128"
    else:
        assert "15.0 or later" in (unsupported_reason(cfg) or "")
    cfg.proxy_headers = {"proxy-authorization": "Basic eDp5"}
    assert "proxy headers" in (unsupported_reason(cfg) or "")


def test_a_setting_our_stream_cannot_honour_falls_back_to_the_official_client(api, caplog):
    _attach(api, EchoPod())
    cfg = _configuration(api)
    cfg.proxy_headers = {"proxy-authorization": "Basic eDp5"}  # no proxy-url: the official client goes direct
    forward = _connector(cfg).open(PodTarget(NS, POD, "alice-train", PORT))
    with caplog.at_level(logging.WARNING, logger="kt_jupyter.portforward"):
        sock = _local(forward.url)
        sock.sendall(b"ping" * 1024)
        assert _recv_exactly(sock, 4096) == b"ping" * 1024
        sock.close()
        forward.close()
    said = [r.getMessage() for r in caplog.records if "official Kubernetes client" in r.getMessage()]
    assert len(said) == 1 and "proxy headers" in said[0]


def _tls_files(tmp_path: Any, name: str) -> tuple[str, str, str]:
    """A CA and a server certificate for ``name`` signed by it (openssl), as a cluster's API server has."""
    import subprocess

    ca, ca_key, crt, key, csr = (str(tmp_path / f) for f in ("ca.pem", "ca.key", "srv.pem", "srv.key", "srv.csr"))
    ext = tmp_path / "ext.cnf"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    for argv in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
                  "-subj", "/CN=fake-cluster-ca"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
                  "-days", "1", "-extfile", str(ext)]):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return ca, crt, key


def test_tls_with_the_kubeconfig_ca_and_tls_server_name(tmp_path):
    import ssl

    ca, crt, key = _tls_files(tmp_path, "kubernetes.default")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    server = FakeKubeApiServer()
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    with server as api:
        api.store.create("pods", NS, {"metadata": {"name": POD}, "spec": {"containers": [{"name": "kernel"}]}})
        pod = EchoPod()
        _attach(api, pod)
        cfg = _configuration(api)
        cfg.host = api.url.replace("http://", "https://")
        cfg.ssl_ca_cert = ca
        with pytest.raises(PortForwardError, match="certificate"):  # the certificate names another host
            open_stream(cfg, NS, POD, PORT)
        cfg.tls_server_name = "kubernetes.default"  # the kubeconfig's tls-server-name
        forward = _connector(cfg).open(PodTarget(NS, POD, "alice-train", PORT))
        sock = _local(forward.url)
        sock.sendall(b"hello")
        assert _recv_exactly(sock, 5) == b"hello"
        sock.close()
        forward.close()
        assert forward.last_error == ""
