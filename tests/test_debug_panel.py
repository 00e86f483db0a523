"""JupyterLab's debugger panel on %%kt cells, driven as JupyterLab drives it: debug_request on the control channel.

A real notebook kernel (ipykernel, own process, kt loaded) gets the messages
JupyterLab 4's debugger sends: debugInfo, initialize, attach, configurationDone,
dumpCell, setBreakpoints, then an execute_request of the cell; stopped events
arrive as iopub debug_event, and stackTrace / scopes / variables / evaluate /
continue follow. The pod kernel is a real local one; every wait has a deadline.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from kt_jupyter.debug_panel import ID_SPAN

TIMEOUT_S = 60


def _first(get, matches, timeout: float, what: str):
    """The first item ``get(timeout=...)`` returns that ``matches``, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = get(timeout=0.2)
        except queue.Empty:
            continue
        if matches(item):
            return item
    raise AssertionError(f"no {what} in {timeout} s")


class Frontend:
    """The part of JupyterLab's debugger this test needs: DAP over debug_request, and iopub events."""

    def __init__(self, client) -> None:
        self.client = client
        self.seq = 0
        self.events: queue.Queue = queue.Queue()
        self.iopub: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "debug_event":
                self.events.put(msg["content"])
            else:
                self.iopub.append(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def request(self, command: str, **arguments) -> dict:
        self.seq += 1
        msg = self.client.session.msg("debug_request", {"type": "request", "seq": self.seq, "command": command,
                                                        "arguments": arguments})
        self.client.control_channel.send(msg)
        return _first(self.client.control_channel.get_msg, lambda r: r["parent_header"].get("msg_id") ==
                      msg["header"]["msg_id"], TIMEOUT_S, f"reply to debug request {command!r}")["content"]

    def event(self, name: str, timeout: float = TIMEOUT_S) -> dict:
        return _first(self.events.get, lambda ev: ev.get("event") == name, timeout, f"{name!r} debug event")

    def reply_of(self, msg_id: str, timeout: float = TIMEOUT_S) -> dict:
        return _first(self.client.get_shell_msg, lambda r: r["parent_header"].get("msg_id") == msg_id, timeout,
                      "execute_reply")["content"]

    def stdout_of(self, msg_id: str, timeout: float = TIMEOUT_S) -> str:
        """The request's stdout, once its outputs are all in: iopub says idle for it after the last one
        (the shell reply may arrive first, on its own channel)."""
        deadline = time.monotonic() + timeout
        while not any(m["msg_type"] == "status" and m["content"].get("execution_state") == "idle"
                      and m["parent_header"].get("msg_id") == msg_id for m in list(self.iopub)):
            assert time.monotonic() < deadline, f"no idle status for {msg_id} within {timeout} s"
            time.sleep(0.02)
        return "".join(m["content"]["text"] for m in list(self.iopub)
                       if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id)

    def start(self) -> dict:
        """What JupyterLab does when the debugger is switched on for a notebook."""
        info = self.request("debugInfo")
        assert info["success"] and info["body"]["hashMethod"] == "Murmur2"
        init = self.request("initialize", clientID="jupyterlab", clientName="JupyterLab", adapterID="python",
                            pathFormat="path", linesStartAt1=True, columnsStartAt1=True,
                            supportsVariableType=True, supportsVariablePaging=True,
                            supportsRunInTerminalRequest=True, locale="en")
        assert init["success"], init
        assert self.request("attach")["success"]
        assert self.request("configurationDone")["success"]
        return info["body"]


@pytest.fixture(scope="module")
def nb(notebook_kernel):
    """JupyterLab's debugger, as far as these tests drive it, on the module's notebook kernel (tests/conftest.py)."""
    front = Frontend(notebook_kernel[1])
    yield front
    front.close()  # before the fixture stops the computes: its iopub reader goes first


CELL = (
    "%%kt --name panel\n"
    "import os\n"
    "def scale(v):\n"
    "    doubled = v * 2\n"
    "    return doubled + 1\n"
    "total = 0\n"
    "for i in range(3):\n"
    "    total += scale(i)\n"
    "print('total', total, 'pid', os.getpid())\n"
)


def test_breakpoints_in_a_kt_cell_stop_in_the_pod_and_show_its_frames_and_variables(nb):
    nb.start()
    path = nb.request("dumpCell", code=CELL)["body"]["sourcePath"]
    bps = nb.request("setBreakpoints", source={"path": path}, breakpoints=[{"line": 4}], sourceModified=False)
    assert bps["success"] and [b["line"] for b in bps["body"]["breakpoints"]] == [4]
    assert [b["source"]["path"] for b in bps["body"]["breakpoints"]] == [path]  # the Breakpoints panel names it

    msg_id = nb.client.execute(CELL)
    stopped = nb.event("stopped")
    thread = stopped["body"]["threadId"]
    assert thread >= ID_SPAN  # a pod thread, in the pod's id range
    frames = nb.request("stackTrace", threadId=thread)["body"]["stackFrames"]
    top = frames[0]
    assert top["id"] >= ID_SPAN and top["name"] == "scale"
    assert (top["source"]["path"], top["line"]) == (path, 4)  # the notebook cell's own file and line
    scopes = nb.request("scopes", frameId=top["id"])["body"]["scopes"]
    local_ref = next(s["variablesReference"] for s in scopes if s["name"].lower().startswith("local"))
    assert local_ref >= ID_SPAN
    names = {v["name"]: v["value"] for v in nb.request("variables", variablesReference=local_ref)["body"]["variables"]}
    assert names["v"] == "0"
    assert nb.request("evaluate", expression="v + 40", frameId=top["id"], context="repl")["body"]["result"] == "40"
    rich = nb.request("richInspectVariables", variableName="v", frameId=top["id"])
    assert rich["success"] and rich["body"]["data"].get("text/plain") == "0"
    assert thread in nb.request("debugInfo")["body"]["stoppedThreads"]

    assert nb.request("next", threadId=thread)["success"]  # a step: line 5 of the cell
    nb.event("stopped")
    top = nb.request("stackTrace", threadId=thread)["body"]["stackFrames"][0]
    assert (top["source"]["path"], top["line"]) == (path, 5)

    # the loop comes back to the breakpoint with the next value, then runs to the end
    assert nb.request("continue", threadId=thread)["success"]
    nb.event("stopped")
    top = nb.request("stackTrace", threadId=thread)["body"]["stackFrames"][0]
    local_ref = next(s["variablesReference"] for s in nb.request("scopes", frameId=top["id"])["body"]["scopes"]
                     if s["name"].lower().startswith("local"))
    values = {v["name"]: v["value"] for v in nb.request("variables", variablesReference=local_ref)["body"]["variables"]}
    assert values["v"] == "1"
    assert nb.request("setBreakpoints", source={"path": path}, breakpoints=[], sourceModified=False)["success"]
    # JupyterLab 4.6's Continue button forgets the stopped thread before reading it: it asks for thread 1
    assert nb.request("continue", threadId=1)["success"]
    reply = nb.reply_of(msg_id)
    assert reply["status"] == "ok", reply
    out = nb.stdout_of(msg_id)
    assert "total 9 pid" in out
    pod_pid = int(out.split("pid")[-1])

    # plain notebook cells still run in the notebook kernel as before (another process than the pod)
    local = nb.client.execute("import os\nx_local = 41 + 1\nprint('local', x_local, os.getpid())")
    assert nb.reply_of(local)["status"] == "ok"
    said = nb.stdout_of(local).split()
    assert said[:2] == ["local", "42"] and int(said[2]) != pod_pid

    # switching the debugger off detaches from the pod; the pod kernel and its state stay
    assert nb.request("disconnect", restart=False, terminateDebuggee=False)["success"]  # as JupyterLab sends it
    again = nb.client.execute("%%kt --name panel\nprint('still', total)")
    assert nb.reply_of(again)["status"] == "ok" and "still 9" in nb.stdout_of(again)


class FakeLinkStoppingAgain:
    """A fake pod link (test double of PodDapLink): answers continue only after the thread's next
    stopped event has arrived, as a fast loop on the pod can make it happen on the wire."""

    compute = "fake"
    closed = False

    def __init__(self, debugger, offset: int) -> None:
        self.debugger = debugger
        self.offset = offset

    def request(self, command: str, arguments: dict) -> dict:
        assert (command, arguments) == ("continue", {"threadId": 1})
        self.debugger._pod_event({"type": "event", "event": "stopped",
                                  "body": {"reason": "breakpoint", "threadId": 1, "allThreadsStopped": True}},
                                 self.offset)
        return {"type": "response", "command": command, "success": True, "body": {"allThreadsContinued": False}}


def test_a_stop_that_beats_the_continue_reply_keeps_the_thread_stopped():
    """Regression (seen in the browser): the pod thread stops again before continue's reply is handled;
    it must stay listed as stopped, or the next Continue (threadId 1) goes to the notebook's own debugpy."""
    import asyncio
    import logging

    from kt_jupyter import debug_panel

    events: list[dict] = []
    dbg = debug_panel._debugger_class()(logging.getLogger("test"), None, events.append, None, None, [])
    dbg._kt_init()
    dbg.is_started = True
    dbg.kt_links.append(FakeLinkStoppingAgain(dbg, ID_SPAN))
    dbg._pod_event({"type": "event", "event": "stopped", "body": {"threadId": 1, "allThreadsStopped": True}}, ID_SPAN)
    assert dbg.stopped_threads == {ID_SPAN + 1}
    reply = asyncio.run(dbg.process_request({"type": "request", "seq": 7, "command": "continue",
                                             "arguments": {"threadId": 1}}))  # as JupyterLab 4.6 sends it
    assert reply["success"] and reply["request_seq"] == 7
    assert dbg.stopped_threads == {ID_SPAN + 1}  # stopped again, and still known to be
    assert [e["body"]["threadId"] for e in events if e["event"] == "stopped"] == [ID_SPAN + 1, ID_SPAN + 1]


class FakeSlowDebugpy:
    """A fake of a pod's debugpy at the wire (Content-Length framed DAP on 127.0.0.1): it reads one request,
    says so (``got``), and answers it only once the test sets ``answer``: a debugpy slow to answer."""

    def __init__(self) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.got = threading.Event()
        self.answer = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import json

        conn, _ = self.listener.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            head, body = buf.split(b"\r\n\r\n", 1)
            length = int(head.split(b":", 1)[1])
            while len(body) < length:
                body += conn.recv(65536)
            request = json.loads(body[:length])
            self.got.set()
            self.answer.wait(TIMEOUT_S)
            reply = json.dumps({"seq": 1, "type": "response", "request_seq": request["seq"], "success": True,
                                "command": request["command"],
                                "body": {"stackFrames": [{"id": 5, "name": "cell", "line": 2}]}}).encode()
            conn.sendall(b"Content-Length: %d\r\n\r\n" % len(reply) + reply)
            conn.recv(65536)  # until the link closes

    def close(self) -> None:
        self.answer.set()
        self.listener.close()


def test_a_slow_pod_debugger_does_not_block_the_control_channel_loop():
    """Issue 19.3: a request for a pod's thread waited for the pod's debugpy (up to 30 s) inside ipykernel's
    async control handler, so nothing else on the control channel was served meanwhile."""
    import asyncio
    import logging

    from kt_jupyter import debug_panel

    fake = FakeSlowDebugpy()
    dbg = debug_panel._debugger_class()(logging.getLogger("test"), None, lambda _e: None, None, None, [])
    dbg._kt_init()
    dbg.is_started = True
    dbg.kt_links.append(debug_panel.PodDapLink("fake", "127.0.0.1", fake.port, on_event=lambda _m: None,
                                               timeout_s=10))

    async def frontend() -> tuple[bool, dict]:
        request = asyncio.ensure_future(dbg.process_request(
            {"type": "request", "seq": 3, "command": "stackTrace", "arguments": {"threadId": ID_SPAN + 1}}))
        # the loop must come back here while the pod has the request and has not answered
        await asyncio.get_running_loop().run_in_executor(None, fake.got.wait, TIMEOUT_S)
        pending_while_pod_thinks = not request.done()
        fake.answer.set()
        return pending_while_pod_thinks, await request

    try:
        pending, reply = asyncio.run(asyncio.wait_for(frontend(), TIMEOUT_S))
    finally:
        dbg.detach_pods()
        fake.close()
    assert pending, "the control loop was blocked while the pod's debugger had not answered"
    assert reply["success"] and reply["request_seq"] == 3
    assert reply["body"]["stackFrames"][0]["id"] == ID_SPAN + 5  # in the pod's id range
