"""A compute as this notebook sees it: its kernel, a session, and what the pod already holds.

:func:`connect` returns the one :class:`ComputeConnection` per compute name in
this process, launching or reattaching to the pod kernel. :meth:`run_cell`
is the whole life of a ``%%kt`` cell: work out what the cell reads, push
the globals the pod lacks, run it with output streamed back, then make the
notebook coherent with the pod: the names the cell bound or deleted, also
before an error or an interrupt, and the values it changed in place come
back, or become :class:`RemoteRef` stand-ins for big or unpicklable ones;
modules are imported here rather than transferred. What changed is asked
in the execute request itself and answered in its reply (one round trip).

What the pod holds is known by identity and version (:class:`Held`): the
pod object's id and the fingerprint last sent or pulled, so an unchanged
value is never sent again, and a value the pod changed is never overwritten
by the notebook's stale copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from typing import Any

from pod_kernel import coherence, waits
from pod_kernel import protocol as P

from .backends import Backend, KernelHandle, get_backend, kt_home
from .cells import analyze_cell, filter_pushable
from .client import (
    ExecuteOptions,
    InputCallback,
    OutputCallback,
    ProgressCallback,
    Session,
)
from .codesync import CodeTree
from .compute import Compute
from .debugging import DebugEndpoint
from .errors import (
    ComputeSpecError,
    KernelDiedError,
    KtError,
    RemoteError,
    TransferError,
    interrupted,
)
from .holdings import (  # noqa: F401  (RemoteRef, CellOutcome, TransferOptions: imported from here too)
    DEFAULT_PULL_LIMIT_BYTES,
    CellOutcome,
    Held,
    Holdings,
    RemoteRef,
    TransferOptions,
    _head,
)

#: Times a cell is sent again after the pod said it lost values the notebook had left there.
MISSING_RETRIES = 2


def interrupted_before_sending(name: str) -> KeyboardInterrupt:
    """What a Ctrl-C before a cell went to its pod raises (shown as one line: no frames of ours)."""
    return interrupted(f"interrupted before the cell was sent to compute {name!r}: it did not run there")


@contextmanager
def _not_sent_on_interrupt(name: str) -> Iterator[None]:
    """A Ctrl-C in this block, before a cell went to its pod, says that the cell did not run there."""
    try:
        yield
    except KeyboardInterrupt:
        raise interrupted_before_sending(name) from None


class ComputeConnection(Holdings):
    """One compute, connected: the kernel handle, the session, and what the pod holds."""

    def __init__(self, compute: Compute, handle: KernelHandle) -> None:
        self.compute = compute
        self.handle = handle
        # a JSON-only compute's pod is never trusted to send a pickle: refused here too, unread
        self.session: Session = handle.session(accept_pickle="pickle" in compute.allowed_serialization)
        #: name -> what the pod holds under it, as last sent or pulled. Before skipping a push the pod
        #: is asked for the ids: another notebook sharing this compute may have rebound the name.
        self.held: dict[str, Held] = {}
        #: names this notebook holds as RemoteRefs to this compute
        self.refs: set[str] = set()
        #: (pod pid, ``held``) of the last check the pod answered (see :meth:`Holdings._wire_check`)
        self.held_answered: tuple[int | None, dict[str, Any]] | None = None
        self.cells_run = 0
        #: one cell (or pull, or reset) at a time: ``held`` and the notebook's namespace are written by the
        #: thread holding it (an ``--async`` cell's thread, or the notebook's), never by two at once
        self.lock = threading.RLock()
        #: threads waiting for :attr:`lock` (a cell queued behind an ``--async`` cell on this compute)
        self.waiting = 0
        self._waiting_lock = threading.Lock()
        self.code = CodeTree()
        #: whether output left behind by earlier notebook sessions was shown (done by the first cell)
        self.caught_up = False

    def __repr__(self) -> str:
        return f"<ComputeConnection {self.compute.backend}:{self.name} {self.handle.where}>"

    def sync_code(self) -> list[str]:
        """Send changed local source files; the pod reloads their modules. Returns those reloaded."""
        manifest = self.code.manifest()
        if manifest == self.code.last_sent:
            return []
        reloaded = self.session.sync_code(manifest, self.code.read)
        self.code.last_sent = manifest
        return reloaded

    @contextmanager
    def turn(self, on_output: OutputCallback | None = None) -> Iterator[None]:
        """Hold :attr:`lock`; when another thread's cell holds it, say so (``on_output``) and wait (Ctrl-C stops)."""
        if not self.lock.acquire(blocking=False):
            if on_output is not None:
                on_output({"type": "notice", "level": "info",
                           "text": f"[kt] a cell runs in the background on compute {self.name!r} (--async): this "
                                   "cell runs when it ends, so that it sees the values it started with"})
            with self._waiting_lock:
                self.waiting += 1
            try:
                waits.acquire(self.lock)  # in slices: a Ctrl-C handled late still stops the wait
            finally:
                with self._waiting_lock:
                    self.waiting -= 1
        try:
            yield
        finally:
            self.lock.release()

    # ------------------------------------------------------------------ a cell

    def run_cell(
        self,
        source: str,
        user_ns: MutableMapping[str, Any],
        *,
        transfer: TransferOptions | None = None,
        on_output: OutputCallback | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        cell_name: str | None = None,
        cell_label: str | None = None,
        timeout_s: float | None = None,
        on_input: InputCallback | None = None,
        debug_wait: bool = False,
        post_mortem: str | None = None,
    ) -> CellOutcome:
        """Push what the cell reads, run it, pull what it assigns; raise the remote error if any.

        ``on_input(prompt, password)`` answers the cell's ``input()`` and pdb
        prompts (see :meth:`Session.execute`); ``debug_wait``: the pod waits
        for a debugger to attach (:meth:`debug`) before running the cell.
        ``post_mortem``: instead of ``source``, pdb on the frames of that failed
        cell (its exception's ``kt_post_mortem``; see :meth:`post_mortem`).
        A cell's exception says where its frames are for ``%debug``:
        ``kt_post_mortem`` and ``kt_compute`` (backend, name). Cells of this
        notebook on one compute run one at a time (:meth:`turn`).
        """
        with ExitStack() as turn:
            with _not_sent_on_interrupt(self.name):  # until the execute goes: then the pod's cell is interrupted
                turn.enter_context(self.turn(on_output))  # an --async cell on this compute ends first
                transfer = transfer or TransferOptions()
                t0 = time.perf_counter()
                analysis = analyze_cell(source)
                if not self.caught_up:
                    self.catch_up(on_output or (lambda _msg: None))
                self.sync_code()
                outcome = CellOutcome(None)
                # with the globals of the notebook functions it calls: they run in the pod's namespace
                reads = coherence.reach(user_ns, set(analysis.reads))
                names = list(dict.fromkeys(list(filter_pushable(reads, user_ns)) + transfer.push))
                missing = [n for n in transfer.push if n not in user_ns]
                if missing:
                    raise TransferError(f"--push names {', '.join(missing)}, which the notebook does not define")
                self._forget_deleted_here(user_ns)
                # the execute follows the push at once, without waiting for its reply: the pod runs the cell once
                # the values are in (one round trip less per cell that sends something)
                requires, pushing = self._push(names, user_ns, outcome, force=set(transfer.push),
                                               on_progress=on_progress, pipeline=True)
                outcome.timings_s["push"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            try:
                for _attempt in range(MISSING_RETRIES + 1):
                    check = self._check(analysis.mentions, transfer, sending=pushing.send if pushing else {})
                    options = ExecuteOptions(cell_name=cell_name, cell_label=cell_label, debug_wait=debug_wait,
                                             check=self._wire_check(check), post_mortem=post_mortem,
                                             requires=tuple(requires),
                                             after=pushing.req_id if pushing else None)
                    try:
                        result = outcome.result = self.session.execute(
                            source, on_output, options, timeout=timeout_s, on_input=on_input,
                            while_waiting=None if pushing is None else partial(self._fingerprint_sent, pushing,
                                                                              outcome))
                    except KeyboardInterrupt:
                        if pushing is not None:  # a Ctrl-C may have cut it short: then the pod holds none of it,
                            sent, pushing = pushing, None  # and the next cell that reads it sends it again
                            with suppress(Exception):
                                self._finish_push(sent, outcome)
                        raise
                    finally:
                        if pushing is not None:  # its failure (the cell did not run) is the one raised
                            sent, pushing = pushing, None
                            self._finish_push(sent, outcome)
                    if not result.missing:
                        break
                    # the pod lost values we did not send again (another notebook deleted them): sent now, then run
                    lost = result.missing
                    outcome.skipped_unchanged = [n for n in outcome.skipped_unchanged if n not in lost]
                    requires = [n for n in requires if n not in lost]
                    self._push(lost, user_ns, outcome, force=set(lost), on_progress=on_progress)
                else:
                    raise TransferError(f"compute {self.name!r} keeps losing {', '.join(result.missing)} "
                                        "before the cell can run (another notebook deletes them?); nothing ran")
            except BaseException as exc:
                outcome.timings_s["execute"] = time.perf_counter() - t1
                self.cells_run += 1
                if not _raised_by_cell(exc):  # the connection or the kernel failed: nothing to reconcile now
                    self.held_answered = None
                    raise
                # the cell raised (or was interrupted): what it bound before that comes back, as locally
                self._reconcile(check, getattr(exc, "kt_state", None), user_ns, outcome, transfer, on_output,
                                on_progress)
                exc = _as_notebook_type(exc, user_ns)
                _mark(exc, kt_compute=(self.compute.backend, self.name))
                raise exc from None
            outcome.timings_s["execute"] = time.perf_counter() - t1
            self.cells_run += 1
            t2 = time.perf_counter()
            self._reconcile(check, outcome.result.state, user_ns, outcome, transfer, on_output, on_progress)
            outcome.timings_s["pull"] = time.perf_counter() - t2
            outcome.timings_s["total"] = time.perf_counter() - t0
            return outcome

    def catch_up(self, on_output: OutputCallback) -> None:
        """Show what the pod printed for notebook sessions that lost their client, and wait for their cells.

        A notebook restarted (or closed) mid-cell leaves that cell running on the
        pod, printing to a session nobody reads. The first cell of the notebook
        that reattaches shows that output (with a note saying where it comes
        from) and, when such a cell still runs, says so and follows it to its
        end before its own cell runs (Ctrl-C stops it).
        """
        self.caught_up = True
        for entry in self.session.connect().get("detached") or []:
            who = f"an earlier notebook session ({str(entry.get('session'))[:8]}, no client for " \
                  f"{float(entry.get('detached_s') or 0):.0f} s)"
            queued = int(entry.get("queued") or 0)
            more = f", then {queued} more of its queued cell(s)" if queued else ""
            if entry.get("running"):
                text = (f"a cell started by {who} is still running on compute {self.name!r}; its output follows, "
                        f"and this cell runs when it ends{more} (interrupt to stop it)")
            else:
                text = f"output of {who} on compute {self.name!r}, printed while no notebook was connected:"
            on_output({"type": "notice", "level": "info", "text": text})
            self.session.follow(entry, on_output)
            on_output({"type": "notice", "level": "info",
                       "text": f"end of {who}'s output" + (f"; {queued} queued cell(s) of it run first" if queued
                                                          else "")})

    # ------------------------------------------------------------------ debugger

    def debug(self) -> DebugEndpoint:
        """Start debugpy in the pod kernel (once) and make it reachable from here (the backend forwards it)."""
        info = self.session.debug()
        backend = get_backend(self.compute.backend)
        forward = getattr(backend, "forward_port", None)
        if forward is None:
            raise KtError(f"the {self.compute.backend} backend cannot forward the debugger's port yet; "
                          "use breakpoint() in the cell (pdb in the notebook) instead")
        local_port = int(forward(self.name, int(info["port"])))
        same_host = self.compute.backend == "local"  # the pod's files are this machine's files
        return DebugEndpoint(
            compute=self.name, host="127.0.0.1", port=local_port, remote_port=int(info["port"]),
            pid=int(info.get("pid") or 0), cells_dir=str(info["cells_dir"]),
            local_cells_dir=str(info["cells_dir"]) if same_host else str(kt_home() / "debug-cells" / self.name),
            code_dir=str(info.get("code_dir") or ""), local_code_dir=str(self.code.root),
            attached=bool(info.get("attached")),
        )

    def pull(self, names: Iterable[str], user_ns: MutableMapping[str, Any],
             on_progress: ProgressCallback | None = None) -> list[str]:
        """Fetch names into ``user_ns`` whatever their size (``%kt pull``)."""
        names = list(names)
        with self.turn():
            known: dict[tuple[int, int], bytes] = {}
            try:
                values = self.session.pull(names, on_progress=on_progress, known=known)
            except KeyboardInterrupt:
                raise interrupted(f"interrupted: {', '.join(names)} not brought back from compute "
                                  f"{self.name!r} (the notebook's are as they were)") from None
            for name, value in values.items():
                user_ns[name] = value
                # not known to be the pod's object: sent again when read
                self.held[name] = Held(P.fingerprint(value, known), None, id(value), head=_head(value))
        return list(values)

    def forget_state(self) -> None:
        """The pod kernel is new: it holds nothing we sent before."""
        with self.turn():
            self.held.clear()
            self.refs.clear()


# ---------------------------------------------------------------------- the process-wide registry

_connections: dict[tuple[str, str], ComputeConnection] = {}
#: guards the two dicts below for a moment; never held across I/O (a launch holds its name's lock only)
_registry_lock = threading.Lock()
#: (backend, name) -> the lock held while that compute is connected, launched or forgotten
_name_locks: dict[tuple[str, str], threading.RLock] = {}
#: the default compute, built when first asked for (from KT_* environment variables), not at import
_default: Compute | None = None


def _name_lock(key: tuple[str, str]) -> threading.RLock:
    """The lock of one compute name: a launch of compute A (up to its launch timeout) never holds up B."""
    with _registry_lock:
        lock = _name_locks.get(key)
        if lock is None:
            lock = _name_locks[key] = threading.RLock()
        return lock


def default_compute() -> Compute:
    """The compute ``%%kt`` cells use when they name none (built on first use, so a bad ``KT_*`` variable
    is reported by the first cell that needs it, not by ``import kt_jupyter``)."""
    global _default
    if _default is None:
        _default = Compute()
    return _default


def set_default_compute(compute: Compute) -> None:
    """Make ``compute`` the default for ``%%kt`` cells with no compute options."""
    global _default
    _default = compute


def connect(compute: Compute | None = None, *, keep: bool = False,
            on_event: Callable[[str], None] | None = None,
            strict: set[str] | frozenset[str] = frozenset()) -> ComputeConnection:
    """The connection to ``compute``'s pod kernel, launching or reattaching as needed.

    When a kernel of that name already runs with other settings, a difference
    in a parameter named in ``strict`` (the caller asked for it explicitly) is
    an error; otherwise ``on_event`` is told and the running kernel is used.

    When a kernel this process used has died, a new one is launched and
    ``on_event`` is told that the remote state was lost.
    """
    compute = compute or default_compute()
    key = (compute.backend, compute.name)
    say = on_event or (lambda _m: None)
    with _name_lock(key):
        conn = _connections.get(key)
        backend = get_backend(compute.backend)
        if conn is not None:
            why = conn.handle.liveness() if conn.handle.liveness else None
            if why is None and compute is conn.compute:  # the usual cell: the very spec it was launched with
                return conn
            if why is None:
                asked = [k for k, v in compute.to_dict().items() if v not in (None, {}, [], "")]
                diff = _resource_diff(compute, conn.compute, asked)
                if diff and _resource_diff(compute, conn.compute, strict):
                    raise ComputeSpecError(
                        f"compute {compute.name!r} is already running with "
                        f"{_resource_diff(compute, conn.compute, strict)}; "
                        f"`%kt down {compute.name}` then run this cell again, or pick another --name"
                    )
                if diff:
                    say(f"compute {compute.name!r} is already running with {diff}; "
                        f"`%kt restart {compute.name}` applies the new settings")
                return conn
            conn.session.close_quietly()
            conn.code.close()
            if replaced_elsewhere(backend, conn.handle):
                # another notebook restarted it (`%kt restart`), or the cluster replaced its pod: this one uses
                # that kernel; stopping it to start yet another would stop that notebook's kernel, and its next
                # cell this one's, cell after cell
                say(f"{why.splitlines()[0]}\nA new pod kernel {compute.name!r} runs already (another notebook "
                    "restarted it, or the cluster replaced its pod); this notebook uses it: the previous one's "
                    "variables are lost.")
            else:
                say(f"{why.splitlines()[0]}\nStarting a new pod kernel: the previous one's variables are lost.")
                # the spec it was launched with (memory, TTL, ...), with what this cell asked for explicitly
                compute = conn.compute.with_overrides(**{k: v for k, v in compute.to_dict().items() if k in strict})
                backend.delete(compute.name)  # its default grace: the container stops and frees its GPU first
        handle = backend.launch(compute, keep=keep, on_event=say)
        conn = ComputeConnection(compute, handle)
        _connections[key] = conn
        return conn


def replaced_elsewhere(backend: Backend, dead: KernelHandle) -> bool:
    """Whether a live kernel other than ``dead`` now runs under its name (another process started it)."""
    try:
        found = backend.find(dead.name)
    except KtError:  # cannot tell (the cluster does not answer): as before, this notebook starts its own
        return False
    if found is None:
        return False
    if found.close_hook is not None:  # launch() finds it again; this look leaves no port-forward behind
        found.close_hook()
    # a process and when it started; a pod by its name and start time (whole seconds): the same pod with a
    # restarted container is the dead one
    return (found.pid, found.started, found.where) != (dead.pid, dead.started, dead.where)


def _resource_diff(wanted: Compute, running: Compute, only: Iterable[str] | None = None) -> str:
    """'' when alike (in ``only`` if given), else e.g. "gpus=None (not 1)"."""
    dw, dr = wanted.to_dict(), running.to_dict()
    keys: tuple[str, ...] = ("backend", "cpus", "memory", "gpus", "gpu_type", "image", "env_vars", "namespace")
    if only is not None:
        keys = tuple(k for k in keys if k in set(only))
    return ", ".join(f"{k}={dr.get(k)!r} (not {dw.get(k)!r})" for k in keys if dw.get(k) != dr.get(k))


def connections() -> list[ComputeConnection]:
    """Connections this process holds."""
    return list(_connections.values())


def disconnect(name: str, backend: str | None = None) -> ComputeConnection | None:
    """Forget (and close) this process's connection to compute ``name``."""
    for key in list(_connections):
        if key[1] == name and (backend is None or key[0] == backend):
            with _name_lock(key):
                conn = _connections.pop(key, None)
            if conn is not None:
                conn.session.close_quietly()
                conn.code.close()
                return conn
    return None


def _as_notebook_type(exc: BaseException, user_ns: Mapping[str, Any]) -> BaseException:
    """A remote exception of a class the notebook defines (``__main__.AppError``) as that class, like locally."""
    module, _, qualname = str(getattr(exc, "ename", "")).rpartition(".")
    cls = user_ns.get(qualname)
    if not isinstance(exc, RemoteError) or module != "__main__" or not (
            isinstance(cls, type) and issubclass(cls, BaseException)):
        return exc
    try:
        mine = cls(exc.evalue)
        mine.remote_traceback = exc.remote_traceback  # type: ignore[attr-defined]
        mine.remote_ename = exc.ename  # type: ignore[attr-defined]
        mine.kt_post_mortem = getattr(exc, "kt_post_mortem", None)  # type: ignore[attr-defined]
        render = getattr(exc, "_render_traceback_", None)
        if render is not None:
            mine._render_traceback_ = render  # type: ignore[attr-defined]
    except Exception:  # its constructor wants other arguments, or it takes no attributes
        return exc
    return mine


def _mark(exc: BaseException, **attrs: Any) -> None:
    """Set attributes on a cell's exception when it takes them (they say where its frames are, for %debug)."""
    for key, value in attrs.items():
        try:
            setattr(exc, key, value)
        except AttributeError:
            pass


def _raised_by_cell(exc: BaseException) -> bool:
    """Whether ``exc`` is the cell's own error (raised remotely, or an interrupt), not a failure of ours."""
    return hasattr(exc, "remote_traceback") and (isinstance(exc, RemoteError) or not isinstance(exc, KtError))


def is_kernel_death(exc: BaseException) -> bool:
    """Whether an error means the pod kernel (and its state) is gone."""
    return isinstance(exc, KernelDiedError)
