"""What a Compute's seed methods do in the world: through its backend and the connection.

:class:`~kt_jupyter.compute.Compute` is a pure value (it imports none of the
modules below it would need for I/O); its methods that reach a kernel —
``status()``, ``is_up()``, ``logs()``, ``pods()``, ``client_port()``,
``rsync()``, ``ssh()``, the async lifecycle of seed 002 — delegate here,
imported on first use. This module sits above compute, backends and
connection, so every import is at the top and the layers point one way.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from . import backends
from .backends import Backend, KernelInfo
from .client import client_loop
from .compute import POD_KERNEL_PORT, Compute
from .connection import ComputeConnection, connect, disconnect
from .errors import BackendUnavailable, NotFoundError
from .manifests import build_deployment, compute_from_deployment
from .rsync import RsyncResult, rsync
from .shell import ssh as open_shell

#: The pod-side module of the tensor calls (``send_tensors`` and friends).
TENSORS_MODULE = "pod_kernel.tensors"


def backend_of(compute: Compute) -> Backend:
    """The backend ``compute`` runs on (looked up at each call, so a test can stand one in)."""
    return backends.get_backend(compute.backend)


def status(compute: Compute) -> KernelInfo:
    """``compute``'s state as its backend reports it."""
    return backend_of(compute).status(compute.name)


def is_up(compute: Compute) -> bool:
    """Whether the pod kernel is running and ready."""
    try:
        return status(compute).phase in ("ready", "running")
    except NotFoundError:
        return False


def logs(compute: Compute, follow: bool, tail: int | None) -> str | Iterator[str]:
    """The last ``tail`` log lines, or with ``follow`` an iterator of new output."""
    backend = backend_of(compute)
    if not follow:
        return backend.logs(compute.name, tail=tail)
    follow_logs = getattr(backend, "follow_logs", None)
    if follow_logs is None:
        raise BackendUnavailable(f"the {compute.backend} backend cannot follow logs; call logs() without follow")
    return follow_logs(compute.name)


def pods(compute: Compute) -> list[Any]:
    """The pods of ``compute`` (Kubernetes backend)."""
    list_pods = getattr(backend_of(compute), "pods", None)
    if list_pods is None:
        raise BackendUnavailable(f"the {compute.backend} backend has no pods; use backend='kubernetes'")
    return list(list_pods(compute.name))


def client_port(compute: Compute) -> int:
    """The local port that reaches the pod kernel (launching it if needed)."""
    url = urlsplit(connect(compute).handle.url)
    if url.hostname == "127.0.0.1" and url.port:
        return url.port
    return backend_of(compute).forward_port(compute.name, POD_KERNEL_PORT)


def sync_files(compute: Compute, paths: str | os.PathLike[str] | list[str | os.PathLike[str]], dest: str | None, *,
               contents: bool, delete: bool, exclude: list[str] | tuple[str, ...],
               progress: bool | Callable[[int, int, int, int], None]) -> RsyncResult:
    """:meth:`Compute.rsync`: launch if needed, then send what changed."""
    return rsync(connect(compute).session, paths, dest, pickle_ok="pickle" in compute.allowed_serialization,
                 contents=contents, delete=delete, exclude=exclude, progress=progress)


def ssh(compute: Compute) -> int | None:
    """:meth:`Compute.ssh`: launch if needed, then a shell beside the kernel."""
    connect(compute)
    return open_shell(compute.backend, compute.name)


def deployment(compute: Compute) -> dict[str, Any]:
    """The Deployment ``compute`` runs as."""
    return build_deployment(compute)


def from_deployment(resource: dict[str, Any]) -> Compute:
    """The Compute of an existing Deployment manifest."""
    return compute_from_deployment(resource)


# ------------------------------------------------------------------ the async lifecycle of seed 002

async def ready(compute: Compute, timeout: float | None) -> None:
    """Launch (or find) the pod kernel and wait until it answers; ``timeout`` overrides launch_timeout."""
    launched = compute if timeout is None else compute.with_overrides(launch_timeout=timeout)
    conn = await asyncio.wait_for(asyncio.to_thread(connect, launched, keep=True), timeout)
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(conn.session.aconnect(), client_loop()))


def is_ready(compute: Compute) -> bool:
    """Whether the pod kernel runs and answers a ping now."""
    handle = backend_of(compute).find(compute.name)
    if handle is None:
        return False
    session = handle.session()
    try:
        session.ping(timeout=5)
        return True
    except Exception:
        return False
    finally:
        session.close_quietly()


async def suspend(compute: Compute) -> None:
    """Scale to zero (or delete, on a backend that cannot suspend)."""
    backend = backend_of(compute)
    disconnect(compute.name, compute.backend)
    scale_to_zero = getattr(backend, "suspend", None)
    if scale_to_zero is not None:
        await asyncio.to_thread(scale_to_zero, compute.name)
    else:
        await asyncio.to_thread(backend.delete, compute.name)


async def resume(compute: Compute) -> None:
    """Start a suspended compute again and wait until it answers."""
    start = getattr(backend_of(compute), "resume", None)
    if start is not None:
        await asyncio.to_thread(start, compute.name)
    await ready(compute, None)


async def delete(compute: Compute, grace_period_seconds: float) -> None:
    """Stop the pod kernel and delete everything of it."""
    disconnect(compute.name, compute.backend)
    await asyncio.to_thread(backend_of(compute).delete, compute.name, grace_period_seconds)


async def tensor_call(compute: Compute, fn: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> Any:
    """Call ``fn`` of :data:`TENSORS_MODULE` on the pod with pickled arguments."""
    conn: ComputeConnection = await asyncio.to_thread(connect, compute, keep=True)
    fut = asyncio.run_coroutine_threadsafe(
        conn.session.acall({"kind": "module", "module": TENSORS_MODULE, "qualname": fn}, args, kwargs,
                           serialization="pickle"), client_loop())
    return await asyncio.wrap_future(fut)
