"""One prestarted pod kernel process, so a local launch skips Python's start and the kernel's imports.

A spare is ``python -m pod_kernel.spare`` (see there), started in its own
process group with the environment a kernel would get. A launch hands it the
kernel's environment, working directory, log file and arguments; it becomes
that kernel (the backend keeps its ``Popen``, ready pipe and process group as
for a fresh one) and the next spare starts in the background. A spare holds
nothing of anyone's: it exits when its stdin closes, that is when this process
exits (however it exits) or :meth:`SparePool.close` lets it go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

#: Environment variables Python (or the dynamic loader) reads at startup: a spare started with other values
#: cannot serve, so a fresh process is started instead.
STARTUP_ENV_PREFIXES = ("PYTHON", "LD_")


def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` a process reads only when it starts."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_ENV_PREFIXES)}


@dataclass
class Spare:
    """A started spare: its process, the read end of its ready pipe, the fd number it writes readiness to."""

    proc: subprocess.Popen
    ready_read_fd: int
    ready_write_fd: int
    startup: dict[str, str]

    def discard(self) -> None:
        """Let it go: its stdin closes (it exits), its group is killed, it is reaped."""
        for close in (lambda: self.proc.stdin and self.proc.stdin.close(), lambda: os.close(self.ready_read_fd)):
            try:
                close()
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class SparePool:
    """Keeps one spare ready once enabled (:meth:`enable`); :meth:`take` hands it to a launch."""

    def __init__(self, base_env: Callable[[], dict[str, str]],
                 no_debugger_hooks: Callable[[], AbstractContextManager]) -> None:
        self._base_env = base_env
        self._no_debugger_hooks = no_debugger_hooks
        self._lock = threading.Lock()
        self._spare: Spare | None = None
        self._starting: threading.Thread | None = None
        self.enabled = False

    def enable(self) -> None:
        """Keep a spare ready from now on (``KT_PRESTART=0`` in the environment turns this off)."""
        if os.environ.get("KT_PRESTART", "1").strip() in ("0", "false", "no", "off"):
            return
        self.enabled = True
        self.refill()

    def refill(self) -> None:
        """Start a spare in the background when enabled and none is ready or starting."""
        with self._lock:
            if not self.enabled or self._spare is not None or (self._starting and self._starting.is_alive()):
                return
            self._starting = threading.Thread(target=self._start, name="kt-spare-kernel", daemon=True)
            self._starting.start()

    def _start(self) -> None:
        env = self._base_env()
        read_fd, write_fd = os.pipe()
        try:
            with self._no_debugger_hooks():
                proc = subprocess.Popen(
                    [sys.executable, "-Xfrozen_modules=off", "-m", "pod_kernel.spare"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                    pass_fds=(write_fd,), start_new_session=True, close_fds=True,
                )
        except OSError:
            os.close(read_fd)
            return
        finally:
            os.close(write_fd)
        spare: Spare | None = Spare(proc, read_fd, write_fd, startup_env(env))
        with self._lock:
            if self.enabled and self._spare is None:
                self._spare, spare = spare, None
        if spare is not None:
            spare.discard()

    def ready_pid(self, timeout_s: float = 30.0) -> int | None:
        """The pid of the spare kept now, once its start (not its imports) is done; None when there is none."""
        starting = self._starting
        if starting is not None:
            starting.join(timeout=timeout_s)
        with self._lock:
            return self._spare.proc.pid if self._spare is not None else None

    def take(self, env: Mapping[str, str], argv: list[str], cwd: str, log_path: str) -> Spare | None:
        """The ready spare, serving as the kernel ``python -m pod_kernel *argv`` with ``env`` in ``cwd`` logging
        to ``log_path`` would; None (start a fresh process) when none is ready or it cannot serve."""
        with self._lock:
            spare = self._spare
            if spare is None or startup_env(env) != spare.startup:  # kept for a launch it can serve
                return None
            self._spare = None
        if spare.proc.poll() is not None:
            spare.discard()
            return None
        launch = {"env": dict(env, KT_READY_FD=str(spare.ready_write_fd)), "argv": argv, "cwd": cwd,
                  "log": log_path}
        try:
            assert spare.proc.stdin is not None
            spare.proc.stdin.write(json.dumps(launch).encode())
            spare.proc.stdin.close()
        except OSError:
            spare.discard()
            return None
        return spare

    def close(self) -> None:
        """Stop keeping a spare; the one ready goes."""
        with self._lock:
            self.enabled = False
            spare, self._spare = self._spare, None
            starting = self._starting
        if starting is not None:
            starting.join(timeout=10)
        with self._lock:
            late, self._spare = self._spare, None
        for s in (spare, late):
            if s is not None:
                s.discard()
