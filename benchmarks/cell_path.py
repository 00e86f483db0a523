"""Where a trivial ``%%kt`` cell's time goes, step by step, in both processes (issue 21, item 3).

    .venv/bin/python benchmarks/cell_path.py [--cells 300] [--gap-ms 5] [--code pass] [--json]

It runs ``--cells`` cells of ``%%kt pass`` (or ``--code``: ``"print(1)"``, a cell
that outputs something just before its end) in one IPython process (IPython's test
shell, no kernel), ``--gap-ms`` apart as in a notebook (back to back, with 0, the
caches stay warm and every step looks two to three times cheaper on a VM), on a
fresh local pod kernel. Both processes take a ``time.perf_counter()`` timestamp at
each step (it reads CLOCK_MONOTONIC: one clock for both); the pod's are loaded by
a ``sitecustomize`` this script writes and puts first on the pod kernel's
``PYTHONPATH``, and it writes them to a file each 10 cells. Steps (the functions
wrapped, in order of a cell):

- ``c_t0``: the notebook starts the cell (``run_cell``); ``c_sn0``/``c_sn1``: the
  notebook's thread writes the execute (``DirectWrites.send_now``; the pod may have
  the bytes before that call returns: intervals go from its start);
- ``p_dr``: the pod's network thread has the bytes (``data_received``);
  ``p_parsed``: websockets parsed the frame (``DirectReads.process_event``);
  ``p_q0``/``p_q1``: the cell is queued (``PodKernelServer._queue_cell``);
- ``p_run0``: the pod's main thread starts it (``Executor.run``); ``p_uc0``/``p_uc1``:
  IPython runs the cell (``Executor._user_code``); ``p_sn0``/``p_sn1``: the main
  thread writes the reply;
- ``c_dr``: the notebook's network thread has the reply's bytes (on a lane: the
  notebook's thread reads them, ``ClientLane.read_frames``);
  ``c_er``: its handler (``Transport._on_execute_reply``; on a lane
  ``Transport._took_lane_reply``); ``c_got``: the notebook's
  thread has it; ``c_t1``: the cell is done.

Then, for scale, a local ``pass`` and a no-op cell magic, the same way. Prints a
table of each step's median and 90th percentile (``--json``: one JSON object). The
wrapped functions are this repository's own: a refactoring that renames one makes
this script fail, not report nonsense.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The steps of a cell, in the order they happen (each interval ends where the next begins).
STEPS = ["c_t0", "c_sn0", "p_dr", "p_parsed", "p_q0", "p_q1", "p_run0", "p_uc0", "p_uc1", "p_sn0", "c_dr", "c_er",
         "c_got", "c_t1"]
#: What each step's interval is, for the table (keyed by the step it ends at).
MEANING = {
    "c_sn0": "the notebook's work before the request leaves (IPython's and the magic's)",
    "p_dr": "the request written, the pod woken with it (its network thread; on a lane, its main thread)",
    "p_parsed": "websockets parses the frame (on a lane: the frame read)",
    "p_q0": "the execute decoded and checked",
    "p_q1": "the cell queued",
    "p_run0": "the pod's main thread woken (on a lane: already)",
    "p_uc0": "the pod's bookkeeping before the cell",
    "p_uc1": "IPython runs the cell on the pod",
    "p_sn0": "the pod's bookkeeping after the cell, the reply built",
    "c_dr": "the reply written, the notebook woken with it (its network thread; on a lane, its own thread)",
    "c_er": "websockets parses the reply, it is routed (on a lane: the frame read and checked)",
    "c_got": "the notebook's thread woken (on a lane: already)",
    "c_t1": "the notebook's work after the reply",
}
#: The writes themselves, apart (the receiver may have the bytes before the writer's system call returns):
#: step -> (where it starts, the step whose row it follows in the table, what it is).
WRITES = {"c_sn1": ("c_sn0", "p_dr", "of which the notebook's write call"),
          "p_sn1": ("p_sn0", "c_dr", "of which the pod's write call")}

class Stamps:
    """One process's timestamps of the cell that runs now, by step (both processes use it)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}

    def mark(self, step: str) -> None:
        """Stamp ``step`` now, unless it was stamped already for this cell."""
        self.now.setdefault(step, time.perf_counter())

    def wrap(self, cls: Any, name: str, before: str, after: str | None = None, until: str | None = None,
             last_return: bool = False) -> None:
        """Stamp ``before`` as ``cls.name`` starts (its latest call before ``until`` is stamped, if given; else
        its first) and ``after`` as it returns (its first return; its last, with ``last_return``)."""
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if until is None:
                self.mark(before)
            elif until not in self.now:
                self.now[before] = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if after and last_return:
                    self.now[after] = time.perf_counter()
                elif after:
                    self.mark(after)
        setattr(cls, name, wrapper)


#: The pod kernel's part: wraps its functions when ``pod_kernel.server`` is imported (a path hook), records.
POD_SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, json, os, sys

_OUT, _rows = os.environ["KT_CELL_PATH_STAMPS"], []


def _patch():
    from benchmarks.cell_path import Stamps
    from pod_kernel import executor, server, wsconn

    stamps = Stamps()
    wrap, _now = stamps.wrap, stamps.now
    wrap(server.KtServerConnection, "data_received", "p_dr", until="p_parsed")  # not a heartbeat's before it
    process_event = wsconn.DirectReads.process_event

    def process_event_wrapper(self, event):
        if getattr(event, "opcode", None) is wsconn.Opcode.BINARY:  # a message, not a ping
            stamps.mark("p_parsed")
        return process_event(self, event)
    wsconn.DirectReads.process_event = process_event_wrapper
    from pod_kernel import lanes  # a lane's execute: read by the main thread itself
    wrap(lanes.Lane, "read", "p_dr", until="p_parsed")
    wrap(server.PodKernelServer, "_lane_frame", "p_parsed")
    wrap(server.PodKernelServer, "_queue_cell", "p_q0", "p_q1")
    wrap(executor.Executor, "_user_code", "p_uc0", "p_uc1")
    wrap(wsconn.DirectWrites, "send_now", "p_sn0", "p_sn1")
    wrap(lanes.Lane, "write", "p_sn0", "p_sn1")
    run = executor.Executor.run

    def run_wrapper(self, job):
        stamps.mark("p_run0")
        try:
            return run(self, job)
        finally:
            _rows.append(dict(_now))
            _now.clear()
            if len(_rows) % 10 == 0:
                with open(_OUT + ".tmp", "w") as f:
                    json.dump(_rows, f)
                os.replace(_OUT + ".tmp", _OUT)
    executor.Executor.run = run_wrapper


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pod_kernel.server":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch()
        spec.loader.exec_module = exec_module
        return spec


if "pod_kernel" in " ".join(sys.orig_argv):
    sys.meta_path.insert(0, _Hook())
'''


def _stats(values: list[float]) -> dict[str, float]:
    from benchmarks.run import pct  # here: the pod imports this module too, and needs none of run.py's imports

    return {"p50_us": pct(values, 50) * 1e6, "p90_us": pct(values, 90) * 1e6}


def measure(cells: int, gap_s: float, warmup: int = 20, code: str = "pass") -> dict[str, Any]:
    """Run the cells; returns ``steps`` (each interval's p50/p90 in us), ``total`` and the local cells'."""
    workdir = Path(tempfile.mkdtemp(prefix="kt-cell-path-"))
    (workdir / "site").mkdir()
    (workdir / "site" / "sitecustomize.py").write_text(textwrap.dedent(POD_SITECUSTOMIZE))
    pod_file = workdir / "pod-stamps.json"
    os.environ["KT_HOME"] = str(workdir / "kt-home")  # a kernel started ahead elsewhere would have no hook
    os.environ["KT_CELL_PATH_STAMPS"] = str(pod_file)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir / "site"), str(ROOT),
                                                           os.environ.get("PYTHONPATH")) if p)
    from IPython.testing.globalipapp import get_ipython

    from kt_jupyter.client import handshake, transport
    from pod_kernel import lanes, wsconn

    shell = get_ipython()
    shell.run_line_magic("load_ext", "kt_jupyter")  # after PYTHONPATH: its kernel started ahead has the hook
    stamps = Stamps()
    now, mark, wrap = stamps.now, stamps.mark, stamps.wrap
    rows: list[dict[str, float]] = []

    wrap(handshake.KtClientConnection, "data_received", "c_dr", until="c_er")  # the reply's, not a pong's
    wrap(transport.Transport, "_on_execute_reply", "c_er")
    wrap(lanes.ClientLane, "read_frames", "c_dr", until="c_er")  # a reply on the lane: read by the notebook's thread
    wrap(transport.Transport, "_took_lane_reply", "c_er")
    wrap(wsconn.DirectWrites, "send_now", "c_sn0", "c_sn1")
    wrap(lanes.ClientLane, "send", "c_sn0", "c_sn1")
    wrap(transport.Transport, "take", "c_take", "c_got", last_return=True)  # its last item is the reply
    cell = f"%%kt --name cell-path\n{code}"
    try:
        for _ in range(warmup):
            shell.run_cell(cell)
        now.clear()
        for _ in range(cells):
            time.sleep(gap_s)
            mark("c_t0")
            shell.run_cell(cell)
            mark("c_t1")
            rows.append(dict(now))
            now.clear()
        deadline = time.monotonic() + 10
        pod: list[dict[str, float]] = []
        while time.monotonic() < deadline:  # the pod writes its stamps each 10 cells
            pod = json.loads(pod_file.read_text()) if pod_file.exists() else []
            if len(pod) >= warmup + cells:
                break
            time.sleep(0.05)
    finally:
        shell.run_line_magic("kt", "down cell-path")
    if len(pod) < warmup + cells:
        raise RuntimeError(f"the pod kernel recorded {len(pod)} cells of {warmup + cells}: was the hook loaded?")
    merged = [dict(n, **p) for n, p in zip(rows, pod[warmup:warmup + cells])]
    steps = {}
    for start, end in itertools.pairwise(STEPS):
        values = [r[end] - r[start] for r in merged if start in r and end in r]
        if len(values) < cells * 0.9:
            raise RuntimeError(f"step {start} -> {end} was seen in {len(values)} cells of {cells}")
        steps[end] = _stats(values)
    writes = {end: _stats([r[end] - r[start] for r in merged]) for end, (start, _row, _what) in WRITES.items()}
    result: dict[str, Any] = {"cells": cells, "gap_ms": gap_s * 1e3, "code": code, "steps": steps, "writes": writes,
                              "total": _stats([r["c_t1"] - r["c_t0"] for r in merged])}
    shell.register_magic_function(lambda line, cell: None, "cell", "noop")
    for name, local in (("local pass", "pass"), ("no-op cell magic", "%%noop\npass")):
        times = []
        for _ in range(cells):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            shell.run_cell(local)
            times.append(time.perf_counter() - t0)
        result[name] = _stats(times)
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"{result['cells']} cells of `%%kt {result['code']}`, {result['gap_ms']:g} ms apart, one IPython process",
             "", "| step | p50 us | p90 us |", "|---|---|---|"]
    for end, stats in result["steps"].items():
        lines.append(f"| {MEANING[end]} | {stats['p50_us']:.0f} | {stats['p90_us']:.0f} |")
        for write, (_start, row, what) in WRITES.items():
            if row == end:
                lines.append(f"| ({what}) | {result['writes'][write]['p50_us']:.0f} | "
                             f"{result['writes'][write]['p90_us']:.0f} |")
    for name in ("total", "local pass", "no-op cell magic"):
        label = f"**a `%%kt {result['code']}` cell**" if name == "total" else f"a {name} cell"
        lines.append(f"| {label} | {result[name]['p50_us']:.0f} | {result[name]['p90_us']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=300, help="cells measured (default 300)")
    p.add_argument("--gap-ms", type=float, default=5.0, help="idle time before each cell (default 5 ms)")
    p.add_argument("--code", default="pass", help="the cell's one line (default pass; e.g. \"print(1)\")")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.cells < 10:
        p.error("--cells must be at least 10")
    if "\n" in args.code:
        p.error("--code is one line")
    result = measure(args.cells, max(0.0, args.gap_ms) / 1e3, code=args.code)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
