"""The ExtensionApp: configuration, shared state and lifetime of the compute API."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Int

from .computes import MetricsProbe
from .handlers import default_handlers


class KtServerApp(ExtensionApp):
    """Serves ``/kt/api/``: list, inspect, launch and stop computes on every backend."""

    name = "kt_jupyter"
    load_other_extensions = True

    metrics_timeout_s = Float(
        2.0, config=True,
        help="Seconds to wait for one pod kernel's metrics before listing it without them.",
    )
    list_timeout_s = Float(
        10.0, config=True,
        help="Seconds to wait for one backend's list of computes before reporting it unavailable.",
    )
    max_log_lines = Int(
        10_000, config=True, help="Largest ?tail= a logs request may ask for.",
    )
    blocking_workers = Int(
        8, config=True, help="Threads for blocking backend calls (launch, delete, logs, listing).",
    )

    def initialize_settings(self) -> None:
        """Create the thread pool and the metrics probe the handlers share."""
        self.executor = ThreadPoolExecutor(self.blocking_workers, thread_name_prefix="kt-server")
        self.probe = MetricsProbe(timeout_s=self.metrics_timeout_s)
        self.listings: dict[str, asyncio.Future] = {}  # backend -> its listing in flight

    def initialize_handlers(self) -> None:
        """Register the REST handlers."""
        self.handlers.extend(default_handlers)

    async def stop_extension(self) -> None:
        """Close pod kernel sessions and the thread pool (the kernels themselves keep running)."""
        await self.probe.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)
