"""Seed-API calls (``fn`` / ``cls``) on a pod kernel: concurrent, outside the cell thread and the network loop.

Cells run one at a time in the main thread; calls do not: the seeds promise
concurrent calls, so synchronous functions run on a thread pool and
coroutine functions on a loop of their own (a thread named ``kt-call-async``),
never on the network loop, so a coroutine that blocks cannot stall
heartbeats. Their prints reach the caller when it asked to stream logs (a
context variable routes them), else the log.

A call names its target as data (JSON-safe, so JSON-only kernels serve calls
too):

- ``{"kind": "module", "module": "pkg.mod", "qualname": "f"}``: an importable
  function (installed, or the user's synced code) called by reference;
- ``{"kind": "defined", "key": K}``: a function or class shipped by value
  (cloudpickle) once, by a call to ``{"kind": "define", "key": K}`` whose
  bundle holds it as ``fn``; only pickle-allowing kernels accept that;
- ``{"kind": "name", "name": "svc"}``: what service ``svc`` last called here,
  else a callable of that name in the pod namespace (``fn(name=...)``);
- ``{"kind": "method", "instance": "svc", "method": "predict"}``: a method of
  an instance created by a ``construct`` call.

A target may carry ``"service"`` (remembered for ``{"kind": "name"}``),
``"deploy"`` (only find the callable, as ``.to(compute)`` does, and reply
true) and ``"cancel_key"``: a ``release`` request naming that key cancels
the call (:meth:`CallRunner.cancel`).

Values that stay remote (``.remote()`` results) are kept in :attr:`CallRunner.refs`
and travel as ``{"__kt_ref__": id}`` markers, replaced here by the real object.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import importlib
import inspect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import protocol as P

#: Where a call's prints go: (outbox, request id), or None for the kernel log.
call_sink: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar("kt_call_sink", default=None)

REF_KEY = "__kt_ref__"
#: Threads serving synchronous calls at once.
CALL_WORKERS = 128
#: Functions and classes shipped by value kept at once; the least recently used go first (then resent).
DEFINED_MAX = 256
#: Cancels remembered for calls not (yet) seen, e.g. cancelled while their arguments were still arriving.
EARLY_CANCELS_MAX = 1024


def identity(value: Any) -> Any:
    """Return the argument (fetches a kept remote value)."""
    return value


class CallError(Exception):
    """A call that names something that does not exist here."""


class UnknownFunction(CallError):
    """A ``defined`` target this kernel does not hold (it restarted, or evicted it): the client defines it again."""


class CallCancelled(Exception):
    """The caller cancelled this call (Ctrl-C in the notebook)."""


@dataclass
class _Running:
    """A call in progress, as far as cancelling it goes."""

    thread_id: int | None = None
    future: Future | None = None
    cancelled: bool = False


class CallRunner:
    """Resolves call targets and runs them concurrently."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.instances: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self.services: dict[str, Callable[..., Any]] = {}
        self._defined: OrderedDict[str, Any] = OrderedDict()
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=CALL_WORKERS, thread_name_prefix="kt-call")
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[str, _Running] = {}
        self._early_cancels: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.calls_served = 0

    # ------------------------------------------------------------------ targets

    def resolve(self, target: dict[str, Any]) -> Callable[..., Any]:
        """The callable a target names (remembered as its ``service``'s when it names one)."""
        kind = target.get("kind")
        if kind == "module":
            obj: Any = importlib.import_module(str(target["module"]))
            for part in str(target["qualname"]).split("."):
                obj = getattr(obj, part)
        elif kind == "defined":
            key = str(target["key"])
            if key not in self._defined:
                raise UnknownFunction(f"function {key} is not defined on this pod kernel")
            self._defined.move_to_end(key)
            obj = self._defined[key]
        elif kind == "name":
            name = str(target["name"])
            obj = self.services.get(name, self.namespace.get(name))
            if not callable(obj):
                raise CallError(f"nothing named {name!r} was deployed to this pod kernel, and its namespace "
                                "holds no function of that name; deploy it with kt.fn(f).to(compute)")
        elif kind == "method":
            name = str(target["instance"])
            if name not in self.instances:
                raise CallError(
                    f"no instance {name!r} on this pod kernel; it was never created or the kernel restarted")
            return getattr(self.instances[name], str(target["method"]))
        else:
            raise CallError(f"unknown call target kind {kind!r}")
        if isinstance(target.get("service"), str):
            self.services[target["service"]] = obj
        return obj

    def define(self, key: str, obj: Callable[..., Any]) -> None:
        """Keep a function or class shipped by value under ``key`` (the client's content hash of it)."""
        self._defined.setdefault(key, obj)
        self._defined.move_to_end(key)
        while len(self._defined) > DEFINED_MAX:
            self._defined.popitem(last=False)

    def construct(self, instance: str, cls_target: dict[str, Any], args: list, kwargs: dict, reuse: bool) -> bool:
        """Create the named instance once; returns whether a new one was made."""
        if reuse and instance in self.instances:
            return False
        cls = self.resolve(cls_target)
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

    async def run(self, func: Callable[..., Any], args: list, kwargs: dict, sink: tuple[Any, str] | None,
                  cancel_key: str | None = None) -> Any:
        """Call ``func`` with prints routed to ``sink``: a thread of the pool, or the calls' own loop
        for a coroutine function. ``cancel_key`` lets :meth:`cancel` stop it."""
        self.calls_served += 1
        state = _Running()
        if cancel_key:
            with self._lock:
                if self._early_cancels.pop(cancel_key, 0) is None:  # cancelled before it arrived
                    raise CallCancelled("the caller cancelled this call")
                self._running[cancel_key] = state
        try:
            if inspect.iscoroutinefunction(func):
                return await self._run_coroutine(func(*args, **kwargs), sink, state)
            ctx = contextvars.copy_context()
            ctx.run(call_sink.set, sink)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, self._in_worker, state, ctx, func, args, kwargs)
            if inspect.isawaitable(result):
                result = await self._run_coroutine(result, sink, state)
            return result
        finally:
            if cancel_key:
                with self._lock:
                    self._running.pop(cancel_key, None)

    def _in_worker(self, state: _Running, ctx: contextvars.Context, func: Callable[..., Any],
                   args: list, kwargs: dict) -> Any:
        """Run ``func`` in this pool thread, where :meth:`cancel` can raise KeyboardInterrupt.

        A KeyboardInterrupt never leaves as such (on the network loop it would stop the
        server): it becomes CallCancelled. :meth:`cancel` signals this thread only while
        ``thread_id`` is set, under the lock; one signalled just as the call ends fires in
        the ``finally`` here (a call at latest: releasing the lock), still inside the ``try``.
        """
        try:
            try:
                with self._lock:
                    if state.cancelled:
                        raise CallCancelled("the caller cancelled this call")
                    state.thread_id = threading.get_ident()
                return ctx.run(func, *args, **kwargs)
            finally:
                with self._lock:
                    state.thread_id = None
        except KeyboardInterrupt:
            raise CallCancelled("the caller cancelled this call") from None

    async def _run_coroutine(self, coro: Any, sink: tuple[Any, str] | None, state: _Running) -> Any:
        async def with_sink() -> Any:
            call_sink.set(sink)
            return await coro

        future = asyncio.run_coroutine_threadsafe(with_sink(), self._coroutine_loop())
        with self._lock:
            state.future = future
            if state.cancelled:
                future.cancel()
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if state.cancelled:
                raise CallCancelled("the caller cancelled this call") from None
            raise

    def _coroutine_loop(self) -> asyncio.AbstractEventLoop:
        """The loop coroutine functions run on (a thread of its own, started once)."""
        with self._lock:
            if self._async_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="kt-call-async", daemon=True).start()
                self._async_loop = loop
            return self._async_loop

    def cancel(self, cancel_key: str) -> bool:
        """Stop a call: KeyboardInterrupt in its thread, or its coroutine cancelled.

        Best effort: Python code stops at its next bytecode; a call blocked in native
        code (a long ``time.sleep``, a read) stops when that returns. A call that has
        not started yet never runs. Returns whether a running call was signalled.
        """
        with self._lock:
            state = self._running.get(cancel_key)
            if state is None:
                self._early_cancels[cancel_key] = None
                while len(self._early_cancels) > EARLY_CANCELS_MAX:
                    self._early_cancels.popitem(last=False)
                return False
            state.cancelled = True
            if state.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(state.thread_id),
                                                           ctypes.py_object(KeyboardInterrupt))
                return True
            if state.future is not None:
                state.future.cancel()
                return True
            return False
