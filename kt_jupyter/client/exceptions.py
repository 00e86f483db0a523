"""A pod's exception rebuilt in the notebook: its real type when that is safe, else a RemoteError."""

from __future__ import annotations

import builtins
import importlib
import pickle
from collections.abc import Mapping
from typing import Any

from ..errors import RemoteError


def _exception_by_name(ename: str, evalue: str, allow_import: bool = True) -> BaseException | None:
    """A builtin (or, with ``allow_import``, importable) exception type rebuilt from its name, else None.

    Importing a module runs its code: a pod that may not send pickles (JSON-only)
    may not make the notebook import anything either, so only builtins then.
    """
    module, _, name = ename.rpartition(".")
    if module and not allow_import:
        return None
    try:
        typ = getattr(importlib.import_module(module), name) if module else getattr(builtins, name)
        if isinstance(typ, type) and issubclass(typ, BaseException) and module not in ("__main__",):
            return typ(evalue)
    except Exception:  # not importable here, or its constructor wants other arguments
        return None
    return None


def rebuild_exception(reply: Mapping[str, Any], payload: bytes, accept_pickle: bool = True) -> BaseException:
    """The remote exception as its real type when it unpickles here, else a RemoteError.

    With ``accept_pickle`` false (a JSON-only compute) the pickled payload is never
    loaded: the type is rebuilt by name when it is a builtin, else a RemoteError.
    """
    tb_text = "\n".join(reply.get("traceback") or [])
    exc: BaseException | None = None
    if payload and accept_pickle:
        try:
            exc = pickle.loads(payload)
            if not isinstance(exc, BaseException) or type(exc).__module__ in ("__main__", "__mp_main__"):
                exc = None
        except Exception:
            exc = None
    if exc is None:
        exc = _exception_by_name(str(reply.get("ename", "")), str(reply.get("evalue", "")), allow_import=accept_pickle)
    if exc is None:
        exc = RemoteError(str(reply.get("ename", "Exception")), str(reply.get("evalue", "")), tb_text)
    lines = list(reply.get("traceback") or [])
    try:
        exc.remote_traceback = tb_text  # type: ignore[attr-defined]
        exc.remote_ename = reply.get("ename")  # type: ignore[attr-defined]
        # IPython (and so the notebook) shows this instead of a local traceback through our code
        shown = lines or [f"{reply.get('ename')}: {reply.get('evalue')}"]
        exc._render_traceback_ = lambda: shown  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without __dict__
        exc = RemoteError(str(reply.get("ename", "Exception")), str(reply.get("evalue", "")), tb_text)
        exc._render_traceback_ = lambda: lines  # type: ignore[method-assign]
    return exc
