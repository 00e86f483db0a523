"""One WebSocket session to one pod kernel: execute, stream, interrupt, push/pull, reconnect.

The notebook's main thread already runs ipykernel's event loop, so every
session runs on one shared asyncio loop in a background thread
(:func:`client_loop`). Each operation exists as a coroutine (``a``-prefixed,
for asyncio users and the seed API) and as a blocking method for the magic.
Blocking :meth:`Session.execute` delivers output callbacks in the calling
thread, so in a notebook they land in the cell that ran them, and turns
Ctrl-C into a remote interrupt.

A dropped connection is resumed: the session reconnects with the last
sequence number it saw and the pod kernel replays what came after; requests
in flight are sent again (executes are deduplicated by id on the pod).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import itertools
import json
import logging
import os
import pickle
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from pod_kernel import protocol as P
from pod_kernel.bulk import BULK_MIN_BYTES, client_transfer

from .errors import (
    AuthError,
    ConnectionLostError,
    KernelDiedError,
    KtError,
    ProtocolMismatchError,
    RemoteError,
    RemoteTimeoutError,
    TransferError,
)

log = logging.getLogger("kt_jupyter.client")


#: The logger our websockets connections use (``websockets.client`` would print the token at DEBUG).
ws_log = logging.getLogger("kt_jupyter.client.websockets")
ws_log.addFilter(P.RedactBearer())

#: How long a dropped connection is retried before giving up.
RECONNECT_TIMEOUT_S = 30.0
#: Connection attempt timeout (TCP + WebSocket handshake).
OPEN_TIMEOUT_S = 10.0
#: Seconds between heartbeats (WebSocket pings), whether a cell runs or not.
HEARTBEAT_INTERVAL_S = 10.0
#: A pod kernel that answers no heartbeat within this many seconds is taken as unreachable. Generous,
#: because a cell in native code that holds the GIL also keeps the pod's network thread from answering.
HEARTBEAT_TIMEOUT_S = 30.0

OutputCallback = Callable[[dict[str, Any]], None]
#: Answers a remote ``input()`` / pdb prompt: (prompt, password) -> the line typed. EOFError: no answer.
InputCallback = Callable[[str, bool], str]
ProgressCallback = Callable[[int, int], None]
#: Returns None while the kernel lives, else a sentence saying how it ended.
Liveness = Callable[[], str | None]

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def client_loop() -> asyncio.AbstractEventLoop:
    """The process-wide asyncio loop all sessions run on (a daemon thread, started once)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=_run, name="kt-client-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


@dataclass
class ExecuteResult:
    """How a cell ended: its execution count and the mime bundle of its last expression."""

    execution_count: int | None
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    #: the pod's answer to the execute's ``check`` (what the cell changed; see pod_kernel.coherence), or None.
    #: A failed cell's exception carries it as ``kt_state``, and ``kt_post_mortem``: the request id whose
    #: frames the pod keeps for ``%debug``.
    state: dict[str, Any] | None = None
    #: names the execute required that the pod lacks: the cell did not run (send them, then run it again)
    missing: list[str] = field(default_factory=list)


#: What pdb's prompt contains (a prompt nothing can answer gets "c": the cell goes on).
PDB_PROMPT = "(Pdb)"


def fallback_answer(prompt: str) -> str | None:
    """The answer when nothing can answer a remote prompt: continue pdb; None (EOFError) for input()."""
    return "c" if PDB_PROMPT in prompt else None


class KtClientConnection(ClientConnection):
    """A client connection whose heartbeat pings never touch the user's ``random`` state.

    websockets draws ping payloads from the global :mod:`random` module: every
    heartbeat would shift the numbers of a notebook that called ``random.seed``.
    """

    async def ping(self, data: Any = None) -> Any:
        """Send a ping; its payload comes from ``os.urandom`` when none is given."""
        return await super().ping(os.urandom(8) if data is None else data)


@dataclass
class _Execution:
    on_output: OutputCallback | None
    reply: asyncio.Future
    #: input_request messages go to on_output, whose caller answers them (Session.execute); else automatic
    answers_input: bool = False
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    """A value request waiting for its reply (or a bundle being received for it)."""

    reply: asyncio.Future
    on_progress: ProgressCallback | None = None
    assembler: P.BundleAssembler | None = None
    header: dict[str, Any] = field(default_factory=dict)
    bulk_ready: asyncio.Future | None = None


@dataclass
class _Conn:
    ws: ClientConnection
    closed: asyncio.Future
    welcome: dict[str, Any]


def _exception_by_name(ename: str, evalue: str, allow_import: bool = True) -> BaseException | None:
    """A builtin (or, with ``allow_import``, importable) exception type rebuilt from its name, else None.

    Importing a module runs its code: a pod that may not send pickles (JSON-only)
    may not make the notebook import anything either, so only builtins then.
    """
    import builtins
    import importlib

    module, _, name = ename.rpartition(".")
    if module and not allow_import:
        return None
    try:
        typ = getattr(importlib.import_module(module), name) if module else getattr(builtins, name)
        if isinstance(typ, type) and issubclass(typ, BaseException) and module not in ("__main__",):
            return typ(evalue)
    except Exception:
        pass
    return None


def rebuild_exception(reply: Mapping[str, Any], payload: bytes, accept_pickle: bool = True) -> BaseException:
    """The remote exception as its real type when it unpickles here, else a RemoteError.

    With ``accept_pickle`` false (a JSON-only compute) the pickled payload is never
    loaded: the type is rebuilt by name when it is a builtin, else a RemoteError.
    """
    tb_text = "\n".join(reply.get("traceback") or [])
    exc: BaseException | None = None
    if payload and accept_pickle:
        try:
            exc = pickle.loads(payload)
            if not isinstance(exc, BaseException) or type(exc).__module__ in ("__main__", "__mp_main__"):
                exc = None
        except Exception:
            exc = None
    if exc is None:
        exc = _exception_by_name(str(reply.get("ename", "")), str(reply.get("evalue", "")), allow_import=accept_pickle)
    if exc is None:
        exc = RemoteError(str(reply.get("ename", "Exception")), str(reply.get("evalue", "")), tb_text)
    lines = list(reply.get("traceback") or [])
    try:
        exc.remote_traceback = tb_text  # type: ignore[attr-defined]
        exc.remote_ename = reply.get("ename")  # type: ignore[attr-defined]
        # IPython (and so the notebook) shows this instead of a local traceback through our code
        exc._render_traceback_ = lambda: lines or [f"{reply.get('ename')}: {reply.get('evalue')}"]  # type: ignore
    except AttributeError:  # an exception type without __dict__
        exc = RemoteError(str(reply.get("ename", "Exception")), str(reply.get("evalue", "")), tb_text)
        exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
    return exc


class Session:
    """A client session to one pod kernel at ``url`` (``ws://host:port``)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        name: str = "default",
        liveness: Liveness | None = None,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        on_notice: Callable[[dict[str, Any]], None] | None = None,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        bulk_host: str | None = None,
        accept_pickle: bool = True,
        bulk_resolver: Callable[[int], tuple[str, int] | None] | None = None,
    ) -> None:
        self.url = url
        #: whether pickled payloads from the pod are loaded here; False for a JSON-only compute, so a
        #: misbehaving pod cannot make the notebook unpickle anything (False too once the pod says it is)
        self.accept_pickle = accept_pickle
        #: host of the pod's bulk channel (None: bundles travel over the WebSocket only)
        self.bulk_host = bulk_host
        #: the pod's bulk port -> the address reaching it from here (a port-forward's), or None: WebSocket only.
        #: Without one, the bulk channel is at bulk_host and the pod's own port.
        self.bulk_resolver = bulk_resolver
        self._token = token
        self.name = name
        self.session_id = uuid.uuid4().hex
        self.liveness = liveness
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_notice = on_notice
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        #: why the last connection dropped, when we know (e.g. no heartbeat answer)
        self.last_drop: str | None = None
        self.last_seq = 0
        self.reconnects = 0
        self.pod_pid: int | None = None
        self.allowed_serialization: list[str] = list(P.SERIALIZATIONS)
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._send_lock: asyncio.Lock | None = None
        self._executions: dict[str, _Execution] = {}
        #: check answers of executions given up on (timeout), taken by the next cell (:meth:`take_orphan_states`)
        self._orphan_states: collections.deque[dict[str, Any]] = collections.deque()
        self._streams: dict[str, OutputCallback] = {}
        self._pending: dict[str, _Pending] = {}
        self._closed = False
        self._dead: KtError | None = None
        #: name -> id() of the object the pod bound, for the last push (tells a rebinding apart)
        self.last_push_ids: dict[str, int] = {}
        #: called (on the client loop) with sequenced messages of requests this session did not send:
        #: a follower of a detached session (:meth:`follow`) shows them
        self.on_unsolicited: Callable[[dict[str, Any]], None] | None = None

    def __repr__(self) -> str:
        return f"<kt Session {self.name!r} {self.url} pid={self.pod_pid}>"

    # ------------------------------------------------------------------ blocking API

    def _run(self, coro, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, client_loop())
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RemoteTimeoutError(f"no answer from pod kernel {self.name!r} within {timeout:g} s") from None

    def connect(self, timeout: float | None = OPEN_TIMEOUT_S) -> dict[str, Any]:
        """Open the connection now; returns the pod kernel's welcome message."""
        return self._run(self.aconnect(), None if timeout is None else timeout + 1)

    def execute(
        self,
        code: str,
        on_output: OutputCallback | None = None,
        *,
        cell_name: str | None = None,
        cell_label: str | None = None,
        timeout: float | None = None,
        on_input: InputCallback | None = None,
        debug_wait: bool = False,
        check: Mapping[str, Any] | None = None,
        post_mortem: str | None = None,
        requires: Iterable[str] = (),
    ) -> ExecuteResult:
        """Run ``code``; output messages reach ``on_output`` in this thread as they arrive.

        Ctrl-C while waiting interrupts the remote cell (and keeps waiting for
        it to end). A remote error is raised as its real type when possible.
        When the cell reads input (``input()``, a pdb prompt), ``on_input(prompt,
        password)`` is called in this thread and its answer sent back (EOFError
        from it: EOFError remotely); without ``on_input`` a pdb prompt is
        answered "c" and ``input()`` gets EOFError. ``debug_wait``: the pod
        waits for a debugger to attach before running the cell. ``check``: what the pod
        checks when the cell ends (see :meth:`_aexecute`); a cell given up on (timeout)
        leaves its answer in :meth:`take_orphan_states` when it ends. ``post_mortem``:
        run pdb on the frames of that failed cell instead of ``code`` (``%debug``).
        ``requires``: names the pod must hold, else it runs nothing and says which
        it lacks (:attr:`ExecuteResult.missing`).
        """
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        done = object()
        req_id = self.new_id()
        fut = asyncio.run_coroutine_threadsafe(
            self._aexecute(code, outputs.put, cell_name=cell_name, cell_label=cell_label, req_id=req_id,
                           answers_input=True, debug_wait=debug_wait, check=check, post_mortem=post_mortem,
                           requires=requires),
            client_loop(),
        )
        fut.add_done_callback(lambda _f: outputs.put(done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = outputs.get(timeout=remaining)
            except queue.Empty:
                if check is not None:  # what the cell changed reaches the next cell's reconciliation
                    fut.add_done_callback(self._keep_orphan_state)
                self.interrupt(target=req_id)
                raise RemoteTimeoutError(
                    f"cell on {self.name!r} did not finish within {timeout:g} s; it was interrupted"
                ) from None
            except KeyboardInterrupt:
                self.interrupt(target=req_id)
                continue
            if item is done:
                result = fut.result()
                if isinstance(result, BaseException):
                    raise result  # raised here, in the caller's thread, never on the client loop
                return result
            if item.get("type") == "input_request":
                self._answer_input(req_id, item, on_input)
                continue
            if on_output is not None:
                on_output(item)

    def _keep_orphan_state(self, fut: concurrent.futures.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        result = fut.result()
        state = result.state if isinstance(result, ExecuteResult) else getattr(result, "kt_state", None)
        if state is not None:
            self._orphan_states.append(state)

    def take_orphan_states(self) -> list[dict[str, Any]]:
        """Check answers of cells :meth:`execute` gave up on (timeout) that ended since, oldest first."""
        taken = []
        while self._orphan_states:  # appended on the client loop: popleft is atomic
            taken.append(self._orphan_states.popleft())
        return taken

    def follow(self, detached: Mapping[str, Any], on_output: OutputCallback,
               check_s: float = 5.0) -> dict[str, Any] | None:
        """Show, in this thread, what a session that lost its client printed since, and follow its running cell.

        ``detached`` is one entry of the welcome's ``detached`` list (a notebook
        that restarted or closed mid-cell). Its unseen messages are replayed to
        ``on_output``; when its cell still runs, this waits for the cell's end,
        passing its live output on (Ctrl-C interrupts that cell). Returns that
        cell's execute_reply, or None when none ran. Nothing it sends is unpickled.
        """
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        follower = Session(self.url, self._token, name=self.name, liveness=self.liveness, accept_pickle=False,
                           heartbeat_interval_s=self.heartbeat_interval_s,
                           heartbeat_timeout_s=self.heartbeat_timeout_s)
        follower.session_id = str(detached["session"])
        follower.last_seq = int(detached.get("after_seq") or 0)
        follower.on_unsolicited = outputs.put
        running = detached.get("running")
        reply: dict[str, Any] | None = None
        shown = follower.last_seq
        try:
            end_seq = int(follower.connect().get("last_seq") or 0)
            while True:
                if shown >= end_seq and (not running or reply is not None):
                    return reply
                try:
                    item = outputs.get(timeout=check_s)
                except queue.Empty:
                    follower.ping()  # a kernel that died meanwhile raises here instead of a silent wait
                    continue
                except KeyboardInterrupt:
                    if running:
                        follower.interrupt(target=running)
                    continue
                shown = max(shown, int(item.get("seq") or 0))
                if item["type"] == "execute_reply":
                    if item.get("id") == running:
                        reply = item
                    if item.get("status") == "error":
                        on_output({"type": "stream", "name": "stderr",
                                   "text": "\n".join(map(str, item.get("traceback") or [])) + "\n"})
                elif item["type"] != "input_request":  # nobody here can answer that cell's prompts
                    on_output(item)
        finally:
            follower.close_quietly()

    def _answer_input(self, req_id: str, request: dict[str, Any], on_input: InputCallback | None) -> None:
        """Ask ``on_input`` (in this thread) and send the answer; Ctrl-C there interrupts the remote cell."""
        prompt, password = str(request.get("prompt", "")), bool(request.get("password"))
        try:
            value = on_input(prompt, password) if on_input is not None else fallback_answer(prompt)
        except EOFError:
            value = None
        except KeyboardInterrupt:
            self.interrupt(target=req_id)  # breaks the pod's wait: pdb quits, input() raises KeyboardInterrupt
            return
        self._run(self.areply_input(request.get("input_id"), value), timeout=OPEN_TIMEOUT_S)

    def push(self, values: Mapping[str, Any], *, serialization: str = "pickle",
             on_progress: ProgressCallback | None = None) -> list[str]:
        """Set names in the pod kernel's namespace."""
        return self._run(self.apush(values, serialization=serialization, on_progress=on_progress))

    def push_bundle(self, bundle: P.Bundle, *, on_progress: ProgressCallback | None = None) -> list[str]:
        """Send values already serialized with :func:`pod_kernel.protocol.dump_values`."""
        return self._run(self.apush_bundle(bundle, on_progress=on_progress))

    def pull(self, names: Iterable[str], *, serialization: str = "pickle",
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Fetch named values from the pod kernel's namespace."""
        return self._run(self.apull(names, serialization=serialization, on_progress=on_progress))

    def inventory(self, names: Iterable[str] | None = None, *, fingerprints: bool = False) -> list[dict[str, Any]]:
        """Name, type, size (and content fingerprint when asked) of the pod's values."""
        return self._run(self.ainventory(names, fingerprints=fingerprints))

    def delete(self, names: Iterable[str]) -> list[str]:
        """Remove names from the pod's namespace; returns those that existed."""
        return self._run(self.arequest({"type": "delete", "names": list(names)}))["removed"]

    def call(self, target: dict[str, Any], args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
             **options: Any) -> Any:
        """Blocking :meth:`acall`."""
        return self._run(self.acall(target, args, kwargs, **options))

    def sync_code(self, manifest: Mapping[str, str], read: Callable[[str], str]) -> list[str]:
        """Blocking :meth:`async_code`."""
        return self._run(self.async_code(manifest, read))

    def interrupt(self, target: str | None = None) -> bool:
        """KeyboardInterrupt in the running remote cell (``target``: only that execute id)."""
        return self._run(self.ainterrupt(target), timeout=OPEN_TIMEOUT_S)

    def metrics(self) -> dict[str, Any]:
        """One resource sample from the pod kernel."""
        return self._run(self.arequest({"type": "metrics"}))["metrics"]

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a heartbeat, in seconds."""
        t0 = time.perf_counter()
        self._run(self.arequest({"type": "ping"}), timeout)
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        """Ask the pod kernel to exit."""
        self._run(self.arequest({"type": "shutdown"}), timeout=OPEN_TIMEOUT_S)
        self.close()

    def close(self) -> None:
        """Close the connection (the pod kernel and its state stay)."""
        if self._closed:
            return
        self._run(self.aclose())

    def close_quietly(self) -> None:
        """Close, ignoring a connection that is already gone."""
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ async API

    def new_id(self) -> str:
        """A fresh request id."""
        return f"{self.session_id[:8]}-{next(self._ids)}"

    async def aconnect(self) -> dict[str, Any]:
        """Connect (or return the live connection's welcome)."""
        return (await self._ensure_conn()).welcome

    async def aexecute(self, code: str, on_output: OutputCallback | None = None, *,
                       cell_name: str | None = None, cell_label: str | None = None,
                       req_id: str | None = None) -> ExecuteResult:
        """Run ``code``; ``on_output`` is called on the client loop for each output message.

        A remote KeyboardInterrupt (or other non-Exception) arrives as RemoteError,
        so it cannot stop the caller's event loop.
        """
        result = await self._aexecute(code, on_output, cell_name=cell_name, cell_label=cell_label, req_id=req_id)
        if isinstance(result, Exception):
            raise result
        if isinstance(result, BaseException):
            raise RemoteError(type(result).__name__, str(result), getattr(result, "remote_traceback", ""))
        return result

    async def _aexecute(self, code: str, on_output: OutputCallback | None = None, *,
                        cell_name: str | None = None, cell_label: str | None = None,
                        req_id: str | None = None, answers_input: bool = False,
                        debug_wait: bool = False, check: Mapping[str, Any] | None = None,
                        post_mortem: str | None = None, requires: Iterable[str] = ()) -> ExecuteResult | BaseException:
        """Run ``code``; a remote error is returned (not raised) so the caller raises it where it belongs.

        ``check`` (``names``, ``held``, ``fingerprint_max_bytes``; see pod_kernel.coherence.CellCheck)
        rides on the execute request: the pod answers it when the cell ends, in the same reply, so a
        cell costs one round trip. The answer is :attr:`ExecuteResult.state`, or the exception's
        ``kt_state``; None from a pod that did not answer. ``requires``: names the pod must
        hold for the cell to run (those the notebook did not send again); a pod lacking one runs
        nothing and its reply lists them (:attr:`ExecuteResult.missing`).
        """
        req_id = req_id or self.new_id()
        t0 = time.perf_counter()
        ex = _Execution(on_output, asyncio.get_running_loop().create_future(),
                        answers_input=answers_input and on_output is not None)
        self._executions[req_id] = ex
        header = {"type": "execute", "id": req_id, "code": code}
        if cell_name:
            header["cell_name"] = cell_name
        if cell_label:
            header["cell_label"] = cell_label
        if debug_wait:
            header["debug_wait"] = True
        if check is not None:
            header["check"] = dict(check)
        if post_mortem is not None:
            header["post_mortem"] = post_mortem
        requires = list(requires)
        if requires:
            header["requires"] = requires
        try:
            reply, payload = await self._until_reply(header, ex.reply)
        finally:
            self._executions.pop(req_id, None)
        state = reply.get("state") if isinstance(reply.get("state"), dict) else None
        if reply.get("status") == "missing" and requires:
            lacked = [n for n in reply.get("missing") or [] if n in requires]
            return ExecuteResult(None, missing=lacked or requires)
        if reply.get("status") != "ok":
            exc = rebuild_exception(reply, payload, self.accept_pickle)
            exc.kt_state = state  # type: ignore[attr-defined]
            exc.kt_post_mortem = req_id if reply.get("post_mortem") is True else None  # type: ignore[attr-defined]
            return exc
        return ExecuteResult(reply.get("execution_count"), ex.data, ex.metadata, time.perf_counter() - t0, state)

    async def apush(self, values: Mapping[str, Any], *, serialization: str = "pickle",
                    on_progress: ProgressCallback | None = None) -> list[str]:
        """Set names remotely; large buffers go out of band, chunked."""
        try:
            bundle = await asyncio.to_thread(P.dump_values, dict(values), serialization)
        except Exception as exc:
            raise TransferError(f"cannot serialize {', '.join(values)} with {serialization}: {exc}") from exc
        return await self.apush_bundle(bundle, on_progress=on_progress)

    async def apush_bundle(self, bundle: P.Bundle, *, on_progress: ProgressCallback | None = None) -> list[str]:
        """Send a serialized bundle of values."""
        reply = await self.arequest({"type": "push"}, bundle=bundle, on_progress=on_progress)
        self.last_push_ids = dict(reply.get("ids") or {})
        return reply["names"]

    async def apull(self, names: Iterable[str], *, serialization: str = "pickle",
                    on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Fetch named values (big ones over the bulk channel when there is one)."""
        header = {"type": "pull", "names": list(names), "serialization": serialization}
        if self._bulk_address() is not None:
            header["bulk"] = True
        bundle = await self.arequest(header, on_progress=on_progress)
        return await asyncio.to_thread(self._load, bundle)

    async def ainventory(self, names: Iterable[str] | None = None, *, fingerprints: bool = False) -> list[dict]:
        """Describe the pod's values."""
        header: dict[str, Any] = {"type": "inventory", "fingerprints": fingerprints}
        if names is not None:
            header["names"] = list(names)
        return (await self.arequest(header))["values"]

    async def acall(self, target: dict[str, Any], args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    *, fn: Any = None, serialization: str = "json", stream: bool = False,
                    on_output: OutputCallback | None = None, keep: bool = False,
                    construct: dict[str, Any] | None = None) -> Any:
        """Run a seed-API call on the pod (see pod_kernel.calls for ``target``); return its result."""
        values: dict[str, Any] = {"args": list(args), "kwargs": dict(kwargs or {})}
        if fn is not None:
            values["fn"] = fn
        try:
            bundle = P.dump_values(values, serialization)
        except Exception as exc:
            raise TransferError(f"cannot serialize the call's arguments with {serialization}: {exc}; "
                                "pass serialization='pickle' for Python objects") from exc
        header: dict[str, Any] = {"type": "call", "target": target, "stream": stream, "keep": keep}
        if construct is not None:
            header["construct"] = construct
        req_id = self.new_id()
        if on_output is not None:
            self._streams[req_id] = on_output
        try:
            result = await self.arequest(header, bundle=bundle, req_id=req_id, resend=False)
        finally:
            self._streams.pop(req_id, None)
        return self._load(result)["result"]

    def _load(self, bundle: P.Bundle) -> dict[str, Any]:
        """Values of a bundle from the pod; a pickle is refused, unread, when pickle is not accepted."""
        if bundle.serialization == "pickle" and not self.accept_pickle:
            raise TransferError(
                f"pod kernel {self.name!r} sent a pickled payload to a JSON-only compute "
                "(allowed_serialization=['json']); it was refused without being unpickled"
            )
        return P.load_values(bundle)

    async def async_code(self, manifest: Mapping[str, str], read: Callable[[str], str]) -> list[str]:
        """Send the files of ``manifest`` (path -> hash) the pod lacks; returns the modules it reloaded."""
        need = (await self.arequest({"type": "sync", "files": dict(manifest)}))["need"]
        if not need:
            return []
        bundle = P.dump_values({rel: read(rel) for rel in need}, "json")
        return (await self.arequest({"type": "files"}, bundle=bundle))["reloaded"]

    async def areply_input(self, input_id: Any, value: str | None) -> bool:
        """Answer a cell's input_request; ``value`` None raises EOFError in the cell. False if none waited."""
        header: dict[str, Any] = {"type": "input_reply", "value": value or "", "eof": value is None}
        if isinstance(input_id, int):
            header["input_id"] = input_id
        return (await self.arequest(header))["accepted"]

    async def adebug(self) -> dict[str, Any]:
        """Start debugpy in the pod kernel (once): its port there, pid, and where cells and code live."""
        return await self.arequest({"type": "debug"})

    def debug(self, timeout: float = 60.0) -> dict[str, Any]:
        """Blocking :meth:`adebug`."""
        return self._run(self.adebug(), timeout)

    def write_cell_file(self, path: str, text: str, timeout: float = OPEN_TIMEOUT_S) -> bool:
        """Have the pod write a cell's file at ``path`` unless it exists (debugpy needs it for breakpoints)."""
        return bool(self._run(self.arequest({"type": "cell_file", "path": path, "text": text}), timeout)["written"])

    def adopt(self, pid: int, timeout: float = OPEN_TIMEOUT_S) -> bool:
        """Tell a local pod kernel that process ``pid`` uses it; False if it lives regardless (``--keep``)."""
        return bool(self._run(self.arequest({"type": "adopt", "pid": pid}), timeout)["adopted"])

    async def ainterrupt(self, target: str | None = None) -> bool:
        """Interrupt the running cell."""
        header: dict[str, Any] = {"type": "interrupt"}
        if target:
            header["target"] = target
        return (await self.arequest(header))["interrupted"]

    async def aclose(self) -> None:
        """Close the connection; pending operations fail with ConnectionLostError."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.ws.close()

    async def arequest(self, header: dict[str, Any], *, bundle: P.Bundle | None = None,
                       on_progress: ProgressCallback | None = None, req_id: str | None = None,
                       resend: bool = True) -> Any:
        """Send a request and return its reply header or bundle.

        After a reconnect the request is sent again, unless ``resend`` is
        False (a call that may already have run): then ConnectionLostError.
        """
        req_id = req_id or self.new_id()
        header = dict(header, id=req_id)
        while True:
            loop = asyncio.get_running_loop()
            pending = _Pending(loop.create_future(), on_progress, bulk_ready=loop.create_future())
            self._pending[req_id] = pending
            try:
                reply, _payload = await self._until_reply(header, pending.reply, bundle, on_progress, once=True,
                                                          bulk_ready=pending.bulk_ready)
                return reply
            except _Resend:
                if not resend:
                    raise ConnectionLostError(
                        f"the connection to {self.name!r} dropped during {header['type']!r}; "
                        "it may or may not have run remotely"
                    ) from None
                continue
            finally:
                self._pending.pop(req_id, None)

    # ------------------------------------------------------------------ internals

    async def _until_reply(self, header: dict[str, Any], reply: asyncio.Future,
                           bundle: P.Bundle | None = None, on_progress: ProgressCallback | None = None,
                           once: bool = False, bulk_ready: asyncio.Future | None = None,
                           ) -> tuple[dict[str, Any], bytes]:
        """Send ``header`` (and bundle) and wait for ``reply``, resending after reconnects.

        A big bundle goes over the bulk channel when the pod has one: the
        header asks for it, the pod answers with a one-time ticket, and the
        bytes flow over plain TCP from their own memory.
        """
        while True:
            conn = await self._ensure_conn()
            address = self._bulk_address() if bundle is not None and bundle.nbytes >= BULK_MIN_BYTES else None
            try:
                if address is not None and bulk_ready is not None:
                    await conn.ws.send(P.encode_frame(dict(header, bulk=True, serialization=bundle.serialization,
                                                           sizes=bundle.sizes)))
                    await asyncio.wait([bulk_ready, reply, conn.closed], return_when=asyncio.FIRST_COMPLETED)
                    if bulk_ready.done() and not reply.done():
                        try:
                            await asyncio.to_thread(client_transfer, address, bulk_ready.result(),
                                                    send=bundle.parts, progress=on_progress)
                        except OSError as exc:  # the pod answers a failed transfer, or the connection drops
                            log.debug("bulk push to %s failed: %s", self.name, exc)
                    bundle_sent = True
                else:
                    bundle_sent = False
                async with self._send_lock:
                    if bundle_sent:
                        pass
                    elif bundle is None:
                        await conn.ws.send(P.encode_frame(header))
                    else:
                        frames = P.bundle_frames(header, bundle)
                        await conn.ws.send(next(frames))
                        sent, total = 0, bundle.nbytes
                        for frame in frames:
                            await conn.ws.send(frame)
                            sent = min(total, sent + P.CHUNK_BYTES)
                            if on_progress is not None:
                                on_progress(sent, total)
            except ConnectionClosed:
                pass
            await asyncio.wait([reply, conn.closed], return_when=asyncio.FIRST_COMPLETED)
            if reply.done():
                return reply.result()
            if once:
                raise _Resend()

    async def _ensure_conn(self) -> _Conn:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise ConnectionLostError(f"session to {self.name!r} is closed")
        conn = self._conn
        if conn is not None and not conn.closed.done():
            return conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
            self._send_lock = asyncio.Lock()
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.closed.done():
                return conn
            reconnecting = conn is not None
            self._conn = await self._open(reconnecting)
            if reconnecting:
                self.reconnects += 1
            return self._conn

    def _died(self) -> KtError | None:
        if self.liveness is None:
            return None
        why = self.liveness()
        return None if why is None else KernelDiedError(why)

    async def _open(self, reconnecting: bool) -> _Conn:
        deadline = time.monotonic() + (self.reconnect_timeout_s if reconnecting else OPEN_TIMEOUT_S)
        delay = 0.02
        last_error: Exception | None = None
        while True:
            dead = self._died()
            if dead is not None:
                self._fail_all(dead)
                raise dead
            nonce = secrets.token_hex(P.NONCE_BYTES)
            try:
                ws = await connect(
                    self.url,
                    additional_headers={
                        P.HEADER_AUTH: f"Bearer {self._token}",
                        P.HEADER_PROTOCOL: str(P.PROTOCOL_VERSION),
                        P.HEADER_SESSION: self.session_id,
                        P.HEADER_LAST_SEQ: str(self.last_seq),
                        P.HEADER_NONCE: nonce,
                    },
                    compression=None,
                    max_size=P.MAX_FRAME_BYTES,
                    open_timeout=max(0.05, min(OPEN_TIMEOUT_S, deadline - time.monotonic())),
                    ping_interval=self.heartbeat_interval_s,
                    ping_timeout=self.heartbeat_timeout_s,
                    close_timeout=min(OPEN_TIMEOUT_S, self.heartbeat_timeout_s),
                    user_agent_header=None,
                    logger=ws_log,
                    create_connection=KtClientConnection,
                )
                welcome, _ = P.decode_frame(await ws.recv())
                await self._check_proof(ws, welcome, nonce)
                break
            except InvalidStatus as exc:
                body = (exc.response.body or b"").decode(errors="replace").strip()
                if exc.response.status_code == 401:
                    raise AuthError(f"pod kernel {self.name!r} rejected the token: {body}") from None
                if exc.response.status_code == 426:
                    raise ProtocolMismatchError(body) from None
                last_error = exc
            except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError, P.ProtocolError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                why = f"{self.last_drop}, and " if reconnecting and self.last_drop else ""
                err = ConnectionLostError(
                    f"cannot reach pod kernel {self.name!r} at {self.url}: {why}{last_error or 'no answer'}. "
                    "Check it with `%kt status`; `%kt restart` starts it again."
                )
                if reconnecting:
                    self._fail_all(err)
                raise err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.last_drop = None
        self.pod_pid = welcome.get("pid")
        self.allowed_serialization = welcome.get("allowed_serialization", self.allowed_serialization)
        if "pickle" not in self.allowed_serialization:
            self.accept_pickle = False
        closed = asyncio.get_running_loop().create_future()
        conn = _Conn(ws, closed, welcome)
        asyncio.create_task(self._read(conn))
        return conn

    async def _check_proof(self, ws: Any, welcome: dict[str, Any], nonce: str) -> None:
        """The pod proves it holds our token before anything it sends is used (mutual authentication).

        A process that took a dead kernel's port accepts any bearer token; without
        this check the notebook would load its pickles.
        """
        proof = welcome.get("proof")
        expected = P.pod_proof(self._token.encode(), nonce, self.session_id)
        if welcome.get("type") == "welcome" and isinstance(proof, str) and hmac.compare_digest(proof, expected):
            return
        try:
            await ws.close(1008, "the pod kernel did not prove it holds the token")
        except ConnectionClosed:
            pass
        raise AuthError(
            f"the process answering at {self.url} did not prove that it holds compute {self.name!r}'s token, "
            "so it is not your pod kernel (another process may have taken its port after it stopped): "
            "nothing it sent was used. `%kt status` shows the compute; `%kt restart` starts a new kernel.")

    def _bulk_address(self) -> tuple[str, int] | None:
        conn = self._conn
        port = conn.welcome.get("bulk_port") if conn is not None else None
        if port and self.bulk_resolver is not None:  # reached through a forward (Kubernetes)
            return self.bulk_resolver(int(port))
        return (self.bulk_host, int(port)) if self.bulk_host and port else None

    async def _bulk_receive(self, pending: _Pending, ticket: str) -> None:
        asm = pending.assembler

        def receive() -> None:
            asm.prefault()  # here, off the event loop: faulting 1 GiB in bulk takes 40-300 ms
            client_transfer(self._bulk_address(), ticket, receive=asm.parts, progress=pending.on_progress)

        try:
            await asyncio.to_thread(receive)
        except Exception as exc:
            if not pending.reply.done():
                pending.reply.set_exception(TransferError(f"bulk transfer from {self.name!r} failed: {exc}"))
            return
        asm.received = asm.total
        if not pending.reply.done():
            pending.reply.set_result((asm.bundle(), b""))

    def _fail_all(self, exc: KtError) -> None:
        self._dead = exc if isinstance(exc, KernelDiedError) else None
        for item in list(self._executions.values()) + list(self._pending.values()):
            if not item.reply.done():
                item.reply.set_exception(exc)
                item.reply.add_done_callback(lambda f: f.exception())  # retrieved even if nobody awaits

    async def _read(self, conn: _Conn) -> None:
        """Route every frame of one connection until it closes."""
        try:
            async for message in conn.ws:
                header, payload = P.decode_frame(message)
                self._route(header, payload)
        except (ConnectionClosed, P.ProtocolError) as exc:
            log.debug("connection to %s ended: %s", self.name, exc)
            sent = getattr(exc, "sent", None)
            if sent is not None and sent.reason == "keepalive ping timeout":
                self.last_drop = (f"it answered no heartbeat for {self.heartbeat_timeout_s:g} s (stopped, "
                                  "hung in native code that holds the GIL, or its network is down)")
        finally:
            if not conn.closed.done():
                conn.closed.set_result(None)
            for pending in self._pending.values():
                pending.assembler = None  # a bundle cut mid-way is requested again

    def _route(self, header: dict[str, Any], payload: memoryview) -> None:
        kind = header["type"]
        seq = header.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # already seen before a reconnect
            self.last_seq = seq
        req_id = header.get("id")
        if kind in ("display", "execute_result") and header.pop("data_in_payload", False):
            header["data"] = json.loads(bytes(payload))  # a mime bundle too big for a header (up to 4 MiB)
        if kind in ("stream", "display", "clear_output", "execute_result", "error"):  # "error": a callback's, shown
            ex = self._executions.get(req_id)
            if ex is None:
                callback = self._streams.get(req_id) or self.on_unsolicited
                if callback is not None:
                    callback(header)
                return
            if kind == "execute_result":
                ex.data = header.get("data")
                ex.metadata = header.get("metadata") or {}
            if ex.on_output is not None:
                ex.on_output(header)
        elif kind == "input_request":
            ex = self._executions.get(req_id)
            if ex is not None and ex.answers_input:
                ex.on_output(header)  # Session.execute answers it in the caller's thread
            elif ex is not None:  # nobody here can type: continue pdb, EOFError for input()
                task = asyncio.ensure_future(self.areply_input(header.get("input_id"),
                                                               fallback_answer(str(header.get("prompt", "")))))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif kind == "execute_reply":
            ex = self._executions.get(req_id)
            if ex is not None and not ex.reply.done():
                ex.reply.set_result((header, bytes(payload)))
            elif ex is None and self.on_unsolicited is not None:
                self.on_unsolicited(header)
        elif kind in ("reply", "error_reply"):
            pending = self._pending.get(req_id)
            if pending is None or pending.reply.done():
                return
            if kind == "reply":
                pending.reply.set_result((header, b""))
            else:
                pending.reply.set_exception(rebuild_exception(
                    {"ename": header.get("ename"), "evalue": header.get("evalue"),
                     "traceback": [header.get("traceback", "")]}, bytes(payload), self.accept_pickle))
        elif kind == "values":
            pending = self._pending.get(req_id)
            if pending is not None:
                pending.header = header
                pending.assembler = P.BundleAssembler(header["serialization"], header["sizes"])
                if header.get("bulk"):
                    asyncio.ensure_future(self._bulk_receive(pending, header["bulk"]))
                else:
                    self._bundle_progress(pending)
        elif kind == "bulk_ready":
            pending = self._pending.get(req_id)
            if pending is not None and pending.bulk_ready is not None and not pending.bulk_ready.done():
                pending.bulk_ready.set_result(header["ticket"])
        elif kind == "chunk":
            pending = self._pending.get(req_id)
            if pending is not None and pending.assembler is not None:
                pending.assembler.feed(payload)
                self._bundle_progress(pending)
        elif kind == "notice":
            log.warning("pod kernel %s: %s", self.name, header.get("text"))
            if self.on_notice is not None:
                self.on_notice(header)
            for ex in self._executions.values():
                if ex.on_output is not None:
                    ex.on_output(header)

    @staticmethod
    def _bundle_progress(pending: _Pending) -> None:
        asm = pending.assembler
        if pending.on_progress is not None:
            pending.on_progress(asm.received, asm.total)
        if asm.done and not pending.reply.done():
            pending.reply.set_result((asm.bundle(), b""))
            pending.assembler = None


class _Resend(Exception):
    """The connection dropped before a value request was answered: send it again."""
