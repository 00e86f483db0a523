"""Runs cells in the pod kernel's main thread, through IPython's InteractiveShell.

The network loop (another thread) submits jobs; :meth:`Executor.serve_forever`
runs them one at a time in the main thread, so signals (interrupts) reach
user code, and the namespace persists between cells. Output is captured as
protocol messages: stream text (coalesced by the session's outbox), display
data and the last expression's value as mime bundles, errors as type, message
and remote traceback whose line numbers are the cell's own.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import re
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TextIO

try:  # signal.getsignal without its Enum conversion, which raises and catches a ValueError for our handler
    from _signal import getsignal as _getsignal  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - not CPython
    _getsignal = signal.getsignal

from . import logfile, waits
from .calls import call_sink
from .cellfiles import CellFileError, CellFiles, write_cell_file  # noqa: F401  (server.py imports it here)
from .coherence import CellCheck, StateTracker
from .debugging import DEBUG_SERVER, QUIT_MESSAGE, InputRelay, is_quit, post_mortem, when_a_debugger_starts
from .lanes import Lane, LaneSet
from .outbox import Outbox
from .protocol import exception_payload, type_name

log = logging.getLogger("pod_kernel.executor")


@dataclass
class CellJob:
    """One execute request: where its output goes and what to run."""

    req_id: str
    code: str
    outbox: Outbox
    cell_name: str | None = None
    cell_label: str | None = None
    #: wait for a debugger (debugpy) to attach after writing the cell's file, before running it
    debug_wait: bool = False
    #: what the notebook asks to check when the cell ends (answered in the reply's ``state``)
    check: CellCheck | None = None
    #: not a cell: pdb post-mortem on the frames of this session's failed cell with this request id (``%debug``)
    post_mortem: str | None = None
    #: names the notebook left here and did not send again: lacking one, the cell does not run (reply "missing")
    requires: list[str] = field(default_factory=list)
    #: the change queued just before it that sets the values it reads (a push): failed, the cell does not run
    gate: concurrent.futures.Future | None = None
    #: the lane its client reads its reply from (see :mod:`pod_kernel.lanes`), if any
    lane: Lane | None = None


class _GateFailed(Exception):
    """The push a cell was queued behind failed to set its values: the cell does not run."""


def push_failed_reply(reason: BaseException) -> dict[str, Any]:
    """The execute_reply fields of a cell that did not run because the push it follows failed."""
    why = f"{type_name(reason)}: {reason}"
    return {"status": "error", "ename": "PushFailed", "evalue": why,
            "traceback": [f"the values this cell reads did not arrive: {why}"], "exception": False}


@dataclass
class NamespaceJob:
    """A change to the namespace from the network (a push, a delete): made in the main thread, between cells.

    A cell running when a push arrives keeps seeing the values it started with
    (``start = x; ...; seen = x`` reads the same ``x``); the push waits its turn.
    """

    change: Callable[[], Any]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def run(self) -> None:
        """Make the change; its result or exception goes to :attr:`done`."""
        if not self.done.set_running_or_notify_cancel():
            return
        try:
            self.done.set_result(self.change())
        except BaseException as exc:  # the requester answers with it; the kernel goes on
            self.done.set_exception(exc)


class _Stop:
    """Sentinel that ends :meth:`Executor.serve_forever`."""


class _Lacking(Exception):
    """A cell's required names are not in the namespace: it does not run."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def jsonable(value: Any) -> Any:
    """Make a mime bundle JSON-safe: bytes become base64 text, tuples lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class CellStream:
    """sys.stdout / sys.stderr of the pod kernel: a running cell's writes go to its session."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, executor: Executor, name: str, fallback: TextIO) -> None:
        self._executor = executor
        self.name = name
        self._fallback = fallback

    def write(self, text: str) -> int:
        """Send text to the running cell's output, or to the kernel log when none runs."""
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        sink = call_sink.get()
        if sink is not None:  # a seed-API call that streams its logs
            sink[0].write_stream(sink[1], self.name, text)
            return len(text)
        job = self._executor.current
        if job is None or threading.current_thread().name.startswith("kt-call"):
            self._fallback.write(text)
        else:
            job.outbox.write_stream(job.req_id, self.name, text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        """Write each line."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush the kernel log; session output is flushed by the outbox."""
        self._fallback.flush()

    def isatty(self) -> bool:
        """Cell output is never a terminal."""
        return False

    def fileno(self) -> int:
        """The underlying log file descriptor (subprocesses write there)."""
        return self._fallback.fileno()

    def readable(self) -> bool:  # pragma: no cover - io protocol
        return False

    def writable(self) -> bool:  # pragma: no cover - io protocol
        return True


def _make_shell(executor: Executor):
    """Build the InteractiveShell subclass whose display paths feed ``executor``."""
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.events import EventManager, available_events
    from IPython.core.history import HistoryManager
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    from . import transforms

    class KtDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            executor.emit(
                {
                    "type": "display",
                    "data": jsonable(data),
                    "metadata": jsonable(metadata or {}),
                    "transient": jsonable(transient or {}),
                    "update": bool(update),
                }
            )

        def clear_output(self, wait=False):
            executor.emit({"type": "clear_output", "wait": bool(wait)})

    # IPython sets a few traits every cell: a trait's validation and observer dispatch cost more than a `pass`
    # cell's code. Nothing observes these (IPython, ipykernel, traitlets: checked), so here they are plain
    # attributes of the same names and defaults, set and read the same way (tests/test_pod_kernel.py).
    class KtHistoryManager(HistoryManager):
        _i00 = _i = _ii = _iii = ""

    class KtDisplayHook(DisplayHook):
        _data: ClassVar[dict] = {}  # replaced per result by start_displayhook / write_format_data
        _md: ClassVar[dict] = {}
        exec_result = None  # see KtHistoryManager

        def start_displayhook(self):
            self._data, self._md = {}, {}

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            self._data, self._md = format_dict, md_dict or {}

        def finish_displayhook(self):
            if self._data:
                executor.emit(
                    {
                        "type": "execute_result",
                        "data": jsonable(self._data),
                        "metadata": jsonable(self._md),
                        "execution_count": self.prompt_count,
                    }
                )

    class KtCompiler(CachingCompiler):
        next_name: str | None = None

        def __init__(self) -> None:
            super().__init__()
            #: cell file -> the notebook's label ("In[7]"), for the last HISTORY_CELLS_KEPT cells (see Executor.run)
            self.labels: dict[str, str] = {}

        def get_code_name(self, raw_code, transformed_code, number):
            if self.next_name:
                return self.next_name
            return super().get_code_name(raw_code, transformed_code, number)

        def format_code_name(self, name):
            if name in self.labels:  # tracebacks say "Cell In[7]" with the notebook's own count
                return "Cell", self.labels[name]
            return super().format_code_name(name)

    class KtEvents(EventManager):
        def trigger(self, event, *args, **kwargs):
            executor.in_event = True  # a callback's error (matplotlib's draw after the cell) is shown, as locally
            try:
                super().trigger(event, *args, **kwargs)
            finally:
                executor.in_event = False

    class KtShell(InteractiveShell):
        displayhook_class = Type(KtDisplayHook)
        display_pub_class = Type(KtDisplayPublisher)
        compiler_class = Type(KtCompiler)
        execution_count = 1  # see KtHistoryManager
        last_execution_succeeded = True
        last_execution_result = None

        def init_history(self):
            self.history_manager = KtHistoryManager(shell=self, parent=self)
            self.configurables.append(self.history_manager)

        def init_events(self):
            super().init_events()
            events = KtEvents(self, available_events)
            events.callbacks = self.events.callbacks
            self.events = events

        def _showtraceback(self, etype, evalue, stb):
            if executor.in_event:  # not the cell's own error: an error output of the cell, as ipykernel shows it
                sys.stdout.flush()
                executor.emit({"type": "error", "ename": getattr(etype, "__name__", str(etype)),
                               "evalue": str(evalue), "traceback": list(stb)})
                return
            executor.last_traceback = list(stb)

        @contextlib.contextmanager
        def _tee(self, channel):
            # IPython 9 wraps sys.stdout/stderr.write for every cell, to copy what it writes into history
            # outputs, which this kernel does not keep (_NoOutputs): each write would pay for nothing
            yield

        def enable_gui(self, gui=None):
            pass

        def show_usage_error(self, exc):
            # said once, by the notebook, which raises it again (IPython would print it here too)
            executor.last_traceback = [f"UsageError: {exc}"]

        def transform_cell(self, raw_cell):
            # %%kt sends "# %%kt ...\n" + the cell: IPython's one-line rules (automagic, `ls dir`) are the cell's
            header, newline, body = raw_cell.partition("\n")
            if newline and header.startswith("# %%kt"):
                return "\n" + self._transform(body)
            return self._transform(raw_cell)

        def _transform(self, cell):
            quick = transforms.quick_transform(self, cell)  # without IPython's builtin trap, when it can be
            return quick if quick is not None else super().transform_cell(cell)

    cfg = Config()
    cfg.HistoryManager.enabled = False
    cfg.InteractiveShell.colors = "nocolor"
    cfg.InteractiveShell.xmode = "Context"
    shell = KtShell.instance(config=cfg)
    transforms.install(shell)  # a cell run again is not tokenized again; no extra compile of one without await
    # IPython keeps every cell's output in history_manager.outputs, forever: a kernel that lives
    # for days (or one 100 MB print) must not; Out[] / _ still work through the display hook.
    assert shell.history_manager is not None  # made by InteractiveShell.__init__
    shell.history_manager.outputs = _NoOutputs()
    return shell


def _cell_logging() -> None:
    """Logging from cells and libraries goes to the cell's stderr, as in a local kernel (whose root logger
    has no handler); the pod kernel's own loggers keep the handlers its command line set up."""
    root = logging.getLogger()
    for name in ("pod_kernel", "websockets", "asyncio", "debugpy"):
        own = logging.getLogger(name)
        for handler in root.handlers:
            own.addHandler(handler)
        own.setLevel(min(root.level, own.level) if own.level else root.level)
        own.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


class _NoOutputs(dict):
    """A history-outputs mapping that keeps nothing."""

    def __contains__(self, key: object) -> bool:
        return False

    def __getitem__(self, key: object) -> list:
        return []

    def __setitem__(self, key: object, value: object) -> None:
        pass


#: Longest the idle main thread waits for a job in one go. A signal sent to the process (the kubelet's SIGTERM) is
#: delivered to whichever thread does not block it, and Python runs its handler only in the main thread, once that
#: thread runs again: a main thread blocked for good on an empty queue would never stop (about 1 in 10 SIGTERMs here).
JOB_WAIT_S = waits.MAIN_WAIT_SLICE_S

#: Cells whose traceback labels the pod keeps.
HISTORY_CELLS_KEPT = 1000
#: Request ids of cells interrupted before they started that the executor remembers at most.
CANCELLED_KEPT = 256
#: What a cell interrupted before it started ends with.
INTERRUPTED_BEFORE_START = "interrupted before it started (it waited its turn on the pod); it did not run"
#: Cells whose IPython history names (``_i7``, ``_7``) stay in the namespace. Every cell's coherence snapshot walks
#: the namespace, so a thousand of them cost ~0.3 ms a cell; the pod's own count is not the notebook's anyway (its
#: ``In`` and ``Out`` keep the rest, and ``_i``, ``_ii``, ``_iii``, ``_``, ``__``, ``___`` are always there).
HISTORY_NAMES_KEPT = 32
#: Cells between two trims of those names (each trim costs ~20 us when the caches went cold between cells).
HISTORY_TRIM_EVERY = 8


Job = CellJob | NamespaceJob | _Stop


class JobQueue:
    """The main thread's jobs, first in first out, from any thread, and the lanes it reads while it waits.

    A job waits in a deque. With no lane open, each put also puts a token in a
    ``SimpleQueue``, on which the main thread waits. That one is C: here a put
    cost the network thread 8 us and the main thread ran 53 us later, against
    26-31 us and 80 us for ``queue.Queue`` (whose waiter, once woken, contends
    for its condition's lock). With lanes (:mod:`pod_kernel.lanes`), the main
    thread waits in ``poll()`` on them and a wake pipe, which a put writes to
    while it sleeps there.
    """

    def __init__(self) -> None:
        self._jobs: collections.deque[Job] = collections.deque()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.lanes = LaneSet()
        #: whether the main thread waits on the lanes (True once one was added: from then on, always)
        self._polling = False
        #: the thread that waits for jobs (:meth:`get`)
        self._getter: int | None = None

    def put(self, job: Job) -> None:
        """Queue ``job`` (any thread)."""
        self._jobs.append(job)  # before its token or wake-up: a woken main thread always finds it
        if not self._polling:
            self._tokens.put(None)
        elif self.lanes.sleeping and threading.get_ident() != self._getter:
            # (a cell read from a lane is put by the waiting thread itself, which finds it as the read returns: a
            # wake-up would cost it four system calls, here and at its next wait)
            self.lanes.wake()

    def add_lane(self, lane: Lane) -> None:
        """Read ``lane`` while waiting for jobs (any thread)."""
        self._polling = True
        self._tokens.put(None)  # a main thread waiting on the tokens wakes, and waits on the lanes from now on
        self.lanes.add(lane)

    def get(self, timeout: float) -> Job:
        """The next job (the main thread only); queue.Empty after ``timeout`` seconds without one."""
        self._getter = threading.get_ident()
        if not self._polling:
            self._tokens.get(timeout=timeout)
            if self._jobs or not self._polling:
                return self._jobs.popleft()
        while True:  # a job put before the switch to the lanes may have left a token: harmless, never read again
            if self._jobs:
                return self._jobs.popleft()
            lanes = self.lanes
            lanes.sleeping = True
            try:
                if self._jobs:  # put after the check above, when it did not know we would sleep
                    continue
                lanes.wait(timeout)  # reading a lane may queue a cell (a put from this thread)
            finally:
                lanes.sleeping = False
            if not self._jobs:
                raise queue.Empty

    def qsize(self) -> int:
        """How many jobs are queued now."""
        return len(self._jobs)

    def waiting(self) -> list[Job]:
        """The jobs queued now, first first (a copy)."""
        return list(self._jobs)


class Executor:
    """The main-thread cell runner of one pod kernel."""

    def __init__(self, cells_dir: Path, allow_pickle: bool = True) -> None:
        self.cell_files = CellFiles(Path(cells_dir))
        self.cells_dir = self.cell_files.dir
        self.allow_pickle = allow_pickle
        self.main_ident = threading.get_ident()
        self.jobs = JobQueue()
        self.current: CellJob | None = None
        self.last_traceback: list[str] = []
        #: whether an IPython event's callbacks run now (their errors are outputs, not the cell's error)
        self.in_event = False
        #: session (its outbox) -> (request id, traceback) of its last failed cell, for ``%debug``
        self.failures: weakref.WeakKeyDictionary[Outbox, tuple[str, TracebackType]] = weakref.WeakKeyDictionary()
        self.cells_run = 0
        self._history_trimmed = 0  # IPython's per-cell names (_iN, _N) of cells up to this one are gone
        self._interrupt_lock = threading.Lock()
        #: a SIGINT came for the current cell before its code started: it stops the cell before it starts
        self._interrupt_pending = False
        #: request ids of cells interrupted before they became current (queued behind another cell, or behind
        #: the push they follow): they do not run (the newest CANCELLED_KEPT; one that ended before is harmless)
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        log_out, log_err = sys.stdout, sys.stderr
        sys.stdout = CellStream(self, "stdout", log_out)
        sys.stderr = CellStream(self, "stderr", log_err)
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        self.shell = _make_shell(self)
        _cell_logging()
        self.state = StateTracker(self.shell.user_ns)  # what each session's cells bound, for its notebook
        self.relay = InputRelay(self)  # input() / pdb in a cell ask the notebook
        self.relay.install()
        self.debug = DEBUG_SERVER
        when_a_debugger_starts(self._write_kept_cells)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)

    def _write_kept_cells(self) -> None:
        """A debugger starts: the cell files kept in memory are written, and each cell's from now on."""
        for why in self.cell_files.write_kept():
            log.warning("%s (breakpoints in that cell will not work)", why)

    def _wait_for_debugger(self, path: Path) -> BaseException | None:
        """Block until an IDE attached (the cell's file is written already); the interrupt if one came."""
        try:
            port = self.debug.listen()
            sys.stdout.write(f"[kt] waiting for a debugger to attach (debugpy, port {port} on the pod); "
                             f"breakpoints go in {path}\n")
            sys.stdout.flush()
            self.debug.wait_for_client()
        except KeyboardInterrupt as exc:
            self.last_traceback = [("KeyboardInterrupt: interrupted while waiting for a debugger to attach; "
                                    "the cell did not run")]
            return exc
        except RuntimeError as exc:  # debugpy missing or failing: say so, do not run the cell
            self.last_traceback = [f"RuntimeError: {exc}; the cell did not run"]
            return exc
        sys.stdout.write("[kt] debugger attached; running the cell\n")
        return None

    def _restore_sigint(self) -> None:
        # pdb's `continue` installs its own SIGINT handler; the next cell gets ours back
        if threading.current_thread() is threading.main_thread() \
                and _getsignal(signal.SIGINT) != self._on_sigint:
            signal.signal(signal.SIGINT, self._on_sigint)
            import pdb

            setattr(pdb.Pdb, "_previous_sigint_handler", None)  # noqa: B010  (a private class attribute of pdb)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """Raise KeyboardInterrupt only inside the running cell's code, never in our own bookkeeping.

        The interrupted frame's callers are walked: under :meth:`_user_code` it is
        the cell (or the wait for a debugger), so it raises; reaching :meth:`run`
        or :meth:`serve_forever` first, it is the kernel's own code (writing the
        cell file, building the reply, taking a lock), where a KeyboardInterrupt
        would escape and kill the kernel: the interrupt is remembered instead, and
        stops the cell before it starts if it has not started yet. With no cell
        running, a late signal is dropped.
        """
        if self.current is None:
            return
        f = frame if frame is not None else sys._getframe(1)
        while f is not None:
            code = f.f_code
            if code is _USER_CODE:
                raise KeyboardInterrupt
            if code is _RUN or code is _SERVE:
                break
            f = f.f_back
        self._interrupt_pending = True

    @property
    def namespace(self) -> dict[str, Any]:
        """The persistent user namespace cells run in."""
        return self.shell.user_ns

    def user_names(self) -> list[str]:
        """Names a user assigned (IPython's own entries hidden)."""
        hidden = self.shell.user_ns_hidden
        return [n for n in self.namespace if not n.startswith("_") and n not in hidden]

    # ------------------------------------------------------------------ thread API

    def submit(self, job: CellJob) -> None:
        """Queue a cell; it runs after those before it (called from any thread)."""
        self.jobs.put(job)

    def change(self, change: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``change`` (a push, a delete) in the main thread once the cells queued before it ended."""
        job = NamespaceJob(change)
        self.jobs.put(job)
        return job.done

    def stop(self) -> None:
        """Make serve_forever return after the running cell."""
        self.jobs.put(_Stop())

    def interrupt(self, req_id: str | None = None) -> bool:
        """Raise KeyboardInterrupt in the running cell (the one with ``req_id`` if given). A cell ``req_id`` that
        has not started yet (queued behind another notebook's cell, or behind the push of the values it reads)
        will not run: it ends with KeyboardInterrupt when its turn comes."""
        with self._interrupt_lock:
            job = self.current
            if job is not None and (req_id is None or job.req_id == req_id):
                signal.pthread_kill(self.main_ident, signal.SIGINT)
                return True
            if req_id is None:
                return False
            self._cancelled[req_id] = None
            while len(self._cancelled) > CANCELLED_KEPT:
                self._cancelled.popitem(last=False)
            return True

    def emit(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Append a message for the running cell (ignored when no cell runs)."""
        job = self.current
        if job is not None:
            job.outbox.append(dict(header, id=job.req_id), payload)

    # ------------------------------------------------------------------ main thread

    def serve_forever(self) -> None:
        """Run queued cells until :meth:`stop`; must be called from the main thread."""
        while True:
            try:
                job = self.jobs.get(timeout=JOB_WAIT_S)
            except queue.Empty:
                continue  # back in Python for a moment: a signal that landed on another thread is handled now
            if isinstance(job, _Stop):
                return
            if isinstance(job, NamespaceJob):
                job.run()
                continue
            self.run(job)

    def run(self, job: CellJob) -> None:
        """Run one cell and append its execute_reply: exactly one, whatever interrupts arrive and whenever."""
        self._interrupt_pending = False
        self.last_traceback = []
        payload = b""
        self.jobs.lanes.cell_started(job.outbox)
        try:
            with self._interrupt_lock:
                self.current = job
                cancelled = job.req_id in self._cancelled
                self._cancelled.pop(job.req_id, None)
            if job.gate is not None and job.gate.done() and job.gate.exception() is not None:
                raise _GateFailed(job.gate.exception())
            lacking = [n for n in job.requires if n not in self.namespace]
            if lacking:  # deleted since the notebook left them (another notebook): it sends them, then asks again
                raise _Lacking(lacking)
            path = None
            if job.post_mortem is None:
                path = self.cell_files.path(job.cell_name, job.code)
                warning = self.cell_files.write(path, job.code, required=job.debug_wait)
                if warning:
                    job.outbox.write_stream(job.req_id, "stderr", warning)
                self.shell.compile.next_name = str(path)
                if job.cell_label:
                    labels = self.shell.compile.labels
                    labels[str(path)] = job.cell_label
                    while len(labels) > HISTORY_CELLS_KEPT:  # bounded (oldest first), like the cell files
                        del labels[next(iter(labels))]
            self._trim_history()
            before = self.state.snapshot()
            try:
                exc = self._user_code(job, path, cancelled)
            except KeyboardInterrupt as interrupted:  # before the cell started, or outside IPython's own handling
                exc = interrupted
                self.last_traceback = self.last_traceback or [f"KeyboardInterrupt: {interrupted or 'interrupted'}"]
            self.state.cell_ended(job.outbox, before)  # also after an error or an interrupt
            sys.stdout.flush()
            tb = exc.__traceback__ if exc is not None else None  # taken first: the reply pickles exc without it
            reply, payload = self._reply(exc)
            if exc is not None and tb is not None and not is_quit(exc) and job.post_mortem is None:
                self.failures[job.outbox] = (job.req_id, tb)  # kept for %debug, as sys.last_traceback is
                reply["post_mortem"] = True
            if job.check is not None:  # the notebook's coherence check, answered in this same reply
                reply["state"] = self._check(job)
        except _Lacking as exc:
            reply = {"status": "missing", "missing": exc.names}
        except _GateFailed as exc:
            reply = push_failed_reply(exc.args[0])
        except CellFileError as exc:  # a file a debugger needs cannot be written, or a refused path
            reply = {"status": "error", "ename": "CellFileError", "evalue": str(exc),
                     "traceback": [f"CellFileError: {exc}"], "exception": False}
        except BaseException as exc:  # our own failure: report it, keep serving
            log.exception("cell runner failed")
            reply = {
                "status": "error",
                "ename": type_name(exc),
                "evalue": str(exc),
                "traceback": traceback.format_exception(exc),
                "exception": False,
            }
        finally:
            with self._interrupt_lock:
                self.current = None
            self.shell.compile.next_name = None
            self._restore_sigint()
            self.jobs.lanes.cell_ended()
        self.cells_run += 1
        reply.update(type="execute_reply", id=job.req_id, execution_count=self.shell.execution_count - 1)
        job.outbox.append(reply, payload, now=True, lane=job.lane)  # the notebook waits: written from here at once

    def _check(self, job: CellJob) -> dict[str, Any] | None:
        """What changed for the notebook (see :meth:`StateTracker.check`); None if our check failed (logged):
        the notebook then asks with a separate inventory request."""
        assert job.check is not None
        try:
            return self.state.check(job.outbox, job.check)
        except Exception:
            log.exception("coherence check failed")
            return None

    def _user_code(self, job: CellJob, path: Path | None, cancelled: bool = False) -> BaseException | None:
        """The cell itself (after waiting for a debugger if asked): the only frames a SIGINT interrupts."""
        if cancelled:
            raise KeyboardInterrupt(INTERRUPTED_BEFORE_START)
        if self._interrupt_pending:
            raise KeyboardInterrupt
        if job.post_mortem is not None:
            self._post_mortem(job)
            return None
        assert path is not None
        if job.debug_wait:
            exc = self._wait_for_debugger(path)
            if exc is not None:
                return exc
        self.debug.trace_this_thread()
        result = self.shell.run_cell(job.code, store_history=True)
        return result.error_in_exec or result.error_before_exec

    def _post_mortem(self, job: CellJob) -> None:
        """pdb on the frames of the session's failed cell ``job.post_mortem``, relayed to the notebook."""
        req_id, tb = self.failures.get(job.outbox, ("", None))
        if tb is None or req_id != job.post_mortem:
            sys.stderr.write("[kt] the pod kernel no longer holds the frames of that error (the pod kernel restarted, "
                             "or this notebook reconnected as a new session); run the failing cell again, "
                             "then %debug\n")
            return
        post_mortem(tb)

    def _trim_history(self) -> None:
        """Forget IPython's per-cell names (``_i7``, ``_7``) of all but the last :data:`HISTORY_NAMES_KEPT` cells
        (each :data:`HISTORY_TRIM_EVERY` cells).

        IPython keeps one input name per cell in the namespace forever (its outputs
        it already caps at ``cache_size``); a kernel that runs for days would grow,
        and every cell's coherence snapshot would walk them all. Its history
        manager also queues every cell's source for a database writer that this
        kernel does not run (history is off): that queue is emptied too. ``In``
        keeps every cell, as in any IPython.
        """
        ns, last = self.namespace, self.shell.execution_count - HISTORY_NAMES_KEPT
        if last - self._history_trimmed < HISTORY_TRIM_EVERY:
            return
        for n in range(self._history_trimmed + 1, last + 1):
            ns.pop(f"_i{n}", None)
            ns.pop(f"_{n}", None)
        self._history_trimmed = max(self._history_trimmed, last)
        history = self.shell.history_manager
        if history is not None and not history.enabled and history.db_input_cache:
            with history.db_input_cache_lock:
                history.db_input_cache.clear()

    def _reply(self, exc: BaseException | None) -> tuple[dict[str, Any], bytes]:
        """The execute_reply fields (and pickled exception) for a cell that ended with ``exc``."""
        if exc is None:
            return {"status": "ok"}, b""
        if is_quit(exc):  # `q` at a pdb prompt: a short message, not a traceback through pdb
            # said as output too: IPython shows nothing for a BdbQuit, by design
            sys.stderr.write(f"{QUIT_MESSAGE}\n")
            sys.stderr.flush()
            return {"status": "error", "ename": type_name(exc), "evalue": "debugger quit",
                    "traceback": [QUIT_MESSAGE], "exception": False}, b""
        payload = exception_payload(exc, self.allow_pickle)
        shown = self.last_traceback or traceback.format_exception(exc)
        # the traceback reaches the kernel log too (`%kt logs`), as a local kernel's terminal would show it
        logfile.tee("stderr", _ANSI_RE.sub("", "\n".join(shown)).rstrip("\n") + "\n")
        return {
            "status": "error",
            "ename": type_name(exc),
            "evalue": str(exc),
            "traceback": shown,
            "exception": bool(payload),
        }, payload


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

#: Code objects the SIGINT handler recognizes on the main thread's stack.
_USER_CODE = Executor._user_code.__code__
_RUN = Executor.run.__code__
_SERVE = Executor.serve_forever.__code__
