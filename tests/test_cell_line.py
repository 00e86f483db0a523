"""The ``%%kt`` line parsed outside the magic (kt_jupyter.magics.args): the debugger panel needs the compute
a cell runs on without importing the magic. Pure: no kernel, no process."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from kt_jupyter.magics.args import compute_of_cell, parse_cell_line
from kt_jupyter.magics.kt import KtMagics

LINES = [
    "",
    " --name train --gpus 1 --memory 16Gi --backend kubernetes --env A=1 --env B=2",
    " -n t --push a,b --pull c --pull-limit 1GB --timeout 5 --async --keep --retry-oom",
    " --debug wait --workers 2 --framework ray --all-ranks --launch-timeout 60 --inactivity-ttl 30m",
    " --help",
]


@pytest.mark.parametrize("line", LINES)
def test_a_line_parses_as_the_magic_parses_it(line):
    """Same options, same defaults: the groups the magic stacks are the ones parse_cell_line has."""
    assert vars(parse_cell_line(line)) == vars(parse_argstring(KtMagics.kt, line))


@pytest.mark.parametrize("line", [" --bogus", " --workers two", " --framework mpi"])
def test_a_line_the_magic_rejects_is_a_usage_error(line):
    with pytest.raises(UsageError):
        parse_argstring(KtMagics.kt, line)
    with pytest.raises(UsageError):
        parse_cell_line(line)


def test_an_unclosed_quote_is_a_usage_error_that_says_so():
    with pytest.raises(UsageError, match="No closing quotation; close the quote"):
        parse_cell_line(' --name "train')


@pytest.mark.parametrize(("cell", "name"), [
    ("%%kt --name train --timeout 5\nx = 1", "train"),
    ("\n  %%kt -n ddp --workers 2\nx", "ddp"),
    ("%%kt\nx = 1", "default"),
    ("%%kt --bogus\nx", "default"),  # the magic says what is wrong when the cell runs
    ("%%kt --name not/valid\nx", "default"),
    ('%%kt --name "open\nx', "default"),
])
def test_compute_of_cell_names_the_compute_a_cell_runs_on(cell, name):
    assert compute_of_cell(cell) == name
