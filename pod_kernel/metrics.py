"""Resource samples of a pod kernel: process and host via psutil, GPUs via NVML when present."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil


class MetricsSampler:
    """Takes samples; NVML is opened once, and its absence is not an error."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # prime: the first call measures from here
        self._nvml = None
        self._gpu_handles: list[Any] = []
        self.gpu_error: str | None = None
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._gpu_handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self._visible_gpus(pynvml)]
        except Exception as exc:  # no driver, no GPU, no library: report no GPUs
            self.gpu_error = f"{type(exc).__name__}: {exc}"
            self._nvml = None

    @staticmethod
    def _visible_gpus(pynvml: Any) -> list[int]:
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None or visible.strip() == "":
            return list(range(count)) if visible is None else []
        out = []
        for item in visible.split(","):
            item = item.strip()
            if item.isdigit() and int(item) < count:
                out.append(int(item))
        return out

    def sample(self) -> dict[str, Any]:
        """One sample: CPU %, RSS, host memory, and per-GPU utilisation/memory/temperature/power."""
        with self._proc.oneshot():
            cpu = self._proc.cpu_percent(None)
            rss = self._proc.memory_info().rss
            for child in self._children():
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
        vm = psutil.virtual_memory()
        return {
            "time": time.time(),
            "pid": self._proc.pid,
            "cpu_percent": cpu,
            "cpu_count": psutil.cpu_count() or 1,
            "rss_bytes": rss,
            "host_memory_total_bytes": vm.total,
            "host_memory_used_bytes": vm.total - vm.available,
            "gpus": self._gpus(),
        }

    def _children(self) -> list[psutil.Process]:
        try:
            return self._proc.children(recursive=True)
        except psutil.Error:
            return []

    def _gpus(self) -> list[dict[str, Any]]:
        if self._nvml is None:
            return []
        nv = self._nvml
        out = []
        for index, handle in enumerate(self._gpu_handles):
            entry: dict[str, Any] = {"index": index}
            for key, read in (
                ("name", lambda h: nv.nvmlDeviceGetName(h)),
                ("utilization_percent", lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("memory_used_bytes", lambda h: nv.nvmlDeviceGetMemoryInfo(h).used),
                ("memory_total_bytes", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total),
                ("temperature_c", lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("power_w", lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    value = read(handle)
                    entry[key] = value.decode() if isinstance(value, bytes) else value
                except Exception:
                    entry[key] = None
            out.append(entry)
        return out


def gpu_count() -> int:
    """How many GPUs NVML sees on this machine (0 without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0
