"""The async Compute client of seed 002: ``async with Compute(...)``, ready, suspend, resume, delete, tensors.

Mixed into :class:`kt_jupyter.compute.Compute`, whose construction stays
pure: nothing here runs until called, and then it goes through
:mod:`kt_jupyter.operations`, the same backend and connection code as ``%%kt`` cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Self


@dataclass
class TensorResponse:
    """What the pod kernel answered to ``send_tensors``."""

    message: str
    count: int
    shapes: list[list[int]] = field(default_factory=list)


def operations() -> ModuleType:
    """:mod:`kt_jupyter.operations`, which does a Compute's I/O: imported on first use, because it sits
    above :mod:`kt_jupyter.compute` (it imports the backends and the connection, which import Compute)."""
    from . import operations as module

    return module


class ComputeLifecycle:
    """Async lifecycle and tensor streaming for a Compute (see seed 002)."""

    async def __aenter__(self) -> Self:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def ready(self, timeout: float | None = None) -> Self:
        """Launch (or find) the pod kernel and wait until it answers; ``timeout`` overrides launch_timeout."""
        await operations().ready(self, timeout)
        return self

    def is_ready(self) -> bool:
        """Whether the pod kernel runs and answers a ping now."""
        return bool(operations().is_ready(self))

    async def suspend(self) -> None:
        """Scale to zero: the kernel stops (its variables are lost); ``resume`` starts it again."""
        await operations().suspend(self)

    async def resume(self) -> None:
        """Start a suspended compute again."""
        await operations().resume(self)

    async def delete(self, grace_period_seconds: float = 30) -> None:
        """Stop the pod kernel and delete everything of it."""
        await operations().delete(self, grace_period_seconds)

    async def send_tensors(self, *tensors: Any) -> TensorResponse:
        """Send tensors (torch or numpy; zero-copy out-of-band buffers) to the pod's ``kt_inbox``."""
        reply = await operations().tensor_call(self, "send", list(tensors))
        return TensorResponse(reply["message"], reply["count"], reply["shapes"])

    async def receive_tensors(self, count: int = 1, parameters: dict[str, Any] | None = None) -> list[Any]:
        """Take ``count`` tensors from the pod's ``kt_outbox`` (random ones of ``parameters['shape']`` if short)."""
        return list(await operations().tensor_call(self, "receive", [count, parameters]))

    async def stream_tensors(self, *tensors: Any) -> list[Any]:
        """Send tensors and get back the pod's ``kt_stream_handler`` applied to each (identity if undefined)."""
        return list(await operations().tensor_call(self, "stream", list(tensors)))
