"""A notebook that restarts (or dies) mid-cell: the reattaching notebook sees what was printed meanwhile.

The "earlier notebook" is a real process holding a real session, killed with
SIGKILL mid-cell; the reattaching notebook is a ComputeConnection in this
process, as a restarted notebook kernel's first ``%%kt`` cell would use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kt_jupyter.compute import Compute
from kt_jupyter.connection import ComputeConnection

EARLIER_NOTEBOOK = r"""
import sys
from kt_jupyter.backends.local import LocalBackend

session = LocalBackend().find(sys.argv[1]).session()

def show(msg):
    if msg.get("type") == "stream" and "ready" in msg.get("text", ""):
        print("started", flush=True)

session.execute(sys.argv[2], on_output=show)
"""

LINES = 250


def _cell(flag: Path) -> str:
    return ("import os, time\nprint('ready', flush=True)\n"
            f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"
            f"for i in range({LINES}):\n    print(f'line {{i}}')\nz = 5\n")


def _start_earlier_notebook(handle, tmp_path: Path, cell: str) -> None:
    """Run ``cell`` from another process, kill that process mid-cell, and wait until the pod noticed."""
    script = tmp_path / "earlier.py"
    script.write_text(EARLIER_NOTEBOOK)
    proc = subprocess.Popen([sys.executable, str(script), "t", cell], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout.readline().strip() == "started"  # its cell runs on the pod now
    proc.send_signal(signal.SIGKILL)  # the notebook kernel dies mid-cell (a restart, a crash)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the pod sees the connection drop within moments
        probe = handle.session()
        try:
            if probe.connect().get("detached"):
                return
        finally:
            probe.close()
    raise AssertionError("the pod kernel never noticed that the earlier notebook's connection dropped")


def _printed(messages: list[dict]) -> list[str]:
    text = "".join(m.get("text", "") for m in messages if m.get("type") == "stream")
    return [line for line in text.splitlines() if line.startswith("line ")]


def test_a_cell_still_running_is_announced_followed_and_its_output_shown(kernel, tmp_path):
    handle, _ = kernel
    flag = tmp_path / "go"
    _start_earlier_notebook(handle, tmp_path, _cell(flag))
    messages: list[dict] = []
    announced = threading.Event()

    def on_output(msg: dict) -> None:
        messages.append(msg)
        if msg.get("type") == "notice" and "still running" in msg.get("text", ""):
            announced.set()
            flag.touch()  # only now does the old cell print: every line goes out while no notebook listens

    ns: dict = {}
    conn = ComputeConnection(Compute(name="t"), handle)
    outcome = conn.run_cell("y = z + 1", ns, on_output=on_output, timeout_s=60)
    assert announced.is_set()
    assert _printed(messages) == [f"line {i}" for i in range(LINES)]  # 250 of 250, in order
    notices = [m["text"] for m in messages if m.get("type") == "notice"]
    assert "this cell runs when it ends" in notices[0] and "end of an earlier notebook session" in notices[-1]
    assert ns["y"] == 6 and outcome.pulled == ["y"]  # then the cell itself ran, after the old one
    conn.session.close()


def test_output_printed_after_the_notebook_died_is_shown_by_the_next_one(kernel, local_backend, tmp_path):
    handle, _ = kernel
    flag = tmp_path / "go"
    _start_earlier_notebook(handle, tmp_path, _cell(flag))
    flag.touch()  # the old cell prints now, then ends: nobody is connected to see it
    ns: dict = {}
    conn = ComputeConnection(Compute(name="t"), handle)
    probe = handle.session()
    probe.execute("pass")  # queued behind the old cell: when it returns, the old cell has ended
    probe.close()
    messages: list[dict] = []
    conn.run_cell("y = 1", ns, on_output=messages.append)
    lines = _printed(messages)
    assert lines == [f"line {i}" for i in range(LINES)]
    notices = [m["text"] for m in messages if m.get("type") == "notice"]
    assert "printed while no notebook was connected" in notices[0]
    # seen once is enough: the next cell shows nothing of it again, nor does another reattaching notebook
    again: list[dict] = []
    conn.run_cell("y = 2", ns, on_output=again.append)
    other = ComputeConnection(Compute(name="t"), handle)
    other.run_cell("w = 1", {}, on_output=again.append)
    assert _printed(again) == [] and not [m for m in again if m.get("type") == "notice"]
    conn.session.close()
    other.session.close()
