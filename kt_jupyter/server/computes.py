"""What the compute API reports: backend state joined with live metrics, fetched without blocking.

The blocking parts (backend calls) are plain functions the handlers run in a
thread pool. Metrics come from the pod kernels over their own sessions,
which run on the client's asyncio loop (:func:`kt_jupyter.client.client_loop`);
:class:`MetricsProbe` keeps one session per compute and bounds every sample
by a timeout, so a hung or dead kernel costs the server a few seconds at
most, never a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..backends import BACKENDS, KernelHandle, KernelInfo, get_backend
from ..client import Session, client_loop
from ..compute import Compute
from ..errors import BackendUnavailable, ComputeSpecError, KtError, NotFoundError, RemoteTimeoutError

#: Spec fields shown as a compute's resources (those set; None left out).
RESOURCE_KEYS = ("cpus", "memory", "gpus", "gpu_type", "gpu_memory", "disk_size")
#: Phases in which a pod kernel answers requests.
LIVE_PHASES = ("ready", "running")
#: Characters of an unexpected error kept in the message about a bad spec.
MAX_REASON_CHARS = 200
#: An example Compute spec for error messages.
SPEC_EXAMPLE = '{"name": "train", "cpus": 2, "memory": "4Gi"}'


def resources_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The resource fields of a Compute spec dict that are set."""
    return {key: spec[key] for key in RESOURCE_KEYS if spec.get(key) not in (None, "", 0, "0")}


def summarize(info: KernelInfo, metrics: dict[str, Any] | None = None,
              metrics_error: str | None = None, now: float | None = None) -> dict[str, Any]:
    """One compute as the REST API shows it: state, resources, age, and idle time / GPU use when known."""
    now = time.time() if now is None else now
    return {
        "name": info.name,
        "backend": info.backend,
        "phase": info.phase,
        "where": info.where,
        "detail": info.detail,
        "pid": info.pid,
        "started": info.started or None,
        "age_s": max(0.0, now - info.started) if info.started else None,
        "resources": resources_of(info.spec),
        "idle_s": metrics.get("idle_s") if metrics else None,
        "gpus": metrics.get("gpus", []) if metrics else [],
        "metrics": metrics,
        "metrics_error": metrics_error,
    }


# ---------------------------------------------------------------------- blocking calls (run in a thread pool)

def list_backend(name: str) -> tuple[list[KernelInfo], dict[str, Any]]:
    """The computes of one backend, and whether it could be asked.

    A backend that is unavailable here (not configured, no cluster, not in
    this build) has no computes; its reason is reported instead of an error.
    """
    try:
        found = get_backend(name).list()
    except KtError as exc:
        return [], {"name": name, "available": False, "message": str(exc)}
    return found, {"name": name, "available": True, "message": ""}


@contextmanager
def _backend_of(backend: str, name: str) -> Iterator[Any]:
    """The backend of an existing compute; an unknown or unavailable backend has no computes (NotFoundError)."""
    if backend not in BACKENDS:
        raise NotFoundError(f"no backend {backend!r}: use one of {', '.join(BACKENDS)}")
    try:
        yield get_backend(backend)
    except BackendUnavailable as exc:  # raised by get_backend or by the first call that needs the cluster
        raise NotFoundError(f"no {backend} compute named {name!r}: {exc}") from None


def compute_status(backend: str, name: str) -> KernelInfo:
    """One compute's state (NotFoundError when there is none)."""
    with _backend_of(backend, name) as b:
        return b.status(name)


def live_handle(backend: str, name: str) -> KernelHandle | None:
    """The running kernel of that compute, or None when it is not running (NotFoundError if unknown)."""
    with _backend_of(backend, name) as b:
        handle = b.find(name)
        if handle is None:
            b.status(name)  # raises NotFoundError for a compute that does not exist at all
        return handle


def compute_logs(backend: str, name: str, tail: int) -> str:
    """The last ``tail`` lines of a compute's log."""
    with _backend_of(backend, name) as b:
        return b.logs(name, tail=tail)


def stop_compute(backend: str, name: str) -> None:
    """Stop a compute and remove it (NotFoundError when there was none)."""
    with _backend_of(backend, name) as b:
        if not b.delete(name):
            raise NotFoundError(f"no {backend} compute named {name!r}")


def launch_compute(spec: Any) -> tuple[KernelInfo, bool]:
    """Start a compute from a Compute spec dict (kept after this server exits); (state, created)."""
    try:
        compute = Compute.from_dict(spec)
    except KtError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:  # a hostile spec the checks did not foresee
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:MAX_REASON_CHARS]
        raise ComputeSpecError(f"the Compute spec is not valid: {reason}; send one like {SPEC_EXAMPLE}") from None
    try:
        b = get_backend(compute.backend)
        existed = b.find(compute.name) is not None
        b.launch(compute, keep=True)
        return b.status(compute.name), not existed
    except BackendUnavailable as exc:  # the request names a backend this server cannot use
        raise ComputeSpecError(f"cannot launch {compute.name!r} on {compute.backend}: {exc}") from None


# ---------------------------------------------------------------------- metrics over pod kernel sessions

class MetricsProbe:
    """Samples pod kernel metrics, one cached session per compute, each sample bounded by ``timeout_s``."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        # (backend, name) -> (identity of the kernel, session); touched only on the client loop
        self._sessions: dict[tuple[str, str], tuple[tuple[Any, ...], Session]] = {}

    async def sample(self, handle: KernelHandle) -> dict[str, Any]:
        """One metrics sample of ``handle``'s kernel; RemoteTimeoutError when it does not answer in time."""
        future = asyncio.run_coroutine_threadsafe(self._sample(handle), client_loop())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s + 1.0)
        except TimeoutError:
            raise RemoteTimeoutError(
                f"compute {handle.name!r} did not answer a metrics request within {self.timeout_s:g} s") from None

    async def forget(self, backend: str, name: str) -> None:
        """Close the cached session of a compute (after it was stopped)."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._drop((backend, name)), client_loop()))

    async def aclose(self) -> None:
        """Close every cached session."""
        async def close_all() -> None:
            for key in list(self._sessions):
                await self._drop(key)

        if self._sessions:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_all(), client_loop()))

    async def _drop(self, key: tuple[str, str]) -> None:
        entry = self._sessions.pop(key, None)
        if entry is not None:
            with contextlib.suppress(Exception):  # the connection is gone already
                await entry[1].aclose()

    async def _sample(self, handle: KernelHandle) -> dict[str, Any]:
        key = (handle.backend, handle.name)
        ident = (handle.url, handle.pid, handle.started)
        entry = self._sessions.get(key)
        if entry is None or entry[0] != ident:
            await self._drop(key)
            entry = self._sessions[key] = (ident, handle.session(reconnect_timeout_s=self.timeout_s))
        try:
            reply = await asyncio.wait_for(entry[1].arequest({"type": "metrics"}), self.timeout_s)
        except TimeoutError:
            await self._drop(key)
            raise RemoteTimeoutError(
                f"compute {handle.name!r} did not answer a metrics request within {self.timeout_s:g} s") from None
        except BaseException:
            await self._drop(key)
            raise
        return reply["metrics"]
