"""Seed-API calls (``fn`` / ``cls``) on a pod kernel: concurrent, outside the cell thread.

Cells run one at a time in the main thread; calls do not: the seeds promise
concurrent calls, so synchronous functions run on a thread pool and
coroutine functions on the network loop. Their prints reach the caller when
it asked to stream logs (a context variable routes them), else the log.

A call names its target as data (JSON-safe, so JSON-only kernels serve calls
too):

- ``{"kind": "module", "module": "pkg.mod", "qualname": "f"}``: an importable
  function (the user's synced code included) called by reference;
- ``{"kind": "source", "name": "f", "source": "def f(...): ..."}``: a
  notebook-defined function, defined once here from its source;
- ``{"kind": "pickled"}``: the function travels in the argument bundle as ``fn``;
- ``{"kind": "method", "instance": "svc", "method": "predict"}``: a method of
  an instance created by ``{"kind": "construct", "instance": "svc", "cls": <target>}``.

Values that stay remote (``.remote()`` results) are kept in :attr:`CallRunner.refs`
and travel as ``{"__kt_ref__": id}`` markers, replaced here by the real object.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import importlib
import inspect
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import protocol as P

#: Where a call's prints go: (outbox, request id), or None for the kernel log.
call_sink: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar("kt_call_sink", default=None)

REF_KEY = "__kt_ref__"
#: Threads serving synchronous calls at once.
CALL_WORKERS = 128


def identity(value: Any) -> Any:
    """Return the argument (fetches a kept remote value)."""
    return value


class CallError(Exception):
    """A call that names something that does not exist here."""


class CallRunner:
    """Resolves call targets and runs them concurrently."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.instances: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=CALL_WORKERS, thread_name_prefix="kt-call")
        self.calls_served = 0

    # ------------------------------------------------------------------ targets

    def resolve(self, target: dict[str, Any], fn: Any = None) -> Callable[..., Any]:
        """The callable a target names."""
        kind = target.get("kind")
        if kind == "module":
            obj: Any = importlib.import_module(str(target["module"]))
            for part in str(target["qualname"]).split("."):
                obj = getattr(obj, part)
            return obj
        if kind == "source":
            return self._from_source(str(target["name"]), str(target["source"]))
        if kind == "pickled":
            if not callable(fn):
                raise CallError("a pickled call target needs the function in its bundle")
            return fn
        if kind == "method":
            name = str(target["instance"])
            if name not in self.instances:
                raise CallError(f"no instance {name!r} on this pod kernel; it was never created or the kernel restarted")
            return getattr(self.instances[name], str(target["method"]))
        raise CallError(f"unknown call target kind {kind!r}")

    def _from_source(self, name: str, source: str) -> Callable[..., Any]:
        key = hashlib.sha1(f"{name}\0{source}".encode()).hexdigest()
        if key not in self._functions:
            scope = self.namespace  # notebook functions see the pod's globals, like cells do
            exec(compile(source, f"<kt-fn {name}>", "exec"), scope)
            self._functions[key] = scope[name]
        return self._functions[key]

    def construct(self, instance: str, cls_target: dict[str, Any], cls_obj: Any, args: list, kwargs: dict,
                  reuse: bool) -> bool:
        """Create the named instance once; returns whether a new one was made."""
        if reuse and instance in self.instances:
            return False
        cls = self.resolve(cls_target, cls_obj)
        self.instances[instance] = cls(*args, **kwargs)
        return True

    # ------------------------------------------------------------------ refs

    def deref(self, value: Any) -> Any:
        """Replace ``{"__kt_ref__": id}`` markers (in lists, tuples, dicts) by the objects they name."""
        if isinstance(value, dict):
            if len(value) == 1 and REF_KEY in value:
                ref = value[REF_KEY]
                if ref not in self.refs:
                    raise CallError(f"remote reference {ref!r} is not held by this pod kernel")
                return self.refs[ref]
            return {k: self.deref(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.deref(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.deref(v) for v in value)
        return value

    def keep(self, value: Any) -> dict[str, Any]:
        """Store a result remotely; return its marker with a description."""
        ref = f"r{next(self._ids)}"
        self.refs[ref] = value
        return {REF_KEY: ref, "type": P.type_name(value), "size": P.approx_size(value)}

    # ------------------------------------------------------------------ running

    async def run(self, func: Callable[..., Any], args: list, kwargs: dict, sink: tuple[Any, str] | None) -> Any:
        """Call ``func`` (thread pool, or on the loop for coroutine functions) with prints routed to ``sink``."""
        self.calls_served += 1
        token = call_sink.set(sink)
        try:
            if inspect.iscoroutinefunction(func):
                return await func(*args, **kwargs)
            ctx = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, lambda: ctx.run(func, *args, **kwargs))
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            call_sink.reset(token)
