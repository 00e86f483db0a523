"""A stable world (issue 19, items 1 and 3): a running cell keeps the values it started with while other
sessions push and delete, those requests wait their turn without blocking their connection, and a launch
that hangs holds up only its own compute name. Real pod kernels; every wait has a deadline."""

from __future__ import annotations

import fcntl
import os
import sys
import threading

from barriers import WAIT_FOR_GO, wait_until

from kt_jupyter import connection as conn_mod
from kt_jupyter.backends import local_registry as registry
from kt_jupyter.compute import Compute


def test_push_and_delete_wait_for_the_running_cell_and_the_connection_stays_up(kernel, tmp_path):
    handle, owner = kernel
    go = tmp_path / "go"
    owner.push({"x": 1, "doomed": "here", "go": str(go)})
    other = handle.session()  # another notebook on the same compute
    other.connect()
    done: dict[str, object] = {}
    cell = threading.Thread(target=lambda: done.update(cell=owner.execute(
        f"start = x\n{WAIT_FOR_GO}seen = x\nkept = doomed")), daemon=True)
    cell.start()
    try:
        wait_until(lambda: other.metrics()["running"], 30, "the cell runs")
        pusher = threading.Thread(target=lambda: done.update(pushed=other.push({"x": 2})), daemon=True)
        pusher.start()
        wait_until(lambda: other.metrics().get("queued", 0) >= 1, 30, "the push waits behind the running cell")
        deleter = threading.Thread(target=lambda: done.update(deleted=other.delete(["doomed"])), daemon=True)
        deleter.start()
        wait_until(lambda: other.metrics().get("queued", 0) >= 2, 30, "the delete waits behind it too")
        assert other.ping() > 0  # the waiting requests do not hold up their connection
        assert "pushed" not in done and "deleted" not in done
    finally:
        go.touch()
    for thread in (cell, pusher, deleter):
        thread.join(60)
        assert not thread.is_alive()
    assert done["pushed"] == ["x"] and done["deleted"] == ["doomed"]
    assert owner.pull(["start", "seen", "kept", "x"]) == {"start": 1, "seen": 1, "kept": "here", "x": 2}
    other.close()


def _blocked_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_a_hung_launch_holds_up_only_its_own_compute(local_backend, cleanup_connections):
    # another notebook is launching 'slow' (it holds the backend's lock for that name): this launch waits
    fd = registry.open_lock(registry.lock_path(local_backend.root, "slow"))
    fcntl.flock(fd, fcntl.LOCK_EX)
    result: dict[str, object] = {}
    slow = threading.Thread(target=lambda: result.update(slow=conn_mod.connect(Compute(name="slow"))), daemon=True)
    fast = threading.Thread(target=lambda: result.update(fast=conn_mod.connect(Compute(name="fast"))), daemon=True)
    try:
        slow.start()
        wait_until(lambda: _blocked_in(slow, "_locked"), 30, "the launch of 'slow' waits for its lock")
        fast.start()
        fast.join(60)
        assert "fast" in result, "connecting to 'fast' waited for the launch of 'slow'"
        assert slow.is_alive() and "slow" not in result
    finally:
        os.close(fd)  # the other launch is done: 'slow' goes on
    slow.join(60)
    assert result["slow"].name == "slow" and result["fast"].name == "fast"
