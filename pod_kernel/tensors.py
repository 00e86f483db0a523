"""Tensor streaming of the async Compute client (seed 002), served by calls on the pod kernel.

``send`` appends tensors to the kernel's inbox, ``receive`` takes tensors from
its outbox (or, like the seed's demo server, makes random ones of a given
shape when the outbox is short), and ``stream`` applies the handler a cell
defined as ``kt_stream_handler`` (identity otherwise). Inbox and outbox are
the lists ``kt_inbox`` and ``kt_outbox`` in the kernel's namespace, so cells
can read what arrived and queue what to send.
"""

from __future__ import annotations

from typing import Any

#: The kernel's user namespace; set by the server at start.
NAMESPACE: dict[str, Any] = {}


def _list(name: str) -> list[Any]:
    return NAMESPACE.setdefault(name, [])


def send(*tensors: Any) -> dict[str, Any]:
    """Receive tensors from a client into ``kt_inbox``."""
    inbox = _list("kt_inbox")
    inbox.extend(tensors)
    shapes = [list(getattr(t, "shape", ())) for t in tensors]
    return {"message": f"received {len(tensors)} tensor(s)", "count": len(tensors), "shapes": shapes,
            "inbox_size": len(inbox)}


def receive(count: int = 1, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Up to ``count`` tensors from ``kt_outbox``; random ones of ``parameters['shape']`` make up the rest."""
    outbox = _list("kt_outbox")
    out = [outbox.pop(0) for _ in range(min(count, len(outbox)))]
    if len(out) < count:
        shape = tuple(int(s) for s in str((parameters or {}).get("shape", "1")).split(",") if s.strip())
        try:
            import torch

            out += [torch.randn(*shape) for _ in range(count - len(out))]
        except ImportError:
            import numpy as np

            out += [np.random.standard_normal(shape).astype("float32") for _ in range(count - len(out))]
    return out


def stream(*tensors: Any) -> list[Any]:
    """Apply ``kt_stream_handler`` (defined by a cell) to each tensor; identity when none is defined."""
    handler = NAMESPACE.get("kt_stream_handler") or (lambda t: t)
    return [handler(t) for t in tensors]
