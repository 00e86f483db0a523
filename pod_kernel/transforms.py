"""IPython's per-cell work done once per source, or skipped when it cannot matter: on the pod kernel, and on the
notebook's own IPython once ``%load_ext kt_jupyter`` ran (:func:`install`).

IPython tokenizes every cell to apply its static input transformations (``%magic``,
``!cmd``, ``x?``, prompts) and compiles it once more than it runs it, to learn
whether it uses top-level ``await``. For a 500-line cell that is about 20 ms and
8 ms of every run, here, before the cell's first line runs. A ``%%kt`` cell is a
cell magic, which IPython turns into one line holding the whole cell as a string
and tokenizes again: in a notebook kernel, a no-op cell magic costs 0.42 ms more than
``pass`` (ipykernel transforms each cell twice).

A cell of one line then goes through IPython's prefilter (automagic, autocall,
macros), which reads the line's first word against the namespace and the
magics: about 35 us here, 70-90 us when the caches went cold between cells. For
two kinds of line its answer is known without running it (see
:func:`prefilter_keeps`): a ``%%kt`` cell's line, and a line that starts with a
Python keyword (``pass``, ``import numpy``).
"""

from __future__ import annotations

import keyword
import re
import types
from collections import OrderedDict
from typing import Any

from IPython.core import inputtransformer2, prefilter
from IPython.core.inputtransformer2 import TransformerManager
from IPython.core.interactiveshell import InteractiveShell

#: Sources whose transformed text is kept (most recently run).
CACHED_CELLS = 64
#: Longer sources are transformed every time, not kept.
CACHED_CELL_MAX_CHARS = 256 << 10


def might_be_async(cell: str) -> bool:
    """Whether ``cell`` could use top-level ``await`` / ``async for`` / ``async with``: never without those words."""
    return "await" in cell or "async" in cell


class CachingTransformerManager(TransformerManager):
    """IPython's static input transformations, remembered per source for the last :data:`CACHED_CELLS` cells.

    They depend on the text alone while only IPython's own transformations are
    registered (each a pure function of the lines); one a user registers (e.g.
    ``get_ipython().input_transformers_cleanup.append(f)``) may keep state, so
    while there is one every cell is transformed afresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self._done: OrderedDict[str, str] = OrderedDict()
        #: copies of the three lists as last checked, and the answer (compared in C: no Python loop per cell)
        self._checked: tuple[list[Any], list[Any], list[Any], bool] | None = None

    def _only_ipythons(self) -> bool:
        lists = (self.cleanup_transforms, self.line_transforms, self.token_transformers)
        checked = self._checked
        if checked is not None and checked[0] == lists[0] and checked[1] == lists[1] and checked[2] == lists[2]:
            return checked[3]
        only = all(getattr(t, "__module__", None) == inputtransformer2.__name__ for t in (*lists[0], *lists[1],
                                                                                         *lists[2]))
        self._checked = (list(lists[0]), list(lists[1]), list(lists[2]), only)
        return only

    def transform_cell(self, cell: str) -> str:
        """IPython's transformation of ``cell``; the one kept from an earlier run of the same source if any."""
        if len(cell) > CACHED_CELL_MAX_CHARS or not self._only_ipythons():
            return super().transform_cell(cell)
        done = self._done.get(cell)
        if done is not None:
            self._done.move_to_end(cell)
            return done
        done = self._done[cell] = super().transform_cell(cell)
        while len(self._done) > CACHED_CELLS:
            self._done.popitem(last=False)
        return done


def should_run_async(shell: Any, raw_cell: str, *, transformed_cell: str | None = None,
                     preprocessing_exc_tuple: Any = None) -> bool:
    """IPython's ``should_run_async``, less its extra compile of a cell without ``await`` or ``async``: such a
    cell cannot be a coroutine, so the answer is the same."""
    if transformed_cell is not None and not might_be_async(transformed_cell):
        return False
    return bool(type(shell).should_run_async(shell, raw_cell, transformed_cell=transformed_cell,
                                             preprocessing_exc_tuple=preprocessing_exc_tuple))


#: A line whose first word, as IPython's prefilter splits it (``LineInfo``), is a Python keyword.
_KEYWORD_LINE = re.compile(r"\s*(?:" + "|".join(keyword.kwlist) + r")(?![\w.*])")
#: The line IPython makes of a cell magic (``%%kt``): its first word is ``get_ipython``, the rest starts with ``(``.
CELL_MAGIC_LINE = "get_ipython().run_cell_magic("
#: IPython's own prefilter checkers; all but the (disabled) Emacs one leave a keyword line or a cell magic's
#: line to the normal handler, which returns it as it is.
_OWN_CHECKERS = (prefilter.EmacsChecker, prefilter.MacroChecker, prefilter.IPyAutocallChecker,
                 prefilter.AssignmentChecker, prefilter.AutoMagicChecker, prefilter.PythonOpsChecker,
                 prefilter.AutocallChecker)


def prefilter_keeps(shell: Any, line: str) -> bool:
    """Whether IPython's prefilter returns the single ``line`` as it is, known without running its checkers.

    True only while IPython's own checkers alone are registered (the Emacs one
    off), no prefilter transformer is, and autocall is off; and for a line
    whose first word is a Python keyword, or a cell magic's line while
    ``get_ipython`` in the namespace is a plain function. Then no checker takes
    the line: a keyword is never a macro, an autocall object or an unshadowed
    magic, and ``get_ipython`` is shadowed by the namespace, followed by ``(``.
    """
    manager = shell.prefilter_manager
    if shell.autocall or manager.transformers:
        return False
    checkers = manager.checkers
    verified = vars(manager).get("_kt_own_checkers")  # the list last found to hold IPython's own only
    if verified is None or verified[0] != checkers:
        if any(type(checker) not in _OWN_CHECKERS for checker in checkers):
            return False
        verified = manager._kt_own_checkers = (list(checkers),
                                               [c for c in checkers if type(c) is prefilter.EmacsChecker])
    if any(checker.enabled for checker in verified[1]):
        return False
    if line.startswith(CELL_MAGIC_LINE):
        return type(shell.user_ns.get("get_ipython")) in (types.FunctionType, types.MethodType)
    match = _KEYWORD_LINE.match(line)
    return match is not None and match.group().strip() not in shell.user_ns


class QuickPrefilter:
    """``prefilter_lines`` of a shell's prefilter manager: a single line :func:`prefilter_keeps` is returned at
    once (with the side effect IPython's has); anything else goes to IPython's."""

    def __init__(self, shell: Any, original: Any) -> None:
        self.shell = shell
        self.original = original

    def __call__(self, lines: str, continue_prompt: bool = False) -> str:
        kept = self.keeps(lines, continue_prompt)
        return kept if kept is not None else str(self.original(lines, continue_prompt))

    def keeps(self, lines: str, continue_prompt: bool = False) -> str | None:
        """The line IPython's prefilter returns for ``lines``, when known without running it (with the side
        effect IPython's has); else None."""
        line = lines.rstrip("\n")
        if not continue_prompt and "\n" not in line and line.strip() and prefilter_keeps(self.shell, line):
            self.shell._last_input_line = line  # as IPython's prefilter_line does
            return line
        return None


def quick_transform(shell: Any, raw_cell: str) -> str | None:
    """IPython's ``transform_cell(raw_cell)`` when it is known without the prefilter (see
    :class:`QuickPrefilter`), so without entering the builtin trap that IPython enters for it (34 us when the
    caches went cold between cells, here); None when IPython's own must run. Used by the pod kernel's shell and,
    after :func:`install`, the notebook's."""
    manager = shell.input_transformer_manager
    if not isinstance(manager, CachingTransformerManager) or shell.input_transformers_post:
        return None
    cell = str(manager.transform_cell(raw_cell))
    if len(cell.splitlines()) != 1:  # no prefilter: IPython returns what the static transformations made
        return cell
    quick = vars(shell.prefilter_manager).get("prefilter_lines")
    kept = quick.keeps(cell) if isinstance(quick, QuickPrefilter) else None
    return None if kept is None else kept + "\n"


def _transform_cell(shell: Any, raw_cell: str) -> str:
    """A shell's ``transform_cell`` after :func:`install`."""
    quick = quick_transform(shell, raw_cell)
    return quick if quick is not None else str(type(shell).transform_cell(shell, raw_cell))


def install(shell: Any) -> None:
    """Make a running IPython (the pod kernel's, the notebook's) keep its static transformations per source,
    skip the extra compile of a cell without ``await``, and skip the prefilter where its answer is known
    (:class:`QuickPrefilter`, :func:`quick_transform`); :func:`uninstall` undoes it. The lists of
    transformations stay the same objects: one an extension registered before or after is still applied (and
    turns the keeping off)."""
    old = shell.input_transformer_manager
    if isinstance(old, CachingTransformerManager):
        return
    new = CachingTransformerManager()
    new.cleanup_transforms, new.line_transforms = old.cleanup_transforms, old.line_transforms
    new.token_transformers = old.token_transformers
    new.kt_replaced = old  # type: ignore[attr-defined]
    shell.input_transformer_manager = new
    if "should_run_async" not in vars(shell):
        shell.should_run_async = types.MethodType(should_run_async, shell)
    if "transform_cell" not in vars(shell) and type(shell).transform_cell is InteractiveShell.transform_cell:
        shell.transform_cell = types.MethodType(_transform_cell, shell)  # a subclass's own (the pod's) calls it
    manager = shell.prefilter_manager
    if "prefilter_lines" not in vars(manager):
        manager.prefilter_lines = QuickPrefilter(shell, manager.prefilter_lines)


def uninstall(shell: Any) -> None:
    """Undo :func:`install`."""
    manager = shell.input_transformer_manager
    if isinstance(manager, CachingTransformerManager) and hasattr(manager, "kt_replaced"):
        shell.input_transformer_manager = manager.kt_replaced
    patched = vars(shell).get("should_run_async")
    if getattr(patched, "__func__", None) is should_run_async:
        del shell.should_run_async
    if getattr(vars(shell).get("transform_cell"), "__func__", None) is _transform_cell:
        del shell.transform_cell
    if isinstance(vars(shell.prefilter_manager).get("prefilter_lines"), QuickPrefilter):
        del shell.prefilter_manager.prefilter_lines
