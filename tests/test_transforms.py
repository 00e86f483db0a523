"""pod_kernel/transforms.py: IPython's static transformations kept per source, and the await check skipped.

Both must be invisible: the same transformed text as IPython's own, every time, and
top-level ``await`` still running in a pod cell, and in the notebook's own IPython
(where ``%load_ext kt_jupyter`` installs them).
"""

from __future__ import annotations

import asyncio

import pytest
from IPython.core import prefilter
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
    assert "prefilter_lines" not in vars(shell.prefilter_manager)
    if was_installed:  # by a %load_ext kt_jupyter of another test in this process
        transforms.install(shell)


#: One-line cells as IPython's static transformations leave them, for the prefilter.
LINES = [
    "pass", "import os", "from os import path", "  for i in range(3): print(i)", "del x", "if x: y = 1",
    "assert x, 'message'", "as_of = 1", "None", "True", "True.real", "None*2", "passx = 1", "lambda: 0",
    "return", "ls", "ls -la", "cd /tmp", "x = 1", "x, y = 1, 2", "f 1", "f(1)", "m", "auto", "print",
    "get_ipython().run_cell_magic('kt', '--name x', 'pass\\n')",
    "get_ipython().run_line_magic('time', 'x = 1')", "get_ipython ()", "pass  # PYTHON-MODE",
]


@pytest.fixture
def shell():
    """The notebook's IPython with the transformations installed, and its namespace and settings restored."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    was_installed = "prefilter_lines" in vars(shell.prefilter_manager)
    transforms.install(shell)
    ns = dict(shell.user_ns)
    autocall, automagic = shell.autocall, shell.automagic
    checkers = list(shell.prefilter_manager.checkers)
    try:
        yield shell
    finally:
        shell.user_ns.clear()
        shell.user_ns.update(ns)
        shell.autocall, shell.automagic = autocall, automagic
        shell.prefilter_manager._checkers[:] = checkers
        for checker in checkers:
            if isinstance(checker, prefilter.EmacsChecker):
                checker.enabled = False
        if not was_installed:
            transforms.uninstall(shell)


def _setups(shell):
    """The settings and namespaces the quick prefilter must get right: yields a name for each."""
    from IPython.core.autocall import ExitAutocall
    from IPython.core.macro import Macro

    yield "as IPython starts"
    shell.register_magic_function(lambda line: line, "line", "m")
    shell.register_magic_function(lambda line: line, "line", "get_ipython")
    shell.user_ns.update(f=print, auto=ExitAutocall(ip=shell), m=Macro("x = 1\n"))
    yield "a macro, an autocall object, a magic named get_ipython"
    shell.autocall = 2
    yield "autocall full"
    shell.autocall = 0
    shell.user_ns["get_ipython"] = Macro("x = 2\n")
    yield "get_ipython rebound to a macro"
    shell.user_ns["get_ipython"] = shell.get_ipython
    next(c for c in shell.prefilter_manager.checkers if isinstance(c, prefilter.EmacsChecker)).enabled = True
    yield "the Emacs checker on"


def test_the_quick_prefilter_answers_as_ipythons(shell):
    """Whenever the quick prefilter keeps a line, IPython's own prefilter returns that very line; and it does
    keep the lines it is for (a %%kt cell's, a keyword's) as IPython starts."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.prefilter import PrefilterManager

    manager = shell.prefilter_manager
    quick = vars(manager)["prefilter_lines"]
    assert isinstance(quick, transforms.QuickPrefilter)
    kept: dict[str, list[str]] = {}
    quick_seen: set[str] = set()
    for setup in _setups(shell):
        kept[setup] = []
        for line in LINES:
            theirs = PrefilterManager.prefilter_lines(manager, line)
            shell._last_input_line = None
            ours = quick(line)
            assert ours == theirs, (setup, line)
            assert shell._last_input_line == line  # the side effect IPython's has
            if transforms.prefilter_keeps(shell, line):
                kept[setup].append(line)
            for cell in (line, line + "\n", f"x = 1\n{line}\n"):  # the whole transformation, without the trap
                fast = transforms.quick_transform(shell, cell)
                if fast is not None:
                    assert fast == InteractiveShell.transform_cell(shell, cell), (setup, cell)
                    quick_seen.add(setup)
    assert quick_seen >= {"as IPython starts", "autocall full"}  # multi-line cells need no prefilter
    assert kept["as IPython starts"] == [
        "pass", "import os", "from os import path", "  for i in range(3): print(i)", "del x", "if x: y = 1",
        "assert x, 'message'", "None", "True", "lambda: 0", "return",
        "get_ipython().run_cell_magic('kt', '--name x', 'pass\\n')", "pass  # PYTHON-MODE"]
    assert kept["autocall full"] == [] and kept["the Emacs checker on"] == []
    assert "get_ipython().run_cell_magic('kt', '--name x', 'pass\\n')" not in kept["get_ipython rebound to a macro"]


def test_the_quick_prefilter_skips_ipythons_checkers_and_yields_to_others(shell, monkeypatch):
    """A %%kt cell and a keyword line run without IPython's checkers; a checker a user registers turns the
    quick path off."""
    from IPython.core.prefilter import PrefilterChecker

    checked: list[str] = []

    class Recording(PrefilterChecker):
        def check(self, line_info):
            checked.append(line_info.line)

    for cls in transforms._OWN_CHECKERS:
        monkeypatch.setattr(cls, "check", lambda self, info: checked.append(info.line))
    assert shell.run_cell("pass").success
    assert shell.run_cell("%%capture out\nfor _ in [1]: print(6 * 7)").success  # two lines, then one
    assert "42" in shell.user_ns["out"].stdout
    assert checked == []
    assert shell.run_cell("x = 1").success and checked  # not a line it knows: IPython's checkers ran
    monkeypatch.undo()
    checked.clear()
    shell.prefilter_manager.register_checker(Recording(shell=shell, prefilter_manager=shell.prefilter_manager))
    assert shell.run_cell("pass").success
    assert checked == ["pass"]
