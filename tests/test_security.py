"""Who may do what to a pod kernel: the token, JSON-only mode, loopback, and where the token never goes.

See SECURITY.md for the threat model these tests check.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from figures import bump, record
from websockets.exceptions import InvalidStatus

from kt_jupyter import connection as conn_mod
from kt_jupyter.backends import get_backend
from kt_jupyter.compute import Compute
from kt_jupyter.errors import AuthError, ConnectionLostError, KernelDiedError, RemoteError, TransferError
from pod_kernel import protocol as P
from wire import handshake, upgrade_headers

MiB = 1 << 20


def bad_authorizations(token: str) -> list[dict[str, str]]:
    """Upgrade headers that must all be refused: no token, wrong ones, near misses.

    (Spaces around a header value are not part of it in HTTP, so ``"Bearer <token> "`` is the token.)
    """
    version = {P.HEADER_PROTOCOL: str(P.PROTOCOL_VERSION)}
    near = token[:-1] + ("A" if token[-1] != "A" else "B")
    return [dict(version)] + [
        dict(version, **{P.HEADER_AUTH: value})
        for value in (
            "", "Bearer", "Bearer ", "Bearer wrong", f"bearer {token}", f"Basic {token}", f"Bearer {near}",
            f"Bearer {token[:-1]}", f"Bearer {token}x", f"Bearer  {token}", f"{token}",
            f"Bearer {token.upper()}", "Bearer " + "A" * 4000,
        )
    ]


def test_missing_or_wrong_token_is_refused_and_nothing_executes(kernel, local_backend):
    handle, s = kernel
    marker = Path(os.environ["KT_HOME"]) / "executed"
    refused = 0
    for headers in bad_authorizations(handle.token):
        with pytest.raises(InvalidStatus) as info:
            with handshake(handle.url, headers) as ws:  # pragma: no cover - must not open
                ws.send(P.encode_frame({"type": "execute", "id": "x", "code": f"open({str(marker)!r}, 'w')"}))
        assert info.value.response.status_code == 401
        assert b"missing or wrong token" in info.value.response.body
        refused += 1
    # the client API says so in words, and never echoes either token
    bad = handle.session()
    bad._token = "not-the-token"
    with pytest.raises(AuthError, match="rejected the token") as info:
        bad.execute(f"open({str(marker)!r}, 'w')")
    assert handle.token not in str(info.value) and "not-the-token" not in str(info.value)
    assert not marker.exists()
    log = local_backend.logs("t", tail=None)
    # refusals are logged, but not one line each: the first at once, the rest summed up per minute
    assert 1 <= log.count("missing or wrong token") <= 2, log[-2000:]
    assert handle.token not in log and "not-the-token" not in log
    record("security", "bad_tokens_refused", refused + 1)


def test_right_token_wrong_protocol_is_refused_before_anything_runs(kernel):
    handle, _ = kernel
    for version in ("", "0", str(P.PROTOCOL_VERSION - 1), str(P.PROTOCOL_VERSION + 1), "1.0", "x" * 100):
        with pytest.raises(InvalidStatus) as info:
            with handshake(handle.url, {P.HEADER_AUTH: f"Bearer {handle.token}", P.HEADER_PROTOCOL: version}):
                pass  # pragma: no cover
        assert info.value.response.status_code == 426


class EvilReduce:
    """Unpickling this touches a file: proof that a pod unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_json_only_mode_refuses_pickle_and_unpickles_nothing(local_backend, tmp_path):
    h = local_backend.launch(Compute(name="jsononly", allowed_serialization=["json"]))
    s = h.session()
    assert s.connect()["allowed_serialization"] == ["json"]
    marker = tmp_path / "unpickled"
    evil = P.dump_values({"evil": EvilReduce(str(marker))})
    with pytest.raises(RemoteError, match="does not accept 'pickle'"):
        s.push_bundle(evil)  # small: over the WebSocket
    big = P.dump_values({"evil": EvilReduce(str(marker)), "pad": np.zeros(2 * MiB)})
    with pytest.raises(RemoteError, match="does not accept 'pickle'"):
        s.push_bundle(big)  # >= 1 MiB: over the bulk channel when there is one
    with pytest.raises(RemoteError, match="does not send 'pickle'"):
        s.pull(["anything"])
    with pytest.raises(RemoteError, match="pickle"):
        s.call({"kind": "module", "module": "builtins", "qualname": "len"}, [[1, 2]], serialization="pickle")
    assert not marker.exists()
    # json still works, calls included, and errors arrive as names and text (no pickled exception)
    assert s.push({"j": {"k": [1, 2]}}, serialization="json") == ["j"]
    assert s.pull(["j"], serialization="json") == {"j": {"k": [1, 2]}}
    assert s.call({"kind": "module", "module": "builtins", "qualname": "len"}, [[1, 2]]) == 2
    with pytest.raises(ZeroDivisionError):
        s.execute("1/0")
    with handshake(h.url, upgrade_headers(h.token)) as ws:
        ws.recv(timeout=10)
        ws.send(P.encode_frame({"type": "execute", "id": "e1", "code": "raise KeyError('k')"}))
        while True:
            reply, payload = P.decode_frame(ws.recv(timeout=30))
            if reply["type"] == "execute_reply":
                break
        assert reply["ename"] == "KeyError" and reply["exception"] is False and len(payload) == 0
    assert not marker.exists()
    s.close()
    bump("security", "pickle_payloads_refused", 4)


def test_notebook_of_a_json_only_compute_never_unpickles_what_a_pod_sends(local_backend, tmp_path):
    """The notebook side keeps to JSON-only too: a misbehaving pod's pickles are refused unread.

    The stand-in for a misbehaving JSON-only pod is a real pod kernel that allows
    pickle, reached by a session for a JSON-only compute. Unpickling any of its
    payloads would create ``marker.<pid of the process that unpickled it>``.
    """
    h = local_backend.launch(Compute(name="misbehaving"))
    marker = tmp_path / "marker"
    mine = Path(f"{marker}.{os.getpid()}")
    s = h.session(accept_pickle=False)
    s.execute(
        "import os\n"
        f"ACTION = 'import os; open(\"{marker}.\" + str(os.getpid()), \"w\")'\n"
        "class Evil:\n    def __reduce__(self):\n        return (exec, (ACTION,))\n"
        "class EvilError(Exception):\n    def __reduce__(self):\n        return (exec, (ACTION,))\n"
        "evil = Evil()\n"
        "big = {'evil': Evil(), 'pad': bytes(2 << 20)}\n"
    )
    with pytest.raises(TransferError, match="refused without being unpickled"):
        s.pull(["evil"])  # small: over the WebSocket
    with pytest.raises(TransferError, match="refused without being unpickled"):
        s.pull(["big"])  # over 1 MiB: over the bulk channel
    s.execute("def make_evil():\n    return Evil()\n")
    with pytest.raises(TransferError, match="refused without being unpickled"):
        s.call({"kind": "name", "name": "make_evil"}, serialization="pickle")
    with pytest.raises(RemoteError) as info:  # the pod sends the exception pickled; it is rebuilt by name
        s.execute("raise EvilError('boom')")
    assert info.value.ename.endswith("EvilError") and "boom" in str(info.value)
    assert not mine.exists()
    assert s.pull(["ACTION"], serialization="json")["ACTION"].startswith("import os")  # JSON still flows
    s.close()

    # the same pod through a session that accepts pickle: the payload really is a live one
    trusting = h.session()
    trusting.pull(["evil"])
    assert mine.exists()
    trusting.close()
    # %%kt and the seed API reach a compute through a ComputeConnection: JSON-only there means no pickle in
    json_only = conn_mod.ComputeConnection(Compute(name="misbehaving", allowed_serialization=["json"]), h)
    assert json_only.session.accept_pickle is False
    assert conn_mod.ComputeConnection(Compute(name="misbehaving"), h).session.accept_pickle is True
    bump("security", "pickle_payloads_refused", 4)


def test_pod_kernel_listens_on_loopback_only(kernel):
    handle, s = kernel
    s.execute("x = 1")
    listening = [c.laddr for c in psutil.Process(handle.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening, "no listening socket found"
    assert all(addr.ip == "127.0.0.1" for addr in listening), listening
    record("security", "listening_sockets_all_loopback", len(listening))


def test_token_and_registry_files_are_private(kernel, local_backend):
    assert oct(local_backend.root.stat().st_mode & 0o777) == "0o700"
    token_file = local_backend.root / "t" / "token"
    assert oct(token_file.stat().st_mode & 0o077) == "0o0"


def test_pod_kernel_refuses_a_token_file_others_can_read(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-value")
    token_file.chmod(0o644)
    out = subprocess.run([sys.executable, "-m", "pod_kernel", "--token-file", str(token_file)],
                         capture_output=True, text=True, timeout=60, env=_env_without_token())
    assert out.returncode != 0 and "readable by others" in out.stderr
    assert "s3cret-token-value" not in out.stderr + out.stdout


def _env_without_token() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KT_TOKEN", None)
    env.pop("KT_TOKEN_FILE", None)
    return env


def test_token_never_in_argv_environ_logs_errors_or_reprs(ip_shell, kt_home, capsys, caplog):
    """Grep everything a token could leak into, after good, bad, failed and dead connections."""
    caplog.set_level(logging.DEBUG)  # websockets logs handshake headers at DEBUG: ours must be redacted
    ip = ip_shell
    ip.run_cell("%%kt --name secret\nimport subprocess, os\nchild = subprocess.Popen(['sleep', '60'])\n"
                "child_pid = child.pid\nenv_seen = dict(os.environ)")
    conn = [c for c in conn_mod.connections() if c.name == "secret"][0]
    handle = conn.handle
    token = handle.token
    places: dict[str, str] = {}
    pod = psutil.Process(handle.pid)
    places["pod argv"] = " ".join(pod.cmdline())
    places["pod environ"] = json.dumps(pod.environ())
    child = psutil.Process(ip.user_ns["child_pid"])
    places["child argv"] = " ".join(child.cmdline())
    places["child environ"] = json.dumps(child.environ())
    places["cell's os.environ"] = json.dumps(ip.user_ns["env_seen"])
    places["notebook argv"] = " ".join(psutil.Process().cmdline())
    places["reprs"] = " ".join(repr(x) for x in (handle, conn, conn.session, conn.compute))
    # a wrong token and a dead kernel: the errors
    bad = handle.session()
    bad._token = token[::-1]
    with pytest.raises(AuthError) as auth:
        bad.connect()
    places["auth error"] = str(auth.value) + repr(auth.value)
    ip.run_cell("%kt status secret")
    ip.run_cell("%kt list")
    ip.run_cell("%kt logs secret --tail 0")
    psutil.Process(ip.user_ns["child_pid"]).kill()
    os.kill(handle.pid, 9)
    with pytest.raises(KernelDiedError) as died:
        conn.session.execute("1")
    places["death error"] = str(died.value)
    lost = handle.session(reconnect_timeout_s=0.5)
    with pytest.raises((ConnectionLostError, KernelDiedError)) as gone:
        lost.connect()
    places["lost error"] = str(gone.value)
    out = capsys.readouterr()
    places["notebook stdout"] = out.out
    places["notebook stderr"] = out.err
    places["client logs (DEBUG)"] = "\n".join(r.getMessage() for r in caplog.records)
    assert "Bearer <redacted>" in places["client logs (DEBUG)"]  # the handshake was logged, without it
    backend = get_backend("local")
    home_files = [p for p in Path(kt_home).rglob("*") if p.is_file() and p.name != "token"]
    places["KT_HOME files"] = "\n".join(p.read_text(errors="replace") for p in home_files)
    places["kernel log"] = (backend.root / "secret" / "kernel.log").read_text(errors="replace") \
        if (backend.root / "secret" / "kernel.log").exists() else ""
    leaks = [where for where, text in places.items() if token in text or token[::-1] in text]
    assert not leaks, f"the token appears in: {leaks}"
    record("security", "places_grepped_for_the_token", len(places))


@pytest.fixture
def ip_shell(kt_home):
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "kt_jupyter")
    shell.run_line_magic("kt", "config --reset")
    saved = dict(shell.user_ns)
    yield shell
    for conn in conn_mod.connections():
        conn_mod.disconnect(conn.name)
    backend = get_backend("local")
    for info in backend.list():
        backend.delete(info.name, grace_period_s=1)
    shell.user_ns.clear()
    shell.user_ns.update(saved)


def test_pod_kernel_at_debug_log_level_logs_no_token(tmp_path):
    """Run a pod kernel by hand with --log-level DEBUG; connect right and wrong; grep its log."""
    token = "tok-" + os.urandom(24).hex()
    token_file = tmp_path / "token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, token.encode())
    os.close(fd)
    read_fd, write_fd = os.pipe()
    log_path = tmp_path / "kernel.log"
    env = dict(_env_without_token(), KT_READY_FD=str(write_fd))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pod_kernel", "--token-file", str(token_file),
                                 "--log-level", "DEBUG", "--cells-dir", str(tmp_path / "cells")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        readable, _, _ = select.select([read_fd], [], [], 60)
        assert readable, "pod kernel not ready within 60 s"
        port = json.loads(os.read(read_fd, 4096).split(b"\n")[0])["port"]
        url = f"ws://127.0.0.1:{port}"
        with handshake(url, upgrade_headers(token)) as ws:
            ws.recv(timeout=10)
            ws.send(P.encode_frame({"type": "ping", "id": "1"}))
            ws.recv(timeout=10)
        with pytest.raises(InvalidStatus):
            with handshake(url, upgrade_headers(f"{token}-wrong")):
                pass  # pragma: no cover
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.close(read_fd)
    log = log_path.read_text(errors="replace")
    assert "DEBUG" in log and "missing or wrong token" in log
    assert token not in log


def test_idle_unauthenticated_bulk_connections_do_not_stop_real_transfers(local_backend):
    h = local_backend.launch(Compute(name="bulkdos", memory="512Mi"))
    s = h.session()
    port = s.connect().get("bulk_port")
    if not port:
        pytest.skip("no bulk channel")
    idle = []
    try:
        for _ in range(100):  # anyone on the machine can open these: the bulk port has no token
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        result: dict = {}

        def push():
            try:
                result["names"] = s.push({"x": np.arange(MiB // 2)})
            except BaseException as exc:  # noqa: BLE001
                result["error"] = exc

        t = threading.Thread(target=push, daemon=True)
        t.start()
        t.join(5)
        assert result.get("names") == ["x"], result
    finally:
        for sock in idle:
            sock.close()


# --------------------------------------------------------------------------- the handshake, attacked (issue 15)

class Impostor:
    """A fake pod kernel (a test double): it took a port and accepts any token, as an attacker's process would.

    It answers the upgrade like a real pod kernel, then sends a welcome (without
    a valid proof: it does not know the token) and a pull reply whose pickle
    touches a file when loaded.
    """

    def __init__(self, marker: Path, proof: str | None) -> None:
        import asyncio

        from websockets.asyncio.server import serve

        self.marker, self.proof = marker, proof
        ready = threading.Event()

        async def handle(ws):
            welcome = {"type": "welcome", "protocol": P.PROTOCOL_VERSION, "pid": 1, "compute": "t",
                       "session": "s", "last_seq": 0, "running": None, "allowed_serialization": ["pickle"],
                       "started": 0.0, "bulk_port": None}
            if self.proof is not None:
                welcome["proof"] = self.proof
            await ws.send(P.encode_frame(welcome))
            async for message in ws:
                header, _ = P.decode_frame(message)
                bundle = P.dump_values({"x": EvilReduce(str(self.marker))})
                for frame in P.bundle_frames({"type": "values", "id": header["id"]}, bundle):
                    await ws.send(frame)

        async def main():
            async with serve(handle, "127.0.0.1", 0, compression=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                self.stop = asyncio.get_running_loop().create_future()
                self.loop = asyncio.get_running_loop()
                ready.set()
                await self.stop

        self.thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(10)


@pytest.mark.parametrize("proof", [None, "0" * 64, "not hex"])
def test_a_peer_that_cannot_prove_the_token_is_refused_and_nothing_it_sends_is_unpickled(tmp_path, proof):
    from kt_jupyter.client import Session

    marker = tmp_path / "unpickled"
    impostor = Impostor(marker, proof)
    try:
        session = Session(f"ws://127.0.0.1:{impostor.port}", "our-secret-token", name="t")
        with pytest.raises(AuthError, match="did not prove that it holds compute 't'") as info:
            session.pull(["x"])
        assert "our-secret-token" not in str(info.value)
        session.close()
    finally:
        impostor.close()
    assert not marker.exists()
    bump("security", "impostor_pods_refused", 1)


def test_a_proof_from_another_connection_is_worth_nothing(kernel, tmp_path):
    """Replaying a real pod's proof (seen on one connection) does not authenticate another."""
    handle, _ = kernel
    with handshake(handle.url, upgrade_headers(handle.token)) as ws:
        seen = P.decode_frame(ws.recv(timeout=10))[0]["proof"]
    from kt_jupyter.client import Session

    marker = tmp_path / "unpickled"
    impostor = Impostor(marker, seen)
    try:
        session = Session(f"ws://127.0.0.1:{impostor.port}", handle.token, name="t")
        with pytest.raises(AuthError, match="did not prove"):
            session.pull(["x"])
        session.close()
    finally:
        impostor.close()
    assert not marker.exists()


def test_duplicate_or_malformed_handshake_headers_are_4xx_not_500(kernel, local_backend):
    handle, s = kernel
    good = upgrade_headers(handle.token)
    auth = (P.HEADER_AUTH, f"Bearer {handle.token}")
    cases = {
        401: [  # two Authorization headers (both right, or one wrong): never a 500 with a traceback
            [auth, auth] + [(k, v) for k, v in good.items() if k != P.HEADER_AUTH],
            [auth, (P.HEADER_AUTH, "Bearer wrong")] + [(k, v) for k, v in good.items() if k != P.HEADER_AUTH],
        ],
        400: [
            list(good.items()) + [(P.HEADER_SESSION, "a"), (P.HEADER_SESSION, "b")],
            list(good.items()) + [(P.HEADER_NONCE, "ab" * 32)],
            list(dict(good, **{P.HEADER_NONCE: "zz" * 32}).items()),
            [(k, v) for k, v in good.items() if k != P.HEADER_NONCE],
            list(dict(good, **{P.HEADER_SESSION: "../" * 10}).items()),
            list(dict(good, **{P.HEADER_SESSION: "s" * 65}).items()),
            list(dict(good, **{P.HEADER_LAST_SEQ: "-1"}).items()),
            list(dict(good, **{P.HEADER_LAST_SEQ: "9" * 40}).items()),
        ],
    }
    for status, header_lists in cases.items():
        for headers in header_lists:
            with pytest.raises(InvalidStatus) as info:
                with handshake(handle.url, headers):
                    pass  # pragma: no cover - must not open
            assert info.value.response.status_code == status, (headers, info.value.response.body)
    assert s.execute("1 + 1").data == {"text/plain": "2"}  # still serving
    log = local_backend.logs("t", tail=None)
    assert "Traceback" not in log and "process_request failed" not in log
    bump("security", "malformed_handshakes_refused", sum(map(len, cases.values())))


def _raw_upgrade(port: int, headers: str, path: str = "/") -> bytes:
    """Send one HTTP upgrade request over a plain socket; the status line and body that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     f"{headers}\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


def test_health_endpoint_answers_probes_without_a_token_or_a_log_line(kernel, local_backend):
    handle, _ = kernel
    port = int(handle.url.rsplit(":", 1)[1])
    log_path = local_backend.log_path("t")
    before = log_path.stat().st_size
    for _ in range(50):  # a probe every 2 s for 100 s
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET {P.HEALTH_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n"), reply
    for _ in range(20):  # a TCP probe: connect, close
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    s = handle.session()
    s.execute("pass")  # the kernel log is written up to here
    s.close()
    assert log_path.stat().st_size == before, log_path.read_text()[before:]


def test_a_handshake_flood_cannot_fill_the_log(kernel, local_backend):
    """Thousands of refused handshakes (no token) add a few lines to the kernel log, not one or three each."""
    handle, s = kernel
    port = int(handle.url.rsplit(":", 1)[1])
    log_path = local_backend.log_path("t")
    before = log_path.stat().st_size
    flood = 1500
    t0 = time.perf_counter()
    for i in range(flood):
        reply = _raw_upgrade(port, f"{P.HEADER_PROTOCOL}: {P.PROTOCOL_VERSION}\r\nAuthorization: Bearer x{i}\r\n")
        assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
    elapsed_s = time.perf_counter() - t0
    s.execute("pass")
    grown = log_path.stat().st_size - before
    record("security", "log_bytes_for_1500_refused_handshakes", grown)
    record("security", "refused_handshakes_per_s", round(flood / elapsed_s))
    # the first refusal of the minute is logged at once, the rest in one summary line per minute:
    # a few hundred bytes, whatever the rate (before: three lines, ~250 bytes, per refused handshake)
    assert grown < 1024, log_path.read_text()[before:]


def test_rejection_log_sums_up_each_window():
    from pod_kernel.rejections import PEERS_TRACKED, RejectionLog

    now = [0.0]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pod_kernel.server")
    logger.addHandler(handler)
    try:
        rl = RejectionLog(window_s=60, clock=lambda: now[0])
        for i in range(1000):
            rl.refused("missing or wrong token", (f"10.0.0.{i % 40}", 5555))
        rl.refused("bad headers", ("127.0.0.1", 1))
        assert len(lines) == 2 and "10.0.0.0" in lines[0] and "bad headers" in lines[1]
        now[0] = 61.0
        rl.flush()
        assert len(lines) == 3
        assert "refused 999 more connection(s) in the last 61 s: missing or wrong token" in lines[2]
        assert "others" in lines[2] or len({f"10.0.0.{i}" for i in range(40)}) <= PEERS_TRACKED
        rl.flush()  # nothing new: nothing logged
        assert len(lines) == 3
        assert rl.totals["missing or wrong token"] == 1000
    finally:
        logger.removeHandler(handler)


def test_a_json_only_pod_cannot_make_the_notebook_import_a_module(tmp_path, monkeypatch):
    """Rebuilding a remote exception by name imports its module: not for a pod that may not send pickles."""
    from kt_jupyter.client import rebuild_exception

    (tmp_path / "planted_mod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Boom(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reply = {"ename": "planted_mod.Boom", "evalue": "x", "traceback": ["planted_mod.Boom: x"]}
    exc = rebuild_exception(reply, b"", accept_pickle=False)
    assert isinstance(exc, RemoteError) and "planted_mod.Boom" in str(exc)
    assert not (tmp_path / "imported").exists()
    assert isinstance(rebuild_exception({"ename": "KeyError", "evalue": "k"}, b"", accept_pickle=False), KeyError)
    # a compute that may send pickles may also name an importable type (the same trust)
    assert type(rebuild_exception(reply, b"", accept_pickle=True)).__name__ == "Boom"
