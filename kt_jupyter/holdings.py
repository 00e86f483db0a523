"""What the pod holds of a notebook's values, and how they move: the pushes before a cell, the pulls after it.

A :class:`~kt_jupyter.connection.ComputeConnection` is a :class:`Holdings`:
``held`` says, name by name, what the pod holds as this notebook last sent
or pulled it (the pod's id of the object, both sides' fingerprints, its head
digest); ``refs`` the names the notebook holds as :class:`RemoteRef`.
Before a cell the values it reads that the pod does not hold unchanged are
pushed (:meth:`Holdings._push`; pipelined: the execute follows at once);
after it the pod's answer to the cell's check (:meth:`Holdings._check`)
says what it bound, deleted or changed in place, and the notebook follows
(:meth:`Holdings._reconcile`): small values are pulled, big ones stay as
RemoteRefs, modules are imported here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, cast

from pod_kernel import coherence, waits
from pod_kernel import protocol as P
from pod_kernel.bulk import BULK_MIN_BYTES

from .client import ExecuteResult, OutputCallback, Session, client_loop
from .compute import Compute
from .errors import KtError, RemoteError, TransferError, interrupted
from .quantities import format_bytes

#: Values larger than this stay on the pod as RemoteRefs unless pulled explicitly.
DEFAULT_PULL_LIMIT_BYTES = 256 << 20
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
    heads: dict[str, str]


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


def _big(value: Any, min_bytes: int = HEAD_MIN_BYTES) -> bool:
    """Whether ``value`` says it holds ``min_bytes`` or more (an array, a tensor: ``nbytes``); a value without
    ``nbytes`` (a DataFrame) could take long just to size."""
    nbytes = getattr(value, "nbytes", None)
    return isinstance(nbytes, int) and nbytes >= min_bytes


def _head(value: Any) -> str:
    """A big array's head digest (see :attr:`Held.head`); '' for anything else: a small value fingerprints in
    little time."""
    return P.head_digest(value) if _big(value) else ""


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


class Holdings:
    """What the pod holds of the notebook's values, and the moves that keep the two coherent (a base of
    :class:`~kt_jupyter.connection.ComputeConnection`, which sets these attributes)."""

    compute: Compute
    session: Session
    #: name -> what the pod holds under it, as last sent or pulled
    held: dict[str, Held]
    #: names this notebook holds as RemoteRefs to this compute
    refs: set[str]
    #: (pod pid, ``held``) of the last check the pod answered
    held_answered: tuple[int | None, dict[str, Any]] | None

    @property
    def name(self) -> str:
        """The compute's name."""
        return self.compute.name

    def _forget_deleted_here(self, user_ns: MutableMapping[str, Any]) -> None:
        """Names the notebook deleted (``del x``, ``%reset``) since the pod got them are deleted there too."""
        gone = [n for n in self.held if n not in user_ns] + [n for n in self.refs if n not in user_ns]
        self.refs -= set(gone)
        for name in gone:
            self.held.pop(name, None)
        if gone:
            self.session.delete(gone)

    def _push(self, names: Iterable[str], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
              force: set[str], on_progress: Callable[[str, int, int], None] | None,
              pipeline: bool = False) -> tuple[list[str], _PushInFlight | None]:
        """Send the values of ``names`` the pod does not hold unchanged; returns the names left unsent because
        the pod holds them (the execute requires them: a pod that lost one answers so, without running), and,
        with ``pipeline``, the push still in flight (:meth:`_finish_push` once the execute that follows it
        returns; without, it has been answered and recorded)."""
        send: dict[str, Any] = {}
        prints: dict[str, str] = {}
        heads: dict[str, str] = {}  # the head digests taken here: the record of the push needs them too
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
            if same is None and (name in force or held is None
                                 or (held.head and heads.setdefault(name, _head(value)) != held.head)):
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
            return maybe_held, _PushInFlight(req_id, reply, send, prints, bundle, heads)
        self.session.push_bundle(bundle, on_progress=progress)
        self._record_push(send, prints, bundle, self.session.last_push_ids, outcome, heads)
        return maybe_held, None

    @staticmethod
    def _fingerprint_sent(pushing: _PushInFlight, outcome: CellOutcome) -> None:
        """Fingerprint what a pipelined push sent without one, while the pod takes it and runs the cell (this
        thread would only wait): not after the cell. An array the bulk channel digests in transit (1 MiB+)
        waits for its digest instead (:meth:`_record_push`)."""
        bulk = pushing.bundle.nbytes >= BULK_MIN_BYTES
        t_fp = time.perf_counter()
        for name, value in pushing.send.items():
            if name not in pushing.prints and not (bulk and _big(value, P.BUFFER_DIGEST_MIN_BYTES)):
                pushing.prints[name] = P.fingerprint(value)
        outcome.timings_s["coherence"] = outcome.timings_s.get("coherence", 0.0) + time.perf_counter() - t_fp

    def _finish_push(self, pushing: _PushInFlight, outcome: CellOutcome) -> None:
        """Wait for a pipelined push's reply (raising its failure) and record what the pod now holds."""
        reply = waits.future_result(pushing.reply)
        self._record_push(pushing.send, pushing.prints, pushing.bundle, dict(reply.get("ids") or {}), outcome,
                          pushing.heads)

    def _record_push(self, send: dict[str, Any], prints: dict[str, str], bundle: P.Bundle, ids: Mapping[str, int],
                     outcome: CellOutcome, heads: Mapping[str, str]) -> None:
        """The pod holds ``send`` now, as the objects ``ids`` names."""
        digested = bundle.known_digests()  # the big buffers' digests, taken as they were sent
        t_fp = time.perf_counter()
        for name, value in send.items():
            known = prints.get(name)
            # sent without a fingerprint, or an unstable value sent again: fingerprinted now for the record
            fp = known if known is not None else P.fingerprint(value, digested)
            old = self.held.get(name)
            self.held[name] = Held(fp, ids.get(name), id(value), old.stable if old else True, fp,
                                   old.pod_stable if old else True, heads[name] if name in heads else _head(value))
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

    def _wire_check(self, check: dict[str, Any]) -> dict[str, Any]:
        """``check`` as the execute carries it: without its ``held``, saying ``held_same``, when that is what the
        pod answered last for this notebook (the pod keeps each session's last; see pod_kernel.coherence).
        ``held`` names every value the pod holds for the notebook: 50 of them are 3.6 kB of JSON, which took
        0.25 ms a cell to write and read here."""
        answered = self.held_answered
        if (answered is not None and answered[0] == self.session.pod_pid and answered[1] == check["held"]
                and self.session.pod_held_same):
            return {"names": check["names"], "held_same": True,
                    "fingerprint_max_bytes": check["fingerprint_max_bytes"]}
        self.held_answered = None  # the pod keeps this one instead: until it answers it, nothing is the same
        return check

    def _reconcile(self, check: dict[str, Any], state: dict[str, Any] | None, user_ns: MutableMapping[str, Any],
                   outcome: CellOutcome, transfer: TransferOptions, on_output: OutputCallback | None,
                   on_progress: Callable[[str, int, int], None] | None) -> None:
        """After a cell: the pod's answer to ``check`` says what it bound, deleted or changed in place; the
        notebook follows. A pod that did not answer in the reply is asked now, in a request of its own."""
        # a check the pod answered: its held is the pod's for the next cell's held_same; one it did not (an
        # error before the cell's end; or a held_same it could not resolve) is asked again with it whole
        self.held_answered = (self.session.pod_pid, check["held"]) if state is not None else None
        if state is None:
            t_sync = time.perf_counter()
            state = waits.future_result(asyncio.run_coroutine_threadsafe(
                self.session.arequest(dict(check, type="inventory")), client_loop()))
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
        try:
            self._pull_values(small, user_ns, outcome, stays, on_progress)
        except KeyboardInterrupt:
            # the cell ran: what it bound that did not come back stays on the pod, as a RemoteRef (the notebook's
            # older value, pushed again by the next cell that reads it, overwrote the pod's new one)
            left = [name for name in small if name not in outcome.pulled]
            stays += [RemoteRef(name, self.name, small[name]["type"], small[name]["size"],
                                reason="not brought back: interrupted") for name in left]
            self._leave_refs(stays, user_ns, outcome, on_output)
            raise interrupted(f"interrupted while the cell's results came back from compute {self.name!r} (the "
                              f"cell ran); left there as RemoteRefs: {', '.join(left)} (`%kt pull NAME` fetches one)"
                              ) from None
        self._leave_refs(stays, user_ns, outcome, on_output)

    def _leave_refs(self, stays: list[RemoteRef], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
                    on_output: OutputCallback | None) -> None:
        """The notebook holds these names as RemoteRefs to values the pod keeps; the user is told which."""
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


def _value_failure(exc: BaseException) -> bool:
    """Whether a pull failed because of a value (unpicklable there), not because the connection went."""
    return not isinstance(exc, KtError) or isinstance(exc, (RemoteError, TransferError))
