"""The blocking session the magics use: each operation waits on the client loop from the caller's thread.

Blocking :meth:`Session.execute` delivers output callbacks in the calling
thread, so in a notebook they land in the cell that ran them, and turns
Ctrl-C into a remote interrupt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from pod_kernel import protocol as P
from pod_kernel import waits

from ..errors import RemoteError, RemoteTimeoutError, interrupted
from .asyncapi import AsyncSession, ExecuteOptions, ExecuteResult, execute_options
from .loop import client_loop
from .transport import (
    OPEN_TIMEOUT_S,
    Inbox,
    InputCallback,
    OutputCallback,
    ProgressCallback,
    _Execution,
    fallback_answer,
)

log = logging.getLogger("kt_jupyter.client")

T = TypeVar("T")

#: What a cell interrupted while the values it reads were still on their way ends with.
INTERRUPTED_WHILE_SENDING = ("interrupted while the values it reads were being sent; it did not run (the next cell "
                             "that reads them sends them again)")


class Session(AsyncSession):
    """A client session to one pod kernel at ``url`` (``ws://host:port``): blocking methods and coroutines."""

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, client_loop())
        try:
            return waits.future_result(fut, timeout)  # in slices: a Ctrl-C handled late still ends it
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RemoteTimeoutError(f"no answer from pod kernel {self.name!r} within {timeout:g} s") from None

    def connect(self, timeout: float | None = OPEN_TIMEOUT_S) -> dict[str, Any]:
        """Open the connection now; returns the pod kernel's welcome message."""
        return self._run(self.aconnect(), None if timeout is None else timeout + 1)

    def execute(self, code: str, on_output: OutputCallback | None = None, options: ExecuteOptions | None = None,
                *, timeout: float | None = None, on_input: InputCallback | None = None,
                while_waiting: Callable[[], None] | None = None, **fields: Any) -> ExecuteResult:
        """Run ``code``; output messages reach ``on_output`` in this thread as they arrive.

        ``options`` (or its fields by keyword: ``cell_name=``, ``check=``, ...)
        say what the request carries besides the code; see :class:`ExecuteOptions`.
        Ctrl-C while waiting interrupts the remote cell (and keeps waiting for
        it to end). A remote error is raised as its real type when possible.
        When the cell reads input (``input()``, a pdb prompt), ``on_input(prompt,
        password)`` is called in this thread and its answer sent back (EOFError
        from it: EOFError remotely); without ``on_input`` a pdb prompt is
        answered "c" and ``input()`` gets EOFError. A cell given up on
        (``timeout``) is interrupted; when it was sent with a ``check``, its
        answer is left in :meth:`take_orphan_states` once it ends. ``while_waiting`` is called in this
        thread once the request is on its way, before the wait (work that would otherwise follow it).
        """
        options = execute_options(options, fields)
        outputs = Inbox()
        done = object()
        req_id = self.new_id()
        loop = client_loop()
        t0 = time.perf_counter()

        def start_watch(ex: _Execution) -> concurrent.futures.Future[Any]:
            fut = asyncio.run_coroutine_threadsafe(self._aexecute(
                code, outputs.put, options, req_id=req_id, answers_input=True, started=(ex, ex.sent_on)), loop)
            fut.add_done_callback(lambda _f: outputs.put(done))
            return fut

        # written from this thread when it can be (a push it follows, ``after``, goes first: through the loop),
        # and its reply handed to this thread as it arrives, after the outputs before it; the coroutine that
        # would resend it after a reconnect starts only if one happens (see Transport._watch)
        ex, sent_on = self._start_execute(loop, req_id, options.header(req_id, code), outputs.put,
                                          answers_input=True, send=not options.after, on_reply=outputs.put,
                                          start_watch=start_watch, inbox=outputs)
        try:
            if sent_on is None:  # the loop sends it
                self._watch(ex)
            return self._wait_for_execute(outputs, ex, req_id, options, timeout, on_output, on_input,
                                          while_waiting, done, t0)
        finally:
            self.leave_lane(outputs, req_id)  # without its reply, the loop reads the lane it may still come on

    def _wait_for_execute(self, outputs: Inbox, ex: _Execution, req_id: str, options: ExecuteOptions,
                          timeout: float | None, on_output: OutputCallback | None, on_input: InputCallback | None,
                          while_waiting: Callable[[], None] | None, done: object, t0: float) -> ExecuteResult:
        """:meth:`execute`'s wait for its outputs and reply, in the caller's thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cut_short = False  # a Ctrl-C ended the push this cell follows (its values did not all arrive)
        if while_waiting is not None:
            try:
                while_waiting()
            except KeyboardInterrupt:  # as in the wait below: the remote cell is interrupted, its reply waited for
                cut_short = self._interrupt_execute(req_id, options)
            except Exception:  # the cell runs on regardless, and is waited for
                log.exception("work done while a cell runs failed")
        while True:
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self.take(outputs, req_id, remaining)
            except queue.Empty:
                fut = self._watch(ex)  # collects the reply when it comes
                if options.check is not None and fut is not None:  # what the cell changed reaches the next cell
                    fut.add_done_callback(self._keep_orphan_state)
                self.interrupt(target=req_id)
                raise RemoteTimeoutError(
                    f"cell on {self.name!r} did not finish within {timeout:g} s; it was interrupted"
                ) from None
            except KeyboardInterrupt:
                cut_short = self._interrupt_execute(req_id, options) or cut_short
                continue
            if isinstance(item, tuple):  # the reply (header, payload): finished here, not by the loop
                outputs.replied = True
                header, payload = item
                self._executions.pop(req_id, None)
                result = self._execute_result(header, payload, options, ex, req_id, t0)
                if cut_short and isinstance(result, RemoteError) and result.ename == "PushFailed":
                    raise interrupted(INTERRUPTED_WHILE_SENDING) from None
                if isinstance(result, BaseException):
                    raise result  # raised here, in the caller's thread, never on the client loop
                return result
            if item is done:  # the execute failed (or was cancelled) before a reply came
                outputs.replied = True  # its coroutine, which followed it to its end, did
                fut = self._watch(ex)
                assert fut is not None  # what put ``done``
                result = waits.future_result(fut)
                if isinstance(result, BaseException):
                    raise result
                return result
            if item.get("type") == "input_request":
                self._answer_input(req_id, item, on_input)
                continue
            if on_output is not None:
                on_output(item)

    def _interrupt_execute(self, req_id: str, options: ExecuteOptions) -> bool:
        """A Ctrl-C during execute ``req_id``: the remote cell is interrupted, and the push it follows ended if
        its bytes are still on their way (the cell cannot start before them; a 2 GiB push through a
        port-forward took tens of seconds). True when that push was cut short."""
        self.interrupt(target=req_id)
        return options.after is not None and self.abort_transfer(options.after)

    def _keep_orphan_state(self, fut: concurrent.futures.Future[Any]) -> None:
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
        outputs: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        follower = Session(self.url, self._token, name=self.name, liveness=self.liveness, accept_pickle=False,
                           path_error=self.path_error,
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
        value: str | None
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

    def start_push(self, bundle: P.Bundle, *, on_progress: ProgressCallback | None = None,
                   ) -> tuple[str, concurrent.futures.Future[dict[str, Any]]]:
        """Send a push without waiting for it: returns its request id (an execute's ``after``) and the future
        of its reply at once. An execute naming it in ``after`` goes on the wire only after what must precede
        it (a bulk push's header; else all of the push): ordered on the client loop, so this thread makes one
        hop there for both, not a hop and a wait for the push."""
        req_id = self.new_id()
        reply = asyncio.run_coroutine_threadsafe(self._apush_first(req_id, bundle, on_progress), client_loop())
        return req_id, reply

    async def _apush_first(self, req_id: str, bundle: P.Bundle,
                           on_progress: ProgressCallback | None) -> dict[str, Any]:
        sent = asyncio.get_running_loop().create_future()
        self._preceding[req_id] = sent  # before anything is awaited: the execute's task runs after this one

        def on_sent() -> None:
            if not sent.done():
                sent.set_result(None)

        try:
            return await self.arequest({"type": "push"}, bundle=bundle, on_progress=on_progress, req_id=req_id,
                                       on_sent=on_sent)
        finally:
            on_sent()  # failed before a byte went: nothing to wait for
            self._preceding.pop(req_id, None)

    def pull(self, names: Iterable[str], *, serialization: str = "pickle",
             on_progress: ProgressCallback | None = None,
             known: dict[tuple[int, int], bytes] | None = None) -> dict[str, Any]:
        """Fetch named values from the pod kernel's namespace (``known``: see :meth:`apull`). A Ctrl-C ends the
        transfer at once (it ran on in the background, its bytes dropped, for up to a second here)."""
        req_id = self.new_id()
        try:
            return self._run(self.apull(names, serialization=serialization, on_progress=on_progress, known=known,
                                        req_id=req_id))
        except KeyboardInterrupt:
            self.abort_transfer(req_id)
            raise

    def inventory(self, names: Iterable[str] | None = None, *, fingerprints: bool = False) -> list[dict[str, Any]]:
        """Name, type, size (and content fingerprint when asked) of the pod's values."""
        return self._run(self.ainventory(names, fingerprints=fingerprints))

    def delete(self, names: Iterable[str]) -> list[str]:
        """Remove names from the pod's namespace; returns those that existed."""
        return list(self._run(self.arequest({"type": "delete", "names": list(names)}))["removed"])

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
        return dict(self._run(self.arequest({"type": "metrics"}))["metrics"])

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a heartbeat, in seconds."""
        t0 = time.perf_counter()
        self._run(self.arequest({"type": "ping"}), timeout)
        return time.perf_counter() - t0

    def debug(self, timeout: float = 60.0) -> dict[str, Any]:
        """Blocking :meth:`adebug`."""
        return self._run(self.adebug(), timeout)

    def write_cell_file(self, path: str, text: str, timeout: float = OPEN_TIMEOUT_S) -> bool:
        """Have the pod write a cell's file at ``path`` unless it exists (debugpy needs it for breakpoints)."""
        return bool(self._run(self.arequest({"type": "cell_file", "path": path, "text": text}), timeout)["written"])

    def adopt(self, pid: int, timeout: float = OPEN_TIMEOUT_S) -> bool:
        """Tell a local pod kernel that process ``pid`` uses it; False if it lives regardless (``--keep``)."""
        return bool(self._run(self.arequest({"type": "adopt", "pid": pid}), timeout)["adopted"])

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
        with contextlib.suppress(Exception):
            self.close()
