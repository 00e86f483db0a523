"""Debugging inside a pod kernel: input relayed to the notebook, so pdb works; and debugpy.

**Input relay.** While a cell runs, ``input()``, ``getpass.getpass()`` and
``sys.stdin.readline()`` in it send an ``input_request`` (``prompt``,
``password``, ``input_id``) through the cell's outbox and block until the
client answers with an ``input_reply`` request. pdb reads its commands
through ``input()`` and writes to ``sys.stdout`` (the cell's output), so
``breakpoint()`` / ``pdb.set_trace()`` in a cell, and in anything it calls,
becomes an interactive pdb in the notebook; so does :func:`post_mortem` on a
failed cell's frames (``%debug`` in the notebook). An interrupt breaks the
wait: at a pdb prompt it quits the debugger (the cell stops), elsewhere it
raises KeyboardInterrupt in the cell.

**debugpy.** :class:`DebugServer` calls ``debugpy.listen`` on the pod's
loopback once; an IDE reaches it through the backend's port forward. While
it listens, ``breakpoint()`` stops in the attached IDE, or, with no IDE
attached, falls back to the relayed pdb.
"""

from __future__ import annotations

import bdb
import builtins
import getpass
import itertools
import json
import os
import pdb
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from . import waits
from .calls import call_sink
from .protocol import PDB_PROMPT

if TYPE_CHECKING:
    from .executor import CellJob, Executor

#: What a cell ended by ``q`` at a pdb prompt says (instead of a traceback through pdb).
QUIT_MESSAGE = "[kt] the debugger was quit: the cell stopped there (the pod kernel and its variables are intact)"
#: Interface debugpy listens on inside the pod: loopback only (debugpy has no auth).
DEBUG_HOST = "127.0.0.1"

#: The relay of the pod kernel running in this process (None outside a pod kernel).
RELAY: InputRelay | None = None

_POD_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: Modules pdb steps over and ``where`` hides: the machinery that runs a cell, not the user's code.
SKIP_MODULES = ("IPython.*", "pod_kernel.*", "traitlets.*", "asyncio.*", "concurrent.*", "runpy",
                "threading", "queue", "contextlib")


#: Called (once each) when a debugger first starts in this process, pdb or debugpy: the executor then writes the
#: cell files it kept in memory, so the paths a debugger shows and sets breakpoints in are real files.
_DEBUGGER_STARTS: list[weakref.WeakMethod[Callable[[], None]]] = []
_debugger_started = False


def when_a_debugger_starts(hook: Callable[[], None]) -> None:
    """Call ``hook`` (a bound method, held weakly) when pdb or debugpy first starts in this process (at once if
    one did already)."""
    if _debugger_started:
        hook()
    else:
        _DEBUGGER_STARTS.append(weakref.WeakMethod(hook))


def _a_debugger_starts() -> None:
    global _debugger_started
    _debugger_started = True
    while _DEBUGGER_STARTS:
        hook = _DEBUGGER_STARTS.pop()()
        if hook is not None:
            hook()


class KtPdb(pdb.Pdb):
    """pdb for cells: it walks the cell's lines and the user's frames, not IPython's.

    IPython runs each top-level statement of a cell as its own code object;
    stepping from one to the next stops at the next statement's first line
    (no ``--Return--`` / ``--Call--`` stops between them), and ``where``,
    ``up`` and ``down`` see only frames outside :data:`SKIP_MODULES`.
    """

    def __init__(self, **kwargs: Any) -> None:
        _a_debugger_starts()
        kwargs.setdefault("skip", SKIP_MODULES)
        super().__init__(**kwargs)
        self._to_next_statement = False

    def _machinery(self, frame: FrameType) -> bool:
        return self.is_skipped_module(frame.f_globals.get("__name__", "")) \
            or frame.f_code.co_filename.startswith(_POD_KERNEL_DIR)

    def _cell_statement(self, frame: FrameType) -> bool:
        back = frame.f_back
        return frame.f_code.co_name == "<module>" and back is not None and self._machinery(back)

    def stop_here(self, frame: FrameType) -> bool:
        """Between two statements of a cell, only the next statement's first line stops."""
        if self._to_next_statement:
            return self._cell_statement(frame)
        return super().stop_here(frame)

    def user_line(self, frame: FrameType) -> None:
        """A stop on a line (the next statement reached, a step, a breakpoint)."""
        self._to_next_statement = False
        super().user_line(frame)

    def user_call(self, frame: FrameType, argument_list: Any) -> None:
        """Entering the next statement of the cell is not a stop of its own."""
        if not self._cell_statement(frame):
            super().user_call(frame, argument_list)

    def user_return(self, frame: FrameType, return_value: Any) -> None:
        """Leaving a statement of the cell: go on to the next one's first line."""
        if self._cell_statement(frame):
            self._to_next_statement = True
            self.set_step()
            return
        super().user_return(frame, return_value)

    def get_stack(self, f: FrameType | None, t: Any) -> tuple[list[tuple[FrameType, int]], int]:
        """The stack without the frames of the machinery around the cell."""
        stack, i = super().get_stack(f, t)
        if not stack:
            return stack, i
        current = stack[i][0]
        kept = [e for e in stack if e[0] is current or not self._machinery(e[0])]
        return kept, next(n for n, e in enumerate(kept) if e[0] is current)


def post_mortem(tb: TracebackType) -> None:
    """pdb on the frames of a cell's error (the notebook's ``%debug``): :class:`KtPdb`, at the innermost frame.

    Its prompt goes to the notebook as for ``breakpoint()``; ``q`` (or an interrupt at the prompt) ends it.
    """
    debugger = KtPdb()
    debugger.reset()
    debugger.interaction(None, tb)


def set_trace(*, header: str | None = None) -> None:
    """``pdb.set_trace`` on a pod kernel: :class:`KtPdb` at the caller."""
    debugger = KtPdb()
    if header is not None:
        debugger.message(header)
    debugger.set_trace(sys._getframe(1))


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    value: str = ""
    eof: bool = False


def is_pdb_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is a pdb command prompt."""
    return PDB_PROMPT in prompt


class InputRelay:
    """``input()`` and friends of the pod kernel: a running cell's reads go to its client."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self._input = builtins.input
        self._getpass = getpass.getpass
        self._stdin: TextIO = sys.stdin

    def install(self) -> None:
        """Replace ``input``, ``getpass.getpass``, ``sys.stdin`` and ``sys.breakpointhook``."""
        global RELAY
        builtins.input = self.input
        getpass.getpass = self.getpass
        sys.stdin = CellStdin(self, self._stdin)
        sys.breakpointhook = breakpointhook
        pdb.set_trace = set_trace
        RELAY = self

    def job(self) -> CellJob | None:
        """The cell whose client answers this thread's reads, or None (no cell, or a seed-API call)."""
        job = self.executor.current
        if job is None or call_sink.get() is not None or threading.current_thread().name.startswith("kt-call"):
            return None
        return job

    # ------------------------------------------------------------------ the replaced functions

    def input(self, prompt: Any = "") -> str:
        """``input()``: asks the notebook while a cell runs."""
        job = self.job()
        if job is None:
            return self._input(prompt)
        return self.ask(job, str(prompt), password=False)

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        """``getpass.getpass()``: asks the notebook (hidden input) while a cell runs."""
        job = self.job()
        if job is None:
            return self._getpass(prompt, stream)
        return self.ask(job, str(prompt), password=True)

    # ------------------------------------------------------------------ request and answer

    def ask(self, job: CellJob, prompt: str, password: bool = False) -> str:
        """Send an input_request for ``job`` and wait for its answer (EOFError if the client has none)."""
        waiter = _Waiter()
        input_id = next(self._ids)
        with self._lock:
            self._waiting[input_id] = waiter
        try:
            try:  # an interrupt as the request goes (the notebook may see it already) counts as one at the prompt
                job.outbox.append({"type": "input_request", "id": job.req_id, "input_id": input_id,
                                   "prompt": prompt, "password": bool(password)})
                waits.wait_event(waiter.event)  # in slices: an interrupt handled late (see waits) still ends it
            except KeyboardInterrupt:
                if is_pdb_prompt(prompt):  # pdb swallows KeyboardInterrupt at its prompt: quit it instead
                    sys.stdout.write("q  [interrupted]\n")
                    return "q"
                raise
        finally:
            with self._lock:
                self._waiting.pop(input_id, None)
        if waiter.eof:
            raise EOFError("no input: the notebook did not answer input()")
        return waiter.value

    def answer(self, input_id: int | None, value: str, eof: bool = False) -> bool:
        """Deliver a client's answer (thread-safe); ``input_id`` None answers the oldest waiting read."""
        with self._lock:
            if input_id is None:
                input_id = min(self._waiting, default=None)
            waiter = self._waiting.pop(input_id, None) if input_id is not None else None
        if waiter is None:
            return False
        waiter.value, waiter.eof = value, eof
        waiter.event.set()
        return True

    @property
    def waiting(self) -> list[int]:
        """Ids of the reads waiting for an answer."""
        with self._lock:
            return sorted(self._waiting)


class CellStdin:
    """``sys.stdin`` of the pod kernel: a running cell's reads are answered by its client."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, relay: InputRelay, fallback: TextIO) -> None:
        self._relay = relay
        self._fallback = fallback

    def readline(self, size: int = -1) -> str:
        """One line from the notebook while a cell runs ('' at end of input)."""
        job = self._relay.job()
        if job is None:
            return self._fallback.readline(size)
        try:
            return self._relay.ask(job, "", password=False) + "\n"
        except EOFError:
            return ""

    def __iter__(self) -> CellStdin:
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def read(self, size: int = -1) -> str:
        """A line at a time while a cell runs; the process's stdin otherwise."""
        if self._relay.job() is None:
            return self._fallback.read(size)
        return self.readline()

    def isatty(self) -> bool:
        """Never a terminal."""
        return False

    def fileno(self) -> int:
        """The process's own stdin descriptor."""
        return self._fallback.fileno()

    def readable(self) -> bool:  # pragma: no cover - io protocol
        return True

    def writable(self) -> bool:  # pragma: no cover - io protocol
        return False

    def close(self) -> None:  # pragma: no cover - io protocol
        pass

    def __getattr__(self, name: str) -> Any:  # anything else (buffer, ...) is the process's own stdin
        return getattr(self._fallback, name)


# --------------------------------------------------------------------------- breakpoints


def _debugpy_attached() -> bool:
    debugpy = sys.modules.get("debugpy")
    if debugpy is None or DEBUG_SERVER.port is None:
        return False
    try:
        return bool(debugpy.is_client_connected())
    except Exception:
        return False


def _pydevd_owns_tracing() -> bool:
    """Whether debugpy traces through sys.monitoring (Python 3.12+), where pdb's sys.settrace fails."""
    constants = sys.modules.get("_pydevd_bundle.pydevd_constants")
    return bool(getattr(constants, "PYDEVD_USE_SYS_MONITORING", False))


def stop_here(frame: FrameType) -> None:
    """Stop in a debugger at ``frame``: the attached IDE, else pdb relayed to the notebook."""
    if _debugpy_attached():
        import pydevd  # importable once debugpy listens

        pydevd.settrace(suspend=True, trace_only_current_thread=True, patch_multiprocessing=False,
                        stop_at_frame=frame)
        return
    if _pydevd_owns_tracing():
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        sys.stderr.write(f"[kt] breakpoint at {where} skipped: debugpy listens in this pod kernel and, on this "
                         "Python, pdb cannot run beside it; attach an IDE to stop here\n")
        return
    if RELAY is not None and RELAY.job() is None:  # a seed-API call (or no cell): no notebook to ask
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        sys.stderr.write(f"[kt] breakpoint at {where} skipped: pdb cannot reach the notebook outside a %%kt "
                         "cell; call with debug=True and attach an IDE to stop here\n")
        return
    KtPdb().set_trace(frame)


def breakpointhook(*args: Any, **kwargs: Any) -> None:
    """``sys.breakpointhook`` of a pod kernel (``PYTHONBREAKPOINT`` still wins when set)."""
    hookname = os.environ.get("PYTHONBREAKPOINT")
    if hookname is not None and hookname != "":
        return sys.__breakpointhook__(*args, **kwargs)
    stop_here(sys._getframe(1))
    return None


def deep_breakpoint() -> None:
    """Stop in the debugger right here, however deep in the call stack (seed 000).

    On a pod kernel: pdb in the notebook (or the attached IDE with ``--debug``);
    anywhere else: plain pdb.
    """
    stop_here(sys._getframe(1))


def is_quit(exc: BaseException) -> bool:
    """Whether ``exc`` means the user quit the debugger."""
    return isinstance(exc, bdb.BdbQuit)


# --------------------------------------------------------------------------- debugpy


class DebugServer:
    """debugpy inside the pod kernel: listening on the loopback once, on request."""

    def __init__(self) -> None:
        self.port: int | None = None
        self._lock = threading.Lock()

    def listen(self) -> int:
        """Start debugpy (once; later calls return the same port). Thread-safe."""
        with self._lock:
            if self.port is not None:
                return self.port
            try:
                import debugpy
            except ImportError:
                raise RuntimeError("debugpy is not installed in the pod kernel's environment; "
                                   "`pip install debugpy` in its image") from None
            # stepping never stops in the pod kernel's own code (IPython's is a library already)
            os.environ.setdefault("PYDEVD_FILTERS", json.dumps({_POD_KERNEL_DIR + "**": True}))
            result: dict[str, Any] = {}

            def _listen() -> None:  # its own thread, so no serving thread starts out traced
                try:
                    result["address"] = debugpy.listen((DEBUG_HOST, 0))
                except BaseException as exc:  # reported in the caller
                    result["error"] = exc

            thread = threading.Thread(target=_listen, name="kt-debugpy-listen", daemon=True)
            thread.pydev_do_not_trace = True  # type: ignore[attr-defined]
            thread.start()
            thread.join()
            if "error" in result:
                raise RuntimeError(f"debugpy.listen failed: {result['error']}")
            self.port = int(result["address"][1])
            _a_debugger_starts()
            sys.breakpointhook = breakpointhook  # importing pydevd replaced it
            tracing = sys.modules.get("pydevd_tracing")
            if tracing is not None:  # pdb's sys.settrace (no IDE attached) is on purpose: no warning in the cell
                tracing.TracingFunctionHolder._warn = False
            return self.port

    @property
    def listening(self) -> bool:
        """Whether debugpy listens."""
        return self.port is not None

    def trace_this_thread(self) -> None:
        """Make the IDE's breakpoints hit in the calling thread (no-op unless listening)."""
        if self.port is None:
            return
        import debugpy

        debugpy.debug_this_thread()

    def wait_for_client(self) -> None:
        """Block until an IDE attached and finished configuring (KeyboardInterrupt breaks it)."""
        import debugpy

        self.listen()
        debugpy.wait_for_client()
        self.trace_this_thread()

    def connected(self) -> bool:
        """Whether an IDE is attached now."""
        return _debugpy_attached()


#: The pod kernel's one debug server.
DEBUG_SERVER = DebugServer()
