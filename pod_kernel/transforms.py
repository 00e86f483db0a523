"""IPython's per-cell work done once per source, or skipped when it cannot matter: on the pod kernel, and on the
notebook's own IPython once ``%load_ext kt_jupyter`` ran (:func:`install`).

IPython tokenizes every cell to apply its static input transformations (``%magic``,
``!cmd``, ``x?``, prompts) and compiles it once more than it runs it, to learn
whether it uses top-level ``await``. For a 500-line cell that is about 20 ms and
8 ms of every run, here, before the cell's first line runs. A ``%%kt`` cell is a
cell magic, which IPython turns into one line holding the whole cell as a string
and tokenizes again: in a notebook kernel, a no-op cell magic costs 0.42 ms more than
``pass`` (ipykernel transforms each cell twice).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any

from IPython.core import inputtransformer2
from IPython.core.inputtransformer2 import TransformerManager

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

    def _only_ipythons(self) -> bool:
        return all(getattr(t, "__module__", None) == inputtransformer2.__name__
                   for t in (*self.cleanup_transforms, *self.line_transforms, *self.token_transformers))

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


def install(shell: Any) -> None:
    """Make a running IPython (the pod kernel's, the notebook's) keep its static transformations per source and
    skip the extra compile of a cell without ``await``; :func:`uninstall` undoes it. The lists of
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


def uninstall(shell: Any) -> None:
    """Undo :func:`install`."""
    manager = shell.input_transformer_manager
    if isinstance(manager, CachingTransformerManager) and hasattr(manager, "kt_replaced"):
        shell.input_transformer_manager = manager.kt_replaced
    patched = vars(shell).get("should_run_async")
    if getattr(patched, "__func__", None) is should_run_async:
        del shell.should_run_async
