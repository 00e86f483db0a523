"""pod_kernel/transforms.py: IPython's static transformations kept per source, and the await check skipped.

Both must be invisible: the same transformed text as IPython's own, every time, and
top-level ``await`` still running in a pod cell, and in the notebook's own IPython
(where ``%load_ext kt_jupyter`` installs them).
"""

from __future__ import annotations

import asyncio

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from pod_kernel import transforms
from pod_kernel.transforms import CachingTransformerManager, might_be_async

CELLS = [
    "pass",
    "x = 1\ny = x + 1\n",
    "%time x = 1",
    "%%timeit -n1\nx = 1\n",
    "!echo hi",
    "files = !ls",
    "t = %time 1",
    "len?",
    "x = 1\nlen??\n",
    ">>> a = 1\n>>> b = 2\n",
    "In [1]: a = 1\n   ...: b = 2\n",
    "    indented = True\n    more = 1\n",
    "\n\n\nx = 1",
    "/print 1",
    "r = await f()",
    "s = 'a % b ! c ?'",
]


@pytest.mark.parametrize("cell", CELLS)
def test_the_kept_transformation_is_ipythons_own(cell):
    ours, theirs = CachingTransformerManager(), TransformerManager()
    expected = theirs.transform_cell(cell)
    assert ours.transform_cell(cell) == expected
    assert ours.transform_cell(cell) == expected  # the kept one, the second time
    assert cell in ours._done or len(cell) > transforms.CACHED_CELL_MAX_CHARS


def test_a_transformation_a_user_registers_runs_every_time():
    manager = CachingTransformerManager()
    calls = []

    def count(lines):
        calls.append(1)
        return [line.replace("ONE", "1") for line in lines]

    manager.cleanup_transforms.append(count)
    assert manager.transform_cell("x = ONE") == "x = 1\n"
    assert manager.transform_cell("x = ONE") == "x = 1\n"
    assert len(calls) == 2 and not manager._done


def test_kept_transformations_are_bounded(monkeypatch):
    monkeypatch.setattr(transforms, "CACHED_CELLS", 3)
    manager = CachingTransformerManager()
    for i in range(10):
        manager.transform_cell(f"x = {i}")
    assert list(manager._done) == ["x = 7", "x = 8", "x = 9"]
    big = "x = 1\n" * (transforms.CACHED_CELL_MAX_CHARS // 6 + 1)
    assert manager.transform_cell(big) == TransformerManager().transform_cell(big)
    assert big not in manager._done


@pytest.mark.parametrize("cell, possible", [
    ("r = await f()", True), ("async with a: pass", True), ("async for x in a: pass", True),
    ("x = 1", False), ("waiter = 2", False),
])
def test_might_be_async(cell, possible):
    assert might_be_async(cell) is possible


def test_top_level_await_and_magics_run_on_the_pod(kernel):
    _, session = kernel
    code = "import asyncio\nasync def twice(x):\n    await asyncio.sleep(0)\n    return 2 * x\nr = await twice(21)\nr"
    for _ in range(2):  # the second run takes the kept transformation
        assert session.execute(code).data == {"text/plain": "42"}
        assert session.execute("%time y = 1\ny").data == {"text/plain": "1"}


def test_installed_on_a_running_ipython_a_cell_run_again_is_not_tokenized_again(monkeypatch):
    """The notebook's IPython, as ``%load_ext kt_jupyter`` leaves it: the same text, the same answers."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    was_installed = isinstance(shell.input_transformer_manager, CachingTransformerManager)
    transforms.uninstall(shell)  # as IPython made it
    original = shell.input_transformer_manager
    cleanup = original.cleanup_transforms
    tokenized: list[int] = []
    tokenize = TransformerManager.do_token_transforms

    def counting(self, lines):
        tokenized.append(1)
        return tokenize(self, lines)

    monkeypatch.setattr(TransformerManager, "do_token_transforms", counting)
    expected = {cell: original.transform_cell(cell) for cell in CELLS}
    transforms.install(shell)
    try:
        transforms.install(shell)  # a second install changes nothing
        manager = shell.input_transformer_manager
        assert isinstance(manager, CachingTransformerManager) and manager.kt_replaced is original
        assert manager.cleanup_transforms is cleanup  # the same list: what others register still applies
        tokenized.clear()
        for _ in range(3):
            assert {cell: shell.input_transformer_manager.transform_cell(cell) for cell in CELLS} == expected
        assert len(tokenized) == len(CELLS)  # the first run of each source only
        assert shell.run_cell("%%capture out\nprint(6 * 7)").success and "42" in shell.user_ns["out"].stdout
        assert shell.should_run_async("x = 1", transformed_cell="x = 1\n") is False
        assert shell.should_run_async("await asyncio.sleep(0)", transformed_cell="await asyncio.sleep(0)\n")
        shell.user_ns["asyncio"] = asyncio
        assert shell.run_cell("r = await asyncio.sleep(0, 'awaited')").success
        assert shell.user_ns["r"] == "awaited"
    finally:
        transforms.uninstall(shell)
    assert shell.input_transformer_manager is original and "should_run_async" not in vars(shell)
    if was_installed:  # by a %load_ext kt_jupyter of another test in this process
        transforms.install(shell)
