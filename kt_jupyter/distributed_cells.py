"""A ``%%kt --workers N`` cell: the same cell on every rank, as ipyparallel's ``%%px`` runs it on N engines.

Each rank runs the cell through its own :meth:`ComputeConnection.run_cell`
(in a thread per rank, so pushes and runs go in parallel): the globals the
cell reads are pushed once per rank, and only what that rank lacks. Output
comes back live, labelled per rank as ``%%px`` labels it (``[stdout:1] ...``);
rich output (displays, the result) from rank 0 only unless ``all_ranks``.
Names come back from rank 0; the others keep theirs (``%kt pull NAME --rank R``).

An error on any rank fails the cell, naming the rank; the ranks still running
are interrupted, and every rank's torch.distributed group is torn down, which
frees a rank blocked in a collective on the failed one (native code that no
interrupt reaches). Ctrl-C does the same for every rank. A Ray cluster's cells
run on its head only: the single-kernel path, unchanged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from .cells import analyze_cell
from .connection import CellOutcome, RemoteRef, TransferOptions
from .distributed_group import WorkerGroup

#: Seconds ranks get to end after an error or an interrupt elsewhere, before the cell gives up on them.
STOP_GRACE_S = 15.0

_SKIP = object()
log = logging.getLogger("kt_jupyter.distributed")


class RankNamespace(MutableMapping):
    """What a rank other than 0 sees of the notebook: the notebook's names under this rank's own bindings.

    Ranks keep their own state (SPMD): a name rank 0 brought back into the notebook is, on every other
    rank, that rank's own value, a :class:`RemoteRef` here, never overwritten by rank 0's copy. It shadows
    the notebook's value only while the notebook's binding is the one it shadowed: a name the notebook
    rebinds afterwards (a local cell) is pushed to every rank again.
    """

    def __init__(self, base: MutableMapping[str, Any], compute: str, rank: int) -> None:
        self.base = base
        self.compute = compute
        self.rank = rank
        self.own: dict[str, Any] = {}
        #: name -> id of the notebook's object the binding shadows (None: none; -1: bound by the running cell)
        self.basis: dict[str, int | None] = {}

    def _live(self, key: object) -> bool:
        if key not in self.own:
            return False
        basis = self.basis.get(key, -1)
        value = self.base.get(key, _SKIP)
        if basis == -1 or basis == (None if value is _SKIP else id(value)):
            return True
        del self.own[key]
        self.basis.pop(key, None)
        return False

    def settle(self, from_rank0: list[str]) -> None:
        """After the cell: names rank 0 brought back are this rank's own; each binding notes what it shadows."""
        for key in from_rank0:
            if key not in self.own:
                self.own[key] = RemoteRef(key, self.compute, "rank's own value", 0, reason=f"rank {self.rank}'s "
                                          f"value; `%kt pull {key} --rank {self.rank}` fetches it")
            self.basis[key] = -1
        for key in list(self.own):
            if self.basis.get(key, -1) == -1:
                value = self.base.get(key, _SKIP)
                self.basis[key] = None if value is _SKIP else id(value)

    def __getitem__(self, key: str) -> Any:
        return self.own[key] if self._live(key) else self.base[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.own[key] = value
        self.basis[key] = -1

    def __delitem__(self, key: str) -> None:
        # a name the rank deleted stays in the notebook (rank 0 decides the notebook's names)
        self.own.pop(key, None)
        self.basis.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return self._live(key) or key in self.base

    def __iter__(self) -> Iterator[str]:
        own = [k for k in list(self.own) if self._live(k)]
        yield from own
        yield from (k for k in list(self.base) if k not in self.own)

    def __len__(self) -> int:
        return len(set(self.own) | set(self.base))


@dataclass
class GroupOutcome:
    """Each rank's outcome (rank order); rank 0's is what the notebook got."""

    outcomes: list[CellOutcome | None]
    timings_s: dict[str, float]


class _Labeller:
    """Stream text per rank and stream as whole lines prefixed ``[stdout:R] ``, like ``%%px``."""

    def __init__(self, show: Callable[[dict[str, Any]], None], all_ranks: bool) -> None:
        self.show = show
        self.all_ranks = all_ranks
        self.partial: dict[tuple[int, str], str] = {}

    def __call__(self, rank: int, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "stream":
            name = str(msg.get("name") or "stdout")
            text = self.partial.pop((rank, name), "") + str(msg.get("text", ""))
            *lines, rest = text.split("\n")
            if rest:
                self.partial[(rank, name)] = rest
            if lines:
                self.show({"type": "stream", "name": name,
                           "text": "".join(f"[{name}:{rank}] {line}\n" for line in lines)})
        elif kind == "notice":
            self.show(dict(msg, text=f"rank {rank}: {msg.get('text', '')}"))
        elif rank == 0 or self.all_ranks:
            if rank and kind == "display":
                self.show({"type": "stream", "name": "stdout", "text": f"[output:{rank}]\n"})
            self.show(msg)

    def flush(self) -> None:
        for (rank, name), text in sorted(self.partial.items()):
            self.show({"type": "stream", "name": name, "text": f"[{name}:{rank}] {text}\n"})
        self.partial.clear()


def run_cell(group: WorkerGroup, source: str, user_ns: MutableMapping[str, Any], namespaces: list[RankNamespace],
             *, transfer: TransferOptions, on_output: Callable[[dict[str, Any]], None], all_ranks: bool = False,
             cell_name: str | None = None, cell_label: str | None = None, timeout_s: float | None = None,
             on_progress: Callable[[str, int, int], None] | None = None) -> GroupOutcome:
    """Run ``source`` on every rank at once; rank 0 moves names with the notebook, the others with their own
    :class:`RankNamespace`. Raises the first rank's error (``exc.rank`` says which) once every rank ended,
    or :data:`STOP_GRACE_S` after it for ranks stuck in native code."""
    n = len(group.ranks)
    mentions = analyze_cell(source).mentions
    before = {k: id(user_ns[k]) for k in mentions if k in user_ns}
    events: queue.SimpleQueue = queue.SimpleQueue()
    t0 = time.perf_counter()

    def one(rank: int) -> None:
        conn = group.ranks[rank]
        ns = user_ns if rank == 0 else namespaces[rank]
        options = transfer if rank == 0 else TransferOptions(push=list(transfer.push), no_pull=True)
        try:
            outcome = conn.run_cell(source, ns, transfer=options,
                                    on_output=lambda msg: events.put(("output", rank, msg)),
                                    on_progress=on_progress if rank == 0 else None,
                                    cell_name=cell_name, cell_label=cell_label, timeout_s=timeout_s)
            events.put(("done", rank, outcome))
        except BaseException as exc:  # reported in the notebook's thread
            events.put(("failed", rank, exc))

    threads = [threading.Thread(target=one, args=(r,), name=f"kt-rank-{r}", daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    labeller = _Labeller(on_output, all_ranks)
    outcomes: list[CellOutcome | None] = [None] * n
    errors: dict[int, BaseException] = {}
    first: int | None = None
    pending = set(range(n))
    stop_deadline: float | None = None
    interrupted = False
    while pending:
        try:
            remaining = None if stop_deadline is None else max(0.0, stop_deadline - time.monotonic())
            kind, rank, item = events.get(timeout=remaining)
        except queue.Empty:
            break  # the ranks left are stuck in native code: said below
        except KeyboardInterrupt:
            if not interrupted:
                interrupted = True
                _interrupt(group, pending)
                stop_deadline = time.monotonic() + STOP_GRACE_S
            continue
        if kind == "output":
            labeller(rank, item)
            continue
        pending.discard(rank)
        if kind == "done":
            outcomes[rank] = item
            continue
        errors[rank] = item
        if first is None:
            first = rank
            if not interrupted:
                _interrupt(group, pending)
                stop_deadline = time.monotonic() + STOP_GRACE_S
        group.abort_process_groups([rank])  # frees peers blocked in a collective with this rank
    labeller.flush()
    back = [k for k in mentions if k in user_ns and before.get(k, _SKIP) != id(user_ns[k])]  # rank 0's names
    for ns in namespaces[1:]:
        ns.settle(back)
    if first is None and interrupted:
        first = min(errors) if errors else None
    if errors or pending:
        if not errors:
            raise KeyboardInterrupt
        group.abort_process_groups([r for r in range(n) if r not in pending and r not in errors])
        raise rank_error(errors[first if first is not None else min(errors)],
                         first if first is not None else min(errors), n, errors, sorted(pending), group.name)
    return GroupOutcome(outcomes, {"total": time.perf_counter() - t0})


def _interrupt(group: WorkerGroup, ranks: set[int]) -> None:
    """KeyboardInterrupt in the running cell of each of ``ranks``, sent in parallel."""
    def one(rank: int) -> None:
        try:
            group.ranks[rank].session.interrupt()
        except Exception as exc:  # a rank that cannot be reached is reported when its cell ends
            log.debug("interrupt of rank %s failed: %s", rank, exc)

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)


def rank_error(exc: BaseException, rank: int, workers: int, errors: dict[int, BaseException],
               stuck: list[int], name: str) -> BaseException:
    """``exc`` (rank ``rank``'s own error, its real type) saying which rank raised it and what the others did."""
    others = [f"rank {r}: {type(e).__name__}" for r, e in sorted(errors.items()) if r != rank]
    what = "was interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    lines = [(f"[kt] rank {rank} of {workers} workers of {name!r} {what}; the other ranks were interrupted and "
              "every rank's torch.distributed group torn down (call init_process_group() again)")]
    if others:
        lines.append("[kt] then " + ", ".join(others))
    if stuck:
        lines.append(f"[kt] rank(s) {', '.join(map(str, stuck))} still run (blocked in native code, e.g. waiting "
                     f"for the failed rank in init_process_group); `%kt restart {name}` starts every worker again")
    try:
        exc.rank = rank  # type: ignore[attr-defined]
        for line in lines:
            exc.add_note(line)
    except (AttributeError, TypeError):
        pass
    render = getattr(exc, "_render_traceback_", None)
    if render is not None:
        def rendered() -> list[str]:
            return list(render()) + lines
        try:
            exc._render_traceback_ = rendered  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return exc


def pull_from_rank(group: WorkerGroup, rank: int, names: list[str], user_ns: MutableMapping[str, Any],
                   suffix: bool) -> list[str]:
    """Fetch names from one rank into the notebook (as ``NAME`` from rank 0 or when asked, else ``NAME_rR``)."""
    if not 0 <= rank < len(group.ranks):
        raise IndexError(f"rank {rank} does not exist: {group.name!r} has ranks 0..{len(group.ranks) - 1}")
    values = group.ranks[rank].session.pull(names)
    out = []
    for name, value in values.items():
        target = f"{name}_r{rank}" if suffix else name
        user_ns[target] = value
        out.append(target)
    return out


__all__ = ["STOP_GRACE_S", "GroupOutcome", "RankNamespace", "pull_from_rank", "rank_error", "run_cell"]
