"""How a function or class given to ``kt.fn`` / ``kt.cls`` reaches the pod kernel.

Wherever the code is defined, the pod gets it the way kubetorch and runhouse
do it, whatever ``serialization`` says (that is for arguments and results):

- defined at module level of an importable module: called *by reference*
  (module + qualified name). An installed module (stdlib, site-packages) is
  imported from the pod's own environment; a module of the user's (under the
  working directory, or in another project: its git root or nearest
  ``pyproject.toml``/``setup.py``) is synced as source and imported by name,
  so its imports, constants and helpers are there and an edit is reloaded.
- defined in ``__main__`` (a script, a notebook cell) or inside a function:
  shipped *by value* with cloudpickle, which carries the globals its code
  references (modules as imports, notebook values and functions by value, as
  ``%%kt`` pushes them, :func:`kt_jupyter.cells.classify_value`); the projects
  of the user modules those globals come from are synced so they import there.
  Only a compute that allows pickle takes code by value: a JSON-only compute
  never unpickles anything, so code for it must live in a module.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pod_kernel import protocol as P

from .cells import classify_value
from .codesync import CodeTree
from .errors import KtError

#: Modules whose absence on the pod is not ours to fix (they come with Python).
_ALWAYS_THERE = frozenset({"builtins", "__main__", "__mp_main__"})


@dataclass(frozen=True)
class Shipment:
    """A call target for the pod and, for code by value, the object to define there first (pickled)."""

    target: dict[str, Any]
    by_value: Any = None

    @property
    def key(self) -> str | None:
        """The name the pod keeps code by value under (its content hash)."""
        return self.target.get("key")


def by_reference(obj: Any) -> bool:
    """Whether ``obj`` can be found again by module and qualified name (as cloudpickle decides it)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or module in _ALWAYS_THERE - {"builtins"} or not qualname or "<locals>" in qualname:
        return False
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def ship(obj: Any, code: CodeTree, allow_pickle: bool) -> Shipment:
    """How ``obj`` (a function or class) travels to a pod whose code tree is ``code``.

    Code from the user's modules is added to ``code`` (synced before the call).
    Raises KtError when it cannot travel: by value to a JSON-only compute, or a
    module without source the pod does not have.
    """
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    if by_reference(obj):
        placed = code.provide(obj.__module__)
        if placed != "missing":
            return Shipment({"kind": "module", "module": obj.__module__, "qualname": obj.__qualname__})
    if not allow_pickle:
        where = ("a notebook cell or a script's __main__" if getattr(obj, "__module__", None) in _ALWAYS_THERE
                 else "inside a function" if "<locals>" in name else f"module {obj.__module__!r}, which has no "
                 "source file to sync")
        raise KtError(
            f"{name!r} is defined in {where}, so it can only travel pickled, and this compute is JSON-only "
            "(allowed_serialization=['json']: it never unpickles anything). Move it to module level in a .py "
            "file (under the working directory or in your project) and import it from there: a JSON-only "
            "compute runs code it imports by module name from synced source files."
        )
    for module in sorted(modules_used(obj)):
        code.provide(module)
    key = P.fingerprint(obj)  # of its pickle: a changed global it carries is a new version
    if not key:
        try:
            P.dump_values({"fn": obj})
            why = "it cannot be pickled"
        except Exception as exc:  # any pickling error is the message
            why = f"{type(exc).__name__}: {exc}"
        raise KtError(f"cannot ship {name!r} to the pod by value ({why}). Move it (and what it uses) to a "
                      "module, which the pod then imports by name.") from None
    return Shipment({"kind": "defined", "key": key}, obj)


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def modules_used(obj: Any) -> set[str]:
    """The modules code shipped by value needs on the pod: those its globals (and theirs, for code
    that travels by value too) are, or come from."""
    out: set[str] = set()
    seen: set[int] = set()

    def visit(value: Any) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        kind = classify_value(value)
        if kind == "module":
            out.add(value.__name__)
        elif isinstance(value, (types.FunctionType, type)) and by_reference(value):
            out.add(value.__module__)
        elif isinstance(value, types.FunctionType):  # by value: what its code reads
            g = value.__globals__
            for n in _code_names(value.__code__):
                if n in g:
                    visit(g[n])
            for cell in value.__closure__ or ():
                try:
                    visit(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            for default in (value.__defaults__ or ()) + tuple((value.__kwdefaults__ or {}).values()):
                visit(default)
        elif isinstance(value, type):  # a class by value: its bases and members
            for base in value.__bases__:
                visit(base)
            for member in vars(value).values():
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    for f in (member.fget, member.fset, member.fdel):
                        if f is not None:
                            visit(f)
                elif isinstance(member, types.FunctionType):
                    visit(member)
        elif type(value).__module__ not in _ALWAYS_THERE:  # an instance: its class
            visit(type(value))

    visit(obj)
    return out
