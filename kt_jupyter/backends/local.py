"""Local backend: pod kernels as subprocesses of this interpreter (the default; no cluster).

Registry: ``$KT_HOME/local/<name>/`` (``~/.kt`` by default, mode 0700) holds
``token``, ``kernel.json`` (pid, port, spec without env values) and
``kernel.log`` (the kernel's stdout/stderr: server events and cell output),
all 0600. Any process of the same user finds a kernel there by name, which is
how a restarted notebook reattaches to its warm kernel; entries that are not
that user's own are never trusted (:mod:`.local_registry`).

A kernel runs in its own process group, so delete stops everything it
started. It exits by itself when the notebook kernel that launched it exits
(unless launched with ``keep=True``) and after ``inactivity_ttl``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import psutil

from ..distributed import fold_workers
from ..errors import ComputeSpecError, KtError, LaunchError, NotFoundError
from . import KernelHandle, KernelInfo, kt_home, spec_mismatch, spec_mismatch_error
from . import local_registry as registry
from .local_spare import SparePool
from .rlimits import apply_memory_limit

if TYPE_CHECKING:
    from ..compute import Compute

#: Lines of the kernel log quoted in errors.
LOG_LINES_IN_ERRORS = 15
#: How often ``follow_logs`` looks for new log text, and how much it reads at once.
FOLLOW_POLL_S = 0.25
FOLLOW_READ_BYTES = 64 << 10
#: Seconds a pod kernel waits, after the notebook kernel that launched it exits, for a restarted
#: notebook to reattach (``KT_OWNER_GRACE_S`` overrides); then it stops. ``--keep`` kernels never wait.
OWNER_GRACE_S = 120.0


def _no_debugger_hooks() -> Any:
    """A context where starting a Python child process is not rewritten by a debugger in this process.

    debugpy (JupyterLab's debugger panel, an IDE attached to the notebook kernel)
    rewrites the command line of Python children so they start under it and wait
    for its session: a pod kernel would never become ready. It must start as itself.
    """
    monkey = sys.modules.get("_pydev_bundle.pydev_monkey")
    skip = getattr(monkey, "skip_subprocess_arg_patch", None)
    return skip() if callable(skip) else contextlib.nullcontext()


def _base_env() -> dict[str, str]:
    """This process's environment as every pod kernel starts with it: pod_kernel importable, output unbuffered
    (a compute's own variables, its token file and GPUs are added at launch)."""
    env = dict(os.environ)
    env.pop("KT_TOKEN", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_POD_KERNEL_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def owner_grace_s() -> float:
    """The grace period for new local kernels: ``KT_OWNER_GRACE_S`` or :data:`OWNER_GRACE_S`."""
    raw = os.environ.get("KT_OWNER_GRACE_S")
    if raw is None:
        return OWNER_GRACE_S
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise ComputeSpecError(f"KT_OWNER_GRACE_S must be a number of seconds, got {raw!r}") from None


_POD_KERNEL_ROOT = str(Path(__file__).resolve().parents[2])


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def tail_lines(path: Path, n: int | None) -> str:
    """The last ``n`` lines of a log (all of it when n is None), '' if missing; never through a symlink.

    A log the pod kernel just rotated is short: the lines before come from ``<name>.1``.
    """
    try:
        with open(path, "rb", opener=_no_follow) as f:
            text = tail_of(f, n)
    except FileNotFoundError:
        text = ""
    return _with_rotated(path, text, n)


def _with_rotated(path: Path, text: str, n: int | None) -> str:
    """``text`` (the end of ``path``), preceded by the end of its rotated copy when it has fewer than n lines."""
    have = len(text.splitlines())
    if n is not None and have >= n:
        return text
    try:
        with open(path.with_name(path.name + ".1"), "rb", opener=_no_follow) as f:
            older = tail_of(f, None if n is None else n - have)
    except (FileNotFoundError, OSError):
        return text
    return "\n".join(t for t in (older.rstrip("\n"), text) if t)


def tail_of(f: BinaryIO, n: int | None) -> str:
    """The last ``n`` lines of an open binary file (all of it when n is None)."""
    if n is None:
        return f.read().decode(errors="replace")
    f.seek(0, os.SEEK_END)
    size = f.tell()
    block = min(size, max(8192, n * 200))
    while True:
        f.seek(size - block)
        data = f.read(block)
        if data.count(b"\n") > n or block == size:
            break
        block = min(size, block * 4)
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-n:]) if n else ""


def _spec_at_rest(compute: Compute) -> dict[str, Any]:
    """The spec kept in kernel.json: the Compute's parameters, with env var names but never their values."""
    spec: dict[str, Any] = compute.to_dict() if hasattr(compute, "to_dict") else {"name": compute.name}
    env = spec.pop("env_vars", None) or {}
    if env:
        spec["env_var_names"] = sorted(env)
    return spec


def _valid_info(info: object) -> bool:
    """Whether a kernel.json holds what the backend relies on, with the right types."""
    if not isinstance(info, dict):
        return False
    ints = [info.get(k) for k in ("pid", "port")]
    numbers = [info.get(k) for k in ("started", "create_time")]
    return (all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints) and info["port"] < 65536
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
            and isinstance(info.get("host"), str) and isinstance(info.get("name"), str))


def describe_exit(returncode: int | None) -> str:
    """'exited with code 3' / 'was killed by SIGKILL' / 'exited (status unknown)'."""
    if returncode is None:
        return "exited (its exit status is unknown: another process started it)"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        hint = " (the kernel OOM killer uses SIGKILL: was memory exhausted?)" if sig == "SIGKILL" else ""
        return f"was killed by {sig}{hint}"
    return f"exited with code {returncode}"


def machine_gpu_count() -> int:
    """GPUs on this machine, per NVML (0 without a driver)."""
    from pod_kernel.metrics import gpu_count

    return gpu_count()


def _same_process(pid: int, create_time: float) -> bool:
    """Whether ``pid`` is a live process (not a zombie) created at ``create_time`` (within a second)."""
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _readable(fd: int) -> bool:
    """Whether ``fd`` is readable now (poll, not select: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class LocalBackend:
    """Pod kernels as local subprocesses."""

    name = "local"

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._children: dict[int, subprocess.Popen] = {}
        #: kernels another process started (another notebook's, one from before a kernel restart): pid -> (its
        #: create_time, a pidfd on it), so that a cell's liveness check reads no /proc files (see _alive)
        self._pidfds: dict[int, tuple[float, int]] = {}
        self._pidfds_lock = threading.Lock()
        self._spares = SparePool(_base_env, _no_debugger_hooks)

    def prestart(self) -> None:
        """Keep a pod kernel process started ahead (Python up, its modules imported), so that a launch takes
        it instead of waiting for a new one; it exits with this process (``KT_PRESTART=0``: never)."""
        self._spares.enable()

    def stop_prestart(self) -> None:
        """Stop keeping a process ahead; the one kept goes."""
        self._spares.close()

    @property
    def root(self) -> Path:
        """Registry directory (``$KT_HOME/local``), created 0700; BackendUnavailable if it is not private to us."""
        return registry.checked_root(self._root or kt_home() / "local")

    def _dir(self, name: str) -> Path:
        """The entry of ``name``: a checked name, inside the registry (it may not exist)."""
        return registry.entry_path(self.root, name)

    def _entry(self, name: str) -> Path | None:
        """The entry of ``name`` when there is one and it is ours (NotFoundError when it is not ours)."""
        return registry.trusted_entry(self.root, name)

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        fd = registry.open_lock(registry.lock_path(self.root, name))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ launch / find

    def launch(self, compute: Compute, *, keep: bool = False,
               on_event: Callable[[str], None] | None = None) -> KernelHandle:
        """Start a pod kernel for ``compute``, or return the live one of the same name."""
        name = compute.name
        say = on_event or (lambda _msg: None)
        with self._locked(name):
            handle = self.find(name)
            if handle is not None:
                mismatch = spec_mismatch(compute, handle.spec)
                if mismatch:
                    raise spec_mismatch_error(name, mismatch)
                if not keep:
                    self._adopt(name, handle, say)
                return handle
            gone = self._read_info(name)
            if gone is not None:  # registered but dead (owner exited, crashed): its state went with it
                say(f"pod kernel {name!r} (pid {gone['pid']}) is gone; starting a new one: "
                    "the previous one's variables are lost")
            return self._start(compute, keep, say)

    def _adopt(self, name: str, handle: KernelHandle, say: Callable[[str], None]) -> None:
        """This process uses a kernel another one launched: it lives while any of them does.

        That is how a restarted notebook keeps its kernel: the old notebook kernel's
        exit starts the grace period (``KT_OWNER_GRACE_S``), and this ``adopt`` ends it.
        """
        info = self._read_info(name) or {}
        owners = [int(p) for p in info.get("owners") or ([info["owner_pid"]] if info.get("owner_pid") else [])]
        if info.get("keep") or os.getpid() in owners:
            return
        orphaned = not any(psutil.pid_exists(p) for p in owners)
        session = handle.session()
        try:
            adopted = session.adopt(os.getpid())
        finally:
            session.close_quietly()
        if not adopted:
            return
        info["owners"] = [p for p in owners if psutil.pid_exists(p)] + [os.getpid()]
        self._write_info(name, info)
        if orphaned:
            say(f"reattached to pod kernel {name!r} (pid {info['pid']}), left running by a notebook kernel "
                "that exited: its variables are still there")

    def _write_info(self, name: str, info: dict[str, Any]) -> None:
        registry.write_private(self._dir(name) / "kernel.json", json.dumps(info).encode())

    def _start(self, compute: Compute, keep: bool, on_event: Callable[[str], None]) -> KernelHandle:
        name = compute.name
        gpus = int(getattr(compute, "gpu_count", 0) or 0)
        env = _base_env()
        env.update({str(k): str(v) for k, v in (getattr(compute, "env_vars", None) or {}).items()})
        if gpus:
            have = machine_gpu_count()
            if gpus > have:
                raise ComputeSpecError(
                    f"compute {name!r} asks for {gpus} GPU(s) but this machine has {have}; "
                    "ask for fewer, or use --backend kubernetes to run on a cluster"
                )
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
        d = registry.fresh_entry(self.root, name)
        token = secrets.token_urlsafe(32)
        token_path = d / "token"
        with os.fdopen(registry.create_private(token_path), "w") as f:
            f.write(token)
        env.pop("KT_TOKEN", None)
        env["KT_TOKEN_FILE"] = str(token_path)
        if "PYTHONPATH" in (getattr(compute, "env_vars", None) or {}):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_POD_KERNEL_ROOT, env.get("PYTHONPATH")) if p)
        ttl = getattr(compute, "inactivity_ttl_s", None)
        allowed = list(getattr(compute, "allowed_serialization", None) or ["json", "pickle"])
        owner = None if keep else os.getpid()
        argv = [sys.executable, "-Xfrozen_modules=off", "-m", "pod_kernel",
                "--compute-name", name, "--cells-dir", str(d / "cells"), "--code-dir", str(d / "code"),
                "--log-file", str(d / "kernel.log"),  # the kernel rotates and caps it (stdout stays on it)
                "--allowed-serialization", ",".join(allowed)]
        if ttl:
            argv += ["--inactivity-ttl", str(float(ttl))]
        if owner:
            argv += ["--owner-pid", str(owner), "--owner-grace", str(owner_grace_s())]
        log_path = d / "kernel.log"
        cwd = getattr(compute, "working_dir", None) or os.getcwd()
        on_event(f"starting pod kernel {name!r} (local subprocess)")
        t0 = time.monotonic()
        with os.fdopen(registry.create_private(log_path, append=True), "ab") as log_file, _no_debugger_hooks():
            spare = self._spares.take(env, argv[4:], cwd, str(log_path))  # a process started ahead, if any
            if spare is not None:
                proc, read_fd = spare.proc, spare.ready_read_fd
            else:
                read_fd, write_fd = os.pipe()
                try:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                        env=dict(env, KT_READY_FD=str(write_fd)), pass_fds=(write_fd,), start_new_session=True,
                        cwd=cwd,
                    )
                finally:
                    os.close(write_fd)
        self._children[proc.pid] = proc
        memory_bytes = getattr(compute, "memory_bytes", None)
        if memory_bytes:  # past it, allocations raise MemoryError (rlimits.py)
            apply_memory_limit(proc.pid, memory_bytes)
        timeout_s = float(getattr(compute, "launch_timeout_s", None) or 60.0)
        try:
            ready = self._wait_ready(read_fd, proc, timeout_s, log_path, name)
        finally:
            os.close(read_fd)
            self._spares.refill()  # the next launch's process starts now, in the background
        info = {
            "name": name,
            "pid": proc.pid,
            "host": "127.0.0.1",
            "port": ready["port"],
            "started": time.time(),
            "create_time": psutil.Process(proc.pid).create_time(),
            "owners": [owner] if owner else [],
            "keep": keep,
            "spec": _spec_at_rest(compute),
        }
        self._write_info(name, info)
        on_event(f"pod kernel {name!r} ready in {time.monotonic() - t0:.2f} s (pid {proc.pid})")
        return self._handle(info, token)

    def _wait_ready(self, read_fd: int, proc: subprocess.Popen, timeout_s: float,
                    log_path: Path, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill_group(proc.pid, proc)
                raise LaunchError(
                    f"pod kernel {name!r} was not ready within {timeout_s:g} s (launch_timeout). "
                    f"Last log lines:\n{tail_lines(log_path, LOG_LINES_IN_ERRORS)}"
                )
            readable, _, _ = select.select([read_fd], [], [], remaining)
            if not readable:
                continue
            data = os.read(read_fd, 4096)
            if not data:
                code = proc.wait(timeout=5)
                self._children.pop(proc.pid, None)
                raise LaunchError(
                    f"pod kernel {name!r} {describe_exit(code)} while starting. "
                    f"Last log lines:\n{tail_lines(log_path, LOG_LINES_IN_ERRORS)}"
                )
            buf += data
        return json.loads(buf.split(b"\n", 1)[0])

    def _read_info(self, name: str) -> dict[str, Any] | None:
        """The entry's kernel.json (None if there is none, or it is unreadable); NotFoundError if not ours."""
        entry = self._entry(name)
        raw = None if entry is None else registry.read_private(name, entry / "kernel.json")
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        return info if _valid_info(info) else None

    def _alive(self, info: dict[str, Any]) -> bool:
        """Whether the kernel ``info`` describes runs: every %%kt cell asks. Our own child is polled; another
        process's is checked once through /proc (pid, create_time: not a process that reused the pid), then
        watched through a pidfd, readable once it exits (154 us a cell through psutil here, 11 through the
        pidfd)."""
        pid = info["pid"]
        proc = self._children.get(pid)
        if proc is not None:
            return proc.poll() is None
        watched = self._pidfds.get(pid)
        if watched is not None and watched[0] == info["create_time"]:
            if not _readable(watched[1]):
                return True
            self._unwatch(pid)
            return False
        if not _same_process(pid, info["create_time"]):
            return False
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfds here (old kernel, seccomp): /proc every time
            return True
        if not _same_process(pid, info["create_time"]):  # the pid was reused between the check and the open
            os.close(fd)
            return False
        with self._pidfds_lock:
            self._unwatch(pid)
            self._pidfds[pid] = (info["create_time"], fd)
        return True

    def _unwatch(self, pid: int) -> None:
        watched = self._pidfds.pop(pid, None)
        if watched is not None:
            os.close(watched[1])

    def find(self, name: str) -> KernelHandle | None:
        """The live kernel registered under ``name``, or None (a dead one's entry stays until a launch replaces it or
        ``delete`` removes it)."""
        info = self._read_info(name)
        if info is None:
            return None
        if not self._alive(info):
            return None
        raw = registry.read_private(name, self._dir(name) / "token")
        if raw is None:
            return None
        return self._handle(info, raw.decode(errors="replace").strip())

    def _not_registered(self, info: dict[str, Any]) -> bool:
        """Whether the registry no longer holds the kernel ``info`` describes (deleted, or another one now)."""
        try:
            now = self._read_info(info["name"])
        except KtError:
            return False
        return now is None or (now.get("pid"), now.get("started")) != (info["pid"], info["started"])

    def _handle(self, info: dict[str, Any], token: str) -> KernelHandle:
        name = info["name"]

        def liveness() -> str | None:
            if self._alive(info):
                return None
            proc = self._children.get(info["pid"])
            code = proc.poll() if proc is not None else None
            if self._not_registered(info):  # its log went with it, or is the next kernel's
                how = "was stopped" if code is None else describe_exit(code)
                return (f"pod kernel {name!r} (pid {info['pid']}) {how}, and its compute was deleted or restarted "
                        "(`%kt down`, `%kt restart`, from this or another notebook or terminal); its variables are "
                        "lost. The next %%kt cell runs on a new one.")
            return (
                f"pod kernel {name!r} (pid {info['pid']}) {describe_exit(code)}; its variables are lost. "
                f"The next %%kt cell starts a new one. Last log lines:\n"
                f"{tail_lines(self._dir(name) / 'kernel.log', LOG_LINES_IN_ERRORS)}"
            )

        return KernelHandle(
            name=name, backend=self.name, url=f"ws://{info['host']}:{info['port']}", token=token,
            pid=info["pid"], started=info["started"], where=f"local pid {info['pid']}",
            spec=info.get("spec", {}), liveness=liveness, bulk_host=info["host"],
        )

    # ------------------------------------------------------------------ inspect

    def list(self) -> list[KernelInfo]:
        """Every registered local compute, live or not; a distributed one once (its workers folded into one row)."""
        out = []
        for name in registry.entry_names(self.root):
            try:
                out.append(self.status(name))
            except NotFoundError:  # removed meanwhile, or its files are not ours: not a compute of ours
                continue
        return fold_workers(out)

    def status(self, name: str) -> KernelInfo:
        """State of one compute: ready (process alive) or stopped."""
        info = self._read_info(name)
        if info is None:
            if self._entry(name) is not None:
                return KernelInfo(name, self.name, "launching")
            raise NotFoundError(f"no local compute named {name!r}; `%kt list` shows those that exist")
        alive = self._alive(info)
        return KernelInfo(
            name=name, backend=self.name, phase="ready" if alive else "stopped",
            where=f"local pid {info['pid']}", pid=info["pid"], started=info["started"],
            spec=info.get("spec", {}), detail="" if alive else "process is gone",
        )

    def logs(self, name: str, tail: int | None = 100) -> str:
        """The kernel log's last ``tail`` lines (server events and cell output)."""
        self._read_info(name)  # an entry (or kernel.json) that is not ours is refused, not shown
        entry = self._entry(name)
        fd = None if entry is None else registry.open_file(name, entry / "kernel.log", private=False)
        if entry is None or fd is None:
            raise NotFoundError(f"no logs for local compute {name!r}")
        with os.fdopen(fd, "rb") as f:
            return _with_rotated(entry / "kernel.log", tail_of(f, tail), tail)

    def forward_port(self, name: str, remote_port: int) -> int:
        """The pod kernel runs on this host: its loopback port is reachable as it is."""
        return remote_port

    def log_path(self, name: str) -> Path:
        """Path of the kernel log (for following it); NotFoundError if the entry is not ours."""
        self._read_info(name)
        return self._dir(name) / "kernel.log"

    def follow_logs(self, name: str, poll_s: float = FOLLOW_POLL_S) -> Iterator[str]:
        """New text of the kernel log as it is written (``kubectl logs -f``); ends when the kernel is gone.

        Survives the log's copy-truncate rotation (the file shrinks: read again from its start).
        """
        fd = None if self._entry(name) is None else registry.open_file(name, self._dir(name) / "kernel.log",
                                                                      private=False)
        if fd is None:
            raise NotFoundError(f"no logs for local compute {name!r}")
        with os.fdopen(fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            while True:
                data = f.read(FOLLOW_READ_BYTES)
                if data:
                    yield data.decode(errors="replace")
                    continue
                if os.fstat(f.fileno()).st_size < f.tell():  # rotated: the kernel writes from the start again
                    f.seek(0)
                    continue
                if self.find(name) is None:  # its last words were read above
                    return
                time.sleep(poll_s)

    def attached(self, name: str) -> builtins.list[int]:  # builtins: list is a method here
        """Pids of the live notebook (or terminal IPython) kernels that use this compute."""
        info = self._read_info(name) or {}
        owners = info.get("owners") or ([info["owner_pid"]] if info.get("owner_pid") else [])
        return [int(p) for p in owners if isinstance(p, int) and psutil.pid_exists(p)]

    # ------------------------------------------------------------------ delete

    def delete(self, name: str, grace_period_s: float = 5.0) -> bool:
        """Stop the kernel's whole process group (TERM, then KILL after the grace period)."""
        with self._locked(name):
            if self._entry(name) is None:  # NotFoundError for an entry that is not ours: left alone
                return False
            try:
                info = self._read_info(name)
            except NotFoundError:  # our entry, files we do not trust: remove it, stop nothing they name
                info = None
            # the entry goes first: a notebook whose cell the stop ends then reads that its compute was deleted
            removed = registry.remove_entry(self.root, name) is not None
            if info is not None and self._alive(info):
                self._stop(info["pid"], grace_period_s)
            if info is not None:
                with self._pidfds_lock:
                    self._unwatch(info["pid"])
            return removed

    def _stop(self, pid: int, grace_period_s: float) -> None:
        proc = self._children.get(pid)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            if proc is not None:
                proc.wait(timeout=grace_period_s)
            else:
                psutil.Process(pid).wait(timeout=grace_period_s)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            pass
        except psutil.NoSuchProcess:
            pass
        self._kill_group(pid, proc)

    def _kill_group(self, pid: int, proc: subprocess.Popen | None) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._children.pop(pid, None)
