"""Attacks on the Jupyter server extension and the local registry, each of which must fail.

Issue 15, items 1, 2 (the registry), 7 (the server extension) and 8: hostile
compute names on every route and method, registry entries planted by another
local user, hostile request bodies, and secrets in registry files. The
server is a real jupyter_server with our extension (pytest-jupyter), requests
go over real sockets, pod kernels are real processes, and another user's
files are really owned by another uid (``nobody``) when the tests run as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("pytest_jupyter", reason="needs pytest-jupyter[server] (the test extra)")

from IPython.core.error import UsageError  # noqa: E402
from pytest_jupyter.jupyter_server import *  # noqa: E402,F401,F403  (jp_serverapp and what it needs)
from tornado.httpclient import HTTPClientError  # noqa: E402

import kt_jupyter as kt  # noqa: E402
from kt_jupyter.compute import Compute  # noqa: E402
from kt_jupyter.errors import BackendUnavailable, ComputeSpecError, NotFoundError  # noqa: E402

#: The uid that owns the "other user's" planted files (``nobody`` on Debian).
OTHER_UID = 65534
#: What a refusal of an untrusted registry entry says (one of these).
UNTRUSTED = "not yours|open to other users|symbolic link|outside the registry"
#: Largest error message the server extension may send back, in characters.
MAX_MESSAGE_CHARS = 1000
MiB = 1 << 20

#: Compute names an attacker sends in a URL, already percent-encoded as they travel.
HOSTILE_NAMES = {
    "encoded slash up": "..%2Fsentinel",
    "encoded slash down": "a%2Fb",
    "dot dot": "..",
    "encoded dot dot": "%2E%2E",
    "dot": ".",
    "dot slash (lock file one level up)": ".%2Fx",
    "NUL": "x%00y",
    "300 characters": "a" * 300,
    "unicode": "caf%C3%A9",
    "leading dash": "-x",
    "trailing newline": "x%0A",
}
ROUTES = [("GET", ""), ("DELETE", ""), ("GET", "/logs"), ("GET", "/metrics"), ("POST", "/terminal")]


@pytest.fixture
def jp_server_config():
    """Load our extension (as the pip-installed config file does), with a short metrics timeout."""
    return {
        "ServerApp": {"jpserver_extensions": {"kt_jupyter.server": True}},
        "KtServerApp": {"metrics_timeout_s": 1.0},
    }


class Reply:
    """Status, raw body and JSON body (None when not JSON) of one response."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    @property
    def message(self) -> str:
        """The ``message`` of a JSON error reply ('' when there is none)."""
        return (self.json or {}).get("message", "") if isinstance(self.json, dict) else ""

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.body[:300]!r}>"


@pytest.fixture
def api(jp_serverapp, http_server_client, jp_auth_header, jp_base_url, jp_asyncio_loop):
    """``api(method, path, body=None) -> Reply`` for ``/kt/api/<path>``, sent exactly as written.

    ``path`` is not escaped again (unlike ``jp_fetch``): ``%2F`` reaches the
    server as ``%2F``, the way an attacker sends it.
    """

    def _api(method: str, path: str, body: bytes | str | None = None, timeout_s: float = 30) -> Reply:
        kwargs: dict = {"method": method, "headers": dict(jp_auth_header), "request_timeout": timeout_s}
        if body is not None or method == "POST":
            kwargs["body"] = body or ""
        url = f"{jp_base_url}kt/api/{path}"
        try:
            response = jp_asyncio_loop.run_until_complete(http_server_client.fetch(url, **kwargs))
        except HTTPClientError as exc:
            return Reply(exc.code, exc.response.body if exc.response else b"")
        return Reply(response.code, response.body)

    return _api


@pytest.fixture
def raw_http(jp_serverapp, jp_http_port, jp_auth_header, jp_base_url, jp_asyncio_loop):
    """``raw_http(head: bytes, body: bytes = b"") -> (status line, headers and body bytes)`` over a plain socket.

    The server is answered from the test's event loop, so the socket is an
    asyncio stream; the reply is read until the server closes or 10 s pass.
    """

    async def exchange(head: bytes, body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
        try:
            writer.write(head)
            await writer.drain()
            if body:
                writer.write(body)
                await writer.drain()
            return await asyncio.wait_for(reader.read(64 * 1024), 10)
        finally:
            writer.close()

    def _raw(request_line: str, headers: dict[str, str], body: bytes = b"") -> bytes:
        lines = [request_line.replace("BASE/", jp_base_url), f"Host: 127.0.0.1:{jp_http_port}",
                 *(f"{k}: {v}" for k, v in {**jp_auth_header, **headers}.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return jp_asyncio_loop.run_until_complete(exchange(head, body))

    return _raw


# ---------------------------------------------------------------------- the name rule (pure)

@pytest.mark.parametrize("name", ["train", "a", "A-1_b.c", "x" * 63, "0"])
def test_good_compute_names_pass(name):
    from kt_jupyter.names import check_compute_name

    assert check_compute_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x", "a/b", "x\x00y", "x" * 64, "café", "-x", "x-", "x\n", "\nx", " x", "x y", "x\\y",
    None, 3, b"x", ["x"],
])
def test_bad_compute_names_are_refused_with_a_short_message(name):
    from kt_jupyter.names import check_compute_name

    with pytest.raises(ComputeSpecError) as info:
        check_compute_name(name)
    assert "compute name" in str(info.value) and "e.g. 'train'" in str(info.value)


def test_a_huge_hostile_name_is_not_echoed_whole():
    from kt_jupyter.names import check_compute_name

    with pytest.raises(ComputeSpecError) as info:
        check_compute_name("A" * (10 * MiB))
    assert len(str(info.value)) < 400 and "10485760 characters" in str(info.value)


# ---------------------------------------------------------------------- item 1: path traversal

@pytest.fixture
def sentinels(kt_home, local_backend):
    """Things next to and inside the registry that no request may touch; returns a check of them."""
    root = local_backend.root
    outside = kt_home / "sentinel"
    outside.mkdir()
    (outside / "kernel.log").write_text("SECRET-LOG-OUTSIDE\n")
    (outside / "kernel.json").write_text("{}")
    (kt_home / "x.lock").write_text("LOCK-CONTENT")
    keep = root / "keep"
    keep.mkdir(mode=0o700)
    (keep / "marker").write_text("kept")
    before = sorted(str(p.relative_to(kt_home)) for p in kt_home.rglob("*"))

    def intact() -> None:
        assert (outside / "kernel.log").read_text() == "SECRET-LOG-OUTSIDE\n"
        assert (kt_home / "x.lock").read_text() == "LOCK-CONTENT"
        assert (keep / "marker").read_text() == "kept"
        after = sorted(str(p.relative_to(kt_home)) for p in kt_home.rglob("*"))
        assert after == before, "a request created or removed files"

    return intact


def test_hostile_names_are_400_on_every_route_and_touch_nothing(api, sentinels):
    wrong = []
    for label, name in HOSTILE_NAMES.items():
        for method, suffix in ROUTES:
            reply = api(method, f"computes/local/{name}{suffix}")
            if reply.code != 400 or "not a valid compute name" not in reply.message \
                    or "SECRET" in reply.message or len(reply.message) > MAX_MESSAGE_CHARS:
                wrong.append(f"{method} {label} ({name}{suffix}): {reply!r}")
    assert not wrong, "\n".join(wrong)
    sentinels()
    assert api("GET", "computes").code == 200  # and the server still serves


def test_hostile_names_are_refused_by_the_local_backend_itself(local_backend, sentinels):
    """Defence in depth: the backend checks names even when a caller (or a new route) did not."""
    for raw in ("../sentinel", "..", ".", "./x", "a/b", "x\x00y", "a" * 300, "café", "-x", "x\n"):
        for call in (local_backend.find, local_backend.status, local_backend.logs, local_backend.delete,
                     local_backend.log_path):
            with pytest.raises(ComputeSpecError, match="not a valid compute name"):
                call(raw)
    sentinels()


def test_hostile_names_in_the_magics_and_the_python_api(ip, sentinels):
    for line in ("down ../sentinel", "logs ..", "status ./x", "restart a/b", "pull v -n ../sentinel",
                 "down -- -x", "logs " + "a" * 300):
        with pytest.raises(UsageError, match="not a valid compute name"):
            ip.run_line_magic("kt", line)
    with pytest.raises(UsageError, match="not a valid compute name"):
        ip.run_cell_magic("kt", "--name ../sentinel", "x = 1")

    def f() -> int:
        return 1

    with pytest.raises(ComputeSpecError, match="not a valid compute name"):
        kt.fn(f, name="../sentinel")  # refused when wrapped, before any compute is involved
    with pytest.raises(ComputeSpecError, match="not a valid compute name"):
        Compute(name="..")
    sentinels()


# ---------------------------------------------------------------------- item 2: another user's registry entries

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root (chown)")


@pytest.fixture
def fake_pod_kernel():
    """What an attacker's fake pod kernel looks like from here: a listening socket and a live pid.

    The pid is a real process in its own session (so a delete that trusted the
    entry would kill it, and we would see it); the socket records whether anyone
    connected without accepting anything.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            start_new_session=True)
    yield listener, proc
    proc.stdin.close()
    proc.wait(timeout=10)
    listener.close()


def _connections_to(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def _plant(entry: Path, port: int, pid: int, *, uid: int, dir_mode: int = 0o700, file_mode: int = 0o600) -> None:
    """A registry entry like the local backend writes, owned by ``uid``, pointing at ``port``."""
    entry.mkdir(mode=0o700)
    (entry / "token").write_text("planted-token-" + "x" * 32)
    (entry / "kernel.log").write_text("PLANTED-LOG\n")
    (entry / "kernel.json").write_text(json.dumps({
        "name": entry.name, "pid": pid, "host": "127.0.0.1", "port": port, "started": time.time(),
        "create_time": psutil.Process(pid).create_time(), "owners": [], "keep": True, "spec": {"name": entry.name},
    }))
    for path in entry.iterdir():
        os.chown(path, uid, uid)
        path.chmod(file_mode)
    os.chown(entry, uid, uid)
    entry.chmod(dir_mode)


def _refused_everywhere(api, local_backend, name: str) -> None:
    """Every way to use compute ``name`` is refused: server routes, backend calls, the listing."""
    for method, suffix in [r for r in ROUTES if r[0] != "DELETE"]:
        reply = api(method, f"computes/local/{name}{suffix}")
        assert reply.code == 404, (method, suffix, reply)
        assert "not usable" in reply.message and "does not trust it" in reply.message
        assert "PLANTED" not in reply.message and "planted-token" not in reply.message
    listed = api("GET", "computes")
    assert listed.code == 200 and name not in [c["name"] for c in listed.json["computes"]]
    for call in (local_backend.find, local_backend.status, local_backend.logs, local_backend.log_path):
        with pytest.raises(NotFoundError, match=UNTRUSTED):
            call(name)
    assert name not in [i.name for i in local_backend.list()]


def _delete_is_refused(api, local_backend, name: str) -> None:
    reply = api("DELETE", f"computes/local/{name}")
    assert reply.code == 404 and "remove it yourself" in reply.message, reply
    with pytest.raises(NotFoundError, match=UNTRUSTED):
        local_backend.delete(name)


@needs_root
@pytest.mark.parametrize("case", ["entry owned by another user", "files owned by another user",
                                  "files readable by others", "entry open to others"])
def test_a_planted_registry_entry_is_never_trusted(case, api, local_backend, fake_pod_kernel):
    listener, proc = fake_pod_kernel
    entry = local_backend.root / "planted"
    port = listener.getsockname()[1]
    if case == "entry owned by another user":
        _plant(entry, port, proc.pid, uid=OTHER_UID)
    elif case == "files owned by another user":
        _plant(entry, port, proc.pid, uid=OTHER_UID)
        os.chown(entry, os.getuid(), os.getgid())
    elif case == "files readable by others":
        _plant(entry, port, proc.pid, uid=os.getuid(), file_mode=0o644)
    else:
        _plant(entry, port, proc.pid, uid=os.getuid(), dir_mode=0o755)
    _refused_everywhere(api, local_backend, "planted")
    with pytest.raises(NotFoundError, match=UNTRUSTED):
        local_backend.launch(Compute(name="planted"))
    if case.startswith("entry"):  # not our entry: left alone
        _delete_is_refused(api, local_backend, "planted")
        assert sorted(p.name for p in entry.iterdir()) == ["kernel.json", "kernel.log", "token"]
    else:  # our entry with files we do not trust: `%kt down` removes it, reading nothing from it
        assert api("DELETE", "computes/local/planted").code == 200
        assert not entry.exists()
    assert _connections_to(listener) == 0, "connected to a pod kernel named by an untrusted entry"
    assert proc.poll() is None, "stopped the process an untrusted entry named"


def test_a_symlinked_entry_is_never_followed_or_deleted_through(api, local_backend, fake_pod_kernel, kt_home):
    """An entry that is a symlink out of the registry: ours in every other way, still refused."""
    listener, proc = fake_pod_kernel
    elsewhere = kt_home / "elsewhere"
    _plant(elsewhere, listener.getsockname()[1], proc.pid, uid=os.getuid())
    (local_backend.root / "linked").symlink_to(elsewhere, target_is_directory=True)
    _refused_everywhere(api, local_backend, "linked")
    _delete_is_refused(api, local_backend, "linked")
    assert _connections_to(listener) == 0 and proc.poll() is None
    assert sorted(p.name for p in elsewhere.iterdir()) == ["kernel.json", "kernel.log", "token"]


def test_symlinked_registry_files_are_never_read(local_backend, fake_pod_kernel, kt_home):
    listener, proc = fake_pod_kernel
    elsewhere = kt_home / "elsewhere"
    _plant(elsewhere, listener.getsockname()[1], proc.pid, uid=os.getuid())
    entry = local_backend.root / "files"
    entry.mkdir(mode=0o700)
    for name in ("kernel.json", "token", "kernel.log"):
        (entry / name).symlink_to(elsewhere / name)
    for call in (local_backend.find, local_backend.status, local_backend.logs):
        with pytest.raises(NotFoundError, match="symbolic link"):
            call("files")
    assert _connections_to(listener) == 0


@pytest.mark.parametrize("problem", ["open to others", "a symlink", *(["owned by another user"] if os.geteuid() == 0
                                                                       else [])])
def test_a_registry_root_that_is_not_private_is_refused_saying_how_to_fix_it(problem, api, kt_home):
    from kt_jupyter.backends.local import LocalBackend

    root = kt_home / "local"
    if problem == "a symlink":
        (kt_home / "real").mkdir(mode=0o700)
        root.symlink_to(kt_home / "real", target_is_directory=True)
    else:
        root.mkdir(mode=0o700)
        if problem == "open to others":
            root.chmod(0o777)
        else:
            os.chown(root, OTHER_UID, OTHER_UID)
    with pytest.raises(BackendUnavailable, match=str(root)):
        LocalBackend().list()
    listed = api("GET", "computes")
    local = next(b for b in listed.json["backends"] if b["name"] == "local")
    assert local["available"] is False and str(root) in local["message"]
    assert "chmod 700" in local["message"] or "remove" in local["message"]
    assert api("GET", "computes/local/x").code == 404


# ---------------------------------------------------------------------- item 7: hostile request bodies

def _short_json_error(reply: Reply, code: int) -> str:
    assert reply.code == code, reply
    assert reply.json is not None and len(reply.message) < MAX_MESSAGE_CHARS, reply
    return reply.message


def test_deeply_nested_json_is_400_not_a_recursion_error(api, local_backend):
    assert "64 KiB" in _short_json_error(api("POST", "computes", "[" * 100_000), 413)
    assert "nested" in _short_json_error(api("POST", "computes", "[" * 60_000), 400)
    assert "nested" in _short_json_error(api("POST", "computes", '{"name": "x", "labels": ' + "{\"a\": " * 5_000
                                             + "1" + "}" * 5_001), 400)
    depth = 900  # json parses it; the Compute checks must not recurse on it either
    spec = '{"name": "x", "labels": {"a": ' + "[" * depth + "]" * depth + "}}"
    _short_json_error(api("POST", "computes", spec), 400)
    spec = '{"name": "x", "env_vars": ' + "[" * depth + "]" * depth + "}"
    _short_json_error(api("POST", "computes", spec), 400)
    assert local_backend.list() == []
    assert api("GET", "computes").code == 200


def test_a_big_value_in_a_spec_is_not_echoed_back(api):
    message = _short_json_error(api("POST", "computes", json.dumps({"name": "x", "cpus": "9" * 60_000})), 400)
    assert "cpus" in message


def test_big_bodies_get_a_413_and_are_never_held(api, raw_http, local_backend):
    from kt_jupyter.server.handlers import MAX_DISCARD_BYTES

    # a 10 MiB spec: read and dropped, so a client still sending it gets the answer
    huge = api("POST", "computes", json.dumps({"name": "x", "image": "A" * (10 * MiB)}))
    assert "at most 64 KiB" in _short_json_error(huge, 413)
    # the same without Content-Length (chunked)
    chunk = b"A" * (256 * 1024)
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 4 + b"0\r\n\r\n"
    reply = raw_http("POST BASE/kt/api/computes HTTP/1.1", {"Transfer-Encoding": "chunked"}, body)
    assert reply.startswith(b"HTTP/1.1 413") and b"at most 64 KiB" in reply, reply[:300]
    # past what is worth reading, the answer comes from the headers alone, before any of the body is sent
    reply = raw_http("POST BASE/kt/api/computes HTTP/1.1", {"Content-Length": str(MAX_DISCARD_BYTES + 1)})
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413") and b"at most 64 KiB" in rest and len(rest) < 4096, reply[:300]
    assert raw_http("POST BASE/kt/api/computes HTTP/1.1", {"Content-Length": "12abc"}).startswith(b"HTTP/1.1 400")
    assert local_backend.list() == []
    assert api("GET", "computes").code == 200


def test_internal_errors_are_short_json(api, monkeypatch):
    from kt_jupyter.server import computes

    def broken(backend: str, name: str):
        raise RuntimeError("boom " + "B" * 100_000)

    monkeypatch.setattr(computes, "compute_status", broken)
    message = _short_json_error(api("GET", "computes/local/x"), 500)
    assert message.startswith("internal error in the kt server extension: RuntimeError: boom")


# ---------------------------------------------------------------------- item 8: secrets at rest

def test_registry_files_are_private_and_hold_no_env_values(local_backend):
    secret = "sk-live-" + "9" * 24
    handle = local_backend.launch(Compute(name="secret", env_vars={"API_KEY": secret}))
    session = handle.session()
    session.connect()
    try:
        session.execute("import os\nassert os.environ['API_KEY'].startswith('sk-live-')")  # it still reaches the pod
    finally:
        session.close()
    entry = local_backend.root / "secret"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    for name in ("kernel.json", "token", "kernel.log"):
        assert stat.S_IMODE((entry / name).stat().st_mode) == 0o600, name
    info = json.loads((entry / "kernel.json").read_text())
    assert secret not in json.dumps(info)
    assert "API_KEY" in json.dumps(info["spec"])  # which variables were set is still shown
    assert local_backend.status("secret").phase == "ready"
    assert not (entry / "kernel.json.tmp").exists()


def test_connections_closed_before_their_handshake_leave_no_log_line():
    """websockets 14 logs each connection closed before its handshake (a TCP probe, a port scan) at ERROR, with a
    traceback; websockets 17 logs nothing. The pod kernel drops those records with any websockets, and keeps the
    others (the end-to-end test, test_security.py, runs on the websockets CI installs)."""
    import logging

    from pod_kernel.server import _quiet_websockets_log

    log = logging.getLogger("websockets.server")
    level, filters = log.level, list(log.filters)
    try:
        log.setLevel(logging.NOTSET)  # as a pod kernel starts, its root logger at INFO
        _quiet_websockets_log()
        _quiet_websockets_log()  # once is enough: a second server start adds no second filter
        assert len(log.filters) == len(filters) + 1

        def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
            try:
                raise EOFError("connection closed while reading HTTP request line")
            except EOFError:
                return log.makeRecord(log.name, level, __file__, 1, msg, (), sys.exc_info())

        assert not log.filter(record("opening handshake failed"))
        assert log.filter(record("connection handler failed"))  # our handler's crash is still said
        assert log.filter(record("server listening on %s", logging.WARNING))
    finally:
        log.setLevel(level)
        log.filters[:] = filters
