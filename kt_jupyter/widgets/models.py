"""The state behind each widget, as traitlets models (no ipywidgets import: the text fallback uses them too).

Views observe these models and only draw; everything that decides something
(phase, what a log line's level is, what is dropped, rates and ETAs) lives
here and is tested without a browser. Models may be updated from background
threads: each mutator holds the model's lock and assigns fresh immutable
values, so observers always see a consistent state.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from traitlets import Bool, Dict, Enum, Float, HasTraits, Int, TraitError, Tuple, Unicode, validate

from ..quantities import RATE_MIN_S, format_bytes

# ---------------------------------------------------------------------- status

#: Phases a compute goes through, in order; the last two end it. Every view says these words: `%kt list`,
#: `%kt status`, the panel, the picker and the JupyterLab sidebar (labextension/src/format.ts).
PHASES = ("launching", "ready", "stopped", "failed")
TERMINAL_PHASES = ("stopped", "failed")
#: Other words for a phase (a backend's, or older ones) and the phase they mean.
_PHASE_ALIASES = {"pending": "launching", "starting": "launching", "pulling": "launching",
                  "pulling image": "launching", "running": "ready", "running cell": "ready", "idle": "ready",
                  "error": "failed", "deleted": "stopped"}
#: What a view says about a ready kernel while a cell runs on it; otherwise "idle <age>".
RUNNING_TEXT = "running a cell"
#: Resource keys shown, in this order.
RESOURCE_KEYS = ("cpus", "memory", "gpus", "gpu_type", "image", "namespace")


def format_age(seconds: float | None) -> str:
    """A short human duration, as the Computes sidebar writes it (labextension/src/format.ts):
    ``4s``, ``3m 20s``, ``2h 5m``, ``3d 4h``; ``-`` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def resources_text(spec: Mapping[str, Any], backend: str = "local") -> str:
    """``2 CPU · 4Gi · 1 GPU A100 · image python:3.11`` (the sidebar's words), from a compute spec dict;
    '' when none set. Image and namespace are left out for the local backend, which ignores them.
    """
    parts = []
    if spec.get("cpus"):
        parts.append(f"{spec['cpus']} CPU")
    if spec.get("memory"):
        parts.append(str(spec["memory"]))
    gpus = spec.get("gpus")
    if gpus and str(gpus) != "0":
        parts.append(f"{gpus} GPU" + (f" {spec['gpu_type']}" if spec.get("gpu_type") else ""))
    if backend == "local":
        return " · ".join(parts)
    image = spec.get("image")
    if isinstance(image, Mapping):
        image = image.get("image_id") or image.get("name")
    if image:
        parts.append(f"image {image}")
    if spec.get("namespace"):
        parts.append(f"ns {spec['namespace']}")
    return " · ".join(parts)


_LAUNCH_WORDS = ("starting", "launch", "applying", "pulling", "schedul", "creating", " ready in ")


def is_launch_event(text: str) -> bool:
    """Whether an ``on_event`` message is about starting a kernel (not a notice about a running one)."""
    first = text.strip().splitlines()[0].lower() if text.strip() else ""
    return any(word in first for word in _LAUNCH_WORDS)


def phase_word(phase: str) -> str:
    """The word every view shows for a backend's phase (one of PHASES; unknown words read 'failed')."""
    phase = str(phase).strip().lower()
    phase = _PHASE_ALIASES.get(phase, phase)
    return phase if phase in PHASES else "failed"


def activity_text(running: bool, idle_s: float | None) -> str:
    """What a ready kernel is doing: 'running a cell', 'idle 3m 20s', or '' when not known."""
    if running:
        return RUNNING_TEXT
    return "" if idle_s is None else f"idle {format_age(idle_s)}"


class StatusModel(HasTraits):
    """What is known about one compute: where it runs, its phase, what it does, its resources, its age.

    A model belongs to one kernel instance: the first ready kernel it sees
    (pid and start time) is its kernel. A newer kernel under the same name is
    not this model's: :meth:`apply_info` then marks it stopped ('replaced').
    """

    name = Unicode(help="Compute name.")
    backend = Unicode("local", help="Backend that runs it: local or kubernetes.")
    phase = Unicode("launching", help="One of PHASES (other words, like a backend's 'pending', are mapped).")
    running = Bool(False, help="Whether a cell runs on the kernel now (known from metrics samples).")
    detail = Unicode(help="Why the phase is what it is (e.g. 'process is gone'), or the last error.")
    where = Unicode(help="Pod and node, or 'local pid N'.")
    resources = Dict(help="Requested resources (cpus, memory, gpus, gpu_type, image, namespace).")
    started = Float(0.0, help="Epoch seconds the kernel started; 0 when not known yet.")
    kernel = Tuple(help="(pid, started) of the kernel this model shows, once it was seen ready; () before.")
    idle_s = Float(None, allow_none=True, help="Seconds since the kernel last ran a cell; None when unknown.")
    cells_run = Int(0, help="Cells the kernel has run.")
    now = Float(0.0, help="Epoch seconds of the latest refresh; ages are measured up to it.")
    events = Tuple(help="Startup events (oldest first, at most max_events).")
    launch_started = Float(0.0, help="Epoch seconds of the first startup event; 0 when none was seen.")
    max_events = Int(12, help="How many startup events are kept.")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._lock = threading.RLock()
        self._busy_at: float | None = None

    @validate("phase")
    def _valid_phase(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip().lower()
        value = _PHASE_ALIASES.get(value, value)
        if value not in PHASES:
            raise TraitError(f"unknown phase {proposal['value']!r}; one of {', '.join(PHASES)}")
        return value

    @validate("max_events")
    def _valid_max_events(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            raise TraitError("max_events must be at least 1")
        return proposal["value"]

    @property
    def phase_label(self) -> str:
        """The phase as every view writes it."""
        return self.phase

    @property
    def activity(self) -> str:
        """'running a cell', 'idle 3m 20s', or '' (not ready, or not sampled yet)."""
        return activity_text(self.running, self.idle_s) if self.phase == "ready" else ""

    @property
    def terminal(self) -> bool:
        """Whether the compute has stopped or failed (nothing more will change)."""
        return self.phase in TERMINAL_PHASES

    def add_event(self, text: str) -> None:
        """Record a startup event (the ``on_event`` callback of a launch)."""
        text = text.strip()
        if not text:
            return
        with self._lock:
            self.events = (self.events + (text.splitlines()[0],))[-self.max_events:]
            if not self.launch_started:
                self.launch_started = time.time()
            self.now = time.time()

    def apply_info(self, info: Any) -> bool:
        """Take the backend's view (a KernelInfo): phase, where, spec, start time.

        Returns False, and marks the model stopped, when the info is about
        another kernel than the one this model shows (the compute was
        replaced by a new kernel of the same name).
        """
        with self._lock, self.hold_trait_notifications():
            alive = phase_word(info.phase) == "ready"
            ident = (info.pid, float(info.started or 0.0))
            if self.kernel and alive and ident != self.kernel:
                self.detail = (f"replaced by a new kernel ({info.where or info.backend}); "
                               f"`%kt status {self.name}` shows that one")
                self.phase, self.running, self.now = "stopped", False, time.time()
                return False
            if alive and not self.kernel and info.started:
                self.kernel = ident
            self.backend = info.backend
            if info.where:
                self.where = info.where
            spec = info.spec or {}
            self.resources = {k: spec[k] for k in RESOURCE_KEYS if spec.get(k) not in (None, "", 0, {})}
            if info.started:
                self.started = float(info.started)
            self.detail = info.detail or ""
            self.now = time.time()
            if not alive or self.phase == "launching" or self.terminal:
                self.phase = phase_word(info.phase)
            if not alive:
                self.running = False
            return True

    def apply_metrics(self, sample: Mapping[str, Any], now: float | None = None) -> None:
        """Take a metrics sample: running a cell or idle, cells run, idle time."""
        now = time.time() if now is None else now
        with self._lock, self.hold_trait_notifications():
            running = bool(sample.get("running"))
            cells = int(sample.get("cells_run") or 0)
            if running:
                self._busy_at = now
            elif sample.get("idle_s") is not None:  # the pod's own count, which its inactivity TTL and the
                self._busy_at = now - float(sample["idle_s"])  # sidebar read too: one idle time everywhere
            elif self._busy_at is None or cells != self.cells_run:
                self._busy_at = now - float(sample.get("uptime_s") or 0.0) if cells == 0 else now
            self.cells_run = cells
            self.idle_s = 0.0 if running else max(0.0, now - self._busy_at)
            if not self.started and sample.get("uptime_s") is not None:
                self.started = now - float(sample["uptime_s"])
            self.running = running
            self.phase = "ready"
            self.now = now

    def tick(self, now: float | None = None) -> None:
        """Advance the clock between samples, so age and idle time count by the second (no pod request)."""
        now = time.time() if now is None else now
        with self._lock, self.hold_trait_notifications():
            if not self.now or self.terminal or self.phase == "launching":
                return
            if not self.running and self._busy_at is not None:
                self.idle_s = max(0.0, now - self._busy_at)
            self.now = now

    def stop(self, why: str) -> None:
        """Mark the compute stopped with a reason (deleted, its process gone)."""
        with self._lock, self.hold_trait_notifications():
            self.detail = why
            self.phase, self.running = "stopped", False
            self.now = time.time()

    def fail(self, why: str) -> None:
        """Mark the compute failed with a reason."""
        with self._lock, self.hold_trait_notifications():
            self.detail = why
            self.phase, self.running = "failed", False
            self.now = time.time()

    def fields(self) -> list[tuple[str, str]]:
        """(label, value) pairs a view shows after the phase, in order; empty values left out."""
        out = []
        if self.phase == "ready" and self.activity:
            out.append(("activity", self.activity))
        if self.phase == "launching" and self.launch_started:
            out.append(("elapsed", format_age(max(self.now, self.launch_started) - self.launch_started)))
        if self.where:
            out.append(("where", self.where))
        res = resources_text(self.resources, self.backend)
        if res:
            out.append(("resources", res))
        if self.started and self.now:
            out.append(("age", format_age(self.now - self.started)))
        if self.phase == "ready":
            out.append(("cells", str(self.cells_run)))
        return out


# ---------------------------------------------------------------------- metrics


class MetricsModel(HasTraits):
    """Recent resource samples of one pod kernel, as series to draw and current values to read."""

    history = Int(60, help="Samples kept per series.")
    rows = Tuple(help="What to draw, in order: dicts with key, label, values, vmax, current.")
    samples = Int(0, help="Samples taken so far.")
    running = Bool(False, help="Whether a cell was running at the latest sample.")
    interval_s = Float(0.0, help="Current sampling interval (fast while a cell runs, slow when idle).")
    error = Unicode(help="Why the latest sample failed, or ''.")
    memory_limit_bytes = Int(0, help="The compute's memory limit (its --memory); 0 when it has none.")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._lock = threading.RLock()
        self._series: dict[str, deque] = {}

    @validate("history")
    def _valid_history(self, proposal: Any) -> int:
        if proposal["value"] < 2:
            raise TraitError("history must be at least 2 samples")
        return proposal["value"]

    def _push(self, key: str, value: float | None) -> tuple:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = deque(maxlen=self.history)
        series.append(value)
        return tuple(series)

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """Append one ``Session.metrics()`` sample and recompute the rows."""
        with self._lock:
            rows = []
            cpu = sample.get("cpu_percent")
            cpu_values = self._push("cpu", cpu)
            cpu_top = max([100.0] + [v for v in cpu_values if v is not None])
            rows.append({"key": "cpu", "label": "CPU", "values": cpu_values, "vmax": cpu_top,
                         "current": "-" if cpu is None else f"{cpu:.0f}%"})
            rss = sample.get("rss_bytes")
            rss_values = self._push("rss", rss)
            cur = "-" if rss is None else format_bytes(rss)
            limit = self.memory_limit_bytes  # the compute's own limit, never the host's memory
            rss_top = float(limit) if limit else (max([v for v in rss_values if v is not None] or [0]) * 1.25 or None)
            rows.append({"key": "rss", "label": "Memory", "values": rss_values, "vmax": rss_top,
                         "current": cur + (f" of {format_bytes(limit)}" if limit else "")})
            for gpu in sample.get("gpus") or []:
                i = gpu.get("index", len(rows))
                util = gpu.get("utilization_percent")
                extra = []
                if gpu.get("temperature_c") is not None:
                    extra.append(f"{gpu['temperature_c']:.0f}°C")
                if gpu.get("power_w") is not None:
                    extra.append(f"{gpu['power_w']:.0f} W")
                rows.append({"key": f"gpu{i}_util", "label": f"GPU {i}", "values": self._push(f"gpu{i}_util", util),
                             "vmax": 100.0, "title": str(gpu.get("name") or ""),
                             "current": ("-" if util is None else f"{util:.0f}%")
                             + (f" · {' · '.join(extra)}" if extra else "")})
                used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
                rows.append({"key": f"gpu{i}_mem", "label": f"GPU {i} mem",
                             "values": self._push(f"gpu{i}_mem", used),
                             "vmax": float(total) if total else None, "title": str(gpu.get("name") or ""),
                             "current": ("-" if used is None else format_bytes(used))
                             + (f" of {format_bytes(total)}" if total else "")})
            with self.hold_trait_notifications():
                self.running = bool(sample.get("running"))
                self.error = ""
                self.samples += 1
                self.rows = tuple(rows)

    def current(self, key: str) -> str:
        """The current value text of a row ('' when there is no such row)."""
        for row in self.rows:
            if row["key"] == key:
                return row["current"]
        return ""


# ---------------------------------------------------------------------- progress


class ProgressModel(HasTraits):
    """One transfer (bytes, rate, ETA) or one launch (events, elapsed time)."""

    kind = Enum(("transfer", "launch"), default_value="transfer", help="What is in progress.")
    label = Unicode(help="What moves or starts, e.g. 'push' or \"launching 'train'\".")
    done = Int(0, help="Bytes moved so far (transfers).")
    total = Int(0, help="Bytes to move; 0 when not known (launches).")
    rate_bps = Float(0.0, help="Average bytes per second since the start.")
    eta_s = Float(None, allow_none=True, help="Seconds left at the current rate; None when unknown.")
    elapsed_s = Float(0.0, help="Seconds since the start.")
    message = Unicode(help="The latest launch event.")
    finished = Bool(False, help="Whether it has ended.")
    failed = Bool(False, help="Whether it ended in an error.")
    text = Unicode(help="One line that says it all.")

    def __init__(self, start_done: int = 0, **kw: Any) -> None:
        """``start_done``: bytes moved already when it is made (a reporter makes it at a transfer's first
        report): the rate counts only what moves from then on."""
        super().__init__(**kw)
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self._start_done = start_done

    @validate("done", "total")
    def _not_negative(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must not be negative")
        return proposal["value"]

    @property
    def fraction(self) -> float | None:
        """Share done in [0, 1]; None for a launch (no total)."""
        if not self.total:
            return 1.0 if self.finished and self.kind == "transfer" else None
        return min(1.0, self.done / self.total)

    def update(self, done: int, total: int, now: float | None = None) -> None:
        """A transfer's new position (the ``on_progress`` callback's numbers)."""
        now = time.monotonic() if now is None else now
        with self._lock, self.hold_trait_notifications():
            self.elapsed_s = max(now - self._t0, 1e-6)
            self.total = max(int(total), 0)
            self.done = min(max(int(done), 0), self.total) if self.total else max(int(done), 0)
            self.finished = bool(self.total) and self.done >= self.total
            moved = self.done - self._start_done
            self.rate_bps = moved / self.elapsed_s if moved > 0 and self.elapsed_s >= RATE_MIN_S else 0.0
            left = self.total - self.done
            self.eta_s = 0.0 if self.finished else (left / self.rate_bps if self.rate_bps > 0 else None)
            self._retext()

    def event(self, message: str, now: float | None = None) -> None:
        """A launch's new event."""
        now = time.monotonic() if now is None else now
        with self._lock, self.hold_trait_notifications():
            self.elapsed_s = now - self._t0
            self.message = message.strip().splitlines()[0] if message.strip() else self.message
            self._retext()

    def finish(self, error: str = "", now: float | None = None) -> None:
        """Mark it ended (with an error message when it failed)."""
        now = time.monotonic() if now is None else now
        with self._lock, self.hold_trait_notifications():
            self.elapsed_s = now - self._t0
            self.finished = True
            self.failed = bool(error)
            if error:
                self.message = error.strip().splitlines()[0]
            if self.kind == "transfer":
                self.eta_s = 0.0
                if self.total and not error:  # one that failed stays where it stopped
                    self.done = self.total
            self._retext()

    def _retext(self) -> None:
        if self.kind == "transfer":
            text = f"{self.label} {format_bytes(self.done)} / {format_bytes(self.total)}"
            if self.rate_bps > 0:
                text += f" · {format_bytes(self.rate_bps)}/s"
            if self.failed:  # where it stopped, and why
                text += f" · stopped: {self.message}"
            elif not self.finished and self.eta_s is not None:
                text += f" · ETA {format_age(self.eta_s)}"
            elif self.finished:
                text += f" · done in {self.elapsed_s:.1f} s"
        elif self.failed:
            text = f"{self.label}: failed after {self.elapsed_s:.1f} s"
        elif self.finished:
            text = f"{self.label}: ready in {self.elapsed_s:.1f} s"
        else:
            text = f"{self.label} … {self.elapsed_s:.1f} s" + (f" · {self.message}" if self.message else "")
        self.text = text
