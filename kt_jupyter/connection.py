"""A compute as this notebook sees it: its kernel, a session, and what the pod already holds.

:func:`connect` returns the one :class:`ComputeConnection` per compute name in
this process, launching or reattaching to the pod kernel. :meth:`run_cell`
is the whole life of a ``%%kt`` cell: work out what the cell reads and
assigns, push the globals the pod lacks, run it with output streamed back,
pull the names it assigned (or leave :class:`RemoteRef` stand-ins for big or
unpicklable ones).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, MutableMapping

from pod_kernel import protocol as P

from .backends import KernelHandle, get_backend, kt_home
from .cells import analyze_cell, filter_pushable
from .client import ExecuteResult, InputCallback, OutputCallback, ProgressCallback, Session
from .codesync import CodeTree
from .compute import Compute
from .debugging import DebugEndpoint
from .errors import ComputeSpecError, KernelDiedError, KtError, TransferError
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
class CellOutcome:
    """What running a cell did: result bundle, names moved each way, timings."""

    result: ExecuteResult | None
    pushed: list[str] = field(default_factory=list)
    skipped_unchanged: list[str] = field(default_factory=list)
    pulled: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_pushed: int = 0
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
        #: name -> fingerprint of the value the pod holds under that name (as last sent or pulled)
        #: name -> (fingerprint of the value, id() of the object the pod bound), as last sent or pulled.
        #: Before skipping a push the pod is asked for the ids: another notebook sharing this compute
        #: may have rebound the name.
        self.held: dict[str, tuple[str, int | None]] = {}
        self.cells_run = 0
        self.lock = threading.Lock()
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
    ) -> CellOutcome:
        """Push what the cell reads, run it, pull what it assigns; raise the remote error if any.

        ``on_input(prompt, password)`` answers the cell's ``input()`` and pdb
        prompts (see :meth:`Session.execute`); ``debug_wait``: the pod waits
        for a debugger to attach (:meth:`debug`) before running the cell.
        """
        transfer = transfer or TransferOptions()
        t0 = time.perf_counter()
        analysis = analyze_cell(source)
        if not self.caught_up:
            self.catch_up(on_output or (lambda _msg: None))
        self.sync_code()
        outcome = CellOutcome(None)
        names = list(dict.fromkeys(list(filter_pushable(analysis.reads, user_ns)) + transfer.push))
        missing = [n for n in transfer.push if n not in user_ns]
        if missing:
            raise TransferError(f"--push names {', '.join(missing)}, which the notebook does not define")
        self._push(names, user_ns, outcome, force=set(transfer.push), on_progress=on_progress)
        outcome.timings_s["push"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        try:
            outcome.result = self.session.execute(source, on_output, cell_name=cell_name, cell_label=cell_label,
                                                  timeout=timeout_s, on_input=on_input, debug_wait=debug_wait)
        finally:
            outcome.timings_s["execute"] = time.perf_counter() - t1
            self.cells_run += 1
            # names the cell (re)bound remotely no longer hold what we last sent
            for name in list(analysis.assigns) + list(analysis.deletes):
                self.held.pop(name, None)

        t2 = time.perf_counter()
        if not transfer.no_pull:
            wanted = transfer.pull if transfer.pull is not None else list(analysis.assigns)
            self._pull_into(wanted, user_ns, outcome, transfer.pull_limit_bytes, on_progress)
        for name in analysis.deletes:
            if name in user_ns and name not in analysis.assigns:
                del user_ns[name]
                outcome.deleted.append(name)
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

    # ------------------------------------------------------------------ moving values

    def _push(self, names: Iterable[str], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
              force: set[str], on_progress: Callable[[str, int, int], None] | None) -> None:
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
            fp = P.fingerprint(value)
            prints[name] = fp
            held = self.held.get(name)
            if fp and name not in force and held is not None and held[0] == fp and held[1] is not None:
                maybe_held.append(name)
            else:
                send[name] = value
        if maybe_held:  # one round trip: does the pod still hold the very objects we left there?
            pod_ids = {d["name"]: d.get("id") for d in self.session.inventory(maybe_held)}
            for name in maybe_held:
                if pod_ids.get(name) == self.held[name][1]:
                    outcome.skipped_unchanged.append(name)
                else:
                    send[name] = user_ns[name]
        if not send:
            return
        bundle = self._dump(send)
        progress = None if on_progress is None else (lambda done, total: on_progress("push", done, total))
        self.session.push_bundle(bundle, on_progress=progress)
        ids = self.session.last_push_ids
        self.held.update({n: (prints[n], ids.get(n)) for n in send if prints.get(n)})
        outcome.pushed = list(send)
        outcome.bytes_pushed = bundle.nbytes

    @staticmethod
    def _dump(values: dict[str, Any]) -> P.Bundle:
        try:
            return P.dump_values(values)
        except Exception:
            pass
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

    def _pull_into(self, names: Iterable[str], user_ns: MutableMapping[str, Any], outcome: CellOutcome,
                   limit_bytes: int, on_progress: Callable[[str, int, int], None] | None) -> None:
        names = list(dict.fromkeys(names))
        if not names:
            return
        described = {d["name"]: d for d in self.session.inventory(names)}
        small = []
        for name in names:
            d = described.get(name)
            if d is None:
                continue  # assigned only on a branch not taken, or deleted again
            if d["size"] > limit_bytes:
                user_ns[name] = RemoteRef(name, self.name, d["type"], d["size"])
                outcome.refs.append(name)
            else:
                small.append(name)
        if not small:
            return
        progress = None if on_progress is None else (lambda done, total: on_progress("pull", done, total))
        try:
            values = self.session.pull(small, on_progress=progress)
        except Exception:
            values = {}
            for name in small:  # find which one cannot come back; the others still do
                try:
                    values.update(self.session.pull([name]))
                except Exception as exc:
                    d = described[name]
                    user_ns[name] = RemoteRef(name, self.name, d["type"], d["size"],
                                              reason=f"cannot be brought back: {type(exc).__name__}: {exc}")
                    outcome.refs.append(name)
        for name, value in values.items():
            user_ns[name] = value
            fp = P.fingerprint(value)
            if fp:
                self.held[name] = (fp, described[name].get("id"))
            outcome.pulled.append(name)

    def pull(self, names: Iterable[str], user_ns: MutableMapping[str, Any],
             on_progress: ProgressCallback | None = None) -> list[str]:
        """Fetch names into ``user_ns`` whatever their size (``%kt pull``)."""
        names = list(names)
        values = self.session.pull(names, on_progress=on_progress)
        for name, value in values.items():
            user_ns[name] = value
            fp = P.fingerprint(value)
            if fp:
                self.held[name] = (fp, None)  # not known to be the pod's object: sent again when read
        return list(values)

    def forget_state(self) -> None:
        """The pod kernel is new: it holds nothing we sent before."""
        self.held.clear()


# ---------------------------------------------------------------------- the process-wide registry

_connections: dict[tuple[str, str], ComputeConnection] = {}
_registry_lock = threading.Lock()
_default = Compute()


def default_compute() -> Compute:
    """The compute ``%%kt`` cells use when they name none."""
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
    with _registry_lock:
        conn = _connections.get(key)
        backend = get_backend(compute.backend)
        if conn is not None:
            why = conn.handle.liveness() if conn.handle.liveness else None
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
            backend.delete(compute.name, grace_period_s=0)
        handle = backend.launch(compute, keep=keep, on_event=say)
        conn = ComputeConnection(compute, handle)
        _connections[key] = conn
        return conn


def _resource_diff(wanted: Compute, running: Compute, only: Iterable[str] | None = None) -> str:
    """'' when alike (in ``only`` if given), else e.g. "gpus=None (not 1)"."""
    dw, dr = wanted.to_dict(), running.to_dict()
    keys = ("backend", "cpus", "memory", "gpus", "gpu_type", "image", "env_vars", "namespace")
    if only is not None:
        keys = tuple(k for k in keys if k in set(only))
    return ", ".join(f"{k}={dr.get(k)!r} (not {dw.get(k)!r})" for k in keys if dw.get(k) != dr.get(k))


def connections() -> list[ComputeConnection]:
    """Connections this process holds."""
    return list(_connections.values())


def disconnect(name: str, backend: str | None = None) -> ComputeConnection | None:
    """Forget (and close) this process's connection to compute ``name``."""
    with _registry_lock:
        for key in list(_connections):
            if key[1] == name and (backend is None or key[0] == backend):
                conn = _connections.pop(key)
                conn.session.close_quietly()
                return conn
    return None


def is_kernel_death(exc: BaseException) -> bool:
    """Whether an error means the pod kernel (and its state) is gone."""
    return isinstance(exc, KernelDiedError)
