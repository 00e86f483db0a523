"""Conformance: every notebook of cases.py gives the same outputs and the same final namespace
with every cell under ``%%kt`` as it gives locally (issue 18).

Both runs go through a real Jupyter kernel (nbclient), one kernel per run, the
notebooks one after another with ``%reset -f`` between them. Cells are compared
by stream text, rich outputs by mime type (and their text), errors by type; the
namespace by type and a value summary printed by a last local cell. Our own
``[kt]`` notices and memory addresses are left out of the comparison. The
figures (cells and names equal, coherence overhead per cell) are printed and
written to test-artifacts/conformance.json.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
from cases import (
    NAMESPACE_EXCEPTIONS,
    NONDETERMINISTIC_CELLS,
    NOTEBOOKS,
    PENDING_DIFFERENCES,
)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_MARK = "#local"
DIGEST_MARK = "KT-NAMESPACE "
TIMINGS_MARK = "KT-TIMINGS "
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
#: Where a warning points: the cell's file, named by each kernel its own way (``/tmp/ipykernel_77/12.py:1``)
_WARNING_AT = re.compile(r"^\S+\.py:\d+: (\w+Warning)", re.MULTILINE)

#: A local cell that prints the user namespace as name -> [type, value summary], one JSON line.
DIGEST_CELL = r'''
def _kt_digest():
    import hashlib, json, sys, types
    shell = get_ipython()
    np, pd = sys.modules.get("numpy"), sys.modules.get("pandas")
    def summary(v, depth=0):
        t = type(v)
        name = f"{t.__module__}.{t.__qualname__}"
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            return [name, repr(v)]
        if isinstance(v, types.ModuleType):
            return [name, v.__name__]
        if isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            return [name, getattr(v, "__qualname__", repr(v))]
        if np is not None and isinstance(v, np.ndarray):
            return [name, str(v.dtype), list(v.shape), hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()]
        if np is not None and isinstance(v, np.generic):
            return [name, repr(v)]
        if pd is not None and isinstance(v, (pd.DataFrame, pd.Series)):
            return [name, v.to_json()]
        if hasattr(v, "bit_generator"):
            return [name, repr(v.bit_generator.state)]
        if hasattr(v, "get_lines") and hasattr(v, "get_title"):
            return [name, len(v.get_lines()), v.get_title()]
        if hasattr(v, "get_axes"):
            return [name, [len(a.get_lines()) for a in v.get_axes()]]
        if hasattr(v, "getChild") and hasattr(v, "handlers"):  # a logging.Logger
            return [name, v.name, v.level]
        if hasattr(v, "getvalue"):
            return [name, v.getvalue()]
        if depth > 4:
            return [name]
        if isinstance(v, (list, tuple)):
            return [name, [summary(x, depth + 1) for x in v]]
        if isinstance(v, (set, frozenset)):
            return [name, sorted(repr(summary(x, depth + 1)) for x in v)]
        if isinstance(v, dict):
            return [name, [[repr(k), summary(x, depth + 1)] for k, x in v.items()]]
        if hasattr(v, "__dict__"):
            return [name, [[k, summary(x, depth + 1)] for k, x in sorted(vars(v).items())]]
        return [name, repr(v)]
    hidden = set(shell.user_ns_hidden)
    names = sorted(n for n in shell.user_ns if not n.startswith("_") and n not in hidden
                   and n not in ("In", "Out", "get_ipython", "exit", "quit"))
    print("KT-NAMESPACE " + json.dumps({n: summary(shell.user_ns[n]) for n in names}, default=repr))
_kt_digest()
del _kt_digest
'''

#: First cell of the %%kt run: the extension, and a hook keeping each %%kt cell's timings on the shell.
KT_SETUP = '''%load_ext kt_jupyter
get_ipython()._kt_timings = []
def _kt_record(result, shell=get_ipython()):
    outcome = shell.magics_manager.registry["KtMagics"].last_outcome
    if outcome is not None and (not shell._kt_timings or shell._kt_timings[-1][0] is not outcome):
        shell._kt_timings.append((outcome, dict(outcome.timings_s)))
get_ipython().events.register("post_run_cell", _kt_record)
del _kt_record'''
KT_TIMINGS = 'import json\nprint("KT-TIMINGS " + json.dumps([t for _o, t in get_ipython()._kt_timings]))'


def build(kt: bool) -> tuple[Any, list[tuple[str, int, int]]]:
    """One notebook holding every case in order; returns it and (case, cell index, notebook cell index)."""
    cells, where = [], []
    if kt:
        cells.append(nbformat.v4.new_code_cell(KT_SETUP))
    for case, sources in NOTEBOOKS.items():
        for i, source in enumerate(sources):
            remote = kt and not source.startswith(LOCAL_MARK)
            where.append((case, i, len(cells)))
            cells.append(nbformat.v4.new_code_cell(f"%%kt\n{source}" if remote else source))
        cells.append(nbformat.v4.new_code_cell(DIGEST_CELL))
        where.append((case, -1, len(cells) - 1))
        if kt:
            cells.append(nbformat.v4.new_code_cell("%%kt\n%reset -f"))
        cells.append(nbformat.v4.new_code_cell("%reset -f"))
    if kt:
        cells.append(nbformat.v4.new_code_cell(KT_TIMINGS))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb, where


def execute(nb: Any, cwd: Path) -> Any:
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _ours(text: str) -> bool:
    return text.lstrip().startswith("[kt]")


def summarize(cell: Any) -> dict[str, Any]:
    """What a cell showed, comparable across the runs."""
    streams = {"stdout": "", "stderr": ""}
    rich, errors = [], []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            lines = [line for line in out["text"].splitlines(keepends=True) if not _ours(line)]
            streams[out["name"]] += "".join(lines)
        elif kind in ("display_data", "execute_result"):
            data = out.get("data", {})
            text = str(data.get("text/plain", ""))
            if _ours(text):
                continue
            rich.append([kind, sorted(data), _ADDRESS.sub("0x?", text) if "image/png" not in data else ""])
        elif kind == "error":
            errors.append(out["ename"].rpartition(".")[2])
    stderr = _WARNING_AT.sub(r"<cell>: \1", streams["stderr"])
    stderr = "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("  "))  # its line
    return {"stdout": _ADDRESS.sub("0x?", streams["stdout"]), "stderr": _ADDRESS.sub("0x?", stderr),
            "rich": rich, "errors": errors}


def namespace(cell: Any) -> dict[str, Any]:
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and DIGEST_MARK in out["text"]:
            line = next(ln for ln in out["text"].splitlines() if ln.startswith(DIGEST_MARK))
            return json.loads(_ADDRESS.sub("0x?", line[len(DIGEST_MARK):]))
    raise AssertionError(f"the namespace cell printed no digest: {cell.get('outputs')}")


def timings(nb: Any) -> list[dict[str, float]]:
    for out in nb.cells[-1].get("outputs", []):
        if out["output_type"] == "stream" and TIMINGS_MARK in out["text"]:
            return json.loads(out["text"].split(TIMINGS_MARK, 1)[1])
    return []


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@pytest.mark.timeout(600)
def test_every_notebook_under_kt_matches_local(tmp_path):
    local_nb, where = build(kt=False)
    kt_nb, kt_where = build(kt=True)
    (tmp_path / "local").mkdir()
    (tmp_path / "kt").mkdir()
    execute(local_nb, tmp_path / "local")
    execute(kt_nb, tmp_path / "kt")

    cell_diffs, ns_diffs, pending = [], [], []
    cells_total = cells_equal = names_total = names_equal = 0
    for (case, i, li), (_c, _i, ki) in zip(where, kt_where):
        if i == -1:
            local_ns, kt_ns = namespace(local_nb.cells[li]), namespace(kt_nb.cells[ki])
            for name in sorted(set(local_ns) | set(kt_ns)):
                names_total += 1
                if local_ns.get(name) == kt_ns.get(name) or (case, name) in NAMESPACE_EXCEPTIONS:
                    names_equal += 1
                else:
                    ns_diffs.append(f"{case}: {name}: local {local_ns.get(name)} != kt {kt_ns.get(name)}")
            continue
        cells_total += 1
        local, remote = summarize(local_nb.cells[li]), summarize(kt_nb.cells[ki])
        if local == remote or (case, i) in NONDETERMINISTIC_CELLS:
            cells_equal += 1
        elif (case, i) in PENDING_DIFFERENCES:
            pending.append(f"{case}[{i}]: local {local} != kt {remote}")
        else:
            cell_diffs.append(f"{case}[{i}]: local {local} != kt {remote}")

    per_cell = timings(kt_nb)
    coherence_ms = [t.get("coherence", 0.0) * 1e3 for t in per_cell]
    report = {
        "notebooks": len(NOTEBOOKS), "cells_equal": cells_equal, "cells_total": cells_total,
        "names_equal": names_equal, "names_total": names_total,
        "nondeterministic_cells": {f"{c}[{i}]": why for (c, i), why in NONDETERMINISTIC_CELLS.items()},
        "namespace_exceptions": {f"{c}.{n}": why for (c, n), why in NAMESPACE_EXCEPTIONS.items()},
        "coherence_ms_p50": round(statistics.median(coherence_ms), 3) if coherence_ms else None,
        "coherence_ms_p95": round(_pct(coherence_ms, 0.95), 3) if coherence_ms else None,
        "kt_cells_timed": len(coherence_ms),
        "differences": cell_diffs + ns_diffs,
        "pending": pending,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "conformance.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nconformance: cells {cells_equal}/{cells_total} equal, names {names_equal}/{names_total} equal; "
          f"coherence checks per %%kt cell p50 {report['coherence_ms_p50']} ms, p95 {report['coherence_ms_p95']} ms")
    assert not cell_diffs and not ns_diffs, "\n".join(cell_diffs + ns_diffs)
    assert len(NOTEBOOKS) >= 25 and len(coherence_ms) > cells_total // 2
