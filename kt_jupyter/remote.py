"""The seed API on pod kernels: ``fn`` and ``cls`` (kubetorch), ``map``/``starmap`` (runhouse).

``kt.fn(f).to(compute)`` returns a callable that runs ``f`` on the pod kernel
named after the function (``name=`` overrides; two modules named alike share
one kernel, and ``%%kt --name NAME`` cells reach it too). Calls run
concurrently on the pod. Arguments and results travel as JSON by default or
pickle on request; the pod kernel enforces its ``allowed_serialization``.

Functions from importable modules are called by reference (module + name),
after the working directory's code is synced, so an edit to a local ``.py``
file is in effect on the next call. Notebook-defined functions travel by
value (pickle) or as source (JSON).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable

from . import connection as conn_mod
from .client import client_loop
from .compute import Compute
from .errors import KtError

#: kubetorch's per-call options, popped from a call's keyword arguments.
CALL_OPTIONS = ("async_", "stream_logs", "stream_metrics", "debug", "serialization")


class RemoteObjectRef:
    """A call result kept on the pod (``.remote(...)``); passing it to later calls costs no transfer."""

    def __init__(self, module: "Module", ref: str, type_name: str, size: int) -> None:
        self._module = module
        self.ref = ref
        self.type = type_name
        self.size = size

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


def _importable_on_pod(module: str) -> bool:
    """Whether the pod can import ``module``: installed (site-packages, stdlib) or synced from the code root."""
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    if not file:
        return False
    path = Path(file).resolve()
    installed = {Path(p).resolve() for key in ("purelib", "platlib", "stdlib", "platstdlib")
                 if (p := sysconfig.get_paths().get(key))}
    if any(path.is_relative_to(base) for base in installed):
        return True
    root = Path.cwd().resolve()  # the code root synced to the pod (kt_jupyter.codesync.CodeTree)
    rel = Path(*module.split("."))
    return path in {(root / rel).with_suffix(".py"), root / rel / "__init__.py"}


def _target_for(obj: Any, serialization: str) -> tuple[dict[str, Any], Any]:
    """How the pod finds ``obj``: by reference, by source (JSON) or by value (pickle)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    if module and module not in ("__main__", "__mp_main__") and "<locals>" not in qualname \
            and _importable_on_pod(module):
        return {"kind": "module", "module": module, "qualname": qualname}, None
    if serialization == "pickle":
        return {"kind": "pickled"}, obj
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError) as exc:
        raise KtError(f"cannot send {qualname!r} as JSON (its source is unavailable: {exc}); "
                      "use serialization='pickle'") from None
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith("@")]
    return {"kind": "source", "name": obj.__name__, "source": "\n".join(lines) + "\n"}, None


class Module:
    """What ``fn`` and ``cls`` share: a name, a compute, and call options."""

    def __init__(self, obj: Any = None, name: str | None = None, get_if_exists: bool = True,
                 reload_prefixes: list[str] | None = None) -> None:
        if obj is None and name is None:
            raise KtError("give the function/class, or name= of an existing service to reload it")
        self._obj = obj
        self._name = name or obj.__name__
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
           dryrun: bool = False) -> "Module":
        """Deploy to ``compute`` (launch or reuse the kernel named after this module)."""
        self._compute = compute.with_overrides(name=self._name)
        if stream_logs is not None:
            self._stream_logs = stream_logs
        if get_if_exists is not None:
            self.get_if_exists = get_if_exists
        if reload_prefixes is not None:
            self.reload_prefixes = list(reload_prefixes)
        self.dryrun = dryrun
        if not dryrun:
            self._deploy(init_args)
        return self

    def deploy(self) -> "Module":
        """Deploy with the settings given so far."""
        self._deploy(None)
        return self

    def _deploy(self, init_args: dict[str, Any] | None) -> None:
        conn = self._connection()
        if not self.get_if_exists:
            conn.forget_state()
        conn.sync_code()

    def _connection(self) -> conn_mod.ComputeConnection:
        return conn_mod.connect(self.compute, keep=True)

    def teardown(self) -> None:
        """Delete the service and its kernel."""
        from .backends import get_backend

        conn_mod.disconnect(self._name, self.compute.backend)
        get_backend(self.compute.backend).delete(self._name)

    # ---------------------------------------------------------------- calls

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts = {k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs}
        if opts.get("debug"):  # debugpy in the pod kernel (once): say how to attach, then call
            print(self._connection().debug().describe(), flush=True)
        return opts

    async def _acall(self, target: dict[str, Any], fn: Any, args: tuple, kwargs: dict[str, Any],
                     opts: dict[str, Any], keep: bool = False, construct: dict | None = None) -> Any:
        conn = await asyncio.to_thread(self._connection)
        await asyncio.to_thread(conn.sync_code)
        stream = opts.get("stream_logs", self.stream_logs)
        on_output = _print_output if stream else None
        return await conn.session.acall(
            target, _encode_refs(list(args)), _encode_refs(kwargs), fn=fn,
            serialization=opts.get("serialization", self.serialization), stream=bool(stream),
            on_output=on_output, keep=keep, construct=construct,
        )

    def _dispatch(self, target: dict[str, Any], fn: Any, args: tuple, kwargs: dict[str, Any],
                  keep: bool = False) -> Any:
        opts = self._options(kwargs)
        coro_factory = lambda: self._acall(target, fn, args, kwargs, opts, keep)  # noqa: E731
        if opts.get("async_", self.async_):
            return _awaitable(coro_factory)
        return asyncio.run_coroutine_threadsafe(coro_factory(), client_loop()).result()

    def _wrap_ref(self, marker: dict[str, Any]) -> RemoteObjectRef:
        return RemoteObjectRef(self, marker["__kt_ref__"], marker.get("type", ""), marker.get("size", 0))


async def _awaitable(factory: Callable[[], Any]) -> Any:
    """Run a call on the client loop; awaitable from the caller's loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), client_loop()))


def _print_output(msg: dict[str, Any]) -> None:
    if msg.get("type") == "stream":
        (sys.stderr if msg.get("name") == "stderr" else sys.stdout).write(msg.get("text", ""))


class Fn(Module):
    """A function on a pod kernel (``kt.fn``)."""

    def _target(self, serialization: str) -> tuple[dict[str, Any], Any]:
        if self._obj is None:
            return {"kind": "source", "name": self._name, "source": ""}, None
        return _target_for(self._obj, serialization)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ser = kwargs.get("serialization", self.serialization)
        target, fn = self._target(ser)
        return self._dispatch(target, fn, args, kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call, keeping the result on the pod; returns a RemoteObjectRef."""
        ser = kwargs.get("serialization", self.serialization)
        target, fn = self._target(ser)
        kwargs.setdefault("serialization", "pickle" if fn is not None else ser)
        result = self._dispatch(target, fn, args, kwargs, keep=True)
        if inspect.isawaitable(result):
            async def _wrap() -> RemoteObjectRef:
                return self._wrap_ref(await result)

            return _wrap()
        return self._wrap_ref(result)

    def map(self, iterable: Iterable[Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        """``[f(x, y...) for x, y... in zip(...)]``, the calls running concurrently on the pod."""
        return self.starmap(list(zip(iterable, *iterables)), **kwargs)

    def starmap(self, arg_tuples: Iterable[tuple], **kwargs: Any) -> list[Any]:
        """``[f(*args) for args in arg_tuples]``, concurrently."""
        opts = self._options(kwargs)
        target, fn = self._target(opts.get("serialization", self.serialization))

        async def _all() -> list[Any]:
            return list(await asyncio.gather(*(self._acall(target, fn, tuple(a), dict(kwargs), opts)
                                               for a in arg_tuples)))

        return asyncio.run_coroutine_threadsafe(_all(), client_loop()).result()


class Cls(Module):
    """A class on a pod kernel (``kt.cls``): one instance, created once, persisting between calls."""

    def _deploy(self, init_args: dict[str, Any] | None) -> None:
        super()._deploy(init_args)
        if self._obj is None:
            return  # reloading an existing service by name: its instance lives there already
        ser = "pickle" if "pickle" in self.compute.allowed_serialization else "json"
        target, obj = _target_for(self._obj, ser)
        conn = self._connection()
        conn.session.call(target, [], dict(init_args or {}), fn=obj, serialization=ser,
                          construct={"instance": self._name, "reuse": self.get_if_exists})

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        target = {"kind": "method", "instance": self._name, "method": method}

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._dispatch(target, None, args, kwargs)

        call.__name__ = method
        return call


def fn(function_obj: Callable[..., Any] | None = None, name: str | None = None, get_if_exists: bool = True,
       reload_prefixes: list[str] | None = None) -> Fn:
    """Wrap a function for remote execution (``.to(compute)`` deploys it)."""
    return Fn(function_obj, name=name, get_if_exists=get_if_exists, reload_prefixes=reload_prefixes)


def cls(class_obj: type | None = None, name: str | None = None, get_if_exists: bool = True,
        reload_prefixes: list[str] | None = None) -> Cls:
    """Wrap a class for remote execution (``.to(compute, init_args=...)`` creates its instance)."""
    return Cls(class_obj, name=name, get_if_exists=get_if_exists, reload_prefixes=reload_prefixes)
