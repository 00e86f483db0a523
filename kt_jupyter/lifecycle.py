"""The async Compute client of seed 002: ``async with Compute(...)``, ready, suspend, resume, delete, tensors.

Mixed into :class:`kt_jupyter.compute.Compute`, whose construction stays
pure: nothing here runs until called. Every method goes through the same
backend and connection code as ``%%kt`` cells.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

_TENSORS = "pod_kernel.tensors"


@dataclass
class TensorResponse:
    """What the pod kernel answered to ``send_tensors``."""

    message: str
    count: int
    shapes: list[list[int]] = field(default_factory=list)


class ComputeLifecycle:
    """Async lifecycle and tensor streaming for a Compute (see seed 002)."""

    async def __aenter__(self) -> Any:
        await self.ready()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.delete()

    def _conn(self) -> Any:
        from .connection import connect

        return connect(self, keep=True)  # type: ignore[arg-type]

    async def ready(self, timeout: float | None = None) -> Any:
        """Launch (or find) the pod kernel and wait until it answers; ``timeout`` overrides launch_timeout."""
        compute = self if timeout is None else self.with_overrides(launch_timeout=timeout)  # type: ignore[attr-defined]
        from .connection import connect

        conn = await asyncio.wait_for(asyncio.to_thread(connect, compute, keep=True), timeout)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(conn.session.aconnect(), _loop()))
        return self

    def is_ready(self) -> bool:
        """Whether the pod kernel runs and answers a ping now."""
        from .backends import get_backend

        handle = get_backend(self.backend).find(self.name)  # type: ignore[attr-defined]
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

    async def suspend(self) -> None:
        """Scale to zero: the kernel stops (its variables are lost); ``resume`` starts it again."""
        from .backends import get_backend
        from .connection import disconnect

        backend = get_backend(self.backend)  # type: ignore[attr-defined]
        disconnect(self.name, self.backend)  # type: ignore[attr-defined]
        suspend = getattr(backend, "suspend", None)
        if suspend is not None:
            await asyncio.to_thread(suspend, self.name)  # type: ignore[attr-defined]
        else:
            await asyncio.to_thread(backend.delete, self.name)  # type: ignore[attr-defined]

    async def resume(self) -> None:
        """Start a suspended compute again."""
        from .backends import get_backend

        backend = get_backend(self.backend)  # type: ignore[attr-defined]
        resume = getattr(backend, "resume", None)
        if resume is not None:
            await asyncio.to_thread(resume, self.name)  # type: ignore[attr-defined]
        await self.ready()

    async def delete(self, grace_period_seconds: float = 30) -> None:
        """Stop the pod kernel and delete everything of it."""
        from .backends import get_backend
        from .connection import disconnect

        disconnect(self.name, self.backend)  # type: ignore[attr-defined]
        await asyncio.to_thread(get_backend(self.backend).delete, self.name, grace_period_seconds)  # type: ignore

    async def _tensor_call(self, fn: str, args: list, kwargs: dict | None = None) -> Any:
        conn = await asyncio.to_thread(self._conn)
        fut = asyncio.run_coroutine_threadsafe(
            conn.session.acall({"kind": "module", "module": _TENSORS, "qualname": fn}, args, kwargs,
                               serialization="pickle"), _loop())
        return await asyncio.wrap_future(fut)

    async def send_tensors(self, *tensors: Any) -> TensorResponse:
        """Send tensors (torch or numpy; zero-copy out-of-band buffers) to the pod's ``kt_inbox``."""
        reply = await self._tensor_call("send", list(tensors))
        return TensorResponse(reply["message"], reply["count"], reply["shapes"])

    async def receive_tensors(self, count: int = 1, parameters: dict[str, Any] | None = None) -> list[Any]:
        """Take ``count`` tensors from the pod's ``kt_outbox`` (random ones of ``parameters['shape']`` if short)."""
        return await self._tensor_call("receive", [count, parameters])

    async def stream_tensors(self, *tensors: Any) -> list[Any]:
        """Send tensors and get back the pod's ``kt_stream_handler`` applied to each (identity if undefined)."""
        return await self._tensor_call("stream", list(tensors))


def _loop() -> asyncio.AbstractEventLoop:
    from .client import client_loop

    return client_loop()
