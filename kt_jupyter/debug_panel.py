"""JupyterLab's own debugger panel on ``%%kt`` cells: breakpoints set in the notebook hit in the pod kernel.

JupyterLab's debugger talks DAP to the notebook kernel (``debug_request`` on
the control channel); ipykernel answers with its :class:`~ipykernel.debugger.Debugger`,
which drives a debugpy inside the notebook kernel. ``%load_ext kt_jupyter``
turns that debugger into a :class:`KtDebugger`, which adds the pod kernels:

- **Cells.** JupyterLab names a cell's file by hashing its text
  (``debugInfo``: Murmur2, seed, temp prefix). For a ``%%kt`` cell the magic
  computes the same path (:func:`ipykernel.compiler.get_file_name` over the
  exact cell text) and the pod kernel compiles the cell under it, line for
  line (the magic line becomes a comment), so the panel's breakpoints,
  current-line marker and "source" all name the notebook cell.
- **Breakpoints** in a ``%%kt`` cell (``dumpCell`` tells which cells those are)
  are kept for its compute. When such a cell runs with the debugger on, the
  magic starts debugpy in the pod (loopback only, reached through the
  backend's forward, as for ``%%kt --debug``), attaches one DAP link to it and
  sets the compute's breakpoints there, then runs the cell.
- **Ids.** Thread, frame and variable ids from a pod's debugpy are shifted by
  ``(index + 1) * ID_SPAN`` on the way to JupyterLab and back on the way to
  the pod, so requests reach the debugpy that owns the id, and the notebook's
  own cells keep debugging locally as before.

The link detaches when the panel's debugger stops (``disconnect``): the pod
kernel and its variables stay.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pod_kernel.debugging import SKIP_MODULES

if TYPE_CHECKING:  # the mixin's methods call ipykernel's Debugger's (super()): it is mixed into that class
    from ipykernel.debugger import Debugger as _DebuggerBase
else:
    _DebuggerBase = object

log = logging.getLogger("kt_jupyter.debug_panel")

#: Ids of a pod's debugpy are shifted into their own range of this size.
ID_SPAN = 1 << 28
#: Events of a pod's debugpy kept for :meth:`PodDapLink._wait_event`.
EVENTS_KEPT = 256
#: Seconds to wait for a pod's debugpy to answer one request.
DAP_TIMEOUT_S = 30.0
#: Worker threads that wait on pods' debugpy for JupyterLab's requests (never on the control channel's loop).
DAP_WORKERS = 4
#: Modules whose frames a pod's stack traces leave out: what runs a cell, not the cell. The ones pdb skips in
#: the pod (one list), as debugpy names them: a module rule covers its submodules ("IPython" hides "IPython.core").
HIDDEN_MODULES = tuple(dict.fromkeys(pattern.removesuffix(".*") for pattern in SKIP_MODULES))
#: Requests whose ``threadId`` argument names the thread they act on.
THREAD_REQUESTS = frozenset({"stackTrace", "continue", "next", "stepIn", "stepOut", "pause", "stepBack",
                             "reverseContinue", "goto", "restartFrame"})
#: Requests whose ``frameId`` argument names the frame they act on.
FRAME_REQUESTS = frozenset({"scopes", "evaluate", "setExpression", "completions", "richInspectVariables"})


class DapError(Exception):
    """A pod's debugpy refused a request, did not answer, or went away."""


class PodDapLink:
    """One DAP connection to the debugpy of a pod kernel (through the backend's port forward)."""

    def __init__(self, compute: str, host: str, port: int, on_event: Callable[[dict[str, Any]], None],
                 timeout_s: float = DAP_TIMEOUT_S) -> None:
        self.compute = compute
        self.on_event = on_event
        self.timeout_s = timeout_s
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.settimeout(None)
        self._seq = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._responses: dict[int, dict[str, Any]] = {}
        #: recent events (attach waits on 'initialized'); bounded: a debug session's output events never stop
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.closed = False
        #: puts a cell's file in the pod (set by KtDebugger.link_pod), and the files it put there
        self.write_file: Callable[[str, str], Any] = lambda path, text: None
        self.written: set[str] = set()
        self._reader = threading.Thread(target=self._read, name=f"kt-dap-{compute}", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ wire

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> int:
        """Send a request; returns its seq (the response is :meth:`response`)."""
        with self._lock:
            self._seq += 1
            msg = {"seq": self._seq, "type": "request", "command": command, "arguments": arguments or {}}
            body = json.dumps(msg).encode()
            try:
                self._sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            except OSError as exc:
                raise DapError(f"the debugger of pod kernel {self.compute!r} went away: {exc}") from None
            return self._seq

    def response(self, seq: int) -> dict[str, Any]:
        """The response to request ``seq`` (waits)."""
        with self._cond:
            if not self._cond.wait_for(lambda: seq in self._responses or self.closed, self.timeout_s):
                raise DapError(f"the debugger of pod kernel {self.compute!r} did not answer in {self.timeout_s:g} s")
            if seq not in self._responses:
                raise DapError(f"the debugger of pod kernel {self.compute!r} went away")
            return self._responses.pop(seq)

    def request(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and wait for its response (the whole message)."""
        return self.response(self.send(command, arguments))

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                while len(buf) < length:
                    data = self._sock.recv(max(65536, length - len(buf)))
                    if not data:
                        return
                    buf += data
                msg, buf = json.loads(buf[:length]), buf[length:]
                if msg.get("type") == "response":
                    with self._cond:
                        self._responses[msg["request_seq"]] = msg
                        self._cond.notify_all()
                elif msg.get("type") == "event":
                    with self._cond:
                        self._events.append(msg)
                        self._cond.notify_all()
                    try:
                        self.on_event(msg)
                    except Exception:  # never kill the reader over one event
                        log.exception("forwarding a debug event of %s failed", self.compute)
        except (OSError, ValueError, StopIteration) as exc:
            log.debug("debug link to %s ended: %s", self.compute, exc)
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def _wait_event(self, name: str) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(e.get("event") == name for e in self._events) or self.closed,
                                     self.timeout_s)
            found = next((e for e in self._events if e.get("event") == name), None)
        if not ok or found is None:
            raise DapError(f"the debugger of pod kernel {self.compute!r} sent no {name!r} event")
        return found

    # ------------------------------------------------------------------ session

    def attach(self, breakpoints: dict[str, list[dict[str, Any]]], just_my_code: bool = True
               ) -> dict[str, dict[str, Any]]:
        """initialize → attach → initialized → setBreakpoints → configurationDone → attach response.

        Returns each path's setBreakpoints response (with debugpy's own ids).
        """
        init = self.request("initialize", {"clientID": "kt-jupyterlab", "adapterID": "debugpy", "pathFormat": "path",
                                           "linesStartAt1": True, "columnsStartAt1": True,
                                           "supportsVariableType": True})
        if not init.get("success"):
            raise DapError(f"debugpy in {self.compute!r} refused initialize: {init.get('message')}")
        # the panel shows the user's frames, not the pod kernel's machinery (as ipykernel hides its own)
        rules = [{"module": name, "include": False} for name in HIDDEN_MODULES]
        rules.append({"path": "**/pod_kernel/**", "include": False})  # its __main__ too, wherever it lives
        attach_seq = self.send("attach", {"justMyCode": just_my_code, "rules": rules})
        self._wait_event("initialized")
        verified = {path: self.request("setBreakpoints", {"source": {"path": path}, "breakpoints": bps})
                    for path, bps in breakpoints.items()}
        self.request("setExceptionBreakpoints", {"filters": []})
        self.request("configurationDone")
        attached = self.response(attach_seq)
        if not attached.get("success"):
            raise DapError(f"debugpy in {self.compute!r} refused attach: {attached.get('message')}")
        return verified

    def close(self) -> None:
        """Detach (the pod kernel keeps running) and close the connection."""
        if not self.closed:
            try:
                self.send("disconnect", {"terminateDebuggee": False, "restart": False})
            except DapError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()


# ---------------------------------------------------------------------- id translation


def shift_body(command: str, body: dict[str, Any], offset: int) -> None:
    """Shift the ids in a pod's response body (``command``'s) or event body by ``offset``, in place."""
    def ref(d: dict[str, Any], key: str) -> None:
        if isinstance(d.get(key), int) and d[key] > 0:
            d[key] += offset

    for frame in body.get("stackFrames") or []:
        ref(frame, "id")
    for thread in body.get("threads") or []:
        ref(thread, "id")
    for scope in body.get("scopes") or []:
        ref(scope, "variablesReference")
    for var in body.get("variables") or []:
        ref(var, "variablesReference")
    if command in ("evaluate", "setExpression", "setVariable"):
        ref(body, "variablesReference")
    ref(body, "threadId")


def routing_id(command: str, arguments: dict[str, Any]) -> int | None:
    """The thread, frame or variable id in a request's arguments that decides which debugpy gets it, or None."""
    if command in THREAD_REQUESTS:
        return arguments.get("threadId")
    if command in FRAME_REQUESTS:
        return arguments.get("frameId")
    if command in ("variables", "setVariable"):
        return arguments.get("variablesReference")
    if command == "copyToGlobals":
        return arguments.get("srcFrameId")
    return None


# ---------------------------------------------------------------------- the kernel's debugger


def install(shell: Any) -> bool:
    """Make the notebook kernel's debugger a KtDebugger (in place); False where there is none.

    Terminal IPython has no kernel, hence no debugger: nothing is imported then.
    """
    debugger = getattr(getattr(shell, "kernel", None), "debugger", None)
    if debugger is None:
        return False
    if isinstance(debugger, KtDebuggerMixin):
        return True
    try:
        from ipykernel.debugger import Debugger
    except ImportError:
        return False
    if type(debugger) is not Debugger:  # a kernel with its own debugger: leave it alone
        return False
    debugger.__class__ = _debugger_class()  # keeps its state: the panel may be on already
    cast(KtDebuggerMixin, debugger)._kt_init()
    return True


def uninstall(shell: Any) -> None:
    """Make the notebook kernel's KtDebugger ipykernel's own Debugger again (pod links detached)."""
    debugger = getattr(getattr(shell, "kernel", None), "debugger", None)
    if not isinstance(debugger, KtDebuggerMixin):
        return
    from ipykernel.debugger import Debugger

    debugger.detach_pods()
    debugger.kt_pool.shutdown(wait=False)
    debugger.__class__ = Debugger  # type: ignore[assignment]  # back to the class it was
    KtDebuggerMixin._point_handlers(debugger)  # ipykernel's own methods again


def active_debugger(shell: Any) -> KtDebuggerMixin | None:
    """The notebook kernel's KtDebugger when JupyterLab's debugger is on, else None."""
    debugger = getattr(getattr(shell, "kernel", None), "debugger", None)
    if isinstance(debugger, KtDebuggerMixin) and debugger.is_started:
        return debugger
    return None


@functools.lru_cache(maxsize=1)
def _debugger_class() -> type:
    from ipykernel.debugger import Debugger

    return type("KtDebugger", (KtDebuggerMixin, Debugger), {"__doc__": KtDebuggerMixin.__doc__})


class KtDebuggerMixin(_DebuggerBase):
    """ipykernel's debugger, plus the pod kernels of ``%%kt`` cells (see the module docstring).

    Mixed into :class:`ipykernel.debugger.Debugger` by :func:`install`.
    """

    # the base class's state this mixin uses (set by ipykernel's Debugger.__init__)
    is_started: bool
    stopped_threads: set[int]
    breakpoint_list: dict[str, list[dict[str, Any]]]
    started_debug_handlers: dict[str, Any]
    static_debug_handlers: dict[str, Any]
    event_callback: Callable[[dict[str, Any]], None]

    def _kt_init(self) -> None:
        self._point_handlers()
        self.kt_cells: dict[str, str] = {}  # cell file -> compute name (from dumpCell)
        self.kt_code: dict[str, str] = {}  # cell file -> the cell's text (from dumpCell)
        self.kt_breakpoints: dict[str, list[dict[str, Any]]] = {}  # cell file -> breakpoints asked
        self.kt_links: list[PodDapLink] = []  # index i owns ids [(i + 1) * ID_SPAN, (i + 2) * ID_SPAN)
        self.kt_lock = threading.Lock()
        self.kt_stops: dict[int, int] = {}  # pod thread -> how many times it stopped (orders events and replies)
        #: where requests that wait on a pod run (:meth:`_off_loop`); its threads are not debugged themselves
        self.kt_pool = concurrent.futures.ThreadPoolExecutor(DAP_WORKERS, "kt-dap-request", initializer=_untraced)

    def _point_handlers(self) -> None:
        # ipykernel built its handler tables from bound methods: point them at this object's class's methods
        for table in (self.started_debug_handlers, self.static_debug_handlers):
            for msg_type in list(table):
                table[msg_type] = getattr(self, msg_type)

    # ------------------------------------------------------------------ JupyterLab's requests

    async def dumpCell(self, message: dict[str, Any]) -> dict[str, Any]:
        """Write the cell's file as ipykernel does; remember ``%%kt`` cells and their compute."""
        reply = await super().dumpCell(message)
        code = message["arguments"]["code"]
        if code.lstrip().startswith("%%kt"):
            from .magics.args import compute_of_cell  # the line's own parser: not the magics themselves

            self.kt_cells[reply["body"]["sourcePath"]] = compute_of_cell(code)
            self.kt_code[reply["body"]["sourcePath"]] = code
        return reply

    async def setBreakpoints(self, message: dict[str, Any]) -> dict[str, Any]:
        """Breakpoints in a ``%%kt`` cell go to its pod kernel (now if linked, else when the cell runs)."""
        path = message["arguments"]["source"]["path"]
        compute = self.kt_cells.get(path)
        if compute is None:
            return await super().setBreakpoints(message)
        asked = message["arguments"].get("breakpoints") or []
        self.kt_breakpoints[path] = asked
        self.breakpoint_list[path] = [{"line": b["line"]} for b in asked]
        link = self._link_for(compute)
        if link is not None:
            reply = await self._off_loop(self._set_pod_breakpoints, link, path, asked)
            return dict(reply, request_seq=message["seq"], seq=message["seq"])
        pending = [{"verified": True, "line": b["line"], "source": {"path": path},
                    "message": f"set in pod kernel {compute!r} when the cell runs"} for b in asked]
        return {"type": "response", "request_seq": message["seq"], "seq": message["seq"], "success": True,
                "command": "setBreakpoints", "body": {"breakpoints": pending}}

    def _set_pod_breakpoints(self, link: PodDapLink, path: str, asked: list[dict[str, Any]]) -> dict[str, Any]:
        if path not in link.written:
            link.write_file(path, pod_source(self.kt_code.get(path, "")))
            link.written.add(path)
        return link.request("setBreakpoints", {"source": {"path": path}, "breakpoints": asked})

    async def _off_loop(self, blocking: Callable[..., Any], *args: Any) -> Any:
        """Run a call that waits on a pod (its debugpy, its kernel) in a worker thread: the control channel's
        loop goes on serving JupyterLab meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.kt_pool, blocking, *args)

    async def process_request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Requests about a pod's thread, frame or variable go to that pod's debugpy; the rest as before."""
        command = str(message.get("command") or "")
        arguments = message.get("arguments") or {}
        target = routing_id(command, arguments)
        if (self.is_started and command == "continue" and isinstance(target, int) and target < ID_SPAN
                and target not in self.stopped_threads):
            # JupyterLab 4's continue() drops the stopped thread from its model before it reads the thread id,
            # so it asks for thread 1; a local debugpy answers a continue of a running thread only once that
            # thread resumes (never): send it to the stopped pod thread instead
            pod_thread = next((t for t in sorted(self.stopped_threads) if t >= ID_SPAN), None)
            if pod_thread is not None:
                message = dict(message, arguments=dict(arguments, threadId=pod_thread))
                target = pod_thread
        if self.is_started and isinstance(target, int) and target >= ID_SPAN:
            return await self._off_loop(self._to_pod, message, target)
        reply = await super().process_request(message)
        if command == "disconnect":
            self.detach_pods()
        elif command == "debugInfo" and reply.get("body") is not None:
            reply["body"]["stoppedThreads"] = sorted(self.stopped_threads)
        return reply

    def _to_pod(self, message: dict[str, Any], target: int) -> dict[str, Any]:
        index = target // ID_SPAN - 1
        with self.kt_lock:
            link = self.kt_links[index] if 0 <= index < len(self.kt_links) else None
        offset = (index + 1) * ID_SPAN
        command = message["command"]
        fail = {"type": "response", "request_seq": message["seq"], "seq": message["seq"], "success": False,
                "command": command}
        if link is None or link.closed:
            return dict(fail, message="that pod kernel's debugger is detached")
        args = dict(message.get("arguments") or {})
        for key in ("threadId", "frameId", "variablesReference", "srcFrameId"):
            if isinstance(args.get(key), int) and args[key] >= offset:
                args[key] -= offset
        if command == "copyToGlobals":
            return dict(fail, message="copying a pod kernel's variable into the notebook is not supported; "
                                      "pull it with %kt pull NAME after the cell")
        if command == "richInspectVariables":  # what ipykernel does for a stopped frame, asked of the pod
            code = f"get_ipython().display_formatter.format({args['variableName']})"
            reply = link.request("evaluate", {"expression": code, "frameId": args["frameId"], "context": "clipboard"})
            data, metadata = ({}, {})
            if reply.get("success"):
                try:
                    data, metadata = _literal(reply["body"]["result"])
                except Exception:  # a repr we cannot read back: show nothing rich
                    data, metadata = {}, {}
            return dict(fail, success=True, body={"data": data,
                                                  "metadata": {k: v for k, v in metadata.items() if k in data}})
        with self.kt_lock:
            stops_before = self.kt_stops.get(target, 0)
        try:
            reply = link.request(command, args)
        except DapError as exc:
            return dict(fail, message=str(exc))
        body = reply.get("body")
        if isinstance(body, dict):
            shift_body(command, body, offset)
        if command == "continue" and reply.get("success"):
            with self.kt_lock:  # unless it has stopped again already (its event can beat this response here)
                if self.kt_stops.get(target, 0) == stops_before:
                    self.stopped_threads.discard(target)
        return dict(reply, request_seq=message["seq"], seq=message["seq"])

    # ------------------------------------------------------------------ the magic's side

    def wants(self, cell_file: str) -> bool:
        """Whether a ``%%kt`` cell with this file should run under the panel's debugger (it has breakpoints)."""
        return bool(self.kt_breakpoints.get(cell_file))

    def link_pod(self, compute: str, host: str, port: int, write_file: Callable[[str, str], object]) -> None:
        """Attach to a pod kernel's debugpy (once per compute) with the breakpoints of its cells.

        ``write_file(path, text)`` puts a cell's file in the pod (debugpy only
        verifies breakpoints in files that exist), before its breakpoints are set.
        """
        with self.kt_lock:
            link = self._link_for(compute)
            if link is not None:
                return
            index = len(self.kt_links)
            offset = (index + 1) * ID_SPAN
            link = PodDapLink(compute, host, port, on_event=lambda msg: self._pod_event(msg, offset))
            link.write_file = write_file
            self.kt_links.append(link)
        mine = {path: bps for path, bps in self.kt_breakpoints.items() if self.kt_cells.get(path) == compute}
        for path in mine:
            write_file(path, pod_source(self.kt_code.get(path, "")))
            link.written.add(path)
        try:
            link.attach(mine, just_my_code=True)  # the cell and the user's code: not IPython's or the pod kernel's
        except DapError:
            link.close()
            raise

    def _link_for(self, compute: str) -> PodDapLink | None:
        return next((lk for lk in self.kt_links if lk.compute == compute and not lk.closed), None)

    def _pod_event(self, msg: dict[str, Any], offset: int) -> None:
        body = msg.get("body")
        if not isinstance(body, dict):
            body = {}
        shift_body(msg.get("event", ""), body, offset)
        event = msg.get("event")
        if event == "stopped" and isinstance(body.get("threadId"), int):
            with self.kt_lock:
                self.stopped_threads.add(body["threadId"])
                self.kt_stops[body["threadId"]] = self.kt_stops.get(body["threadId"], 0) + 1
            body["allThreadsStopped"] = False  # JupyterLab asks for this thread; ipykernel's queue is local-only
        elif event == "continued":
            if body.get("allThreadsContinued"):
                self.stopped_threads = {t for t in self.stopped_threads if not offset <= t < offset + ID_SPAN}
            else:
                self.stopped_threads.discard(body.get("threadId"))
        elif event in ("initialized", "process", "output", "module", "loadedSource", "debugpyWaitingForServer",
                       "debugpySockets", "terminated", "exited", "breakpoint"):
            return  # the pod's session housekeeping: JupyterLab's session is the notebook kernel's
        self.event_callback(msg)

    def detach_pods(self) -> None:
        """Detach every pod link (the pods' kernels keep running)."""
        with self.kt_lock:
            links, self.kt_links = self.kt_links, []
        for link in links:
            link.close()
        self.stopped_threads = {t for t in self.stopped_threads if t < ID_SPAN}


def _untraced() -> None:
    """Mark a worker thread as debugger machinery (as ipykernel marks its own): debugpy leaves it alone."""
    thread = threading.current_thread()
    thread.pydev_do_not_trace = True  # type: ignore[attr-defined]
    thread.is_pydev_daemon_thread = True  # type: ignore[attr-defined]


def _literal(text: str) -> Any:
    import ast

    return ast.literal_eval(text)


def pod_source(cell_text: str) -> str:
    """What the pod kernel runs for a ``%%kt`` cell's text: the magic line as a comment, lines unchanged."""
    return "# " + cell_text.lstrip() if cell_text.lstrip().startswith("%%kt") else cell_text
