"""``%%kt`` (run a cell on a pod kernel) and ``%kt <subcommand>`` (manage computes).

Thin by design: each magic parses its line, then makes one call into
:mod:`kt_jupyter.connection` / the backends, in the style of ipyparallel's
``client/magics.py``. User mistakes are ``UsageError``s; errors from remote
code are raised as their real type with the remote traceback as what the
notebook shows.
"""

from __future__ import annotations

import argparse
import functools
import os
import posixpath
import shlex
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import MagicArgumentParser, kwds, magic_arguments, parse_argstring

from .. import connection as conn_mod
from .. import debug_panel, oom
from ..backends import BACKENDS, backend_with, get_backend
from ..cells import analyze_cell
from ..compute import Compute
from ..debugging import NotebookInput, install_post_mortem
from ..errors import BackendUnavailable, ComputeSpecError, KtError, NotFoundError, RemoteError
from ..names import check_compute_name
from ..render import RemoteResult, present_error, show_notice, show_output, stopped_because
from ..widgets import Deferred, launch_reporter, transfer_reporter
from ..widgets.frontend import current_parent
from . import distributed as kt_dist
from .args import KtHelpFormatter, cell_line_args, compute_from_args, parse_seconds, transfer_from_args

#: Usage line of the cell magic (argparse %-formats it: '%%%%' shows as '%%').
CELL_USAGE = "%%%%kt [options]      (the first line of a cell; the rest of the cell runs remotely)"
#: How many distinct %%kt lines keep their parsed options (a notebook has a handful).
PARSED_LINES_KEPT = 64
CELL_EPILOG = "Managing computes: %kt list | status | logs | down | restart | pull | config | pick | wait; %kt help"


def notebook_compute_name(session: str | None = None) -> str:
    """A compute name of this notebook's own: ``nb-<notebook file stem>`` (JupyterLab and Notebook 7 tell the
    kernel its notebook's path), else ``nb-<this kernel's pid>``."""
    path = session if session is not None else os.environ.get("JPY_SESSION_NAME", "")
    stem = os.path.splitext(os.path.basename(path))[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem.lower()).strip("-_")[:40]
    return f"nb-{cleaned or os.getpid()}"


def running_cell_count(shell: Any) -> int:
    """The N of the running cell's ``In[N]``, exactly as IPython labels its frames (``Cell In[N], line L``).

    IPython 9 counts a cell before running it, IPython 8 after; the number that
    IPython's compiler recorded for the calling cell's code is the one its
    tracebacks show. Outside a cell: the shell's ``execution_count``.
    """
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", None)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and isinstance(numbers, dict):
        number = numbers.get(frame.f_code.co_filename)
        if isinstance(number, int):
            return number
        frame = frame.f_back
    return int(shell.execution_count)


def shared_text(name: str, pids: list[int]) -> str:
    """Who uses compute ``name``: every notebook or terminal kernel attached runs cells on the same variables."""
    if not pids:
        return f"attached:  no notebook kernel (compute {name!r} runs on its own until stopped or idle)"
    mine = [p for p in pids if p == os.getpid()]
    others = [p for p in pids if p != os.getpid()]
    parts = (["this kernel"] if mine else []) + [f"pid {p}" for p in others]
    line = f"attached:  {', '.join(parts)}"
    if others:
        line += (f"\n           shared: cells from {'these' if len(pids) > 1 else 'that'} kernels run on the same "
                 f"variables; `%kt config --per-notebook` gives this notebook a compute of its own")
    return line


class AsyncCell:
    """A ``%%kt --async`` cell running in the background."""

    def __init__(self, label: str, compute: str) -> None:
        self.label = label
        self.compute = compute
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.outcome: conn_mod.CellOutcome | None = None
        self.done = threading.Event()

    def __repr__(self) -> str:
        state = "running" if not self.done.is_set() else ("failed" if self.error else "done")
        return f"<kt async cell {self.label} on {self.compute!r}: {state}>"


def _subcommand_parser(prog: str, description: str) -> MagicArgumentParser:
    p = MagicArgumentParser(prog=f"%kt {prog}", description=description, add_help=False,
                            formatter_class=KtHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help=argparse.SUPPRESS)
    return p


@magics_class
class KtMagics(Magics):
    """The kt magics."""

    shell: InteractiveShell  # Magics allows None; these are always built with the shell they run in

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        self.async_cells: list[AsyncCell] = []
        #: %%kt --workers cells: each group's per-rank namespaces
        self._dist = kt_dist.DistributedCells()
        #: what the last %%kt cell moved and how long each step took (for tests and curious users)
        self.last_outcome: conn_mod.CellOutcome | None = None
        self._subcommands = self._build_subcommands()
        #: (backend, name, pid, started) of the kernel the last %%kt cell ran on
        self._last_kernel: tuple[str, str, int | None, float] | None = None
        #: %%kt line -> (default compute, its options, the compute they ask for, the options it set)
        self._parsed_lines: dict[str, tuple[Compute, argparse.Namespace, Compute, frozenset[str]]] = {}
        #: the exact text of the cell running now (JupyterLab's debugger names cell files by hashing it)
        self._raw_cell: str | None = None
        shell.events.register("pre_run_cell", self._remember_cell)
        install_post_mortem(shell)  # %debug and %pdb on reach a failed %%kt cell's frames on its pod
        # the first %%kt cell's kernel is started ahead on the default backend (backends/local_spare.py); the
        # default compute itself is only built by the first cell (a bad KT_* variable fails that cell, not this)
        get_backend("local").prestart()

    def _remember_cell(self, info: Any) -> None:
        self._raw_cell = getattr(info, "raw_cell", None)

    # ------------------------------------------------------------------ %%kt

    @no_var_expand  # expanded by the magic itself, only when the line has something to expand (see _expand)
    @magic_arguments()
    @kwds(usage=CELL_USAGE, formatter_class=KtHelpFormatter, epilog=CELL_EPILOG)
    @cell_line_args
    @cell_magic
    def kt(self, line: str, cell: str) -> Any:
        """Run this cell on a warm pod kernel (local subprocess or Kubernetes pod).

        The globals the cell reads are sent (unchanged ones only once), its
        output streams back live, and the names it assigns come back (big
        ones stay remote as RemoteRef; `%kt pull NAME` fetches them).
        Without compute options the cell runs on the default compute
        (`%kt config`, `%kt pick`); out of the box: local backend, name
        'default', shared by every notebook and terminal of this user.

        For example, as the first line of a cell:

            %%kt
            %%kt --gpus 1 --memory 16Gi --name train --backend kubernetes
            %%kt --workers 2 --name ddp          (every rank runs it: torch.distributed)
        """
        args, compute, explicit = self._parse_line(self._expand(line))
        if args.help:
            print(self.kt.parser.format_help())
            return None
        transfer = transfer_from_args(args)
        timeout_s = parse_seconds(args.timeout, "--timeout")
        if args.debug not in (None, "attach", "wait"):
            raise UsageError(f"--debug takes nothing or 'wait' (--debug wait), got {args.debug!r}")
        count = running_cell_count(self.shell)
        label = f"In[{count}]"
        cell_name = f"kt-cell-{count}.py"
        # the magic line as a comment keeps the notebook's line numbers in remote tracebacks
        source = f"# %%kt {line}\n{cell}"
        try:
            analyze_cell(source)  # a cell that does not parse fails here, before any kernel starts
        except SyntaxError as exc:
            raise present_error(exc, self.shell, count) from None
        events: list[str] = []
        parent = current_parent()  # this cell: what other threads show for it later goes there
        if kt_dist.wants_workers(args):  # N workers: every rank runs it (pytorch), or a Ray cluster's head
            compute = kt_dist.distributed_compute(args, compute)
            if compute.distributed_config.framework == "pytorch":  # type: ignore[union-attr]
                return self._dist.run(self.shell, compute, source, cell, keep=args.keep, all_ranks=args.all_ranks,
                                      transfer=transfer, timeout_s=timeout_s, label=label, cell_name=cell_name,
                                      count=count)
            connection = self._dist.connect(compute, args.keep).head
        else:
            kt_dist.check_not_distributed(compute, any(c.name == compute.name and c.compute.backend == compute.backend
                                                       for c in conn_mod.connections()))
            connection = self._connect(compute, keep=args.keep, strict=explicit, heard=events, parent=parent)
        self._say_where(connection, announced=bool(events))
        if args.debug:
            self._announce_debugger(connection, cell_name, source, wait=args.debug == "wait")
        elif not args.async_:
            cell_name = self._debug_panel_file(connection) or cell_name
        # pdb / input() in the cell ask here; a background cell has no input box
        on_input = NotebookInput(allowed=not args.async_)
        # made when a transfer needs it: most cells move nothing big
        progress = Deferred(lambda into: transfer_reporter(parent=into), parent)

        def run() -> conn_mod.CellOutcome:
            try:
                return oom.run_cell(  # connection.run_cell, plus a clear OOM error and the opt-in retry
                    connection, source, self.shell.user_ns, retry_oom=args.retry_oom, keep=args.keep,
                    on_event=show_notice,
                    transfer=transfer, on_output=show_output, on_progress=progress,
                    cell_name=cell_name, cell_label=label, timeout_s=timeout_s,
                    on_input=on_input, debug_wait=args.debug == "wait",
                )
            except BaseException as exc:  # a transfer it leaves unfinished says so (a --async cell's too)
                progress.stop(stopped_because(exc))
                raise

        if args.async_:
            return self._start_async(run, label, compute.name)
        try:
            outcome = self.last_outcome = run()
        except BaseException as exc:  # shown as IPython shows a local cell's error (colours, no frames of ours)
            raise present_error(exc, self.shell, count) from None
        result = outcome.result
        if result is not None and result.data and not cell.rstrip().endswith(";"):
            return RemoteResult(result.data, result.metadata)
        return None

    def _expand(self, line: str) -> str:
        """The ``%%kt`` line with ``$name`` and ``{expr}`` expanded as IPython expands a magic's line.

        IPython does it before calling any magic that does not opt out, and
        copies the whole namespace to do it: 27 us a cell here, more in a
        notebook of many names. A line without ``$`` or ``{`` has nothing to
        expand; one with them is expanded by IPython's own ``var_expand``, in
        the same frame it would have used.
        """
        if "$" not in line and "{" not in line:
            return line
        frame: Any = sys._getframe()
        hops = 0
        while frame is not None and frame.f_code is not InteractiveShell.run_cell_magic.__code__:
            frame, hops = frame.f_back, hops + 1
        # var_expand reads the frame depth + 1 above its own, which is this one's caller: IPython's is the frame two
        # above run_cell_magic; called some other way, the user namespace alone
        return str(self.shell.var_expand(line, hops + 2 if frame is not None else sys.getrecursionlimit()))

    def _debug_panel_file(self, connection: conn_mod.ComputeConnection) -> str | None:
        """With JupyterLab's debugger on and breakpoints in this cell: link the pod's debugpy to the panel.

        Returns the cell's file as JupyterLab names it, for the pod to run the cell under.
        """
        panel = debug_panel.active_debugger(self.shell)
        raw = self._raw_cell
        if panel is None or raw is None or not raw.lstrip().startswith("%%kt"):
            return None
        from ipykernel.compiler import get_file_name

        path = get_file_name(raw)
        if not panel.wants(path):
            return None
        try:
            endpoint = connection.debug()
            panel.link_pod(connection.name, endpoint.host, endpoint.port, write_file=connection.session.write_cell_file)
        except (KtError, RemoteError, debug_panel.DapError, OSError) as exc:
            print(f"[kt] JupyterLab's debugger cannot reach pod kernel {connection.name!r} ({exc}); "
                  "this cell runs without its breakpoints", file=sys.stderr)
            return None
        return path

    def _announce_debugger(self, connection: conn_mod.ComputeConnection, cell_name: str, source: str,
                           wait: bool) -> None:
        """Start debugpy in the pod kernel and print how to attach, and which file this cell runs from."""
        try:
            endpoint = connection.debug()
        except (KtError, RemoteError) as exc:
            raise UsageError(f"--debug: {exc}") from None
        cell_file = posixpath.join(endpoint.cells_dir, cell_name)
        local_file = os.path.join(endpoint.local_cells_dir, cell_name)
        if local_file != cell_file:  # the IDE opens (and sets breakpoints in) a local copy of the cell
            os.makedirs(endpoint.local_cells_dir, exist_ok=True)
            with open(local_file, "w") as f:
                f.write(source)
        print(endpoint.describe(cell_file, local_file, waiting=wait), flush=True)

    def _parse_line(self, line: str) -> tuple[argparse.Namespace, Compute, set[str]]:
        """The ``%%kt`` line's options and the compute they ask for, parsed once per line and default compute.

        A cell run again gets the very same Compute, so :func:`connection.connect` knows the spec its kernel
        was launched with by identity (no settings comparison), and the line is not parsed again.
        """
        default = conn_mod.default_compute()
        hit = self._parsed_lines.get(line)
        if hit is not None and hit[0] is default:
            return hit[1], hit[2], set(hit[3])
        args = parse_argstring(self.kt, line)
        compute, explicit = compute_from_args(args, default)
        if len(self._parsed_lines) >= PARSED_LINES_KEPT:
            self._parsed_lines.clear()
        self._parsed_lines[line] = (default, args, compute, frozenset(explicit))
        return args, compute, explicit

    def _connect(self, compute: Compute, keep: bool = False, strict: set[str] | None = None,
                 heard: list[str] | None = None, parent: Any = None) -> conn_mod.ComputeConnection:
        """Connect (launching or reattaching); what the launch said is shown (in the cell of ``parent``, a
        parent header; by default the one running now), and appended to ``heard``."""
        # made when a launch says something: most cells find their kernel running
        report = Deferred(lambda into: launch_reporter(compute.name, compute.backend, into),
                          current_parent() if parent is None else parent)

        def on_event(text: str) -> None:
            if heard is not None:
                heard.append(text)
            report(text)

        try:
            return conn_mod.connect(compute, keep=keep, strict=strict or set(), on_event=on_event)
        except ComputeSpecError as exc:
            raise UsageError(str(exc)) from None

    def _say_where(self, connection: conn_mod.ComputeConnection, announced: bool) -> None:
        """One line when this cell runs elsewhere than the previous %%kt cell: another compute, or a new
        (empty) kernel under the same name that nothing has announced yet."""
        handle = connection.handle
        here = (connection.compute.backend, connection.name, handle.pid, handle.started)
        before, self._last_kernel = self._last_kernel, here
        if before is None or before == here:
            return
        if before[:2] != here[:2]:
            show_notice(f"this cell runs on {here[1]!r} ({here[0]}); the previous %%kt cell ran on "
                        f"{before[1]!r} ({before[0]})", "info")
        elif not announced:
            show_notice(f"this cell runs on a new pod kernel {here[1]!r} ({handle.where or here[0]}): "
                        "the variables earlier cells left there are gone", "warning")

    def _start_async(self, run: Callable[[], conn_mod.CellOutcome], label: str, compute: str) -> None:
        job = AsyncCell(label, compute)
        parent = getattr(self.shell, "parent_header", None)
        # ipykernel's shell has set/reset_thread_parent; a terminal IPython's has neither
        set_thread_parent = getattr(self.shell, "set_thread_parent", None)
        reset_thread_parent = getattr(self.shell, "reset_thread_parent", None)

        def target() -> None:
            tokens = None
            if parent is not None and set_thread_parent is not None:
                tokens = set_thread_parent(parent)  # our output goes to the cell that started us
            try:
                job.outcome = run()
                result = job.outcome.result
                if result is not None and result.data:
                    show_output({"type": "display", "data": result.data, "metadata": result.metadata})
            except BaseException as exc:  # shown in the cell that started it; %kt wait re-raises
                job.error = present_error(exc, self.shell)
                self.shell.showtraceback((type(exc), exc, exc.__traceback__))
            finally:
                if tokens is not None and reset_thread_parent is not None:
                    reset_thread_parent(tokens)
                job.done.set()

        job.thread = threading.Thread(target=target, name=f"kt-async-{label}", daemon=True)
        self.async_cells.append(job)
        job.thread.start()
        show_notice(f"{label} is running on {compute!r} in the background; `%kt wait` waits for it", "info")

    # ------------------------------------------------------------------ %kt

    @line_magic("kt")  # type: ignore[arg-type]  # IPython types line_magic(name) as returning "_F | decorator", not a decorator
    def kt_line(self, line: str) -> Any:
        """Manage computes: %kt list | status | logs | down | restart | pull | config | pick | wait | help.

        `%kt help` describes the %%kt cell magic and every subcommand; `%kt help SUBCOMMAND` one of them.
        """
        words = shlex.split(line)
        if not words or words[0] in ("help", "-h", "--help"):
            topic = words[1] if len(words) > 1 else None
            if topic in self._subcommands:
                print(self._subcommands[topic][0].format_help())
            else:
                print(self._overview())
            return None
        sub = words[0]
        if sub not in self._subcommands:
            raise UsageError(f"unknown subcommand %kt {sub}; one of: {', '.join(self._subcommands)}")
        parser, handler = self._subcommands[sub]
        args = parser.parse_args(words[1:])
        if args.help:
            print(parser.format_help())
            return None
        try:
            return handler(args)
        except (NotFoundError, ComputeSpecError, BackendUnavailable) as exc:
            raise UsageError(str(exc)) from None

    def _overview(self) -> str:
        """What `%kt help` prints: the cell magic with its options, then the subcommands."""
        lines = [self.kt.parser.format_help().rstrip().rsplit("\n", 1)[0].rstrip(), "",
                 "usage: %kt SUBCOMMAND [options]   (a line magic: manages computes; `%kt help SUBCOMMAND`)", ""]
        for name, (parser, _h) in self._subcommands.items():
            lines.append(f"  {name:<9} {parser.description}")
        return "\n".join(lines)

    def _build_subcommands(self) -> dict[str, tuple[MagicArgumentParser, Callable[[Any], Any]]]:
        subs: dict[str, tuple[MagicArgumentParser, Callable[[Any], Any]]] = {}

        p = _subcommand_parser("list", "list computes of every backend with their state")
        p.add_argument("--backend", choices=BACKENDS, help="only this backend")
        subs["list"] = (p, self._list)

        p = _subcommand_parser("status", "show one compute's state, resources and metrics")
        p.add_argument("name", nargs="?", help="compute name (default: the default compute)")
        subs["status"] = (p, self._status)

        p = _subcommand_parser("logs", "show the pod kernel's log (server events and cell output)")
        p.add_argument("name", nargs="?", help="compute name (default: the default compute)")
        p.add_argument("--tail", type=int, default=100, metavar="N", help="last N lines (default 100; 0 for all)")
        p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until interrupted")
        subs["logs"] = (p, self._logs)

        p = _subcommand_parser("down", "stop a compute and delete everything of it")
        p.add_argument("name", nargs="?", help="compute name")
        p.add_argument("--all", action="store_true", help="every compute of every backend")
        subs["down"] = (p, self._down)

        p = _subcommand_parser("restart", "stop a compute and start it again, empty")
        p.add_argument("name", nargs="?", help="compute name (default: the default compute)")
        subs["restart"] = (p, self._restart)

        p = _subcommand_parser("pull", "fetch remote values (e.g. RemoteRefs) into the notebook, whatever their size")
        p.add_argument("vars", nargs="+", metavar="VAR", help="names to fetch")
        p.add_argument("--name", "-n", help="compute to fetch from (default: where the RemoteRef lives)")
        p.add_argument("--rank", type=int, metavar="R", help="a distributed compute's rank R: bound as VAR_rR")
        p.add_argument("--all-ranks", dest="all_ranks", action="store_true",
                       help="every rank of a distributed compute: bound as VAR_r0, VAR_r1, ...")
        subs["pull"] = (p, self._pull)

        p = _subcommand_parser("config", "show or set the default compute used by %%kt cells without options")
        p.add_argument("settings", nargs="*", metavar="key=value", help="e.g. name=train gpus=1 backend=kubernetes")
        p.add_argument("--reset", action="store_true", help="back to local backend, name 'default'")
        p.add_argument("--per-notebook", dest="per_notebook", action="store_true",
                       help="name the default compute after this notebook, so other notebooks and terminals "
                            "(which share 'default') do not run on it")
        subs["config"] = (p, self._config)

        # --- widgets (kt_jupyter.widgets) ---
        p = _subcommand_parser("pick", "choose a compute with a form; launch it, make it the default")
        subs["pick"] = (p, self._pick)

        p = _subcommand_parser("wait", "wait for %%kt --async cells to finish")
        p.add_argument("--timeout", type=float, default=None, help="give up after S seconds")
        subs["wait"] = (p, self._wait)
        return subs

    # ------------------------------------------------------------------ subcommand bodies

    def _named(self, name: str | None) -> Compute:
        """The compute a subcommand names (checked), or the default one."""
        default = conn_mod.default_compute()
        if name is not None:
            check_compute_name(name)
        if name is None or name == default.name:
            return default
        for c in conn_mod.connections():
            if c.name == name:
                return c.compute
        return default.with_overrides(name=name, backend=backend_with(name, default.backend))

    def _list(self, args: Any) -> None:
        rows = []
        for backend_name in [args.backend] if args.backend else BACKENDS:
            try:
                rows += get_backend(backend_name).list()
            except BackendUnavailable:
                if args.backend:
                    raise
            except KtError as exc:
                if args.backend:
                    raise
                print(f"[kt] {backend_name}: {exc}", file=sys.stderr)
        from ..widgets.textfallback import (
            computes_table,  # the picker's and the sidebar's words and formats
        )

        print(computes_table(rows))

    def _status(self, args: Any) -> None:
        from ..widgets import show_status  # a live panel in a notebook, text elsewhere

        compute = self._named(args.name)
        if kt_dist.is_distributed(compute.backend, compute.name):  # every worker, rank by rank
            return kt_dist.status(compute.backend, compute.name, show_status)
        show_status(compute.name, compute.backend)
        attached = getattr(get_backend(compute.backend), "attached", None)
        if attached is not None:
            print(shared_text(compute.name, attached(compute.name)))

    def _pick(self, args: Any) -> None:
        from ..widgets import show_picker  # the form in a notebook, text elsewhere

        show_picker()

    def _logs(self, args: Any) -> None:
        compute = self._named(args.name)
        backend = get_backend(compute.backend)
        text = backend.logs(compute.name, tail=args.tail or None)
        print(text)
        if not args.follow:
            shown = len(text.splitlines())
            if args.tail and shown >= args.tail:  # there may be more: say how to see it
                show_notice(f"last {shown} lines; `%kt logs {compute.name} --tail 0` shows all", "info")
            return
        follow = getattr(backend, "follow_logs", None)
        if follow is None:
            raise UsageError(f"--follow is not supported by the {compute.backend} backend")
        try:
            for chunk in follow(compute.name):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass

    def _down(self, args: Any) -> None:
        if args.all:
            for group in kt_dist.dg.groups():  # every worker of this notebook's distributed computes first
                kt_dist.down(group.compute.backend, group.name, self._dist)
            names = [(b, info.name) for b in BACKENDS for info in self._safe_list(b)]
        elif args.name:
            names = [(self._named(args.name).backend, args.name)]
        else:
            raise UsageError("name a compute (`%kt down NAME`) or use --all")
        for backend_name, name in names:
            if kt_dist.is_distributed(backend_name, name):  # every worker of it
                kt_dist.down(backend_name, name, self._dist)
                continue
            conn_mod.disconnect(name, backend_name)
            existed = get_backend(backend_name).delete(name)
            print(f"[kt] {name} ({backend_name}): {'stopped and deleted' if existed else 'was not running'}")

    @staticmethod
    def _safe_list(backend_name: str) -> list:
        try:
            return get_backend(backend_name).list()
        except KtError:
            return []

    def _restart(self, args: Any) -> None:
        compute = self._named(args.name)
        group = kt_dist.group_named(compute.backend, compute.name)
        if group is not None:  # every worker, started again together
            kt_dist.down(compute.backend, compute.name, self._dist)
            self._dist.connect(group.compute, keep=False)
            print(f"[kt] {compute.name} restarted: {len(group.ranks)} fresh workers, no variables")
            return
        conn_mod.disconnect(compute.name, compute.backend)
        get_backend(compute.backend).delete(compute.name)
        self._connect(compute)
        print(f"[kt] {compute.name} restarted: a fresh kernel, no variables")

    def _pull(self, args: Any) -> None:
        ns = self.shell.user_ns
        if args.rank is not None or args.all_ranks:  # from the ranks of a distributed compute
            compute = self._named(args.name)
            bound = kt_dist.pull(kt_dist.group_named(compute.backend, compute.name), compute.name, list(args.vars),
                                 args.rank, ns)
            print(f"[kt] pulled {', '.join(bound)}")
            return
        by_compute: dict[str, list[str]] = {}
        for var in args.vars:
            value = ns.get(var)
            where = args.name or (value.compute if isinstance(value, conn_mod.RemoteRef) else None)
            by_compute.setdefault(where or conn_mod.default_compute().name, []).append(var)
        pulled = []
        for name, names in by_compute.items():
            compute = self._named(name)
            if get_backend(compute.backend).find(name) is None:  # never launch an empty kernel to pull from
                raise UsageError(f"compute {name!r} is not running (stopped, or never started), so {', '.join(names)} "
                                 f"can no longer be fetched; run the cell that makes them again")
            connection = self._connect(compute)
            progress = transfer_reporter()
            try:
                pulled += connection.pull(names, ns, on_progress=functools.partial(progress, "pull"))
            except BaseException as exc:
                progress.stop(stopped_because(exc))
                raise
        print(f"[kt] pulled {', '.join(pulled)}")
        return

    def _config(self, args: Any) -> None:
        if args.reset:
            conn_mod.set_default_compute(Compute())
        if args.per_notebook:
            conn_mod.set_default_compute(conn_mod.default_compute().with_overrides(name=notebook_compute_name()))
        elif args.settings:
            overrides: dict[str, Any] = {}
            for item in args.settings:
                key, sep, value = item.partition("=")
                if not sep:
                    raise UsageError(f"settings are key=value, got {item!r}")
                overrides[key.strip().replace("-", "_")] = value
            if "env" in overrides:
                from .args import parse_env

                overrides["env_vars"] = parse_env(overrides.pop("env").split(";"))
            try:
                conn_mod.set_default_compute(conn_mod.default_compute().with_overrides(**overrides))
            except (ComputeSpecError, TypeError) as exc:
                raise UsageError(f"%kt config: {exc}") from None
        default = conn_mod.default_compute()
        print(f"default compute: {default!r}")
        print(f"equivalent cell line: {default.magic_line() if hasattr(default, 'magic_line') else ''}")

    def _wait(self, args: Any) -> None:
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        pending = [j for j in self.async_cells if not j.done.is_set()]
        for job in pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.done.wait(remaining):
                raise UsageError(f"{job.label} still running after {args.timeout:g} s")
        failed = [j.error for j in self.async_cells if j.error is not None]
        self.async_cells = [j for j in self.async_cells if not j.done.is_set()]
        print(f"[kt] {len(pending)} background cell(s) finished" + (f", {len(failed)} failed" if failed else ""))
        if failed:
            raise failed[0]
