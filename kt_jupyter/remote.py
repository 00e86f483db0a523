"""The seed API on pod kernels: ``fn`` and ``cls`` (kubetorch), ``map``/``starmap`` (runhouse).

``kt.fn(f).to(compute)`` returns a callable that runs ``f`` on the pod kernel
named after the function (``name=`` overrides; two modules named alike share
one kernel, and ``%%kt --name NAME`` cells reach it too). Calls run
concurrently on the pod.

Code travels as :mod:`kt_jupyter.codetravel` says: functions of modules are
imported by name on the pod (the user's modules synced as source first, so an
edit is in effect on the next call); functions from a script's ``__main__``,
a notebook cell or another function travel by value (cloudpickle) once per
version. ``serialization`` (``json`` by default, ``pickle`` on request) is how
arguments and results travel; the pod kernel enforces its
``allowed_serialization``.

On a compute distributed over torch.distributed (``compute.distribute("pytorch",
workers=N)``) a call runs on every worker at once (SPMD) and returns the
workers' results as a list in rank order; an error on any worker fails the
call naming its rank (``exc.rank``), after the other workers' calls were
cancelled and every worker's process group torn down (so none stays blocked
in a collective). On a Ray compute calls run on the head, where ``ray.init()``
reaches the cluster.

Ctrl-C while waiting for a call (or a map) cancels it: the local wait and
upload stop, and the pod interrupts the call (best effort: Python code stops
at once, a call blocked in native code when that returns). A ``.remote()``
result dropped here is released on the pod (in batches, on the client loop).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from pod_kernel import waits
from pod_kernel.calls import UnknownFunction

from . import connection as conn_mod
from .backends import get_backend
from .client import OPEN_TIMEOUT_S, Session, client_loop
from .codetravel import Shipment, ship
from .compute import Compute
from .distributed_cells import STOP_GRACE_S, rank_error
from .distributed_group import WorkerGroup, connect_group, delete_group
from .errors import KtError
from .names import check_compute_name

log = logging.getLogger("kt_jupyter.remote")

#: kubetorch's per-call options, popped from a call's keyword arguments.
CALL_OPTIONS = ("async_", "stream_logs", "stream_metrics", "debug", "serialization")
#: How long Ctrl-C waits for the pod to hear that its calls are cancelled.
CANCEL_TIMEOUT_S = OPEN_TIMEOUT_S


class _Releases:
    """Remote refs dropped and calls cancelled, sent to their pods in one ``release`` request per
    session and turn of the client loop (a finalizer may run in any thread, during any GC)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Session, tuple[list[str], list[str]]] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task] = set()

    def add(self, session: Session, refs: Iterable[str] = (), calls: Iterable[str] = ()) -> None:
        """Queue refs to release and calls to cancel on ``session``'s pod."""
        with self._lock:
            entry = self._pending.setdefault(session, ([], []))
            entry[0].extend(refs)
            entry[1].extend(calls)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            client_loop().call_soon_threadsafe(self._flush)
        except RuntimeError:  # the interpreter is shutting down: the pod goes with the notebook
            pass

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, {}, False
        for session, (refs, calls) in batch.items():
            task = asyncio.ensure_future(self._send(session, refs, calls))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _send(session: Session, refs: list[str], calls: list[str]) -> None:
        try:
            await session.arequest({"type": "release", "refs": refs, "calls": calls})
        except Exception as exc:
            log.debug("release on %s failed: %s", session.name, exc)

    async def _drain(self) -> None:
        self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def drain(self, timeout_s: float) -> None:
        """Send what is queued now and wait (from outside the client loop) until the pods answered."""
        fut = asyncio.run_coroutine_threadsafe(self._drain(), client_loop())
        try:
            fut.result(timeout_s)
        except Exception:
            fut.cancel()


releases = _Releases()


class RemoteObjectRef:
    """A call result kept on the pod (``.remote(...)``); passing it to later calls costs no transfer.

    When the last reference to it here goes, the pod's copy is released.
    """

    def __init__(self, module: Module, ref: str, type_name: str, size: int) -> None:
        self._module = module
        self.ref = ref
        self.type = type_name
        self.size = size
        finalizer = weakref.finalize(self, releases.add, module._connection().session, [ref])
        finalizer.atexit = False

    def __repr__(self) -> str:
        return f"<RemoteObjectRef {self.ref}: {self.type} on {self._module.service_name!r}>"

    def fetch(self, serialization: str = "pickle") -> Any:
        """Bring the value here."""
        session = self._module._connection().session
        return session.call({"kind": "module", "module": "pod_kernel.calls", "qualname": "identity"},
                            [{"__kt_ref__": self.ref}], serialization=serialization)


def _encode_refs(value: Any) -> Any:
    """RemoteObjectRefs inside arguments become markers the pod replaces by the real objects."""
    if isinstance(value, RemoteObjectRef):
        return {"__kt_ref__": value.ref}
    if isinstance(value, list):
        return [_encode_refs(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_encode_refs(v) for v in value)
    if isinstance(value, dict):
        return {k: _encode_refs(v) for k, v in value.items()}
    return value


#: Per session: the code by value given to its pod, by key (done, or under way: concurrent calls share one).
_defined: weakref.WeakKeyDictionary[Session, dict[str, asyncio.Future]] = weakref.WeakKeyDictionary()


async def _define(session: Session, shipment: Shipment, force: bool = False) -> None:
    """Give the pod the code shipped by value, unless this session already did (or is doing it)."""
    if shipment.by_value is None:
        return
    known = _defined.setdefault(session, {})
    key = str(shipment.key)
    while key in known and not (force and known[key].done()):
        pending = known[key]
        try:
            await asyncio.shield(pending)
            return
        except asyncio.CancelledError:
            if not pending.cancelled():
                raise  # this caller was cancelled
            # the call that was defining it was cancelled: define it here
    known[key] = done = asyncio.get_running_loop().create_future()
    try:
        await session.acall({"kind": "define", "key": key}, fn=shipment.by_value, serialization="pickle")
    except BaseException as exc:
        known.pop(key, None)
        if isinstance(exc, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(exc)
            done.exception()  # retrieved: the waiters (if any) raise it themselves
        raise
    done.set_result(None)


class Module:
    """What ``fn`` and ``cls`` share: a name, a compute, and call options."""

    def __init__(self, obj: Any = None, name: str | None = None, get_if_exists: bool = True,
                 reload_prefixes: list[str] | None = None) -> None:
        if obj is None and name is None:
            raise KtError("give the function/class, or name= of an existing service to reload it")
        self._obj = obj
        self._name = self._given_name = check_compute_name(name) if name else obj.__name__
        self.get_if_exists = get_if_exists
        self.reload_prefixes = list(reload_prefixes or [])
        self._compute: Compute | None = None
        self.serialization = "json"
        self.async_ = False
        self._stream_logs: bool | None = None
        self.dryrun = False

    # ---------------------------------------------------------------- properties of the seed

    @property
    def name(self) -> str:
        """The function/class (service) name."""
        return self._name

    @property
    def compute(self) -> Compute:
        """The Compute this module runs on (named after the module)."""
        if self._compute is None:
            raise KtError(f"{self._name!r} is not deployed yet: call .to(kt.Compute(...)) first")
        return self._compute

    @property
    def service_name(self) -> str:
        """``{username}-{name}``, as on Kubernetes."""
        return (self._compute or Compute(name=self._name)).service_name

    @property
    def namespace(self) -> str:
        """The Kubernetes namespace (resolved lazily)."""
        return self.compute.namespace

    @property
    def pointers(self) -> tuple[str | None, str | None, str]:
        """(file path, module name, function/class name)."""
        obj = self._obj
        try:
            path = inspect.getsourcefile(obj) if obj is not None else None
        except TypeError:
            path = None
        return path, getattr(obj, "__module__", None), self._name

    @property
    def stream_logs(self) -> bool:
        """Whether remote prints stream back (default True in notebooks)."""
        if self._stream_logs is not None:
            return self._stream_logs
        cfg = getattr(self._compute, "logging_config", None)
        value = getattr(cfg, "stream_logs", None) if cfg is not None else None
        return True if value is None else bool(value)

    @stream_logs.setter
    def stream_logs(self, value: bool | None) -> None:
        self._stream_logs = value

    @property
    def logging_config(self) -> Any:
        """The compute's LoggingConfig, if any."""
        return getattr(self._compute, "logging_config", None)

    # ---------------------------------------------------------------- lifecycle

    def to(self, compute: Compute, init_args: dict[str, Any] | None = None, stream_logs: bool | None = None,
           get_if_exists: bool | None = None, reload_prefixes: list[str] | None = None,
           dryrun: bool = False) -> Module:
        """Deploy to ``compute`` (launch or reuse the kernel named after this module).

        With ``get_if_exists`` and ``reload_prefixes``, a running service named
        ``{prefix}-{name}`` (the first prefix that has one) is used instead.
        """
        if stream_logs is not None:
            self._stream_logs = stream_logs
        if get_if_exists is not None:
            self.get_if_exists = get_if_exists
        if reload_prefixes is not None:
            self.reload_prefixes = list(reload_prefixes)
        self.dryrun = dryrun
        if not dryrun:
            self._name = self._existing_name(compute)
        self._compute = compute.with_overrides(name=self._name)
        if not dryrun:
            self._deploy(init_args)
        return self

    def _existing_name(self, compute: Compute) -> str:
        """The first ``{prefix}-{name}`` of ``reload_prefixes`` that runs, else the name as given."""
        if self.get_if_exists and self.reload_prefixes:
            backend = get_backend(compute.backend)
            for prefix in self.reload_prefixes:
                if backend.find(f"{prefix}-{self._given_name}") is not None:
                    return f"{prefix}-{self._given_name}"
        return self._given_name

    def deploy(self) -> Module:
        """Deploy with the settings given so far."""
        self._deploy(None)
        return self

    def _deploy(self, init_args: dict[str, Any] | None) -> None:
        conn = self._connection()
        if not self.get_if_exists:
            conn.forget_state()
        shipment = self._ship(conn)  # code that cannot travel to this compute is an error here, before any call
        if self._obj is not None:  # the pod imports or defines it now, and knows it as this service's
            if self._spmd:
                _wait(lambda: self._acall_ranks(shipment, (), {}, {"serialization": "json"}, deploy=True))
            else:
                _wait(lambda: self._acall(shipment, (), {}, {"serialization": "json"}, deploy=True))

    def _connection(self) -> conn_mod.ComputeConnection:
        if self.compute.distributed_config is not None:
            return self._workers().head  # Ray: where calls run; pytorch: what code travel is prepared for
        return conn_mod.connect(self.compute, keep=True)

    def _workers(self) -> WorkerGroup:
        return connect_group(self.compute, keep=True)

    @property
    def _spmd(self) -> bool:
        """Whether calls run on every worker (torch.distributed), not on one kernel."""
        config = self._compute.distributed_config if self._compute is not None else None
        return config is not None and config.framework == "pytorch"

    def _ship(self, conn: conn_mod.ComputeConnection) -> Shipment:
        """How the wrapped function or class reaches the pod (syncing the user's modules it needs)."""
        if self._obj is None:
            return Shipment({"kind": "name", "name": self._name})
        return ship(self._obj, conn.code, conn.session.accept_pickle)

    def teardown(self) -> None:
        """Delete the service and its kernel."""
        if self.compute.distributed_config is not None:
            delete_group(self.compute.backend, self._name)
            return
        conn_mod.disconnect(self._name, self.compute.backend)
        get_backend(self.compute.backend).delete(self._name)

    # ---------------------------------------------------------------- calls

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts = {k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs}
        if opts.get("debug"):  # debugpy in the pod kernel (once): say how to attach, then call
            print(self._connection().debug().describe(), flush=True)
        return opts

    async def _acall(self, shipment: Shipment, args: tuple, kwargs: dict[str, Any], opts: dict[str, Any],
                     keep: bool = False, construct: dict | None = None, deploy: bool = False,
                     conn: conn_mod.ComputeConnection | None = None, cancel_key: str | None = None,
                     on_output: Callable[[dict[str, Any]], None] | None = None) -> Any:
        if conn is None:
            conn = await asyncio.to_thread(self._connection)
        await asyncio.to_thread(conn.sync_code)
        session = conn.session
        stream = opts.get("stream_logs", self.stream_logs)
        cancel_key = cancel_key or uuid.uuid4().hex
        target = dict(shipment.target, cancel_key=cancel_key)
        if target["kind"] != "method":
            target["service"] = self._name
        if deploy:
            target["deploy"] = True
        try:
            for attempt in range(2):
                await _define(session, shipment, force=attempt > 0)
                try:
                    return await session.acall(
                        target, _encode_refs(list(args)), _encode_refs(kwargs),
                        serialization=opts.get("serialization", self.serialization), stream=bool(stream),
                        on_output=(on_output or _print_output) if stream else None, keep=keep,
                        construct=construct,
                    )
                except UnknownFunction:  # the pod restarted or evicted it: define it again, once
                    if attempt or shipment.by_value is None:
                        raise
        except asyncio.CancelledError:  # Ctrl-C here, or the caller's task cancelled: stop it on the pod
            releases.add(session, calls=[cancel_key])
            raise

    async def _acall_ranks(self, shipment: Shipment, args: tuple, kwargs: dict[str, Any], opts: dict[str, Any],
                           deploy: bool = False) -> list[Any]:
        """The call on every worker at once; results in rank order, or the first failed rank's error."""
        group = await asyncio.to_thread(self._workers)
        n = len(group.ranks)
        for conn in group.ranks[1:]:  # each rank's code tree gets the user's modules too (synced per rank)
            self._ship(conn)
        keys = [uuid.uuid4().hex for _ in range(n)]
        tasks = [asyncio.ensure_future(self._acall(shipment, args, kwargs, opts, deploy=deploy, conn=group.ranks[r],
                                                   cancel_key=keys[r], on_output=_rank_printer(r, n)))
                 for r in range(n)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # Ctrl-C: every rank's call is cancelled there (see _acall)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(group.abort_process_groups)
            raise
        failed = [r for r, t in enumerate(tasks) if t.done() and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        first = failed[0]
        for r, task in enumerate(tasks):  # the others stop: cancelled on the pod, and freed from collectives
            if not task.done():
                releases.add(group.ranks[r].session, calls=[keys[r]])
        await asyncio.to_thread(group.abort_process_groups, failed)
        done, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        await asyncio.to_thread(group.abort_process_groups, [r for r, t in enumerate(tasks)
                                                             if t in done and r not in failed])
        for task in stuck:
            task.cancel()
        errors = {r: t.exception() for r, t in enumerate(tasks) if t in done and t.exception() is not None}
        raise rank_error(tasks[first].exception(), first, n, errors,  # type: ignore[arg-type]
                         [r for r, t in enumerate(tasks) if t in stuck], self.compute.name)

    def _dispatch(self, shipment: Shipment, args: tuple, kwargs: dict[str, Any], keep: bool = False) -> Any:
        opts = self._options(kwargs)
        if self._spmd:
            if keep:
                raise KtError(f"{self._name!r} runs on every worker of {self.compute.name!r} (torch.distributed): "
                              ".remote() keeps one result, but there is one per rank; call it instead")
            coro_factory = lambda: self._acall_ranks(shipment, args, kwargs, opts)
        else:
            coro_factory = lambda: self._acall(shipment, args, kwargs, opts, keep)
        if opts.get("async_", self.async_):
            return _awaitable(coro_factory)
        return _wait(coro_factory)

    def _wrap_ref(self, marker: dict[str, Any]) -> RemoteObjectRef:
        return RemoteObjectRef(self, marker["__kt_ref__"], marker.get("type", ""), marker.get("size", 0))


def _wait(factory: Callable[[], Any]) -> Any:
    """Run a call on the client loop and wait for it here; Ctrl-C cancels it there and on the pod."""
    loop = client_loop()
    running: list[asyncio.Task[Any]] = []

    async def run() -> Any:
        task = asyncio.current_task()
        if task is not None:  # always: this runs as a task
            running.append(task)
        return await factory()

    fut = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return waits.future_result(fut)  # in slices: a Ctrl-C handled late still cancels the call
    except KeyboardInterrupt:
        fut.cancel()

        async def stop() -> None:  # the call's task unwound (its cancels queued), then they are sent
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await releases._drain()

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(CANCEL_TIMEOUT_S)
        except Exception as exc:
            log.warning("could not tell the pod to cancel: %s", exc)
        raise


async def _awaitable(factory: Callable[[], Any]) -> Any:
    """Run a call on the client loop; awaitable from the caller's loop (cancelling it cancels the call)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), client_loop()))


def _rank_printer(rank: int, workers: int) -> Callable[[dict[str, Any]], None] | None:
    """Prints of one worker's call, each line labelled ``[stdout:R]`` as ``%%px`` labels them (one worker: plain)."""
    if workers == 1:
        return None

    def show(msg: dict[str, Any]) -> None:
        if msg.get("type") == "stream":
            text = str(msg.get("text", ""))
            lines = text.splitlines(keepends=True)
            name = "stderr" if msg.get("name") == "stderr" else "stdout"
            _print_output({"type": "stream", "name": name,
                           "text": "".join(f"[{name}:{rank}] {line}" for line in lines)})

    return show


def _print_output(msg: dict[str, Any]) -> None:
    if msg.get("type") == "stream":
        (sys.stderr if msg.get("name") == "stderr" else sys.stdout).write(msg.get("text", ""))


class Fn(Module):
    """A function on a pod kernel (``kt.fn``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._dispatch(self._ship(self._connection()), args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call, keeping the result on the pod; returns a RemoteObjectRef (released there when dropped here)."""
        result = self._dispatch(self._ship(self._connection()), args, kwargs, keep=True)
        if inspect.isawaitable(result):
            async def _wrap() -> RemoteObjectRef:
                return self._wrap_ref(await result)

            return _wrap()
        return self._wrap_ref(result)

    def map(self, iterable: Iterable[Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        """``[f(x, y...) for x, y... in zip(...)]``, the calls running concurrently on the pod."""
        return self.starmap(list(zip(iterable, *iterables)), **kwargs)

    def starmap(self, arg_tuples: Iterable[tuple], **kwargs: Any) -> list[Any]:
        """``[f(*args) for args in arg_tuples]``, concurrently; Ctrl-C cancels them all."""
        if self._spmd:
            raise KtError(f"{self._name!r} runs on every worker of {self.compute.name!r} (torch.distributed), so "
                          "map/starmap have no one kernel to spread over; call it, or use a Ray compute")
        opts = self._options(kwargs)
        shipment = self._ship(self._connection())

        async def _all() -> list[Any]:
            return list(await asyncio.gather(*(self._acall(shipment, tuple(a), dict(kwargs), opts)
                                               for a in arg_tuples)))

        return _wait(_all)


class Cls(Module):
    """A class on a pod kernel (``kt.cls``): one instance, created once, persisting between calls."""

    def _deploy(self, init_args: dict[str, Any] | None) -> None:
        if self._spmd:
            raise KtError("kt.cls on a compute distributed over torch.distributed is not supported (one instance "
                          "per rank); wrap a function with kt.fn, or distribute over Ray")
        conn = self._connection()
        if not self.get_if_exists:
            conn.forget_state()
        if self._obj is None:
            return  # reloading an existing service by name: its instance lives there already
        shipment = self._ship(conn)
        ser = "pickle" if conn.session.accept_pickle else "json"
        construct = {"instance": self._name, "reuse": self.get_if_exists}
        _wait(lambda: self._acall(shipment, (), dict(init_args or {}), {"serialization": ser}, construct=construct))

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        shipment = Shipment({"kind": "method", "instance": self._name, "method": method})

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._dispatch(shipment, args, kwargs)

        call.__name__ = method
        return call


def fn(function_obj: Callable[..., Any] | None = None, name: str | None = None, get_if_exists: bool = True,
       reload_prefixes: list[str] | None = None) -> Fn:
    """Wrap a function for remote execution (``.to(compute)`` deploys it).

    ``reload_prefixes``: with ``get_if_exists``, ``.to()`` uses a running service named
    ``{prefix}-{name}`` (the first prefix that has one) instead of ``name``.
    """
    return Fn(function_obj, name=name, get_if_exists=get_if_exists, reload_prefixes=reload_prefixes)


def cls(class_obj: type | None = None, name: str | None = None, get_if_exists: bool = True,
        reload_prefixes: list[str] | None = None) -> Cls:
    """Wrap a class for remote execution (``.to(compute, init_args=...)`` creates its instance);
    ``reload_prefixes`` as for :func:`fn`."""
    return Cls(class_obj, name=name, get_if_exists=get_if_exists, reload_prefixes=reload_prefixes)
