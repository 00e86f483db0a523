"""``%%kt --workers 2`` when things go wrong (issue 22): a cell that raises on one rank only, and "interrupt
kernel" while a rank waits in a collective. Real pod kernels joined by torch.distributed over gloo; every wait
has a deadline.

Each test checks last that the same two kernels run a collective again.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from barriers import wait_until
from ipshell import run

from kt_jupyter import distributed_group as dg

pytest.importorskip("torch")

#: The head of every cell: join the world when this rank has no process group (the first cell, or after a
#: failed or interrupted cell tore it down).
JOIN = ("import os, torch, torch.distributed as dist\n"
        "if not dist.is_initialized():\n    dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n")
#: A collective over both ranks: the sum of rank+1 is 3.
ALL_REDUCE = JOIN + "t = torch.tensor([float(rank + 1)])\ndist.all_reduce(t)\n"
#: Rank 1 raises; rank 0 waits in a collective rank 1 never joins.
FAIL_ON_RANK_ONE = JOIN + ("if rank == 1:\n    raise ValueError('bad shard on rank 1')\n"
                           "dist.all_reduce(torch.ones(1))\n")
NAME = "ddpf"


def _cell(code: str) -> str:
    return f"%%kt --workers 2 --name {NAME}\n{code}"


def _ports(out: str) -> list[str]:
    """Each rank's MASTER_PORT as the cell printed it (``[stdout:R] port P``), rank order."""
    return [next(line.split()[-1] for line in out.splitlines() if line.startswith(f"[stdout:{r}] port "))
            for r in (0, 1)]


def test_error_on_one_rank_names_it_frees_rank_zero_and_the_next_cell_works(ip, capsys):
    show_port = "print('port', os.environ['MASTER_PORT'])\n"
    run(ip, _cell(ALL_REDUCE + show_port))
    assert ip.user_ns["t"].tolist() == [3.0]
    seen = [_ports(capsys.readouterr().out)]
    for attempt in range(3):  # the world is torn down and formed again each time
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="bad shard on rank 1") as info:
            run(ip, _cell(FAIL_ON_RANK_ONE))
        assert info.value.rank == 1, attempt
        notes = info.value.__notes__
        assert any("rank 1 of 2 workers of 'ddpf' failed" in n for n in notes)
        assert not any("still run" in n for n in notes), notes  # rank 0 was freed from its all_reduce
        assert time.monotonic() - t0 < 30
        del ip.user_ns["t"]
        capsys.readouterr()
        run(ip, _cell(ALL_REDUCE + show_port))
        assert ip.user_ns["t"].tolist() == [3.0], attempt  # the next cell forms the world again and works
        seen.append(_ports(capsys.readouterr().out))
    # every new world on a port both ranks agree on, never the last world's (rank 0 may still hold its server)
    assert all(p0 == p1 for p0, p1 in seen) and len({p0 for p0, _ in seen}) == len(seen), seen


def _interrupt_when(paths: list, timeout_s: float = 60.0) -> threading.Thread:
    """Ctrl-C ("interrupt kernel") in this (main) thread once every file in ``paths`` exists."""
    main = threading.main_thread().ident

    def go() -> None:
        wait_until(lambda: all(p.exists() for p in paths), timeout_s, "both ranks in the cell")
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_interrupt_during_a_collective_reaches_every_rank_and_the_world_forms_again(ip, tmp_path, capsys):
    ip.user_ns["mark"] = str(tmp_path)
    # rank 0 blocks in all_reduce (native code no KeyboardInterrupt reaches); rank 1 waits in Python
    cell = JOIN + ("import pathlib, time\n"
                   "pathlib.Path(mark, f'r{rank}').touch()\n"
                   "if rank == 0:\n    dist.all_reduce(torch.ones(1))\n"
                   "else:\n    deadline = time.monotonic() + 120\n"
                   "    while time.monotonic() < deadline:\n        time.sleep(0.01)\n")
    try:
        thread = _interrupt_when([tmp_path / "r0", tmp_path / "r1"])
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as info:
            run(ip, _cell(cell))
        thread.join(10)
        elapsed_s = time.monotonic() - t0
        notes = getattr(info.value, "__notes__", [])
        first = info.value.rank  # the first rank whose cell ended; the note names the other's interrupt too
        assert f"[kt] rank {first} of 2 workers of 'ddpf' was interrupted" in notes[0], notes
        assert f"[kt] then rank {1 - first}: KeyboardInterrupt" in notes, notes  # it reached every rank
        assert not any("still run" in n for n in notes), notes
        assert elapsed_s < 60
        grp = next(g for g in dg.groups() if g.name == NAME)
        pids = [c.handle.pid for c in grp.ranks]
        assert grp.liveness() is None  # both kernels survived the interrupt
        run(ip, _cell(ALL_REDUCE + "alive = dist.is_initialized()\n"))
        assert ip.user_ns["t"].tolist() == [3.0]  # the next cell formed the world again
        assert [c.handle.pid for c in grp.ranks] == pids  # on the same kernels (their state kept)
        capsys.readouterr()
        ip.run_line_magic("kt", "list --backend local")
        listed = capsys.readouterr().out
        assert "2 pytorch workers (rank 0: local pid" in listed and "ddpf-r" not in listed, listed  # once
        print(f"interrupt during all_reduce: cell ended in {elapsed_s:.2f} s")
    finally:
        ip.run_line_magic("kt", f"down {NAME}")


def test_workers_another_notebook_restarted_are_used_not_replaced(kt_home):
    """Another notebook restarts a distributed compute this one uses (its `%kt restart`: stop every worker, start
    them again). This notebook's next use finds its workers gone and new ones under the names: it uses those. It used
    to stop them and start its own, whose loss the other notebook's next cell answered the same way."""
    import os
    import subprocess
    import sys

    import kt_jupyter as kt
    from kt_jupyter.backends import get_backend

    compute = kt.Compute(name="ddps").distribute("pytorch", workers=2)
    group = dg.connect_group(compute)
    try:
        old = [conn.handle.pid for conn in group.ranks]
        other = ("import kt_jupyter as kt\nfrom kt_jupyter import distributed_group as dg\n"
                 "dg.delete_group('local', 'ddps', grace_period_s=1)\n"
                 "g = dg.connect_group(kt.Compute(name='ddps').distribute('pytorch', workers=2), keep=True)\n"
                 "print(' '.join(str(c.handle.pid) for c in g.ranks))\n")
        done = subprocess.run([sys.executable, "-c", other], check=False, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        new = [int(p) for p in done.stdout.split()]
        assert len(new) == 2 and not set(new) & set(old)
        events: list[str] = []
        again = dg.connect_group(compute, on_event=events.append)
        assert [conn.handle.pid for conn in again.ranks] == new  # used, not replaced
        assert any("another notebook restarted them" in e for e in events), events
        backend = get_backend("local")
        assert [backend.find(dg.rank_name("ddps", r)).pid for r in range(2)] == new
    finally:
        dg.delete_group("local", "ddps", dg.forget("local", "ddps"), grace_period_s=1)
