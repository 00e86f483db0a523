"""Out of memory: one clear error naming the compute's memory limit, and an opt-in retry with more.

Seed 003 promises "dynamic retry with larger compute" after an OOM. Here it is
opt-in: ``%%kt --retry-oom`` (or :func:`run_cell` with ``retry_oom=N``) runs a
cell that ran out of memory again on a new pod kernel of the same name with
``memory_growth`` times the memory, at most N times. The new kernel starts
empty: the names the cell reads from the notebook are sent again, but values
that earlier ``%%kt`` cells left only on the pod are gone, and the user is
told so. Without the option an OOM is an :class:`OutOfMemoryError` that says
the limit and how to raise it.

A cell is out of memory when it raised ``MemoryError`` remotely (a local
kernel under its RLIMIT_DATA, a refused push), or when its kernel was
OOMKilled (Kubernetes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from typing import Any

import psutil

from . import connection as conn_mod
from .backends import get_backend
from .compute import Compute
from .errors import KernelDiedError, OutOfMemoryError, RemoteError
from .quantities import canonical_bytes

#: Retries ``--retry-oom`` allows when given no number.
DEFAULT_OOM_RETRIES = 2
#: Each retry multiplies the memory limit by this.
MEMORY_GROWTH = 2.0


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the pod kernel ran out of memory (not the notebook)."""
    if isinstance(exc, OutOfMemoryError):
        return False
    if isinstance(exc, RemoteError):
        return exc.ename.rsplit(".", 1)[-1] == "MemoryError"
    if isinstance(exc, MemoryError):
        return getattr(exc, "remote_traceback", None) is not None  # rebuilt from the pod, not raised here
    if isinstance(exc, KernelDiedError):
        return "OOMKilled" in str(exc)
    return False


def grown_memory(compute: Compute, growth: float = MEMORY_GROWTH, max_bytes: int | None = None) -> str | None:
    """The next memory limit to try (a quantity string), or None when it cannot grow."""
    current = getattr(compute, "memory_bytes", None)
    if not current:
        return None
    if max_bytes is None and compute.backend == "local":
        max_bytes = psutil.virtual_memory().total
    bigger = math.ceil(current * growth / (1 << 20)) << 20  # whole MiB
    if max_bytes is not None:
        bigger = min(bigger, max_bytes)
    return canonical_bytes(bigger) if bigger > current else None


def oom_error(exc: BaseException, compute: Compute, tried: tuple[str | None, ...] = ()) -> OutOfMemoryError:
    """The error a user sees: what ran out, under which limit, and what to do."""
    name = compute.name
    if compute.memory:
        what = f"the cell ran out of memory on compute {name!r} (memory limit {compute.memory})"
        bigger = grown_memory(compute)
        todo = (f"Give it more with `%%kt --name {name} --memory {bigger}`, or add `--retry-oom` to retry "
                "automatically with twice the memory (on a new pod kernel: its variables are lost)."
                if bigger else "It already has all the memory this machine has; use less, or a bigger machine.")
    else:
        what = f"the cell ran out of memory on compute {name!r}, which has no memory limit: its machine is full"
        todo = "Use less memory, or run it on a bigger machine (`--backend kubernetes --memory ...`)."
    if len(tried) > 1:
        what += f"; tried memory limits {', '.join(str(t) for t in tried)}"
    cause = getattr(exc, "evalue", None) or str(exc)
    err = OutOfMemoryError(f"{what}. {todo}" + (f"\n{type(exc).__name__}: {cause}" if cause else ""),
                           compute.memory, tried)
    remote_tb = getattr(exc, "remote_traceback", "") or ""
    lines = remote_tb.splitlines()
    shown = lines + [f"OutOfMemoryError: {what}. {todo}"] if lines else [f"OutOfMemoryError: {err}"]
    err._render_traceback_ = lambda: shown  # type: ignore[method-assign]
    return err


def run_cell(
    connection: conn_mod.ComputeConnection,
    source: str,
    user_ns: MutableMapping[str, Any],
    *,
    retry_oom: int = 0,
    memory_growth: float = MEMORY_GROWTH,
    max_memory_bytes: int | None = None,
    keep: bool = False,
    on_event: Callable[[str], None] | None = None,
    **run_kw: Any,
) -> conn_mod.CellOutcome:
    """:meth:`ComputeConnection.run_cell`, with an OOM turned into :class:`OutOfMemoryError`.

    With ``retry_oom`` > 0 an OOM relaunches the compute with more memory and
    runs the cell again, up to ``retry_oom`` times.
    """
    say = on_event or (lambda _m: None)
    tried: list[str | None] = []
    while True:
        try:
            return connection.run_cell(source, user_ns, **run_kw)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            compute = connection.compute
            tried.append(compute.memory)
            bigger = grown_memory(compute, memory_growth, max_memory_bytes)
            if len(tried) > retry_oom or bigger is None:
                raise oom_error(exc, compute, tuple(tried)) from exc
        say(f"the cell ran out of memory on {compute.name!r} with memory={compute.memory}; running it again on "
            f"a new pod kernel with memory={bigger}. Its variables are lost; the names this cell reads from the "
            "notebook are sent again.")
        conn_mod.disconnect(compute.name, compute.backend)
        get_backend(compute.backend).delete(compute.name, grace_period_s=1.0)
        connection = conn_mod.connect(compute.with_overrides(memory=bigger), keep=keep, on_event=on_event)
