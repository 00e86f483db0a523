"""Reusable option groups of the kt magics (stacked as decorators) and their conversion to API objects."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, argument_group, kwds, magic_arguments, parse_argstring

from .. import oom
from ..compute import Compute
from ..connection import TransferOptions, default_compute
from ..errors import ComputeSpecError
from ..names import BACKENDS
from ..quantities import parse_size

_F = Callable[..., Any]


class KtHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help as a notebook user reads it: ``usage: %%kt [options]``, placeholders as written (no reST ``::``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(inspect.cleandoc(text), width, indent)


def _stack(*decorators: Callable[[_F], _F]) -> Callable[[_F], _F]:
    def apply(func: _F) -> _F:
        for dec in reversed(decorators):
            func = dec(func)
        return func

    return apply


#: Where a cell runs: the Compute parameters a magic line can set.
compute_args = _stack(
    argument_group("compute", "Where the cell runs (unset options keep the default compute's values)"),
    argument("--name", "-n", help="compute name; the same name reaches the same warm kernel (default: 'default')"),
    argument("--backend", choices=list(BACKENDS), help="local subprocess or Kubernetes pod"),
    argument("--cpus", help="CPU request, e.g. 2, 0.5, 500m"),
    argument("--memory", help="memory request, e.g. 4Gi, 512Mi"),
    argument("--gpus", help="number of GPUs, e.g. 1"),
    argument("--gpu-type", dest="gpu_type", help="GPU product, e.g. A100 (Kubernetes node selector)"),
    argument("--image", help="container image for the pod kernel (Kubernetes)"),
    argument("--namespace", help="Kubernetes namespace"),
    argument("--env", action="append", metavar="K=V", default=[], help="environment variable; repeatable"),
    argument("--launch-timeout", dest="launch_timeout", metavar="S", help="seconds to wait for the kernel to start"),
    argument("--inactivity-ttl", dest="inactivity_ttl", metavar="TTL",
             help="stop the kernel after this long idle, e.g. 30m, 3600"),
)

#: Which names move between the notebook and the pod kernel.
transfer_args = _stack(
    argument_group("transfer", "Which names move (default: push what the cell reads, pull what it assigns)"),
    argument("--push", metavar="A,B", help="always send these names, even when unchanged"),
    argument("--pull", metavar="A,B", help="bring back only these names"),
    argument("--no-pull", dest="no_pull", action="store_true", help="bring nothing back"),
    argument("--pull-limit", dest="pull_limit", metavar="SIZE",
             help="values bigger than this stay remote as RemoteRef (default 256MB)"),
)

#: How the cell runs: deadline, background, lifetime of the kernel, out-of-memory retries.
execution_args = _stack(
    argument_group("execution", "How the cell runs"),
    argument("--timeout", metavar="S", help="interrupt the cell if it runs longer than S seconds"),
    argument("--async", dest="async_", action="store_true",
             help="return at once; output keeps arriving here; names are pulled when it ends (`%%kt wait`)"),
    argument("--keep", action="store_true", help="keep the kernel running after this notebook's kernel exits"),
    argument("--retry-oom", dest="retry_oom", nargs="?", type=int, const=oom.DEFAULT_OOM_RETRIES, default=0,
             metavar="N", help="if the cell runs out of memory, run it again on a new kernel with twice the "
                               "memory, up to N times (default 2; remote variables are lost)"),
)

#: Debugging the cell from an IDE (JupyterLab's debugger panel and `breakpoint()` need no option).
debugging_args = _stack(
    argument_group("debugging", "breakpoint() in a cell opens pdb here; JupyterLab's debugger works as usual"),
    argument("--debug", nargs="?", const="attach", metavar="wait",
             help="start debugpy in the pod kernel and print how an IDE attaches (VS Code launch.json); "
                  "`--debug wait` waits for the IDE to attach before running the cell"),
)

#: Several workers: torch.distributed ranks (the cell runs on each) or a Ray cluster (the cell runs on its head).
distributed_args = _stack(
    argument_group("distributed", "Run on several workers (torch.distributed ranks, or a Ray cluster)"),
    argument("--workers", type=int, metavar="N",
             help="run on N pod kernels: pytorch runs the cell on every rank (RANK, WORLD_SIZE, MASTER_ADDR... set; "
                  "output labelled [stdout:RANK]; names come back from rank 0); ray runs it on the head of an "
                  "N-node Ray cluster"),
    argument("--framework", choices=["pytorch", "ray"], help="pytorch (default) or ray"),
    argument("--all-ranks", dest="all_ranks", action="store_true",
             help="show rich output and results of every rank, not only rank 0's"),
)

#: Every option of the ``%%kt`` line, group by group (the magic's parser, and :func:`parse_cell_line`'s).
cell_line_args = _stack(
    argument("-h", "--help", action="store_true", help=argparse.SUPPRESS),
    compute_args, transfer_args, execution_args, debugging_args, distributed_args,
)


@magic_arguments()
@kwds(usage="%%kt [options]")
@cell_line_args
def _cell_line(line: str) -> None:
    """The options of a ``%%kt`` line, for :func:`parse_cell_line` (the magic has the same ones)."""


def parse_cell_line(line: str) -> argparse.Namespace:
    """The options of a ``%%kt`` line (the text after ``%%kt``); a UsageError for one the magic rejects."""
    try:
        return parse_argstring(_cell_line, line)
    except ValueError as exc:  # shlex: an unclosed quote
        raise UsageError(f"%%kt line: {exc}; close the quote") from None


def compute_of_cell(code: str) -> str:
    """The compute name a ``%%kt`` cell runs on: its ``--name``, else the default compute's.

    A line the magic will reject names the default compute here (the magic says why when the cell runs).
    """
    line = code.lstrip().split("\n", 1)[0].removeprefix("%%kt")
    default = default_compute()
    try:
        return compute_from_args(parse_cell_line(line), default)[0].name
    except (UsageError, ComputeSpecError):
        return default.name


_COMPUTE_KEYS = ("name", "backend", "cpus", "memory", "gpus", "gpu_type", "image", "namespace",
                 "launch_timeout", "inactivity_ttl")


def _names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def parse_env(items: list[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> dict, with a UsageError naming a malformed item."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--env expects KEY=VALUE, got {item!r}")
        env[key.strip()] = value
    return env


def compute_from_args(args: argparse.Namespace, default: Compute) -> tuple[Compute, set[str]]:
    """The compute a magic line asks for: the default with the given options applied.

    Returns the compute and the names of the parameters the line set.
    """
    overrides: dict[str, Any] = {k: getattr(args, k) for k in _COMPUTE_KEYS if getattr(args, k, None) is not None}
    env = parse_env(getattr(args, "env", []) or [])
    if env:
        overrides["env_vars"] = {**(default.env_vars or {}), **env}
    if not overrides:
        return default, set()
    try:
        return default.with_overrides(**overrides), set(overrides)
    except ComputeSpecError as exc:
        raise UsageError(str(exc)) from None


def transfer_from_args(args: argparse.Namespace) -> TransferOptions:
    """TransferOptions from --push/--pull/--no-pull/--pull-limit."""
    options = TransferOptions(push=_names(args.push), no_pull=args.no_pull)
    if args.pull is not None:
        options.pull = _names(args.pull)
    if args.no_pull and args.pull:
        raise UsageError("--pull and --no-pull contradict each other; use one")
    if args.pull_limit is not None:
        try:
            options.pull_limit_bytes = parse_size(args.pull_limit)
        except (ComputeSpecError, ValueError) as exc:
            raise UsageError(f"--pull-limit: {exc}") from None
    return options


def parse_seconds(value: str | None, option: str) -> float | None:
    """A positive number of seconds, or a UsageError naming the option."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"{option} expects seconds, e.g. 60; got {value!r}") from None
    if seconds <= 0:
        raise UsageError(f"{option} must be positive; got {value!r}")
    return seconds
