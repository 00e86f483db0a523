"""Keeps one compute's status, log and metrics models fresh from a background thread.

One :class:`ComputeMonitor` per compute in this process (:func:`monitor_for`),
shared by every panel showing it. It polls the backend's status, samples
``Session.metrics()`` on its own session (fast while a cell runs, slow when
idle), and follows the kernel log (the file itself for local kernels, else
``backend.logs(tail=N)``). It stops when the compute stops or fails, when a
newer kernel replaces the one it showed (a panel shows one kernel instance,
never its successor), or when the last panel using it is closed. As every
notebook cell starts and ends (IPython's ``pre_run_cell`` and ``post_run_cell``) the live
monitors refresh at once, so a panel is right as soon as a cell or a
``%kt down`` ends; a run of quick cells refreshes it at most every
``POKE_MIN_GAP_S``, and the charts gain a point per sampling interval, not per
cell (a quick warm cell costs neither a pod request nor a redraw sent to the browser).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import get_backend
from ..errors import ComputeSpecError, KtError, NotFoundError
from ..quantities import parse_size
from .log_model import LogModel, new_lines_since
from .models import MetricsModel, StatusModel

log = logging.getLogger("kt_jupyter.widgets")

#: Metrics/status interval while a cell runs or the compute launches.
FAST_INTERVAL_S = 1.0
#: Metrics/status interval while idle.
SLOW_INTERVAL_S = 5.0
#: How often the status panel's age and idle time advance between samples (local clock only).
CLOCK_INTERVAL_S = 1.0
#: How often a local log file is checked for new lines.
LOG_FILE_INTERVAL_S = 0.5
#: How often a backend without a log file is asked for its log tail.
LOG_POLL_INTERVAL_S = 2.0
#: How much of a log file's end is read when following starts.
LOG_START_BYTES = 256 << 10
#: Pokes refresh the status at once, but at most once per this many seconds (a run of quick cells refreshes it
#: as they go, not twice per cell: each refresh is a request to the pod kernel and, when a number changed, a
#: redraw sent to the browser).
POKE_MIN_GAP_S = 0.25
#: A sample is drawn in the charts when at least this share of the fast interval passed since the last one drawn
#: (a timed sample is never skipped for jitter; one a cell event asked for in between is).
CHART_GAP_TOLERANCE = 0.8
#: After a poke (a cell starts or ends), how long status is sampled at the fast interval.
POKE_FAST_S = 10.0


class ComputeMonitor:
    """Polls one compute into a StatusModel, a LogModel and a MetricsModel."""

    def __init__(self, name: str, backend: str = "local", *, fast_s: float = FAST_INTERVAL_S,
                 slow_s: float = SLOW_INTERVAL_S, log_lines: int = 400) -> None:
        self.name = name
        self.backend_name = backend
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.status = StatusModel(name=name, backend=backend)
        self.logs = LogModel(compute_name=name, max_lines=log_lines)
        self.metrics = MetricsModel()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._users = 0
        self._lock = threading.Lock()
        self._session: Any = None
        self._session_pid: int | None = None
        self._log_offset: int | None = None
        self._log_id: tuple[int, int] | None = None
        self._log_tail: list[str] = []
        self._fast_until = 0.0
        #: a cell poked since the thread last looked; when the thread's wait ends; the earliest refresh a poke
        #: may make (see :meth:`poke`)
        self._poked = False
        self._sleeps_until = 0.0
        self._poke_refresh_at = 0.0
        self._charted_at: float | None = None  # monotonic time of the latest sample drawn in the charts
        #: where the kernel's handle comes from (default: the backend's ``find``; a distributed compute's rank on
        #: Kubernetes: the group's own connection to it, which the backend's ``find`` does not know)
        self.find_handle: Callable[[str], Any] | None = None

    def __repr__(self) -> str:
        return f"<ComputeMonitor {self.backend_name}:{self.name} {self.status.phase}>"

    @property
    def backend(self) -> Any:
        """The backend object."""
        return get_backend(self.backend_name)

    @property
    def alive(self) -> bool:
        """Whether the polling thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ComputeMonitor:
        """Start polling in a daemon thread (once)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name=f"kt-monitor-{self.name}", daemon=True)
                self._thread.start()
        _refresh_after_cells()
        return self

    def acquire(self) -> ComputeMonitor:
        """A panel starts using this monitor."""
        with self._lock:
            self._users += 1
        return self.start()

    def release(self) -> None:
        """A panel is closed; the monitor stops with the last one."""
        with self._lock:
            self._users = max(0, self._users - 1)
            last = self._users == 0
        if last:
            self.stop()

    def stop(self) -> None:
        """Stop polling and close the monitor's session (the compute keeps running)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None or self._thread is threading.current_thread():
            self._close_session()

    def poke(self) -> None:
        """Refresh now, then sample fast for a while (a cell just started or ended here).

        The thread is woken only when it would otherwise sleep past the earliest refresh a poke may make
        (:data:`POKE_MIN_GAP_S` after the last): quick cells in a row do not wake it twice per cell, each
        wake costing the notebook's other threads the GIL just while a cell runs.
        """
        self._fast_until = time.monotonic() + POKE_FAST_S
        self._poked = True  # set before the wake time is read: the thread reads them in the other order
        if self._sleeps_until > self._poke_refresh_at:
            self._wake.set()

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.alive

    # ------------------------------------------------------------------ one refresh

    def refresh(self, *, logs: bool = True) -> None:
        """One synchronous refresh of status and metrics (and logs); NotFoundError if no such compute."""
        self.refresh_status(raise_missing=True)
        if logs:
            self.refresh_logs()

    def refresh_status(self, raise_missing: bool = False) -> None:
        """Ask the backend for the compute's state; sample metrics when it is up."""
        try:
            info = self.backend.status(self.name)
        except NotFoundError:
            if raise_missing:
                raise
            self.status.stop("deleted")
            return
        except Exception as exc:  # a backend hiccup (API down, timeout) is shown; the next refresh may work
            self.status.detail = f"cannot read its state: {exc}"
            return
        if not self.status.apply_info(info):  # a newer kernel of that name: not the one this monitor shows
            self._stop.set()
            self._close_session()
            return
        if self.status.phase != "ready":
            self._close_session()
            return
        self.sample_metrics(info.pid)

    def sample_metrics(self, pid: int | None = None) -> None:
        """One metrics sample into the status and metrics models."""
        session = self._ensure_session(pid)
        if session is None:
            return
        try:
            sample = session.metrics()
        except KtError as exc:
            self.metrics.error = str(exc).splitlines()[0]
            self._close_session()
            return
        except Exception as exc:  # a broken sample must not kill the monitor
            self.metrics.error = f"{type(exc).__name__}: {exc}"
            log.debug("metrics of %s failed", self.name, exc_info=True)
            return
        self.status.apply_metrics(sample)
        # The charts are a time series at the sampling interval: a sample a poke asked for (every cell starts
        # and ends) updates the status line, but adds a point only when the fast interval has passed since
        # the last one; otherwise each quick cell would redraw and resend every chart for nothing new.
        now = time.monotonic()
        recent = self._charted_at is not None and now - self._charted_at < self.fast_s * CHART_GAP_TOLERANCE
        if recent and not self.metrics.error:  # (a failed sample's note goes as soon as one works)
            return
        self._charted_at = now
        self.metrics.memory_limit_bytes = memory_limit_bytes(self.status.resources)
        self.metrics.interval_s = self.fast_s if sample.get("running") else self.slow_s
        self.metrics.add_sample(sample)

    def _ensure_session(self, pid: int | None) -> Any:
        if self._session is not None and (pid is None or pid == self._session_pid):
            return self._session
        self._close_session()
        handle = (self.find_handle or self.backend.find)(self.name)
        if handle is None:
            return None
        session = handle.session()
        try:
            session.connect()
        except KtError as exc:
            self.metrics.error = str(exc).splitlines()[0]
            return None
        self._session, self._session_pid = session, handle.pid
        return session

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close_quietly()

    def refresh_logs(self) -> bool:
        """Read new log lines into the log model; True when some arrived."""
        path_of = getattr(self.backend, "log_path", None)
        try:
            if path_of is not None:
                return self._follow_file(Path(path_of(self.name)))
            return self._poll_tail()
        except Exception as exc:  # logs are best effort: the status and metrics go on
            log.debug("logs of %s: %s", self.name, exc)
            return False

    def _follow_file(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        ident = (st.st_dev, st.st_ino)
        if self._log_id is not None and ident != self._log_id:  # another kernel's log: never shown here
            self._wake.set()  # the status check ends this monitor when its kernel is gone
            return False
        if self._log_offset is not None and st.st_size < self._log_offset:
            self._log_offset = 0  # rotated (copied, then truncated in place): carry on from its start
        self._log_id = ident
        if self._log_offset is None:  # first look: only the end of it
            self._log_offset = max(0, st.st_size - LOG_START_BYTES)
            skip_partial = self._log_offset > 0
        else:
            skip_partial = False
        if st.st_size <= self._log_offset:
            return False
        with open(path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read(st.st_size - self._log_offset)
        self._log_offset += len(data)
        text = data.decode(errors="replace")
        if skip_partial:
            text = text.split("\n", 1)[1] if "\n" in text else ""
            self.logs.older = True
        self.logs.append_text(text)
        return bool(text)

    def _poll_tail(self) -> bool:
        current = self.backend.logs(self.name, tail=self.logs.max_lines).splitlines()
        new = [] if current == self._log_tail else new_lines_since(self._log_tail, current)
        if not self._log_tail and len(current) >= self.logs.max_lines:
            self.logs.older = True
        self._log_tail = current
        self.logs.append_lines(new)
        return bool(new)

    # ------------------------------------------------------------------ the thread

    def _interval(self) -> float:
        st = self.status
        busy = st.phase == "launching" or st.running or time.monotonic() < self._fast_until
        return self.fast_s if busy else self.slow_s

    def _loop(self) -> None:
        file_logs = getattr(self.backend, "log_path", None) is not None
        log_every = LOG_FILE_INTERVAL_S if file_logs else LOG_POLL_INTERVAL_S
        next_status = next_logs = next_tick = time.monotonic()
        refreshed_at = next_status - POKE_MIN_GAP_S
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:  # age and idle time count by the second between (slower) samples
                    self.status.tick()
                    next_tick = now + CLOCK_INTERVAL_S
                if now >= next_logs:
                    if self.refresh_logs() and self.status.phase == "ready" and not self.status.running:
                        next_status = min(next_status, now + 0.2)  # output while idle: a cell may have started
                    next_logs = now + log_every
                woken = self._poked or self._wake.is_set()
                self._poked = False
                self._wake.clear()
                if now >= next_status or (woken and now >= refreshed_at + POKE_MIN_GAP_S):
                    self.refresh_status()
                    refreshed_at = time.monotonic()
                    next_status = refreshed_at + self._interval()
                elif woken:  # pokes from quick cells in a row: one refresh per gap, the last cell's state
                    next_status = min(next_status, refreshed_at + POKE_MIN_GAP_S)
                if self.status.terminal:
                    self.refresh_logs()  # its last words
                    break
                self._poke_refresh_at = refreshed_at + POKE_MIN_GAP_S
                self._sleeps_until = until = max(time.monotonic() + 0.01, min(next_status, next_logs, next_tick))
                if self._poked:  # poked since it looked, by a poke that saw the previous wake time: look again
                    continue
                self._wake.wait(until - time.monotonic())
        except Exception:  # never a traceback in the notebook from a helper thread
            log.exception("monitor of %s failed", self.name)
        finally:
            self._stop.set()
            self._close_session()


def memory_limit_bytes(resources: dict[str, Any]) -> int:
    """A compute's memory limit in bytes from its requested resources; 0 when it has none (or it does not parse)."""
    memory = resources.get("memory")
    if not memory:
        return 0
    try:
        return parse_size(str(memory), "memory")
    except (ComputeSpecError, ValueError):
        return 0


_monitors: dict[tuple[str, str], ComputeMonitor] = {}
_monitors_lock = threading.Lock()


def monitor_for(name: str, backend: str = "local", *, new_kernel: bool = False) -> ComputeMonitor:
    """The live monitor of a compute in this process, or a new (not yet started) one.

    ``new_kernel``: a kernel is being launched under that name, so always a
    new monitor; one still showing an older kernel ends when it sees the new one.
    """
    with _monitors_lock:
        mon = _monitors.get((backend, name))
        if new_kernel or mon is None or mon._stop.is_set():
            mon = _monitors[(backend, name)] = ComputeMonitor(name, backend)
        return mon


def poke_all() -> None:
    """Every live monitor of this process refreshes now (a notebook cell started or ended)."""
    with _monitors_lock:
        monitors = [m for m in _monitors.values() if m.alive]
    for mon in monitors:
        mon.poke()


#: The shells whose cells poke the monitors: id(shell) -> (its events, the callback), so unload can remove it.
_hooked: dict[int, tuple[Any, Callable[..., None]]] = {}


def _poke(*_args: Any) -> None:
    """IPython's ``pre_run_cell`` / ``post_run_cell`` callback: :func:`poke_all`."""
    poke_all()


def _refresh_after_cells() -> None:
    """Once per IPython shell: poke the monitors as every cell starts and ends (a cell's state, or what a
    `%kt down` did, shows at once)."""
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    events = getattr(shell, "events", None)
    if events is None or id(shell) in _hooked:
        return
    _hooked[id(shell)] = (events, _poke)
    events.register("pre_run_cell", _poke)
    events.register("post_run_cell", _poke)


def unhook(shell: Any) -> None:
    """Undo :func:`_refresh_after_cells` for ``shell`` (``%unload_ext``)."""
    events, callback = _hooked.pop(id(shell), (None, None))
    for event in ("pre_run_cell", "post_run_cell"):
        try:
            if events is not None:
                events.unregister(event, callback)
        except ValueError:
            pass  # already gone


def stop_all() -> None:
    """Stop every monitor of this process (tests, kernel shutdown)."""
    with _monitors_lock:
        monitors = list(_monitors.values())
        _monitors.clear()
    for mon in monitors:
        mon.stop()
