"""``%%kt --workers N`` and the ``%kt`` subcommands on distributed computes: thin, over the group API.

The single-kernel path of ``%%kt`` stays as it is; a cell with ``--workers``
(or ``--framework``/``--all-ranks``) comes here. pytorch: the cell runs on
every worker (:func:`kt_jupyter.distributed_cells.run_cell`); ray: the
single-kernel path runs it on the head's connection, unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, MutableMapping
from typing import Any

from IPython.core.error import UsageError

from .. import distributed_group as dg
from ..compute import Compute
from ..connection import TransferOptions
from ..distributed import rank_name
from ..distributed_cells import RankNamespace, pull_from_rank, run_cell
from ..errors import ComputeSpecError
from ..render import RemoteResult, present_error, show_notice, show_output
from ..widgets import transfer_reporter, widgets_available


def wants_workers(args: argparse.Namespace) -> bool:
    """Whether a ``%%kt`` line asks for a distributed compute."""
    return args.workers is not None or args.framework is not None or args.all_ranks


def distributed_compute(args: argparse.Namespace, compute: Compute) -> Compute:
    """``compute`` distributed as ``--workers N --framework F`` say (UsageError for a bad value)."""
    if args.workers is None:
        raise UsageError("--framework and --all-ranks go with --workers N (how many workers)")
    try:
        return compute.with_overrides(distributed={"framework": args.framework or "pytorch",
                                                   "workers": args.workers})
    except ComputeSpecError as exc:
        raise UsageError(str(exc)) from None


def check_not_distributed(compute: Compute, connected: bool) -> None:
    """Before a single-kernel cell's first run on ``compute``: its name must not be a running group's."""
    if connected:
        return
    try:
        dg.check_single(compute)
    except ComputeSpecError as exc:
        raise UsageError(str(exc)) from None


class DistributedCells:
    """What ``%%kt --workers`` keeps between cells: each group's per-rank namespaces."""

    def __init__(self) -> None:
        self.namespaces: dict[tuple[str, str], list[RankNamespace]] = {}

    def connect(self, compute: Compute, keep: bool) -> dg.WorkerGroup:
        """The group (launching it): launch progress as notices, then (in a notebook) the panel of every worker."""
        said: list[str] = []

        def report(text: str) -> None:
            said.append(text)
            show_notice(text)

        try:
            group = dg.connect_group(compute, keep=keep, on_event=report)
        except ComputeSpecError as exc:
            raise UsageError(str(exc)) from None
        if said and widgets_available():  # launched (or started again): show it as `%kt status NAME` would
            status(compute.backend, compute.name, lambda *_a: None, quiet=True)
        return group

    def _namespaces(self, group: dg.WorkerGroup, user_ns: MutableMapping[str, Any]) -> list[RankNamespace]:
        key = (group.compute.backend, group.name)
        spaces = self.namespaces.get(key)
        if spaces is None or len(spaces) != len(group.ranks) or spaces[0].base is not user_ns \
                or any(s.compute != c.name for s, c in zip(spaces, group.ranks)):
            spaces = [RankNamespace(user_ns, c.name, r) for r, c in enumerate(group.ranks)]
            self.namespaces[key] = spaces
        return spaces

    def run(self, shell: Any, compute: Compute, source: str, cell: str, *, keep: bool, all_ranks: bool,
            transfer: TransferOptions, timeout_s: float | None, label: str, cell_name: str, count: int) -> Any:
        """Run the cell on every worker (pytorch); returns what the notebook shows as the cell's result."""
        group = self.connect(compute, keep)
        try:
            outcome = run_cell(group, source, shell.user_ns, self._namespaces(group, shell.user_ns),
                               transfer=transfer, on_output=show_output, all_ranks=all_ranks,
                               cell_name=cell_name, cell_label=label, timeout_s=timeout_s,
                               on_progress=transfer_reporter())
        except BaseException as exc:
            raise present_error(exc, shell, count) from None
        results = [o.result if o is not None else None for o in outcome.outcomes]
        if all_ranks:
            for rank, res in enumerate(results[1:], start=1):
                if res is not None and res.data and not cell.rstrip().endswith(";"):
                    show_output({"type": "stream", "name": "stdout", "text": f"Out[{count}:{rank}]:\n"})
                    show_output({"type": "display", "data": res.data, "metadata": res.metadata})
        result = results[0]
        if result is not None and result.data and not cell.rstrip().endswith(";"):
            return RemoteResult(result.data, result.metadata)
        return None

    def forget(self, backend: str, name: str) -> None:
        """Drop the namespaces of a group that was stopped."""
        self.namespaces.pop((backend, name), None)


def group_named(backend: str, name: str) -> dg.WorkerGroup | None:
    """This process's group of that name, or None."""
    return next((g for g in dg.groups() if g.name == name and g.compute.backend == backend), None)


def is_distributed(backend: str, name: str) -> bool:
    """Whether ``name`` is a distributed compute (this process's, or one running)."""
    return group_named(backend, name) is not None or dg.existing_group(backend, name) is not None


def pull(group_or_none: dg.WorkerGroup | None, name: str, names: list[str], rank: int | None,
         user_ns: MutableMapping[str, Any]) -> list[str]:
    """``%kt pull NAME --rank R`` / ``--all-ranks``: each rank's value as ``NAME_rR`` (rank 0's stays NAME)."""
    if group_or_none is None:
        raise UsageError(f"compute {name!r} is not a distributed compute this notebook runs cells on; "
                         f"run a `%%kt --workers N --name {name}` cell first")
    ranks = range(len(group_or_none.ranks)) if rank is None else [rank]
    bound = []
    for r in ranks:
        try:
            bound += pull_from_rank(group_or_none, r, names, user_ns, suffix=True)
        except IndexError as exc:
            raise UsageError(str(exc)) from None
    return bound


def down(backend: str, name: str, cells: DistributedCells) -> bool:
    """Stop every worker of ``name``; True if any ran."""
    cells.forget(backend, name)
    existed = dg.delete_group(backend, name)
    show_notice(f"{name} ({backend}): every worker {'stopped and deleted' if existed else 'was not running'}",
                "info")
    return existed


def status(backend: str, name: str, show: Callable[[str, str], Any], quiet: bool = False) -> None:
    """``%kt status NAME``: each worker's status, rank by rank (``quiet``: the panel only, no heading line)."""
    group = group_named(backend, name)
    found = dg.existing_group(backend, name) if group is None else None
    workers = group.config.workers if group is not None else (found[0] if found else 0)
    framework = group.config.framework if group is not None else (found[1] if found else "?")
    if not quiet:
        print(f"{name}: {workers} {framework} workers ({', '.join(rank_name(name, r) for r in range(workers))})")
    kernels = 1 if backend == "kubernetes" and framework == "ray" else workers  # KubeRay's workers run Ray only
    if widgets_available() and kernels:  # one panel: every worker's status and its own sparklines
        from ..widgets.panel import show_group_panel

        show_group_panel(name, f"{workers} {framework} workers", [rank_name(name, r) for r in range(kernels)],
                         backend, [c.handle for c in group.ranks] if group is not None else None)
        return
    for rank in range(workers):
        print(f"--- rank {rank}")
        if backend != "kubernetes":
            show(rank_name(name, rank), backend)
            continue
        from ..backends.kubernetes_distributed import status_of_name

        info = status_of_name(rank_name(name, rank))  # the pod's state, read as the backend reads one kernel's
        if info is None:  # Ray's worker pods hold Ray only
            print("a Ray worker pod (a Ray node, no pod kernel)")
            continue
        print(f"{info.phase}: {info.where}" + (f"\n{info.detail}" if info.detail else ""))
