"""What the cells changed in the pod's namespace, so a notebook can stay coherent with it.

Bindings are found exactly and for free: the executor snapshots ``name -> id``
of the namespace around every cell, so a name a cell bound, rebound or deleted
is known whatever the cell did (an error half way, an interrupt, ``exec``,
``from m import *``), without reading its source. In-place changes are found
by fingerprints, and only where they can happen: the names a notebook holds
(it says which, with the pod object's id and the fingerprint it knows) are
fingerprinted again when the cell mentioned them, or reached them through a
function it mentioned, or when they are small. A value whose pickle differs
from one dump to the next (a matplotlib ``Figure`` counts its callbacks while
pickling) is *unstable*: it is known by identity, and counted as changed when
the cell mentioned it.
"""

from __future__ import annotations

import itertools
import operator
import re
import threading
import time
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .protocol import approx_size, fingerprint, is_immutable, type_name

#: Held values at most this big are fingerprinted after every cell, mentioned or not
#: (aliases, a method that changes another global); bigger ones only when the cell reached them.
UNMENTIONED_CHECK_MAX_BYTES = 4 << 20
#: So are those whose fingerprint took at most this long: a costlier one (a DataFrame of strings pickles
#: for ~25 ms a few MB) is checked only when the cell reached it.
UNMENTIONED_CHECK_MAX_S = 0.002
#: Values that cannot change in place are kept (see StateTracker._same) up to this size.
SAME_KEPT_MAX_BYTES = 64 << 10

_ABSENT = object()
#: IPython's own names in the user namespace (``_``, ``_i3``, ``_7``, dunders) and its fixed entries.
_IPYTHON_NAME = re.compile(r"_+|_i+|_i?\d+|__\w+__|_oh|_ih|_dh|_exit_code")
_IPYTHON_FIXED = frozenset({"In", "Out", "get_ipython", "exit", "quit"})
#: A namespace's names in order, and the ``id()`` of each one's value (see :meth:`StateTracker.snapshot`).
Snapshot = tuple[tuple[str, ...], tuple[int, ...]]


@dataclass(frozen=True)
class CellCheck:
    """What a notebook asks the pod to check when a cell ends; answered in the execute_reply."""

    #: the names the cell's code mentions
    names: list[str] = field(default_factory=list)
    #: name -> [pod id, fingerprint, stable] of what the notebook believes the pod holds
    held: dict[str, Any] = field(default_factory=dict)
    #: values up to this size are fingerprinted in the answer
    fingerprint_max_bytes: int = 0


def parse_check(value: Any, kept: Mapping[str, Any] | None = None) -> CellCheck | None:
    """A :class:`CellCheck` from the wire (an execute's ``check``, an inventory's fields), validated; None if absent.

    Names are strings; ``held`` entries are checked again one by one when used. A check that says
    ``held_same`` holds what ``kept`` does (its session's last ``held``, see :func:`held_of`); None without it.
    """
    if not isinstance(value, Mapping):
        return None
    held = value.get("held")
    if isinstance(held, Mapping):
        held = {k: v for k, v in held.items() if isinstance(k, str)}
    elif value.get("held_same") is True and kept is not None:
        held = dict(kept)  # a copy: a push adds what it set to the check's (pushes.py)
    else:
        return None
    names = value.get("names")
    limit = value.get("fingerprint_max_bytes")
    return CellCheck([n for n in names if isinstance(n, str)] if isinstance(names, list) else [], held,
                     limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0)


def held_of(value: Any, check: CellCheck | None, kept: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a session keeps for its next ``held_same`` after a check from the wire (``value``, parsed as
    ``check``): the ``held`` it carried; else what it kept (a check without ``held``, or none, keeps that)."""
    if check is not None and isinstance(value, Mapping) and isinstance(value.get("held"), Mapping):
        return dict(check.held)
    return kept


def is_user_name(name: str) -> bool:
    """Whether ``name`` in the user namespace is the user's, not IPython's."""
    return not (_IPYTHON_NAME.fullmatch(name) or name in _IPYTHON_FIXED)


class StateTracker:
    """Names each session's cells bound or deleted, collected until that session asks (:meth:`sync`)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        #: owner (a session's outbox) -> names its cells bound, rebound or deleted since its last sync
        self._pending: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        #: name -> (id, weak reference) of its value, found too big or too slow to check after a cell that did not
        #: reach it (its size alone can take long: pandas counts every string of a DataFrame); a value bound since
        #: is looked at again. The reference is weak (a cell that deletes a model to load another must get its
        #: memory back at once): one that cannot be weakly referred to (a list of arrays) is known by its id alone
        self._costly: dict[str, tuple[int, Any]] = {}
        #: name -> the small value that cannot change in place (see protocol.is_immutable) last found there with
        #: the notebook's fingerprint: the same object is the same value. Held here, so that no other value can
        #: take its address (another notebook's ``x = None`` then ``x = 0.01`` may reuse a float's)
        self._same: dict[str, Any] = {}

    def snapshot(self) -> Snapshot:
        """The namespace's names, in order, and ``id()`` of their values (cheap: built in C, no Python step per
        name, no hashing, and no reference kept to any value)."""
        ns = self.namespace.copy()  # one C call: another thread's change to the namespace waits for it
        return tuple(ns), tuple(map(id, ns.values()))

    def cell_ended(self, owner: Any, before: Snapshot) -> None:
        """Record, for ``owner``, the user names bound, rebound or deleted since ``before``."""
        names, ids = self.snapshot()
        if names == before[0]:  # the same names in the same order (usual): their ids compared in C, in turn
            touched = set(itertools.compress(names, map(operator.ne, ids, before[1])))
        else:  # names added or deleted: (name, id) pairs in one snapshot only
            touched = {n for n, _id in dict(zip(*before)).items() ^ dict(zip(names, ids)).items()}
        touched = {n for n in touched if is_user_name(n)}
        if touched:
            with self._lock:
                self._pending.setdefault(owner, set()).update(touched)

    def check(self, owner: Any, check: CellCheck) -> dict[str, Any]:
        """:meth:`sync` for a :class:`CellCheck`, plus ``check_s``: the seconds it took."""
        t0 = time.perf_counter()
        state = self.sync(owner, check.held, check.names, check.fingerprint_max_bytes)
        state["check_s"] = time.perf_counter() - t0
        return state

    def sync(self, owner: Any, held: Mapping[str, Any], mentioned: Iterable[str],
             fingerprint_max_bytes: int) -> dict[str, Any]:
        """What changed for ``owner`` since its last sync, as a reply's fields.

        ``held``: name -> ``[pod id, fingerprint, stable]`` as the notebook knows
        them; ``mentioned``: the names the cell's code mentions. Returns
        ``changed`` (descriptions of names bound, rebound or changed in place:
        pull or refer to them), ``deleted`` (names a cell of this owner
        deleted), ``missing`` (held names the pod no longer has) and
        ``unstable`` (held names found to pickle differently each time).
        """
        ns = self.namespace
        with self._lock:
            touched = self._pending.pop(owner, set())
        reached = reach(ns, set(mentioned) | touched)
        changed: dict[str, dict[str, Any]] = {}
        deleted, missing, unstable = [], [], []
        costly, same = self._costly, self._same
        for name in [n for n in list(costly) if not self._is_costly(n, ns.get(n, _ABSENT))]:
            costly.pop(name, None)  # rebound or deleted since (an inventory's check may run on another thread)
        for name, kept in list(same.items()):
            if ns.get(name, _ABSENT) is not kept:
                same.pop(name, None)
        for name in sorted(touched):
            if name in ns:
                changed[name] = describe(name, ns[name], fingerprint_max_bytes)
            else:
                deleted.append(name)
        for name, entry in held.items():
            if name in changed or name in touched:
                continue
            value = ns.get(name, _ABSENT)
            if value is _ABSENT:
                missing.append(name)
                continue
            pod_id, known_fp, stable = _held_entry(entry)
            if id(value) != pod_id:  # rebound by another session, or a seed-API call
                changed[name] = describe(name, value, fingerprint_max_bytes)
                continue
            if not stable:
                if name in reached:
                    changed[name] = describe(name, value, fingerprint_max_bytes, stable=False)
                continue
            if not known_fp or same.get(name) is value:  # cannot change in place: the same object, the same value
                continue
            unmentioned = name not in reached
            if unmentioned:
                if self._is_costly(name, value):
                    continue
                if approx_size(value) > UNMENTIONED_CHECK_MAX_BYTES:
                    self._costly_now(name, value)
                    continue
            t0 = time.perf_counter()
            now = fingerprint(value)
            if unmentioned and time.perf_counter() - t0 > UNMENTIONED_CHECK_MAX_S:
                self._costly_now(name, value)
            if now == known_fp:
                if is_immutable(value) and approx_size(value) <= SAME_KEPT_MAX_BYTES:
                    same[name] = value
                continue
            if fingerprint(value) != now:  # pickles differently each time: identity is its version
                unstable.append(name)
                if name in reached:
                    changed[name] = describe(name, value, fingerprint_max_bytes, stable=False)
                continue
            changed[name] = dict(describe(name, value, 0), fingerprint=now)
        self._add_containers(changed, held, unstable, fingerprint_max_bytes)
        return {"changed": list(changed.values()), "deleted": deleted, "missing": missing, "unstable": unstable}

    def _is_costly(self, name: str, value: Any) -> bool:
        kept = self._costly.get(name)
        return kept is not None and kept[0] == id(value) and (kept[1] is None or kept[1]() is value)

    def _costly_now(self, name: str, value: Any) -> None:
        try:
            ref = weakref.ref(value)
        except TypeError:  # (a list, a dict, a tuple: its id, which another value could take once it is gone)
            ref = None
        self._costly[name] = (id(value), ref)

    def _add_containers(self, changed: dict[str, dict[str, Any]], held: Mapping[str, Any], unstable: list[str],
                        fingerprint_max_bytes: int) -> None:
        """Held names pickled inside a changed value, or holding one (``ax.figure is fig``), change with it:
        they travel in the same bundle, so the notebook's copies keep sharing their objects."""
        if not changed:
            return
        ns = self.namespace
        others = {id(ns[n]): n for n in held if n in ns and n not in changed}
        todo = [n for n in changed if n in ns]
        while todo and others:
            inside = _pickled_ids(ns[todo.pop()])
            for obj_id in inside & others.keys():
                name = others.pop(obj_id)
                changed[name] = describe(name, ns[name], fingerprint_max_bytes, stable=name not in unstable)
                todo.append(name)


class _Discard:
    """A file that keeps nothing: pickling only to see what a value holds."""

    def write(self, data: bytes) -> int:
        return len(data)


def _pickled_ids(value: Any) -> set[int]:
    """ids of the objects a pickle of ``value`` contains (buffers not copied); empty if it does not pickle."""
    import cloudpickle

    pickler = cloudpickle.Pickler(_Discard(), protocol=5, buffer_callback=lambda _buf: True)
    try:
        pickler.dump(value)
    except Exception:
        return set()
    return set(pickler.memo.copy())


def describe(name: str, value: Any, fingerprint_max_bytes: int, stable: bool = True) -> dict[str, Any]:
    """Name, type, size, id; the fingerprint when at most ``fingerprint_max_bytes``; a module's name."""
    size = approx_size(value)
    entry: dict[str, Any] = {"name": name, "type": type_name(value), "size": size, "id": id(value),
                             "stable": stable}
    if isinstance(value, types.ModuleType):
        entry["module"] = value.__name__
    elif stable and size <= fingerprint_max_bytes:
        entry["fingerprint"] = fingerprint(value)
    return entry


def _held_entry(entry: Any) -> tuple[int | None, str, bool]:
    """``[pod id, fingerprint, stable]`` from the wire, validated (anything odd: unknown, so checked)."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        return None, "", True
    pod_id, fp, stable = entry
    return (pod_id if isinstance(pod_id, int) else None, fp if isinstance(fp, str) else "",
            stable is not False)


def reach(ns: Mapping[str, Any], names: set[str]) -> set[str]:
    """``names`` plus the globals that functions, classes and instances of notebook classes among
    them refer to, transitively: calling ``f()`` may change the global list ``f`` appends to."""
    seen: set[str] = set()
    todo = [n for n in names if n in ns]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for ref in globals_of(ns[name]):
            if ref in ns and ref not in seen:
                todo.append(ref)
    return seen | names


def globals_of(value: Any) -> set[str]:
    """Global names the code of a notebook-defined function, class or instance mentions."""
    if isinstance(value, (types.FunctionType, types.MethodType)):
        func = getattr(value, "__func__", value)
        return _code_names(func.__code__) if getattr(func, "__module__", None) == "__main__" else set()
    cls = value if isinstance(value, type) else type(value)
    if getattr(cls, "__module__", None) != "__main__":
        return set()
    found: set[str] = set()
    for klass in cls.__mro__:
        if getattr(klass, "__module__", None) != "__main__":
            continue
        for attr in list(vars(klass).values()):
            func = getattr(attr, "__func__", attr)
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType):
                found |= _code_names(code)
    return found


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def adopt_functions(values: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """Make notebook-defined functions (and methods of notebook classes) in ``values`` run in ``namespace``.

    cloudpickle gives a function shipped by value a private globals dict holding
    copies of the globals it used; a function that appends to a global list
    would change that copy, not the namespace's list, where a local cell changes
    the notebook's. Returns ``values`` with such functions rebuilt on
    ``namespace`` (classes are changed in place); a global the namespace lacks
    is taken from the function's copy.
    """
    adopted = dict(values)
    for name, value in values.items():
        if isinstance(value, types.FunctionType):
            adopted[name] = _rebind(value, namespace)
        elif isinstance(value, type) and value.__module__ == "__main__":
            for attr, member in list(vars(value).items()):
                func = getattr(member, "__func__", member)
                if isinstance(func, types.FunctionType) and func.__globals__ is not namespace:
                    new = _rebind(func, namespace)
                    try:
                        setattr(value, attr, type(member)(new) if member is not func else new)
                    except (TypeError, AttributeError):  # a read-only class attribute: leave it
                        pass
    return adopted


def _rebind(func: types.FunctionType, namespace: dict[str, Any]) -> types.FunctionType:
    if func.__module__ != "__main__" or func.__globals__ is namespace:
        return func
    for key, val in func.__globals__.items():
        if not key.startswith("__"):
            namespace.setdefault(key, val)
    new = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__ = func.__qualname__
    new.__doc__ = func.__doc__
    new.__annotations__ = func.__annotations__
    new.__dict__.update(func.__dict__)
    return new
