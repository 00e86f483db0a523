"""The server extension's REST API (/kt/api/) on a real Jupyter server, with real local pod kernels.

jupyter_server's pytest fixtures are imported into this module only (not
registered as a global plugin), so their autouse event-loop fixtures do not
reach the rest of the suite; tests are plain functions that drive requests
with :func:`fetch`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest

pytest.importorskip("pytest_jupyter", reason="needs pytest-jupyter[server] (the test extra)")

from jupyter_server.auth import Authorizer  # noqa: E402
from pytest_jupyter.jupyter_server import *  # noqa: E402,F401,F403  (jp_serverapp, jp_fetch and what they need)
from tornado.httpclient import HTTPClientError  # noqa: E402

from kt_jupyter.compute import Compute  # noqa: E402

#: Seconds the extension waits for a pod kernel's metrics in these tests.
METRICS_TIMEOUT_S = 1.0


@pytest.fixture
def jp_server_config():
    """Load our extension (as the pip-installed config file does), with a short metrics timeout."""
    return {
        "ServerApp": {"jpserver_extensions": {"kt_jupyter.server": True}},
        "KtServerApp": {"metrics_timeout_s": METRICS_TIMEOUT_S},
    }


class Reply:
    """Status and JSON body of one response."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.json = json.loads(body) if body else None

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.json}>"


@pytest.fixture
def fetch(jp_fetch, jp_asyncio_loop):
    """``fetch(method, *path, body=None, params=None, token=True) -> Reply``; errors are Replies too."""

    def _fetch(method: str, *parts: str, body: object = None, params: dict | None = None,
               token: bool = True, timeout_s: float = 60) -> Reply:
        kwargs: dict = {"method": method, "params": params, "request_timeout": timeout_s}
        if body is not None:
            kwargs["body"] = body if isinstance(body, (str, bytes)) else json.dumps(body)
        elif method == "POST":
            kwargs["body"] = ""
        if not token:
            kwargs["headers"] = {"Authorization": ""}
        try:
            response = jp_asyncio_loop.run_until_complete(jp_fetch("kt", "api", *parts, **kwargs))
        except HTTPClientError as exc:
            return Reply(exc.code, exc.response.body if exc.response else b"")
        return Reply(response.code, response.body)

    return _fetch


def wait_for(condition, timeout_s: float = 15, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------- the summary (pure)

def test_summary_of_a_compute_with_and_without_metrics():
    from kt_jupyter.backends import KernelInfo
    from kt_jupyter.server.computes import summarize

    spec = Compute(name="s", cpus=2, memory="4Gi", gpus=1).to_dict()
    info = KernelInfo("s", "local", "ready", where="local pid 7", pid=7, started=100.0, spec=spec)
    gpus = [{"index": 0, "name": "A100", "utilization_percent": 40, "memory_used_bytes": 1, "memory_total_bytes": 2}]
    full = summarize(info, {"idle_s": 12.5, "gpus": gpus, "rss_bytes": 5}, now=160.0)
    assert full["resources"] == {"cpus": "2", "memory": "4Gi", "gpus": "1"}
    assert (full["age_s"], full["idle_s"], full["gpus"], full["metrics_error"]) == (60.0, 12.5, gpus, None)
    bare = summarize(KernelInfo("s", "local", "stopped", spec={"name": "s"}), metrics_error="not running")
    assert (bare["resources"], bare["age_s"], bare["idle_s"], bare["gpus"]) == ({}, None, None, [])
    assert bare["metrics"] is None and bare["metrics_error"] == "not running"
    json.dumps(full)  # what the API sends


# ---------------------------------------------------------------------- authentication and authorisation

ALL_METHODS = [
    ("GET", ("computes",)),
    ("POST", ("computes",)),
    ("GET", ("computes", "local", "x")),
    ("DELETE", ("computes", "local", "x")),
    ("GET", ("computes", "local", "x", "logs")),
    ("GET", ("computes", "local", "x", "metrics")),
    ("POST", ("computes", "local", "x", "terminal")),
]


@pytest.mark.parametrize("method,parts", ALL_METHODS)
def test_every_method_requires_authentication(fetch, method, parts, local_backend):
    reply = fetch(method, *parts, body={"name": "x"} if method == "POST" else None, token=False)
    assert reply.code in (401, 403), reply
    assert reply.json["message"]
    assert local_backend.list() == []  # nothing was launched


class DenyKt(Authorizer):
    """An authorizer that refuses the "kt" resource and allows everything else."""

    def is_authorized(self, handler, user, action, resource) -> bool:
        return resource != "kt"


@pytest.fixture
def deny_kt(jp_server_config):
    """Configure the server (before it starts) with the :class:`DenyKt` authorizer."""
    jp_server_config["ServerApp"]["authorizer_class"] = DenyKt


@pytest.mark.parametrize("method,parts", ALL_METHODS)
def test_every_method_asks_the_authorizer(deny_kt, fetch, method, parts):
    reply = fetch(method, *parts, body={"name": "x"} if method == "POST" else None)
    assert reply.code == 403, reply
    assert "resource: kt" in reply.json["message"]


# ---------------------------------------------------------------------- the life of a compute

def test_list_when_there_are_no_computes(fetch):
    reply = fetch("GET", "computes")
    assert reply.code == 200
    assert reply.json["computes"] == []
    backends = {b["name"]: b for b in reply.json["backends"]}
    assert backends["local"]["available"] is True
    assert set(backends) == {"local", "kubernetes"}
    if not backends["kubernetes"]["available"]:
        assert backends["kubernetes"]["message"]  # says why, instead of failing the listing


def test_launch_list_metrics_logs_stop(fetch, local_backend):
    spec = {"name": "api", "cpus": "1", "memory": "512Mi", "env_vars": {"GREETING": "hi"}}
    reply = fetch("POST", "computes", body=spec)
    assert reply.code == 201, reply
    assert reply.json["name"] == "api" and reply.json["backend"] == "local"
    assert reply.json["phase"] == "ready"
    assert reply.json["resources"] == {"cpus": "1", "memory": "512Mi"}

    # launched with keep=True: not tied to the server process; same name again reuses it
    info = local_backend.status("api")
    assert json.loads((local_backend.root / "api" / "kernel.json").read_text())["keep"] is True
    again = fetch("POST", "computes", body=spec)
    assert again.code == 200 and again.json["pid"] == info.pid

    # something in its log: a cell's output goes there
    session = local_backend.find("api").session()
    session.connect()
    session.execute("import os\nprint('hello from', os.environ['GREETING'])")
    session.close()

    listed = fetch("GET", "computes").json["computes"]
    assert [c["name"] for c in listed] == ["api"]
    compute = listed[0]
    assert compute["where"] == f"local pid {info.pid}"
    assert compute["age_s"] >= 0
    assert compute["metrics_error"] is None
    assert isinstance(compute["idle_s"], float)
    assert compute["gpus"] == compute["metrics"]["gpus"]
    assert compute["metrics"]["rss_bytes"] > 0
    assert compute["metrics"]["cells_run"] >= 1

    one = fetch("GET", "computes", "local", "api")
    assert one.code == 200 and one.json["name"] == "api" and one.json["metrics"]["rss_bytes"] > 0

    metrics = fetch("GET", "computes", "local", "api", "metrics")
    assert metrics.code == 200
    assert {"cpu_percent", "rss_bytes", "host_memory_total_bytes", "gpus", "idle_s", "uptime_s"} <= set(
        metrics.json["metrics"])

    logs = fetch("GET", "computes", "local", "api", "logs")
    assert logs.code == 200 and "hello from hi" in logs.json["logs"]
    last = fetch("GET", "computes", "local", "api", "logs", params={"tail": "1"})
    assert last.code == 200 and len(last.json["logs"].splitlines()) <= 1

    stopped = fetch("DELETE", "computes", "local", "api")
    assert stopped.code == 200 and stopped.json["stopped"] is True
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert fetch("GET", "computes").json["computes"] == []
    assert fetch("GET", "computes", "local", "api").code == 404


def test_compute_started_by_a_notebook_is_listed_and_stoppable(fetch, local_backend):
    """A %%kt cell launches through the backend from the notebook kernel; the server sees it by name."""
    handle = local_backend.launch(Compute(name="from-nb", memory="1Gi"))
    listed = fetch("GET", "computes").json["computes"]
    assert [(c["name"], c["phase"], c["resources"]) for c in listed] == [("from-nb", "ready", {"memory": "1Gi"})]
    assert fetch("DELETE", "computes", "local", "from-nb").code == 200
    wait_for(lambda: not local_backend.find("from-nb"), what="the kernel to be gone")
    assert handle.liveness() is not None  # the notebook side now sees it dead


def test_a_dead_kernel_is_listed_as_stopped_and_has_no_metrics(fetch, local_backend):
    handle = local_backend.launch(Compute(name="gone"))
    os.killpg(handle.pid, signal.SIGKILL)
    wait_for(lambda: local_backend.status("gone").phase == "stopped", what="phase stopped")
    listed = fetch("GET", "computes").json["computes"]
    assert [(c["name"], c["phase"], c["metrics"]) for c in listed] == [("gone", "stopped", None)]
    reply = fetch("GET", "computes", "local", "gone", "metrics")
    assert reply.code == 409 and "not running" in reply.json["message"]
    assert fetch("GET", "computes", "local", "gone", "logs").code == 200  # logs outlive the process
    assert fetch("DELETE", "computes", "local", "gone").code == 200


@pytest.fixture
def hung_kernel(kt_home):
    """A registry entry whose "kernel" is a real socket that accepts connections and never answers.

    Its pid is this test process (alive, so the entry counts as ready); the
    entry is removed before anything could try to stop that pid.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    d = kt_home / "local" / "hung"
    d.parent.mkdir(mode=0o700)
    d.mkdir(mode=0o700)  # private, as the local backend makes its registry (it trusts no other)
    (d / "token").write_text("t" * 32)
    (d / "kernel.log").write_text("")
    me = psutil.Process()
    (d / "kernel.json").write_text(json.dumps({
        "name": "hung", "pid": me.pid, "host": "127.0.0.1", "port": listener.getsockname()[1],
        "started": time.time(), "create_time": me.create_time(), "owner_pid": None, "keep": True,
        "spec": {"name": "hung"},
    }))
    for path in d.iterdir():
        path.chmod(0o600)
    yield "hung"
    for path in d.iterdir():
        path.unlink()
    d.rmdir()
    done.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_a_kernel_that_never_answers_does_not_hang_the_server(fetch, hung_kernel):
    t0 = time.monotonic()
    listed = fetch("GET", "computes", timeout_s=20).json["computes"]
    assert time.monotonic() - t0 < METRICS_TIMEOUT_S + 5
    assert [(c["name"], c["metrics"]) for c in listed] == [("hung", None)]
    assert listed[0]["metrics_error"]
    t0 = time.monotonic()
    reply = fetch("GET", "computes", "local", hung_kernel, "metrics", timeout_s=20)
    assert time.monotonic() - t0 < METRICS_TIMEOUT_S + 5
    assert reply.code in (502, 504), reply
    assert "hung" in reply.json["message"]
    assert fetch("GET", "computes").code == 200  # and the server still answers


@pytest.fixture
def slow_kubernetes(jp_server_config, monkeypatch):
    """A fake kubernetes listing that blocks until released (no cluster can be unreachable for real here).

    Yields the list of calls made to it and the event that releases them.
    """
    from kt_jupyter.server import computes

    jp_server_config["KtServerApp"]["list_timeout_s"] = 1.0
    real = computes.list_backend
    calls: list[str] = []
    release = threading.Event()

    def fake_list_backend(name: str):
        if name != "kubernetes":
            return real(name)
        calls.append(name)
        release.wait(30)
        return [], {"name": name, "available": False, "message": "released"}

    monkeypatch.setattr(computes, "list_backend", fake_list_backend)
    yield calls, release
    release.set()


def test_a_slow_backend_is_reported_without_holding_the_listing(slow_kubernetes, fetch, local_backend):
    calls, release = slow_kubernetes
    local_backend.launch(Compute(name="quick"))
    for _ in range(3):
        t0 = time.monotonic()
        reply = fetch("GET", "computes")
        assert time.monotonic() - t0 < 5
        assert [c["name"] for c in reply.json["computes"]] == ["quick"]
        kube = next(b for b in reply.json["backends"] if b["name"] == "kubernetes")
        assert kube["available"] is False and "did not answer within 1 s" in kube["message"]
    assert calls == ["kubernetes"]  # one listing in flight, not one thread per request
    release.set()


# ---------------------------------------------------------------------- bad input -> 4xx with a message

@pytest.mark.parametrize("body,code,fragment", [
    ("{not json", 400, "JSON Compute spec"),
    ("[1, 2]", 400, "JSON object"),
    ({"name": "x", "cpus": "lots"}, 400, "cpus"),
    ({"name": "x", "memory": "-1Gi"}, 400, "memory"),
    ({"nmae": "x"}, 400, "did you mean 'name'"),
    ({"name": "Bad Name!"}, 400, "not a valid compute name"),
    ({"name": "x", "backend": "mars"}, 400, "backend must be one of"),
    ({"name": "x", "gpus": "64"}, 400, "GPU"),
])
def test_bad_launch_specs_are_400_with_a_message(fetch, local_backend, body, code, fragment):
    reply = fetch("POST", "computes", body=body)
    assert reply.code == code, reply
    assert fragment in reply.json["message"], reply.json["message"]
    assert local_backend.list() == []


def test_launch_on_an_unavailable_backend_is_400_saying_why(fetch):
    from kt_jupyter.backends import get_backend
    from kt_jupyter.errors import BackendUnavailable

    try:
        get_backend("kubernetes").list()
    except BackendUnavailable:
        pass
    else:
        pytest.skip("a Kubernetes cluster is reachable from here")
    reply = fetch("POST", "computes", body={"name": "x", "backend": "kubernetes"})
    assert reply.code == 400, reply
    assert "cannot launch 'x' on kubernetes" in reply.json["message"]


@pytest.mark.parametrize("method,parts,params,code,fragment", [
    ("GET", ("computes", "local", "nope"), None, 404, "no local compute named 'nope'"),
    ("DELETE", ("computes", "local", "nope"), None, 404, "no local compute named 'nope'"),
    ("GET", ("computes", "local", "nope", "logs"), None, 404, "nope"),
    ("GET", ("computes", "local", "nope", "metrics"), None, 404, "nope"),
    ("GET", ("computes", "mars", "x"), None, 404, "no backend 'mars'"),
    ("DELETE", ("computes", "kubernetes", "x"), None, 404, "x"),
    ("GET", ("computes", "local", "x", "logs"), {"tail": "abc"}, 400, "tail must be a whole number"),
    ("GET", ("computes", "local", "x", "logs"), {"tail": "0"}, 400, "tail must be a whole number"),
    ("GET", ("computes", "local", "x", "logs"), {"tail": "99999999"}, 400, "tail must be a whole number"),
])
def test_unknown_computes_and_bad_parameters(fetch, method, parts, params, code, fragment):
    reply = fetch(method, *parts, params=params)
    assert reply.code == code, reply
    assert fragment in reply.json["message"], reply.json["message"]
