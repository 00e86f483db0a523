"""A small Debug Adapter Protocol client for tests: JSON messages over TCP, Content-Length framed.

Enough of DAP to do what an IDE does when it attaches to debugpy: initialize,
attach, set breakpoints, configurationDone, then stackTrace / scopes /
variables / evaluate / next / continue, and disconnect. Every wait has a
deadline; a reader thread files responses by request seq and keeps events.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable

#: How long one request or event is waited for.
DAP_TIMEOUT_S = 30.0


class DapError(Exception):
    """A request failed, or an answer did not come in time."""


class DapClient:
    """One connection to a debug adapter (debugpy's)."""

    def __init__(self, host: str, port: int, timeout_s: float = DAP_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.settimeout(None)
        self._seq = 0
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._responses: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="dap-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ wire

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.decode("ascii").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                msg = json.loads(body)
                with self._cond:
                    if msg.get("type") == "response":
                        self._responses[msg["request_seq"]] = msg
                    elif msg.get("type") == "event":
                        self.events.append(msg)
                    self._cond.notify_all()
        except OSError:
            return
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def send(self, command: str, **arguments: Any) -> int:
        """Send a request; returns its seq (see :meth:`response`)."""
        with self._send_lock:
            self._seq += 1
            seq = self._seq
            body = json.dumps({"seq": seq, "type": "request", "command": command,
                               "arguments": arguments}).encode()
            self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return seq

    def _wait(self, ready: Callable[[], Any], what: str, timeout_s: float | None) -> Any:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._cond:
            while True:
                found = ready()
                if found is not None:
                    return found
                if self._closed:
                    raise DapError(f"connection closed while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DapError(f"no {what} within {timeout_s or self.timeout_s:g} s")
                self._cond.wait(left)

    def response(self, seq: int, timeout_s: float | None = None) -> dict[str, Any]:
        """The body of the response to request ``seq``; DapError if it failed."""
        msg = self._wait(lambda: self._responses.get(seq), f"response to request {seq}", timeout_s)
        if not msg.get("success"):
            raise DapError(f"{msg.get('command')} failed: {msg.get('message')} {msg.get('body')}")
        return msg.get("body") or {}

    def request(self, command: str, timeout_s: float | None = None, **arguments: Any) -> dict[str, Any]:
        """Send a request and wait for its response body."""
        return self.response(self.send(command, **arguments), timeout_s)

    def event(self, name: str, predicate: Callable[[dict], bool] | None = None, after: int = 0,
              timeout_s: float | None = None) -> dict[str, Any]:
        """The first event called ``name`` (matching ``predicate``) at index ``after`` or later."""
        def find() -> dict[str, Any] | None:
            for ev in self.events[after:]:
                if ev.get("event") == name and (predicate is None or predicate(ev.get("body") or {})):
                    return ev
            return None

        return self._wait(find, f"{name!r} event", timeout_s)

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ what an IDE does

    def attach(self, breakpoints: dict[str, list[int]], **attach_args: Any) -> dict[str, list[dict]]:
        """Attach in the order debugpy needs (see RECIPES.md); returns the breakpoints as verified.

        initialize -> attach (not awaited) -> initialized -> setBreakpoints ->
        setExceptionBreakpoints -> configurationDone -> attach response.
        """
        self.request("initialize", clientID="kt-tests", adapterID="debugpy", pathFormat="path",
                     linesStartAt1=True, columnsStartAt1=True, supportsVariableType=True)
        attach_args.setdefault("justMyCode", True)
        attach_seq = self.send("attach", **attach_args)
        self.event("initialized")
        verified = {}
        for path, lines in breakpoints.items():
            body = self.request("setBreakpoints", source={"path": path},
                                breakpoints=[{"line": n} for n in lines])
            verified[path] = body.get("breakpoints", [])
        self.request("setExceptionBreakpoints", filters=[])
        self.request("configurationDone")
        self.response(attach_seq)
        return verified

    def stopped(self, after: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
        """The next ``stopped`` event's body (at event index ``after`` or later)."""
        return self.event("stopped", after=after, timeout_s=timeout_s)["body"]

    def top_frame(self, thread_id: int) -> dict[str, Any]:
        """The innermost frame of a stopped thread."""
        return self.request("stackTrace", threadId=thread_id, startFrame=0, levels=20)["stackFrames"][0]

    def locals(self, frame_id: int) -> dict[str, str]:
        """name -> value (as debugpy shows it) of a frame's locals."""
        scopes = self.request("scopes", frameId=frame_id)["scopes"]
        ref = next(s["variablesReference"] for s in scopes if s["name"].lower().startswith("locals"))
        return {v["name"]: v["value"] for v in self.request("variables", variablesReference=ref)["variables"]}

    def evaluate(self, expression: str, frame_id: int) -> str:
        """An expression's value in a frame, as text."""
        return self.request("evaluate", expression=expression, frameId=frame_id, context="repl")["result"]

    def step_and_wait(self, command: str, thread_id: int) -> dict[str, Any]:
        """``next`` / ``stepIn`` / ``stepOut``, then the frame it stopped in."""
        mark = len(self.events)
        self.request(command, threadId=thread_id)
        self.stopped(after=mark)
        return self.top_frame(thread_id)

    def disconnect(self) -> None:
        """Detach, leaving the debuggee running."""
        try:
            self.request("disconnect", terminateDebuggee=False, restart=False)
        finally:
            self.close()
