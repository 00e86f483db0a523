"""Compute.ssh(): a shell beside a real local pod kernel through real ptys (pexpect drives our terminal),
and the server extension's terminal route on a real Jupyter server with terminado; client_port().
On Kubernetes the same through the fake cluster: ``pods/exec`` over the WebSocket channel protocol
(:mod:`k8s_fake.exec`) and the production port-forward."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import psutil
import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("pytest_jupyter", reason="needs pytest-jupyter[server] (the test extra)")

from pytest_jupyter.jupyter_server import *  # noqa: E402,F401,F403  (jp_serverapp, jp_fetch and what they need)
from tornado.httpclient import HTTPClientError  # noqa: E402

from kt_jupyter import backends as backends_mod  # noqa: E402
from kt_jupyter.backends.kubernetes import KubernetesBackend  # noqa: E402
from kt_jupyter.compute import Compute  # noqa: E402
from kt_jupyter.shell import open_server_terminal  # noqa: E402
from k8s_fake.cluster import NS, fake_cluster  # noqa: E402

#: Seconds any one expected answer may take.
ANSWER_TIMEOUT_S = 15


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"kt_jupyter.server": True}}}


@pytest.fixture
def pod_kernel(tmp_path, local_backend):
    """A running local compute with its own working directory and an env var of its own."""
    pod = tmp_path / "pod"
    pod.mkdir()
    compute = Compute(name="sh1", working_dir=str(pod), env_vars={"KT_MARK": "mark-123", "SHELL": "/bin/sh"})
    local_backend.launch(compute)
    return compute, pod


@pytest.fixture
def k8s_pod_kernel(tmp_path, monkeypatch, kt_home):
    """A compute on the fake cluster, reached through the production port-forward; the fake API serves exec (as a real kubelet does).
    Yields the compute and the fake container's working directory."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        backend = KubernetesBackend()  # outside a cluster: the real PortForwardConnector
        monkeypatch.setitem(backends_mod._instances, "kubernetes", backend)
        compute = Compute(name="ksh", backend="kubernetes", env_vars={"KT_MARK": "mark-k8s", "SHELL": "/bin/sh"})
        backend.launch(compute)
        pod = cluster.pods(compute)[0]["metadata"]["name"]
        try:
            yield compute, psutil.Process(cluster.kubelet.pid(NS, pod)).cwd()
        finally:
            for live in list(backend._live.values()):
                live.close()


def _shell_env() -> dict[str, str]:
    return {**os.environ, "SHELL": "/bin/sh", "TERM": "dumb"}


def test_local_shell_is_a_real_tty_in_the_kernels_directory_with_its_environment(pod_kernel):
    compute, pod = pod_kernel
    child = pexpect.spawn(sys.executable, ["-m", "kt_jupyter.shell", "--backend", "local", compute.name],
                          env={**_shell_env(), "KT_MARK": "not-the-kernels"}, timeout=ANSWER_TIMEOUT_S,
                          encoding="utf-8", dimensions=(40, 100))
    try:
        child.expect(r"[$#] $")  # the kernel's $SHELL (sh) prompts: it reads the terminal now
        child.sendline('echo "[$KT_MARK:$(pwd)]"; tty; stty size')
        child.expect_exact(f"[mark-123:{pod}]")  # the kernel's environment and working directory
        child.expect(r"/dev/pts/\d+")  # a real terminal on the far side of our relay
        child.expect_exact("40 100")  # the window size travelled
        child.setwinsize(30, 90)
        child.sendline("stty size")
        child.expect_exact("30 90")  # and follows a resize
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3  # the shell's exit code is ours


def test_shell_of_a_compute_that_is_not_running_says_what_to_do(kt_home):
    child = pexpect.spawn(sys.executable, ["-m", "kt_jupyter.shell", "nope"], env=_shell_env(),
                          timeout=ANSWER_TIMEOUT_S, encoding="utf-8")
    child.expect(pexpect.EOF)
    child.close()
    assert "kt ssh: no running local compute named 'nope'; run a cell on it" in child.before
    assert child.exitstatus == 1 and "Traceback" not in child.before


def test_ssh_without_a_terminal_or_server_names_the_command(pod_kernel, monkeypatch):
    from kt_jupyter import shell
    from kt_jupyter.errors import BackendUnavailable

    compute, _ = pod_kernel
    monkeypatch.setattr(shell, "notebook_server", lambda: None)  # pytest's stdin is no terminal either
    with pytest.raises(BackendUnavailable, match="python -m kt_jupyter.shell --backend local sh1"):
        shell.ssh("local", compute.name)


def test_client_port_reaches_the_local_kernel(pod_kernel, cleanup_connections):
    compute, _ = pod_kernel
    port = compute.client_port()
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def test_kubernetes_shell_is_an_exec_on_a_tty_in_the_pods_directory_and_client_port_reaches_it(
        k8s_pod_kernel, cleanup_connections):
    compute, pod_dir = k8s_pod_kernel
    port = compute.client_port()  # a local port of the port-forward through the API server
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")

    child = pexpect.spawn(sys.executable, ["-m", "kt_jupyter.shell", "--backend", "kubernetes", compute.name],
                          env={**_shell_env(), "KT_MARK": "not-the-pods"}, timeout=ANSWER_TIMEOUT_S,
                          encoding="utf-8", dimensions=(40, 100))
    try:
        child.expect(r"[$#] $")
        child.sendline('echo "[$KT_MARK:$(pwd)]"; tty; stty size')
        child.expect_exact(f"[mark-k8s:{pod_dir}]")  # the container's environment and working directory
        child.expect(r"/dev/pts/\d+")  # tty=true: a terminal in the pod
        child.expect_exact("40 100")  # the window size travelled on the resize channel
        child.setwinsize(30, 90)
        child.sendline("stty size")
        child.expect_exact("30 90")
        child.sendline("seq 1 30000")
        child.expect_exact("\r\n30000\r\n")  # 170 KB as many messages, none lost or reordered
        child.sendline("echo bye; exit 3")
        child.expect_exact("\r\nbye\r\n")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3  # from the error channel's Status (reason ExitCode)


# ---------------------------------------------------------------------- the server's terminal route

async def _terminal_echo(jp_ws_fetch, terminal: str, mark: str) -> str:
    """Type `echo "[$KT_MARK:$(pwd)]"` into a server terminal; what it printed up to ``mark``, then exit."""
    ws = await jp_ws_fetch("terminals", "websocket", terminal)
    ws.write_message(json.dumps(["stdin", 'echo "[$KT_MARK:$(pwd)]"\r']))
    seen = ""
    while mark not in seen:
        message = json.loads(await asyncio.wait_for(ws.read_message(), ANSWER_TIMEOUT_S))
        if message[0] == "stdout":
            seen += message[1]
    ws.write_message(json.dumps(["stdin", "exit\r"]))
    ws.close()
    return seen


def _post_terminal(jp_fetch, loop, backend: str, name: str, headers: dict | None = None):
    try:
        reply = loop.run_until_complete(jp_fetch("kt", "api", "computes", backend, name, "terminal", method="POST",
                                                 body="{}", headers=headers or {}))
    except HTTPClientError as exc:
        return exc.code, json.loads(exc.response.body)
    return reply.code, json.loads(reply.body)


def test_terminal_route_opens_a_shell_on_the_compute(pod_kernel, jp_fetch, jp_ws_fetch, jp_asyncio_loop,
                                                     jp_serverapp, jp_http_port, jp_base_url):
    compute, pod = pod_kernel
    code, body = _post_terminal(jp_fetch, jp_asyncio_loop, "local", compute.name)
    assert code == 201 and body["path"] == f"terminals/{body['name']}" and body["compute"] == "sh1"

    mark = f"[mark-123:{pod}]"
    assert mark in jp_asyncio_loop.run_until_complete(_terminal_echo(jp_ws_fetch, body["name"], mark))

    # what ssh() in a notebook does: find the server, ask it, get the page's URL
    server = {"url": f"http://localhost:{jp_http_port}{jp_base_url}", "token": jp_serverapp.identity_provider.token}
    url = jp_asyncio_loop.run_until_complete(asyncio.to_thread(open_server_terminal, "local", compute.name, server))
    assert url.startswith(server["url"] + "terminals/")
    try:  # its shell was told to exit: the server may have removed the terminal already
        jp_asyncio_loop.run_until_complete(jp_fetch("api", "terminals", body["name"], method="DELETE"))
    except HTTPClientError as exc:
        assert exc.code == 404, exc
    second = jp_asyncio_loop.run_until_complete(jp_fetch("api", "terminals", url.rsplit("/", 1)[1], method="DELETE"))
    assert second.code == 204


def test_terminal_route_opens_a_shell_in_a_kubernetes_pod(k8s_pod_kernel, jp_fetch, jp_ws_fetch, jp_asyncio_loop):
    compute, pod_dir = k8s_pod_kernel
    code, body = _post_terminal(jp_fetch, jp_asyncio_loop, "kubernetes", compute.name)
    assert code == 201 and body["backend"] == "kubernetes"

    mark = f"[mark-k8s:{pod_dir}]"
    assert mark in jp_asyncio_loop.run_until_complete(_terminal_echo(jp_ws_fetch, body["name"], mark))
    try:
        jp_asyncio_loop.run_until_complete(jp_fetch("api", "terminals", body["name"], method="DELETE"))
    except HTTPClientError as exc:
        assert exc.code == 404, exc


def test_terminal_route_refuses_what_it_must(pod_kernel, jp_fetch, jp_asyncio_loop):
    compute, _ = pod_kernel
    assert _post_terminal(jp_fetch, jp_asyncio_loop, "local", "gone")[0] == 404
    code, body = _post_terminal(jp_fetch, jp_asyncio_loop, "local", "..")
    assert code == 400 and "name" in body["message"]
    assert _post_terminal(jp_fetch, jp_asyncio_loop, "nowhere", compute.name)[0] == 404
    code, _ = _post_terminal(jp_fetch, jp_asyncio_loop, "local", compute.name, headers={"Authorization": ""})
    assert code in (401, 403)
    code, body = _post_terminal(jp_fetch, jp_asyncio_loop, "local", compute.name)  # still fine with a token
    assert code == 201
    jp_asyncio_loop.run_until_complete(jp_fetch("api", "terminals", body["name"], method="DELETE"))
