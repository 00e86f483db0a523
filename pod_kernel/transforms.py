"""IPython's per-cell work that a pod kernel does once per source, or skips when it cannot matter.

IPython tokenizes every cell to apply its static input transformations (``%magic``,
``!cmd``, ``x?``, prompts) and compiles it once more than it runs it, to learn
whether it uses top-level ``await``. For a 500-line cell that is about 20 ms and
8 ms of every run, here, before the cell's first line runs.
"""

from __future__ import annotations

from collections import OrderedDict

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
