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

import asyncio
import concurrent.futures
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from pod_kernel import coherence
from pod_kernel import protocol as P
from pod_kernel.bulk import BULK_MIN_BYTES

from .backends import KernelHandle, get_backend, kt_home
from .cells import analyze_cell, filter_pushable
from .client import (
    ExecuteOptions,
    ExecuteResult,
    InputCallback,
    OutputCallback,
    ProgressCallback,
    Session,
    client_loop,
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
)
from .quantities import format_bytes

#: Values larger than this stay on the pod as RemoteRefs unless pulled explicitly.
DEFAULT_PULL_LIMIT_BYTES = 256 << 20
#: Times a cell is sent again after the pod said it lost values the notebook had left there.
MISSING_RETRIES = 2


@dataclass(frozen=True)
class RemoteRef:
    """Stands in locally for a value that stayed on a pod kernel.

    Later ``%%kt`` cells on the same compute use the real value there with
    no transfer; ``%kt pull NAME`` fetches it.
    """

    name: str
    compute: str
    type: str
    size: int
    reason: str = "larger than the pull limit"

    def __repr__(self) -> str:
        return (f"<RemoteRef {self.name}: {self.type}, {format_bytes(self.size)} on compute "
                f"{self.compute!r} ({self.reason}); `%kt pull {self.name}` fetches it>")


@dataclass
class _PushInFlight:
    """A push sent without waiting for its reply (the execute that follows names it in ``after``)."""

    req_id: str
    reply: concurrent.futures.Future[dict[str, Any]]
    send: dict[str, Any]
    prints: dict[str, str]
    bundle: P.Bundle


@dataclass
class Held:
    """A value the pod holds under a name, as this notebook last sent or pulled it.

    Each side judges its own copy with its own fingerprint (a function shipped by
    value pickles differently in the two processes, and a matplotlib Figure
    differently at each dump): ``fingerprint``/``stable`` are the notebook's,
    ``pod_fingerprint``/``pod_stable`` what the pod said of its object. An
    unstable value is known by identity: the same object is the same version.
    """

    #: the notebook's fingerprint of its copy when it was sent or pulled ('' when it cannot be fingerprinted)
    fingerprint: str
    #: id() of the pod's object (None: not known, so it is sent again when read)
    pod_id: int | None
    #: id() of the notebook's object
    local_id: int
    #: False when the notebook's copy pickles differently each time
    stable: bool = True
    #: the pod's fingerprint of its object ('' unknown: the notebook's is sent instead)
    pod_fingerprint: str = ""
    #: False when the pod's object pickles differently each time
    pod_stable: bool = True
    #: the notebook's :func:`~pod_kernel.protocol.head_digest` of a big value ('' for small ones)
    head: str = ""


#: Values at least this big (the bulk channel's) have a head digest: a new array whose head differs from the
#: held one's is sent without being fingerprinted first (even 1 MiB took ~0.2 ms to fingerprint here).
HEAD_MIN_BYTES = BULK_MIN_BYTES


def _head(value: Any) -> str:
    """A big array's head digest (see :attr:`Held.head`); '' for anything else: a small value fingerprints in
    little time, and a value without ``nbytes`` (a DataFrame) could take long just to size."""
    nbytes = getattr(value, "nbytes", None)
    return P.head_digest(value) if isinstance(nbytes, int) and nbytes >= HEAD_MIN_BYTES else ""


@dataclass
class CellOutcome:
    """What running a cell did: result bundle, names moved each way, timings."""

    result: ExecuteResult | None
    pushed: list[str] = field(default_factory=list)
    skipped_unchanged: list[str] = field(default_factory=list)
    pulled: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: names bound to modules by the cell, imported here instead of transferred
    imported: list[str] = field(default_factory=list)
    bytes_pushed: int = 0
    #: seconds of push, execute, pull, total; ``coherence``: fingerprinting here and the pod's checks
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class TransferOptions:
    """Which names move: forced pushes, an explicit pull list or none, the size limit."""

    push: list[str] = field(default_factory=list)
    pull: list[str] | None = None
    no_pull: bool = False
    pull_limit_bytes: int = DEFAULT_PULL_LIMIT_BYTES


class ComputeConnection:
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

    @property
    def name(self) -> str:
        """The compute's name."""
        return self.compute.name

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
                self.lock.acquire()
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
        with self.turn(on_output):  # an --async cell on this compute ends first
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
                                             check=check, post_mortem=post_mortem, requires=tuple(requires),
                                             after=pushing.req_id if pushing else None)
                    try:
                        result = outcome.result = self.session.execute(
                            source, on_output, options, timeout=timeout_s, on_input=on_input,
                            while_waiting=None if pushing is None else partial(self._fingerprint_sent, pushing,
                                                                              outcome))
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

    def _forget_deleted_here(self, user_ns: MutableMapping[str, Any]) -> None:
        """Names the notebook deleted (``del x``, ``%reset``) since the pod got them are deleted there too."""
        gone = [n for n in self.held if n not in user_ns] + [n for n in self.refs if n not in user_ns]
        self.refs -= set(gone)
        for name in gone:
            self.held.pop(name, None)
        if gone:
            self.session.delete(gone)

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

    # ------------------------------------------------------------------ moving values

    def _push(self, names: Iterable[str], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
              force: set[str], on_progress: Callable[[str, int, int], None] | None,
              pipeline: bool = False) -> tuple[list[str], _PushInFlight | None]:
        """Send the values of ``names`` the pod does not hold unchanged; returns the names left unsent because
        the pod holds them (the execute requires them: a pod that lost one answers so, without running), and,
        with ``pipeline``, the push still in flight (:meth:`_finish_push` once the execute that follows it
        returns; without, it has been answered and recorded)."""
        send: dict[str, Any] = {}
        prints: dict[str, str] = {}
        maybe_held: list[str] = []
        for name in names:
            value = user_ns[name]
            if isinstance(value, RemoteRef):
                if value.compute != self.name:
                    raise TransferError(
                        f"{name} lives on compute {value.compute!r}, not {self.name!r}; "
                        f"`%kt pull {name} --name {value.compute}` fetches it first"
                    )
                continue  # the pod holds the real value already
            held = self.held.get(name)
            same = held if held is not None and id(value) == held.local_id and held.pod_id is not None else None
            if same is not None and not same.stable and name not in force:  # known by identity only
                maybe_held.append(name)
                continue
            if same is None and (name in force or held is None or (held.head and _head(value) != held.head)):
                # sent whatever its fingerprint: taken as its bytes go (the bulk channel's digests), not before
                send[name] = value
                continue
            t_fp = time.perf_counter()
            fp = prints[name] = P.fingerprint(value)
            if fp and same is not None and fp != same.fingerprint and P.fingerprint(value) != fp:
                same.stable = False  # pickles differently each time: its identity is its version
                fp = same.fingerprint
            outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + time.perf_counter() - t_fp
            if fp and name not in force and held is not None and held.fingerprint == fp and held.pod_id is not None:
                maybe_held.append(name)
            else:
                send[name] = value
        # Not sent: the pod holds them (or a newer value the cell's check brings back, never overwritten by
        # this copy). The execute request requires them, so no round trip of its own asks whether it still does.
        outcome.skipped_unchanged += maybe_held
        if not send:
            return maybe_held, None
        bundle = self._dump(send)
        progress = None if on_progress is None else (lambda done, total: on_progress("push", done, total))
        outcome.pushed += list(send)
        outcome.bytes_pushed += bundle.nbytes
        if pipeline:
            req_id, reply = self.session.start_push(bundle, on_progress=progress)
            return maybe_held, _PushInFlight(req_id, reply, send, prints, bundle)
        self.session.push_bundle(bundle, on_progress=progress)
        self._record_push(send, prints, bundle, self.session.last_push_ids, outcome)
        return maybe_held, None

    @staticmethod
    def _fingerprint_sent(pushing: _PushInFlight, outcome: CellOutcome) -> None:
        """Fingerprint what a pipelined push sent without one, while the pod takes it and runs the cell (this
        thread would only wait): not after the cell. A bundle with parts the bulk channel digests in transit
        waits for those digests instead (:meth:`_record_push`)."""
        if any(size >= P.HASH_PARALLEL_MIN_BYTES for size in pushing.bundle.sizes):
            return
        t_fp = time.perf_counter()
        for name, value in pushing.send.items():
            if name not in pushing.prints:
                pushing.prints[name] = P.fingerprint(value)
        outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + time.perf_counter() - t_fp

    def _finish_push(self, pushing: _PushInFlight, outcome: CellOutcome) -> None:
        """Wait for a pipelined push's reply (raising its failure) and record what the pod now holds."""
        reply = pushing.reply.result()
        self._record_push(pushing.send, pushing.prints, pushing.bundle, dict(reply.get("ids") or {}), outcome)

    def _record_push(self, send: dict[str, Any], prints: dict[str, str], bundle: P.Bundle, ids: Mapping[str, int],
                     outcome: CellOutcome) -> None:
        """The pod holds ``send`` now, as the objects ``ids`` names."""
        digested = bundle.known_digests()  # the big buffers' digests, taken as they were sent
        t_fp = time.perf_counter()
        for name, value in send.items():
            known = prints.get(name)
            # sent without a fingerprint, or an unstable value sent again: fingerprinted now for the record
            fp = known if known is not None else P.fingerprint(value, digested)
            old = self.held.get(name)
            self.held[name] = Held(fp, ids.get(name), id(value), old.stable if old else True, fp,
                                   old.pod_stable if old else True, _head(value))
        outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + time.perf_counter() - t_fp

    @staticmethod
    def _dump(values: dict[str, Any]) -> P.Bundle:
        with suppress(Exception):  # else one of them cannot travel: each is tried alone below, to name it
            return P.dump_values(values)
        problems = []
        for name, value in values.items():
            try:
                P.dump_values({name: value})
            except Exception as exc:
                problems.append(f"`{name}` ({P.type_name(value)}): {type(exc).__name__}: {exc}")
        raise TransferError(
            "cannot send to the pod kernel, so nothing ran:\n  " + "\n  ".join(problems)
            + "\nCreate these inside the %%kt cell instead, or leave them out of it."
        )

    def _check(self, mentions: Iterable[str], transfer: TransferOptions,
               sending: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What the pod checks when the cell ends: the names it mentions, and what this notebook believes the
        pod holds (its id and fingerprint of each value), answered in the execute_reply. Names ``sending`` (a
        push not answered yet) are left out: the pod adds them, as the objects that push set."""
        sending = sending or {}
        held = {n: [h.pod_id, h.pod_fingerprint or h.fingerprint, h.pod_stable]
                for n, h in self.held.items() if h.pod_id is not None and n not in sending}
        return {"names": sorted(mentions), "held": held, "fingerprint_max_bytes": transfer.pull_limit_bytes}

    def _reconcile(self, check: dict[str, Any], state: dict[str, Any] | None, user_ns: MutableMapping[str, Any],
                   outcome: CellOutcome, transfer: TransferOptions, on_output: OutputCallback | None,
                   on_progress: Callable[[str, int, int], None] | None) -> None:
        """After a cell: the pod's answer to ``check`` says what it bound, deleted or changed in place; the
        notebook follows. A pod that did not answer in the reply is asked now, in a request of its own."""
        if state is None:
            t_sync = time.perf_counter()
            state = asyncio.run_coroutine_threadsafe(self.session.arequest(dict(check, type="inventory")),
                                                     client_loop()).result()
            outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + time.perf_counter() - t_sync
        else:
            outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + float(state.get("check_s") or 0)
        state = _merge_states(self.session.take_orphan_states() + [state])
        for name in state.get("unstable") or []:
            if name in self.held:
                self.held[name].pod_stable = False
        for name in state.get("missing") or []:
            self.held.pop(name, None)
        for name in state.get("deleted") or []:
            self.held.pop(name, None)
            self.refs.discard(name)
            if name in user_ns:
                del user_ns[name]
                outcome.deleted.append(name)
        wanted = None if transfer.pull is None else set(transfer.pull)
        small: dict[str, dict[str, Any]] = {}
        stays: list[RemoteRef] = []
        for d in state.get("changed") or []:
            name = d["name"]
            self.held.pop(name, None)
            if transfer.no_pull or (wanted is not None and name not in wanted):
                if name in user_ns:  # the notebook's copy is stale now: it must not be pushed back over it
                    user_ns[name] = RemoteRef(name, self.name, d["type"], d["size"], reason="not pulled (--pull)")
                    outcome.refs.append(name)
                    self.refs.add(name)
                continue
            if d.get("module"):
                self._import(name, d, user_ns, outcome, stays)
            elif d["size"] > transfer.pull_limit_bytes:
                limit = format_bytes(transfer.pull_limit_bytes)
                stays.append(RemoteRef(name, self.name, d["type"], d["size"],
                                       reason=f"larger than the pull limit ({limit})"))
            elif self._unchanged_here(name, d, user_ns):
                continue
            else:
                small[name] = d
        self._pull_values(small, user_ns, outcome, stays, on_progress)
        for ref in stays:
            user_ns[ref.name] = ref
            outcome.refs.append(ref.name)
            self.refs.add(ref.name)
        if stays and on_output is not None:
            listed = "; ".join(f"{r.name} ({r.type}, {format_bytes(r.size)}, {r.reason})" for r in stays)
            on_output({"type": "notice", "level": "info",
                       "text": f"[kt] stays on compute {self.name!r} as a RemoteRef (`%kt pull NAME` fetches it): "
                               f"{listed}"})

    def _unchanged_here(self, name: str, d: dict[str, Any], user_ns: MutableMapping[str, Any]) -> bool:
        """Whether the notebook already holds exactly what the pod bound (``x = x.copy()``): nothing moves."""
        fp = d.get("fingerprint")
        if not fp or not d.get("stable", True) or name not in user_ns or isinstance(user_ns[name], RemoteRef):
            return False
        mine = P.fingerprint(user_ns[name])
        if mine != fp:
            return False
        self.held[name] = Held(mine, d.get("id"), id(user_ns[name]), True, fp)
        return True

    def _import(self, name: str, d: dict[str, Any], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
                stays: list[RemoteRef]) -> None:
        """A name the cell bound to a module: imported here (as the cell did there), never transferred."""
        try:
            module = importlib.import_module(str(d["module"]))
        except Exception as exc:
            stays.append(RemoteRef(name, self.name, d["type"], d["size"],
                                   reason=f"module {d['module']!r} cannot be imported here: {type(exc).__name__}"))
            return
        user_ns[name] = module
        self.refs.discard(name)
        fp = P.fingerprint(module)
        self.held[name] = Held(fp, d.get("id"), id(module))
        outcome.imported.append(name)

    def _pull_values(self, described: dict[str, dict[str, Any]], user_ns: MutableMapping[str, Any],
                     outcome: CellOutcome, stays: list[RemoteRef],
                     on_progress: Callable[[str, int, int], None] | None) -> None:
        """Pull ``described`` in one request; when it fails, halves find the names that cannot come back."""
        if not described:
            return
        progress = None if on_progress is None else (lambda done, total: on_progress("pull", done, total))
        known: dict[tuple[int, int], bytes] = {}  # digests of the big buffers, sent with them
        try:
            with _no_new_pyplot_figures():
                values = self.session.pull(list(described), on_progress=progress, known=known)
        except Exception as exc:
            if not _value_failure(exc):  # the connection or the kernel failed
                raise
            if len(described) == 1:
                name, d = next(iter(described.items()))
                stays.append(RemoteRef(name, self.name, d["type"], d["size"],
                                       reason=f"cannot be brought back: {type(exc).__name__}: {exc}"[:300]))
                return
            items = list(described.items())
            half = len(items) // 2
            self._pull_values(dict(items[:half]), user_ns, outcome, stays, on_progress)
            self._pull_values(dict(items[half:]), user_ns, outcome, stays, on_progress)
            return
        # notebook functions see the notebook's globals (a dict: IPython's user_ns, or a test's)
        values = coherence.adopt_functions(values, cast(dict, user_ns))
        for name, value in values.items():
            user_ns[name] = value
            self.refs.discard(name)
            d = described[name]
            fp = P.fingerprint(value, known)
            # pickles the same way twice here: a stable value; else it is known by identity from now on
            stable = bool(fp) and (fp == d.get("fingerprint") or P.fingerprint(value, known) == fp)
            self.held[name] = Held(fp, d.get("id"), id(value), stable, d.get("fingerprint") or "",
                                   bool(d.get("stable", True)), _head(value))
            outcome.pulled.append(name)

    def pull(self, names: Iterable[str], user_ns: MutableMapping[str, Any],
             on_progress: ProgressCallback | None = None) -> list[str]:
        """Fetch names into ``user_ns`` whatever their size (``%kt pull``)."""
        names = list(names)
        with self.turn():
            known: dict[tuple[int, int], bytes] = {}
            values = self.session.pull(names, on_progress=on_progress, known=known)
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
            say(f"{why.splitlines()[0]}\nStarting a new pod kernel: the previous one's variables are lost.")
            conn.session.close_quietly()
            # the spec it was launched with (memory, TTL, ...), with what this cell asked for explicitly
            compute = conn.compute.with_overrides(**{k: v for k, v in compute.to_dict().items() if k in strict})
            backend.delete(compute.name)  # its default grace: the container stops and frees its GPU first
        handle = backend.launch(compute, keep=keep, on_event=say)
        conn = ComputeConnection(compute, handle)
        _connections[key] = conn
        return conn


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


class _no_new_pyplot_figures:
    """Figures unpickled here are not registered with pyplot (matplotlib does so when the pod's
    figure was registered there), so the notebook's backend does not show them a second time."""

    def __enter__(self) -> None:
        helpers = sys.modules.get("matplotlib._pylab_helpers")
        self.before = set(helpers.Gcf.figs) if helpers is not None else set()

    def __exit__(self, *exc: object) -> None:
        helpers = sys.modules.get("matplotlib._pylab_helpers")
        if helpers is not None:
            for num in set(helpers.Gcf.figs) - self.before:
                manager = helpers.Gcf.figs.pop(num, None)
                canvas = getattr(manager, "canvas", None)
                if manager is not None and canvas is not None and canvas.manager is manager:
                    canvas.manager = None


def _merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Check answers, oldest first (cells given up on, then this one), as one: the newest word on a name wins."""
    changed: dict[str, dict[str, Any]] = {}
    deleted: dict[str, None] = {}
    missing: set[str] = set()
    unstable: set[str] = set()
    for state in states:
        for d in state.get("changed") or []:
            changed[d["name"]] = d
            deleted.pop(d["name"], None)
        for name in state.get("deleted") or []:
            changed.pop(name, None)
            deleted[name] = None
        missing |= set(state.get("missing") or [])
        unstable |= set(state.get("unstable") or [])
    return {"changed": list(changed.values()), "deleted": list(deleted), "missing": sorted(missing - changed.keys()),
            "unstable": sorted(unstable)}


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


def _value_failure(exc: BaseException) -> bool:
    """Whether a pull failed because of a value (unpicklable there), not because the connection went."""
    return not isinstance(exc, KtError) or isinstance(exc, (RemoteError, TransferError))


def is_kernel_death(exc: BaseException) -> bool:
    """Whether an error means the pod kernel (and its state) is gone."""
    return isinstance(exc, KernelDiedError)
