"""What a notebook cell reads and assigns, found from its source alone (pure: no I/O).

``%%kt`` pushes the globals a cell reads that exist in the notebook and pulls back the
names it assigns. :func:`analyze_cell` turns IPython syntax into Python (``!ls``,
``%time``, ``obj?``), walks the module level in execution order, and resolves the
scopes the cell defines (functions, lambdas, comprehensions) with :mod:`symtable`.

Rules; they err towards pushing a name rather than letting a stale pod value be used:

- A load is a *read* unless every path to it passed a top-level binding: a name bound
  in one ``if``/``try``/``match`` branch, a loop body or a comprehension is not bound
  after it (``with`` bodies are taken to run to the end; ``except`` handlers start from
  the state before the ``try``). ``x += 1`` and ``del x`` read ``x``; builtins are reads.
- Function and lambda bodies run later: a name one reads is a read unless the cell
  binds it at top level before that top-level statement ends (so recursion and
  ``class A: def m(self): return A`` are not reads; a global bound further down is).
  Comprehension and class bodies run at once and are checked where they stand.
- ``assigns``: names *possibly* bound at top level, in order of first binding, with
  the ``global`` names a function binds and comprehension walrus targets; the puller
  must tolerate one missing on the pod (a branch not taken, ``except ... as e``). A name
  whose last top-level operation in source order is an unconditional ``del`` is left
  out; ``deletes`` holds those whose last such operation is a ``del`` (a conditional one
  stays in ``assigns`` too).
- Code that ``%time``, ``%%time``, ``%prun`` and ``%%capture`` run is analysed inline,
  ``%timeit`` code only adds reads; ``$name`` and ``{expr}`` in shell commands and other
  magic arguments are reads.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import io
import keyword
import re
import symtable
import sys
import tokenize
import types
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from IPython.core.inputtransformer2 import TransformerManager

ValueKind = Literal["module", "function", "class", "value"]


@dataclass(frozen=True)
class ImportSource:
    """How an import bound a name: ``import module [as asname]`` or
    ``from module import attr [as asname]`` (a relative module keeps its dots)."""

    module: str
    attr: str | None = None
    asname: str | None = None

    @property
    def statement(self) -> str:
        """The one import statement that re-creates this binding."""
        alias = f" as {self.asname}" if self.asname else ""
        if self.attr is None:
            return f"import {self.module}{alias}"
        return f"from {self.module} import {self.attr}{alias}"


@dataclass(frozen=True)
class CellAnalysis:
    """What one cell reads and binds at top level; the module docstring gives the rules."""

    reads: frozenset[str] = frozenset()
    assigns: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()
    #: Name -> the last top-level import that bound it (the cell may bind it otherwise too).
    imports: Mapping[str, ImportSource] = field(default_factory=dict)
    #: The cell does ``from m import *``, binding names no analysis can list.
    star_import: bool = False
    #: The cell ends with an expression statement not silenced by ``;``: its value is shown.
    last_expr: bool = False
    #: Every name the cell's code mentions, in any scope: the names a cell can change in place.
    mentions: frozenset[str] = frozenset()


_TRANSFORMER = TransformerManager()
#: Magics whose argument is code run in the user namespace -> whether its bindings stay there.
_CODE_MAGICS = {"time": True, "prun": True, "capture": True, "timeit": False}
#: Magics whose argument names an object to look up (``obj?``, ``%pdef obj`` ...).
_INFO_MAGICS = frozenset({"pinfo", "pinfo2", "pdef", "pdoc", "psource", "pfile"})
_DOLLAR = re.compile(r"(?<!\$)\$([A-Za-z_]\w*)")
_BRACES = re.compile(r"\{([^{}]+)\}")
_IDENT = re.compile(r"\s*([A-Za-z_]\w*)")
#: Names IPython keeps in the user namespace, besides ``_``, ``__``, ``_i3``, ``_7`` and dunders.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_oh", "_dh", "_ih", "_exit_code"})
_IPYTHON_PATTERN = re.compile(r"_+|_i+|_i?\d+|__\w+__")
_MISSING = object()
#: The line ``%%kt`` puts first in the source it sends (it keeps the notebook's line numbers).
_KT_HEADER = "# %%kt"
_AUTOMAGIC = re.compile(r"\s*([A-Za-z_]\w*)(?:\s+(.*))?$", re.DOTALL)


def analyze_cell(source: str, line_magics: Collection[str] | None = None) -> CellAnalysis:
    """Analyse a cell's source; a ``SyntaxError`` propagates, its line numbers the cell's own.

    A one-line cell (not counting a leading ``# %%kt`` line) may be an automagic or a
    shell alias without ``%`` (``ls dir``, ``pwd``), as IPython allows there:
    ``line_magics`` names those (default: the running IPython's magics and aliases).
    """
    return _analyze(_automagic(source, line_magics) or source)


@functools.lru_cache(maxsize=32)
def _analyze(source: str) -> CellAnalysis:
    """The analysis of source as Python (cached: ``%%kt`` checks a cell before it runs it, and a cell runs
    again and again while it is being worked on)."""
    code, tree = _parse(source)
    w = _Walker()
    w.block(tree.body)
    return CellAnalysis(
        reads=frozenset(w.reads),
        assigns=tuple(n for n in w.assigns if not w.deleted.get(n, False)),
        deletes=tuple(w.deleted),
        imports=types.MappingProxyType(w.imports),
        star_import=w.star,
        last_expr=bool(tree.body) and isinstance(tree.body[-1], ast.Expr) and not _ends_with_semicolon(code),
        mentions=frozenset(w.reads | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}),
    )


def filter_pushable(reads: Iterable[str], namespace: Mapping[str, object]) -> list[str]:
    """The names in ``reads`` to push from ``namespace``, sorted: those it holds, minus
    IPython's own names and builtins it has not shadowed."""
    return [
        name for name in sorted(set(reads))
        if name in namespace and name not in _IPYTHON_NAMES and not _IPYTHON_PATTERN.fullmatch(name)
        and getattr(builtins, name, _MISSING) is not namespace[name]
    ]


def classify_value(value: object) -> ValueKind:
    """How a global travels: ``"module"`` (imported remotely by ``__name__``), ``"function"``
    or ``"class"`` (defined in the notebook: by value), else ``"value"`` (pickled as is)."""
    if isinstance(value, types.ModuleType):
        return "module"
    if isinstance(value, (type, types.FunctionType)):
        module = getattr(value, "__module__", None)
        if module is None or module == "__main__" or module not in sys.modules:
            return "class" if isinstance(value, type) else "function"
    return "value"


# --------------------------------------------------------------------------- parsing


def _parse(source: str) -> tuple[str, ast.Module]:
    try:
        code = _TRANSFORMER.transform_cell(source)
    except Exception:  # IPython could not tokenize it: let the compiler report why
        code = source
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(code, "<cell>", "exec", flags=flags | ast.PyCF_ONLY_AST, dont_inherit=True)
    compile(tree, "<cell>", "exec", flags=flags, dont_inherit=True)  # scope errors too
    return code, tree


def _automagic(source: str, line_magics: Collection[str] | None) -> str | None:
    """A one-line cell ``name args`` as IPython's prefilter runs it when ``name`` is a line magic or
    an alias not shadowed by a variable or builtin, and ``args`` no assignment: as
    ``get_ipython().run_line_magic(...)``; None when it is not one."""
    header, body = "", source
    if source.startswith(_KT_HEADER):
        header, _, body = source.partition("\n")
        header += "\n"
    line = body.strip("\n")
    match = _AUTOMAGIC.match(line)
    if "\n" in line or match is None:
        return None
    name, rest = match.group(1), match.group(2)
    rest = rest or ""
    # the cheap tests first (an assignment, a keyword, a builtin: never a magic, as for IPython): asking the
    # running IPython for its magics is most of what analysing a one-line cell costs (15 -> 2 us for `pass`)
    if ((rest.startswith("=") and not rest.startswith("==")) or keyword.iskeyword(name) or hasattr(builtins, name)
            or not (_is_line_magic(name) if line_magics is None else name in line_magics)):
        return None
    return f"{header}get_ipython().run_line_magic({name!r}, {rest!r})\n"


def _is_line_magic(name: str) -> bool:
    """Whether ``name`` is a line magic or alias of the running IPython not shadowed by one of its variables
    (outside IPython: one of IPython's default aliases)."""
    from IPython.core.alias import default_aliases
    from IPython.core.getipython import get_ipython

    shell = get_ipython()
    if shell is None:
        return any(alias == name for alias, _cmd in default_aliases())
    return bool(shell.automagic) and name in shell.magics_manager.magics["line"] and name not in shell.user_ns


def _magic_code(code: str) -> ast.Module | None:
    """A magic's code parsed, leading options (``-n 10 f(x)``) dropped; None if not Python."""
    words = code.split(" ")
    for i in range(len(words)):
        try:
            return _parse(" ".join(words[i:]))[1]
        except SyntaxError:
            if not (words[i].startswith("-") or (i and words[i - 1].startswith("-"))):
                return None
    return None


def _ends_with_semicolon(code: str) -> bool:
    """IPython's rule: a trailing ``;`` silences the last expression."""
    skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError):
        return False
    return bool(tokens) and tokens[-1].type == tokenize.OP and tokens[-1].string == ";"


class _AsGenerators(ast.NodeTransformer):
    """List/set/dict comprehensions as generator expressions: same scoping, never inlined (PEP 709)."""

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp) -> ast.GeneratorExp:
        self.generic_visit(node)
        return ast.GeneratorExp(elt=node.elt, generators=node.generators)

    visit_SetComp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> ast.GeneratorExp:
        self.generic_visit(node)
        return ast.GeneratorExp(elt=ast.Tuple([node.key, node.value], ast.Load()), generators=node.generators)


def _scope_names(node: ast.AST) -> tuple[set[str], set[str]]:
    """(globals read, globals bound) by the scopes inside ``node``, which stands at module level."""
    try:
        top = symtable.symtable(ast.unparse(_AsGenerators().visit(copy.deepcopy(node))), "<cell>", "exec")
    except SyntaxError:  # the source did not round-trip: take every name inside as a read
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}, set()
    # symtable counts `x += 1` and `del x` as bindings only; they read x too
    rebinds = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Del)}
    rebinds |= {n.target.id for n in ast.walk(node)
                if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)}
    reads: set[str] = set()
    binds: set[str] = set()
    tables = list(top.get_children())
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            if sym.is_global() and (sym.is_referenced() or sym.is_assigned() and sym.get_name() in rebinds):
                reads.add(sym.get_name())
            if sym.is_declared_global() and sym.is_assigned():
                binds.add(sym.get_name())
    return reads - {"__class__"}, binds  # a method's __class__ is its class cell, not a global


def _deleted(*blocks: list[ast.stmt]) -> set[str]:
    """Names the blocks may unbind (``del``, the end of ``except ... as``)."""
    nodes = [n for block in blocks for stmt in block for n in ast.walk(stmt)]
    return {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Del)} | {
        n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}


# --------------------------------------------------------------------------- walking


class _Walker:
    """Walks one scope in execution order: the module, or a top-level class body (``module`` set).

    ``bound`` holds the names definitely bound at this point, ``depth`` counts
    enclosing conditional blocks; a class body resolves what it has not bound
    through the module, as Python does. Findings are kept on the module walker.
    """

    def __init__(self, module: _Walker | None = None, depth: int = 0) -> None:
        self.module, self.top, self.depth = module, module or self, depth
        self.bound: set[str] = set()
        self.reachable = True
        self.declared_global: set[str] = set()
        self.pending: set[str] = set()  # function bodies' reads, settled when the statement ends
        self.reads: set[str] = set()
        self.assigns: dict[str, None] = {}
        self.deleted: dict[str, bool] = {}  # name -> whether deleted unconditionally
        self.imports: dict[str, ImportSource] = {}
        self.star = False

    def _here(self, name: str) -> bool:
        """Whether ``name`` lives in this scope (not the module's, for a class body)."""
        return self.module is None or name not in self.declared_global

    def load(self, name: str) -> None:
        if name in self.bound and self._here(name):
            return
        if self.module is None:
            self.reads.add(name)
        else:
            self.module.load(name)

    def store(self, name: str, definite: bool = True) -> None:
        if self.module is not None and not self._here(name):
            self.module.store(name, definite)
            return
        if definite:
            self.bound.add(name)
        if self.module is None:
            self.assigns.setdefault(name)
            self.deleted.pop(name, None)

    def delete(self, name: str) -> None:
        self.load(name)
        if self.module is not None and not self._here(name):
            self.module.delete(name)
            return
        self.bound.discard(name)
        if self.module is None:
            self.deleted.pop(name, None)
            self.deleted[name] = self.depth == 0

    def nested(self, node: ast.AST, deferred: bool) -> None:
        """Account for the scopes inside ``node`` (a def, lambda or comprehension)."""
        reads, binds = _scope_names(node)
        if deferred:
            self.top.pending |= reads
        else:
            for name in reads:
                self.top.load(name)
        for name in binds:
            self.top.store(name, definite=False)

    # control flow --------------------------------------------------------
    def block(self, stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            self.visit(stmt)
            if self.module is None and self.pending:
                self.reads |= self.pending - self.bound
                self.pending.clear()

    def branch(self, start: set[str], body: list[ast.stmt], *before: ast.AST | None,
               conditional: bool = True) -> set[str] | None:
        """Walk ``before`` then ``body`` from ``start``; the end state, or None if it cannot fall through."""
        self.bound, self.reachable = set(start), True
        self.depth += conditional
        self.visit(*before)
        self.block(body)
        self.depth -= conditional
        return self.bound if self.reachable else None

    def merge(self, start: set[str], ends: list[set[str] | None], was_reachable: bool) -> None:
        live = [end for end in ends if end is not None]
        self.bound = set.intersection(*live) if live else set(start)
        self.reachable = was_reachable and bool(live)

    def visit(self, *nodes: ast.AST | Sequence[ast.AST | None] | None) -> None:
        """Visit nodes in order (lists flattened, None skipped), each through its ``_Type`` handler."""
        for node in nodes:
            if isinstance(node, ast.AST):
                handler = getattr(self, "_" + type(node).__name__, None)
                if handler is not None:
                    handler(node)
                else:
                    self.visit(*ast.iter_child_nodes(node))
            elif node is not None:
                self.visit(*node)

    # statements ----------------------------------------------------------
    def _Assign(self, node: ast.Assign) -> None:
        self.visit(node.value, node.targets)

    def _AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.load(node.target.id)
        self.visit(node.value, node.target)

    def _AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.annotation, node.value)
        if node.value is not None or not isinstance(node.target, ast.Name):  # `x: int` binds nothing
            self.visit(node.target)

    def _FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.visit(node.decorator_list, node.args, node.returns)
        self.store(node.name)
        self.nested(node, deferred=True)  # after the name: `global` names it binds come later

    _AsyncFunctionDef = _FunctionDef

    def _arguments(self, args: ast.arguments) -> None:
        """Defaults and annotations, evaluated where the function is defined."""
        params = [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]
        self.visit([p.annotation for p in params if p is not None], args.defaults, args.kw_defaults)

    def _ClassDef(self, node: ast.ClassDef) -> None:
        self.visit(node.decorator_list, node.bases, node.keywords)
        _Walker(module=self.top, depth=self.depth).block(node.body)
        self.store(node.name)

    def _Global(self, node: ast.Global) -> None:
        self.declared_global.update(node.names)

    def _Import(self, node: ast.Import | ast.ImportFrom) -> None:
        module = "." * getattr(node, "level", 0) + (getattr(node, "module", None) or "")
        for alias in node.names:
            if alias.name == "*":
                self.top.star = True
                continue
            if isinstance(node, ast.Import):  # `import a.b.c` binds `a`
                source, name = ImportSource(alias.name, None, alias.asname), alias.name.partition(".")[0]
            else:
                source, name = ImportSource(module, alias.name, alias.asname), alias.name
            name = alias.asname or name
            self.store(name)
            if self.module is None:
                self.imports[name] = source

    _ImportFrom = _Import

    def _stop(self, node: ast.stmt) -> None:
        self.visit(*ast.iter_child_nodes(node))
        self.reachable = False

    _Return = _Raise = _Break = _Continue = _stop

    def _If(self, node: ast.If) -> None:
        self.visit(node.test)
        start, was = set(self.bound), self.reachable
        self.merge(start, [self.branch(start, node.body), self.branch(start, node.orelse)], was)

    def _loop(self, node: ast.For | ast.AsyncFor | ast.While) -> None:
        self.visit(node.test if isinstance(node, ast.While) else node.iter)
        start, was = self.bound - _deleted(node.body), self.reachable
        self.branch(start, node.body, None if isinstance(node, ast.While) else node.target)
        end = self.branch(start, node.orelse)  # no iteration, or a break, may skip the rest
        self.merge(start, [start & end if end is not None else start], was)

    _For = _AsyncFor = _While = _loop

    def _With(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item.context_expr, item.optional_vars)
        self.block(node.body)

    _AsyncWith = _With

    def _Try(self, node: ast.Try) -> None:
        start, was = set(self.bound), self.reachable
        body_end = self.branch(start, node.body)
        ends = [self.branch(body_end, node.orelse) if body_end is not None else None]
        for handler in node.handlers:
            name = ast.Name(handler.name, ast.Store()) if handler.name else None
            end = self.branch(start - _deleted(node.body), handler.body, handler.type, name)
            ends.append(None if end is None else end - {handler.name})  # Python unbinds `as name`
        self.merge(start, ends, was)
        if node.finalbody:
            after, live = set(self.bound), self.reachable
            blocks = [node.body, node.orelse, *(h.body for h in node.handlers)]
            end = self.branch((start - _deleted(*blocks)) & after, node.finalbody, conditional=False)
            self.bound = (after - _deleted(node.finalbody)) | (end or set())
            self.reachable = live and end is not None

    _TryStar = _Try

    def _Match(self, node: ast.Match) -> None:
        self.visit(node.subject)
        start, was = set(self.bound), self.reachable
        ends = [self.branch(start, case.body, case.pattern, case.guard) for case in node.cases]
        last = node.cases[-1]
        if last.guard is not None or not (isinstance(last.pattern, ast.MatchAs) and last.pattern.pattern is None):
            ends.append(start)  # no case may match
        self.merge(start, ends, was)

    def _match_pattern(self, node: ast.pattern) -> None:
        self.visit(*ast.iter_child_nodes(node))  # values and classes, then captures
        for name in (getattr(node, "name", None), getattr(node, "rest", None)):
            if name is not None:
                self.store(name)

    _MatchValue = _MatchSingleton = _MatchSequence = _MatchMapping = _match_pattern
    _MatchClass = _MatchStar = _MatchAs = _MatchOr = _match_pattern

    # expressions ---------------------------------------------------------
    def _Name(self, node: ast.Name) -> None:
        {ast.Load: self.load, ast.Store: self.store, ast.Del: self.delete}[type(node.ctx)](node.id)

    def _NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value, node.target)

    def _BoolOp(self, node: ast.BoolOp) -> None:
        self.visit(node.values[0])
        start = set(self.bound)
        self.visit(node.values[1:])  # may not run: what they bind is not definite
        self.bound = start

    def _IfExp(self, node: ast.IfExp) -> None:
        self.visit(node.test)
        start = set(self.bound)
        self.visit(node.body)
        body, self.bound = self.bound, start
        self.visit(node.orelse)
        self.bound &= body

    def _Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        self.nested(node, deferred=True)

    def _comp_scope(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> None:
        self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
        self.nested(node, deferred=False)

    _ListComp = _SetComp = _DictComp = _GeneratorExp = _comp_scope

    def _Call(self, node: ast.Call) -> None:
        self.visit(*ast.iter_child_nodes(node))
        func = node.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
                and isinstance(func.value.func, ast.Name) and func.value.func.id == "get_ipython"):
            return
        args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if len(args) != len(node.args) or not args:  # only string literals name what runs
            return
        if func.attr in ("system", "getoutput"):
            self._expanded(args[0])
        elif func.attr == "run_line_magic" and len(args) == 2:
            self._magic(args[0], args[1])
        elif func.attr == "run_cell_magic" and len(args) == 3:
            self._magic(args[0], args[1], args[2])

    # IPython -------------------------------------------------------------
    def _magic(self, name: str, line: str, body: str | None = None) -> None:
        """``%name line``, or ``%%name line`` over a cell ``body``."""
        if name in _INFO_MAGICS:
            if match := _IDENT.match(line):
                self.load(match.group(1))
        elif name not in _CODE_MAGICS:
            self._expanded(line)  # IPython expands $name and {expr} in magic arguments
        elif body is None:
            self._embedded([line], keep=_CODE_MAGICS[name])
        else:
            words = [w for w in line.split() if not w.startswith("-")]
            if name == "capture" and words:  # %%capture [options] [output]
                self.store(words[-1])
            self._embedded([line, body] if name == "timeit" else [body], keep=_CODE_MAGICS[name])

    def _expanded(self, text: str) -> None:
        """Reads of IPython's variable expansion: ``$name`` and ``{expr}``."""
        names = _DOLLAR.findall(text)
        for match in _BRACES.finditer(text):
            try:
                expr = ast.parse(match.group(1).strip(), mode="eval")
            except SyntaxError:
                continue
            names += [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)]
        for name in names:
            self.load(name)

    def _embedded(self, codes: list[str], keep: bool) -> None:
        """Code a magic runs (``%timeit`` setup, then statement): walked inline when its
        bindings stay in the namespace, else only its reads count."""
        walker = self if keep else _Walker()
        if not keep:
            walker.bound = set(self.top.bound)
        for tree in filter(None, map(_magic_code, codes)):
            walker.block(tree.body)
        if not keep:
            for name in walker.reads:
                self.load(name)
