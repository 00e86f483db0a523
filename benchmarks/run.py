"""Side-by-side timings of kt_jupyter and its peers, measured in one run on this machine.

    ./dev bench            # full run (1 GB transfers; several minutes)
    ./dev bench --quick    # small sizes and few repetitions (the test suite's smoke run)

Writes benchmarks/results/<timestamp>.json and prints a Markdown table. Every
peer figure (ipyparallel, raw loopback TCP, a plain local cell, a restarted
kernel) is measured in the same run, never copied from elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
#: Each transfer is repeated this many times; the median and the spread (min, max) are reported.
REPS_TRANSFER = 7
#: Rows up to this size take more samples (REPS_SMALL_TRANSFER): a sample costs milliseconds, and a 1 MiB
#: transfer's time swings by half from one sample to the next on a shared machine.
SMALL_TRANSFER_BYTES = 8 << 20
REPS_SMALL_TRANSFER = 21
#: The torch tensor row's size (a --quick run's): tensors take the path arrays take, save their fingerprints,
#: which missed them once (torch's own pickle copied each tensor into the stream: 16x slower than an array).
TENSOR_ROW_BYTES = 100 << 20
TENSOR_ROW_BYTES_QUICK = 8 << 20
#: Before timing one side, wait (at most this long) until the processes of the run are idle: a peer that
#: digests a gigabyte after its call returned (ipyparallel's hub and schedulers do) must not slow the next row.
QUIET_WAIT_S = 5.0
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values."""
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def rate(size: int, samples_s: list[float]) -> dict[str, Any]:
    """MB/s of moving ``size`` bytes: median, and the slowest and fastest of ``samples_s`` (kept, in ms, in the
    order taken)."""
    mb = size / 1e6
    return {"MBps": mb / statistics.median(samples_s), "min_MBps": mb / max(samples_s),
            "max_MBps": mb / min(samples_s), "reps": len(samples_s),
            "samples_ms": [round(x * 1e3, 1) for x in samples_s]}


def wait_quiet(max_busy_cores: float = 0.15, window_s: float = 0.25) -> float:
    """Wait until this process and its children use under ``max_busy_cores`` CPU; seconds waited."""
    me = psutil.Process()
    t0 = time.perf_counter()
    idle = threading.Event()  # never set: its timed wait paces the samples
    while time.perf_counter() - t0 < QUIET_WAIT_S:
        procs = [me, *me.children(recursive=True)]
        before = {}
        for p in procs:
            try:
                before[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        idle.wait(window_s)
        used = 0.0
        for p in procs:
            try:
                used += sum(p.cpu_times()[:2]) - before.get(p.pid, 0.0)
            except psutil.Error:
                pass
        if used / window_s < max_busy_cores + 0.05:  # the sampling itself costs a little
            break
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """p50/p95 in milliseconds of ``reps`` calls of each of ``fns``, taken in turn (a, b, c, a, b, c, ...): on a
    shared box the load of the moment falls on each alike, so their differences hold even when levels drift."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"p50_ms": pct(v, 50), "p95_ms": pct(v, 95), "reps": reps, "samples_ms": v}
            for name, v in samples.items()}


def paired_p50_ms(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The median of a's sample minus b's taken right before it (two entries of one :func:`interleaved`)."""
    return statistics.median(x - y for x, y in zip(a["samples_ms"], b["samples_ms"]))


class PeakRSS:
    """Peak RSS growth of some processes while a block runs (sampled every millisecond)."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.base = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                try:
                    self.peak[i] = max(self.peak[i], p.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def extra(self) -> list[int]:
        """Peak minus starting RSS, per process."""
        return [pk - b for pk, b in zip(self.peak, self.base)]


# ---------------------------------------------------------------------------- peers


def raw_tcp_transfer(payload: np.ndarray, fresh: bool = False) -> float:
    """Seconds to move ``payload`` over loopback TCP into a preallocated buffer (the machine's limit).

    ``fresh``: the receiver allocates new memory inside the timed region, as any
    receiver of a new value must, in the fastest way measured here: an anonymous
    map advised to huge pages, faulted in by a second thread in 32 MiB chunks
    ahead of the bytes, the receive waiting where that thread has not been yet
    (as kt's receives do: ``BundleAssembler.faulting_in``, where the numbers
    are); otherwise the buffer was written before timing.
    """
    view = memoryview(payload).cast("B")
    n = view.nbytes
    dest = None if fresh else bytearray(n)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    done = threading.Event()

    def receive() -> None:
        conn, _ = srv.accept()
        buf = dest if dest is not None else _fresh_map(n)
        got, mv = 0, memoryview(buf)
        ahead = None if dest is not None else _FaultAhead(buf)
        while got < n:
            want = min(n - got, 8 << 20)
            if ahead is not None:
                ahead.wait(got + want)
            got += conn.recv_into(mv[got:], want)
        if ahead is not None:
            ahead.join()
        conn.close()
        done.set()

    t = threading.Thread(target=receive)
    t.start()
    client = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    client.sendall(view)
    done.wait()
    elapsed = time.perf_counter() - t0
    client.close()
    srv.close()
    t.join()
    return elapsed


def _fresh_map(n: int) -> Any:
    """New memory, not faulted in yet, advised to huge pages where the kernel gives them."""
    import mmap

    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class _FaultAhead:
    """A thread faulting a new map in ahead of a receive that waits for it: ``recvpool.populate``, 32 MiB per
    madvise(MADV_POPULATE_WRITE) call (the same calls kt's receives make; no kt protocol around them)."""

    def __init__(self, buf: Any) -> None:
        from pod_kernel import recvpool

        self._done = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=recvpool.populate, args=(buf, None, self._advance), daemon=True)
        self._thread.start()

    def _advance(self, end: int) -> None:
        with self._cond:
            self._done = end
            self._cond.notify_all()

    def wait(self, end: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done >= end)

    def join(self) -> None:
        self._thread.join()


class IPP:
    """An ipyparallel cluster with one local engine."""

    def __init__(self) -> None:
        import ipyparallel as ipp

        t0 = time.perf_counter()
        self.cluster = ipp.Cluster(n=1, log_level=40)
        self.rc = self.cluster.start_and_connect_sync(activate=False)
        self.rc.wait_for_engines(1, timeout=120)
        self.cold_start_s = time.perf_counter() - t0
        self.view = self.rc[0]
        self.engine_pid = self.view.apply_sync(os.getpid)

    def stop(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()


# ---------------------------------------------------------------------------- benchmarks


#: A notebook's values for the round trip with values held: 50 small ones (numbers, strings, lists, dicts,
#: tuples), five 2 MB arrays and a DataFrame of 100,000 rows with a column of strings.
NOTEBOOK_NAMES = [f"v{i}" for i in range(50)] + [f"a{i}" for i in range(5)] + ["df"]
NOTEBOOK_VALUES = "\n".join(
    ["import numpy as np, pandas as pd"]
    + [f"v{i} = " + ["%d" % i, "[1, 2, %d]" % i, "{'a': %d, 'b': 'text'}" % i, "'s%d' * 10" % i, "(%d, 2.5)" % i][i % 5]
       for i in range(50)]
    + [f"a{i} = np.random.default_rng({i}).random(250_000)" for i in range(5)]
    + ["df = pd.DataFrame({'x': np.arange(100_000), 'y': ['s%d' % i for i in range(100_000)]})"])


def bench_kernel_round_trips(reps: int, results: dict[str, Any], worker_counts: tuple[int, ...] = (2, 4),
                             cold_reps: int = 3) -> None:
    """A trivial cell through a real ipykernel: local, %%kt, %%px; then N workers: %%kt --workers N vs %%px on
    N engines, and the time to all ranks ready (the first cell of a new group, launch included) vs an N-engine
    ipyparallel cluster's start."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env=dict(os.environ))
    try:
        def run(code: str) -> float:
            t0 = time.perf_counter()
            reply = kc.execute_interactive(code, timeout=300, output_hook=lambda m: None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"{code!r} failed: {reply['content'].get('evalue')}")
            return time.perf_counter() - t0

        run("%load_ext kt_jupyter")
        run("%%kt --name bench-rt\npass")
        run("import ipyparallel as ipp\nrc = ipp.Cluster(n=1, log_level=40).start_and_connect_sync()\n"
            "rc.wait_for_engines(1, timeout=120)\nrc[:].activate()")
        results["round_trip"] = interleaved({
            "local cell (same ipykernel)": lambda: run("pass"),
            "%%kt (kt_jupyter)": lambda: run("%%kt --name bench-rt\npass"),
            "%%px (ipyparallel, 1 engine)": lambda: run("%%px\npass"),
        }, reps)
        # the same, in a notebook that holds what notebooks hold: every %%kt cell checks it all on the pod
        run(NOTEBOOK_VALUES)
        run("%%kt --name bench-rt\n_held = len([" + ", ".join(NOTEBOOK_NAMES) + "])")
        results["round_trip_held"] = interleaved({
            "local cell (same ipykernel)": lambda: run("pass"),
            "%%kt (kt_jupyter)": lambda: run("%%kt --name bench-rt\npass"),
        }, reps)
        run("%kt down bench-rt")
        run("rc.cluster.stop_cluster_sync()")
        workers: dict[str, Any] = {}
        for n in worker_counts:
            kt_ready, ipp_ready = [], []
            for _ in range(cold_reps):
                wait_quiet()
                kt_ready.append(run(f"%%kt --workers {n} --name bench-w{n}\npass"))
                run(f"%kt down bench-w{n}")
                wait_quiet()
                ipp_ready.append(run(f"rc{n} = ipp.Cluster(n={n}, log_level=40).start_and_connect_sync()\n"
                                     f"rc{n}.wait_for_engines({n}, timeout=120)\nrc{n}[:].execute('pass').get()"))
                run(f"rc{n}.cluster.stop_cluster_sync()")
            run(f"%%kt --workers {n} --name bench-w{n}\npass")
            run(f"rc{n} = ipp.Cluster(n={n}, log_level=40).start_and_connect_sync()\n"
                f"rc{n}.wait_for_engines({n}, timeout=120)\nrc{n}[:].activate(suffix='{n}')")
            wait_quiet()
            workers[str(n)] = {
                "all_ranks_ready_s": {"kt": statistics.median(kt_ready), "kt_max": max(kt_ready),
                                      "ipp": statistics.median(ipp_ready), "ipp_max": max(ipp_ready),
                                      "reps": cold_reps},
                "round_trip": interleaved({
                    f"%%kt --workers {n}": lambda n=n: run(f"%%kt --workers {n} --name bench-w{n}\npass"),
                    f"%%px ({n} engines)": lambda n=n: run(f"%%px{n}\npass"),
                }, reps),
            }
            run(f"%kt down bench-w{n}")
            run(f"rc{n}.cluster.stop_cluster_sync()")
        results["workers"] = workers
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def pod_pool(conn: Any, ns: dict[str, Any]) -> tuple[int, int, int]:
    """The pod's receive pool: receives that reused a buffer so far, spares it faulted in ahead so far, and bytes
    it keeps idle now."""
    conn.run_cell("from pod_kernel import recvpool\n_kt_pool = [recvpool.pool().reused, recvpool.pool().spared, "
                  "recvpool.pool().idle_bytes()]", ns)
    reused, spared, idle = ns.pop("_kt_pool")
    return int(reused), int(spared), int(idle)


def transfer_row(size: int, conn: Any, ns: dict[str, Any], ipp: IPP, reps: int = REPS_TRANSFER,
                 tensor: bool = False) -> dict[str, Any]:
    """One row of :func:`bench_transfers`: every way of moving ``size`` bytes, side by side, ``reps`` times; of
    numpy arrays, or (``tensor``) of torch tensors."""
    from kt_jupyter.connection import TransferOptions

    no_pull = TransferOptions(no_pull=True)
    base = np.random.default_rng(0).integers(0, 255, size=size, dtype=np.uint8)
    reused_before, spared_before, _idle = pod_pool(conn, ns)

    def fresh(i: int) -> Any:
        array = base + np.uint8(i + 1)  # a new array, other bytes throughout, written before it moves
        if tensor:
            import torch

            return torch.from_numpy(array)
        return array

    def full(i: int) -> str:  # code that makes a fresh value of ``size`` bytes there
        if tensor:
            return f"torch.full(({size},), {i % 250}, dtype=torch.uint8)"
        return f"np.full({size}, {i % 250}, np.uint8)"

    # each way: (set up sample i, untimed) -> (move it, timed); peak memory is sampled around the move only
    def kt_push_setup(i: int) -> None:
        ns["a"] = fresh(i)

    def kt_push() -> None:
        conn.run_cell("n = a.nbytes", ns)

    def kt_pull_setup(i: int) -> None:
        ns.pop("b", None)
        conn.run_cell(f"b = {full(i)}", ns, transfer=no_pull)

    def kt_pull() -> None:
        conn.pull(["b"], ns)
        assert ns["b"].nbytes == size

    staged: dict[str, Any] = {}

    def ipp_push_setup(i: int) -> None:
        staged["a"] = fresh(i)

    def ipp_push() -> None:
        ipp.view.push({"a": staged.pop("a")}, block=True)

    def ipp_pull_setup(i: int) -> None:
        staged.pop("b", None)
        ipp.view.execute(f"b = {full(i)}", block=True)

    def ipp_pull() -> None:
        staged["b"] = ipp.view.pull("b", block=True)
        assert staged["b"].nbytes == size

    def no_setup(i: int) -> None:
        pass

    # the limits time themselves (from the first byte sent; not the socket's setup)
    limits = {"raw_tcp": (no_setup, lambda: raw_tcp_transfer(base)),
              "raw_tcp_fresh_memory": (no_setup, lambda: raw_tcp_transfer(base, fresh=True))}
    ways = {"kt_push": (kt_push_setup, kt_push), "kt_pull": (kt_pull_setup, kt_pull),
            "ipp_push": (ipp_push_setup, ipp_push), "ipp_pull": (ipp_pull_setup, ipp_pull)}
    samples: dict[str, list[float]] = {name: [] for name in (*limits, *ways)}
    # interleaved, the limits too: the load of a shared box (raw TCP's own 1 GiB time swung 0.47-0.74 s in one
    # row here) falls on every way alike, so the ratios hold when the box's speed drifts
    for i in range(reps):
        for name, (setup, move) in {**limits, **ways}.items():
            setup(i)
            gc.collect()
            wait_quiet()
            t0 = time.perf_counter()
            took = move()
            samples[name].append(took if name in limits else time.perf_counter() - t0)
    staged.clear()
    ipp.view.execute("del a, b", block=True)
    peaks = {}
    for name in ("kt_push", "kt_pull"):
        setup, move = ways[name]
        setup(reps)
        gc.collect()
        wait_quiet()
        with PeakRSS(os.getpid(), conn.handle.pid) as mem:
            move()
        peaks[name] = mem.extra()
    ns.pop("b", None)
    reused, spared, idle = pod_pool(conn, ns)
    reuse = {"pod_receives_into_reused_buffers": reused - reused_before,
             "pod_spares_faulted_ahead": spared - spared_before, "pod_idle_pool_bytes": idle}
    row: dict[str, Any] = {name: rate(size, v) for name, v in samples.items()}
    row.update(reuse)
    for side in ("push", "pull"):
        row[f"kt_{side}_vs_tcp"] = row[f"kt_{side}"]["MBps"] / row["raw_tcp"]["MBps"]
        row[f"kt_{side}_vs_tcp_fresh"] = row[f"kt_{side}"]["MBps"] / row["raw_tcp_fresh_memory"]["MBps"]
        row[f"kt_{side}_vs_ipp"] = row[f"kt_{side}"]["MBps"] / row[f"ipp_{side}"]["MBps"]
    for name, (notebook, pod) in peaks.items():  # a pull's notebook side holds the value it fetched: 1.0 is none extra
        row[f"{name}_peak_extra_x_payload"] = {"notebook": notebook / size, "pod": pod / size}
    ns.pop("a", None)
    conn.run_cell("pass", ns)  # the notebook's `a` is gone: so is the pod's
    return row


def bench_transfers(sizes: list[int], ipp: IPP, results: dict[str, Any], quick: bool = False) -> None:
    """Push and pull of fresh numpy arrays, and a row of torch tensors, along the user's path: kt vs ipyparallel
    vs raw loopback TCP.

    kt push: a ``%%kt`` cell that reads a fresh array of the notebook (``conn.run_cell``: fingerprint, send,
    run, reconcile). kt pull: ``%kt pull b`` of a fresh array a cell made there (``conn.pull``). ipyparallel:
    ``view.push`` and ``view.pull`` (what ``%%px`` users call). Every sample moves a new array into new
    memory; each side is timed only once the processes of the run are idle. Peak memory comes from one extra,
    untimed repetition (sampling RSS every millisecond costs CPU the timed runs must not lose).
    """
    from kt_jupyter import connection as conn_mod
    from kt_jupyter.backends import get_backend
    from kt_jupyter.compute import Compute

    conn = conn_mod.connect(Compute(name="bench-xfer"))
    ns: dict[str, Any] = {}
    conn.run_cell("import numpy as np, torch", ns)
    ipp.view.execute("import numpy as np, torch", block=True)
    rows = {}
    try:
        for size in sizes:
            reps = REPS_SMALL_TRANSFER if size <= SMALL_TRANSFER_BYTES and not quick else REPS_TRANSFER
            rows[f"{size / 2**20:g} MiB"] = transfer_row(size, conn, ns, ipp, reps)
        size = TENSOR_ROW_BYTES_QUICK if quick else TENSOR_ROW_BYTES  # what ML users move: a torch tensor
        rows[f"{size / 2**20:g} MiB torch tensor"] = transfer_row(size, conn, ns, ipp, REPS_TRANSFER, tensor=True)
    finally:
        conn_mod.disconnect("bench-xfer")
        get_backend("local").delete("bench-xfer")
    results["transfers"] = rows


def bench_first_transfer(size: int, results: dict[str, Any], reps: int = 3) -> None:
    """The first push and the first pull of a new array into a new pod kernel: no receive buffer of that size to
    reuse on either side, as when a notebook sends its dataset once. Each sample starts a new compute, and this
    process's receive pool is emptied first; raw TCP into fresh memory is measured in turn with them (the
    transfer rows' samples after their first reuse buffers, and did not show what this costs)."""
    from kt_jupyter import connection as conn_mod
    from kt_jupyter.backends import get_backend
    from kt_jupyter.compute import Compute
    from kt_jupyter.connection import TransferOptions

    base = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    samples: dict[str, list[float]] = {"kt_push": [], "kt_pull": [], "raw_tcp_fresh_memory": []}

    def on_new_pod(i: int, side: str) -> float:
        name = f"bench-first-{side}-{i}"
        empty_receive_pool()  # this process's, as in a new notebook: a pull would reuse the last pull's buffer
        conn = conn_mod.connect(Compute(name=name))
        ns: dict[str, Any] = {}
        try:
            conn.run_cell("import numpy as np", ns)
            if side == "push":
                ns["a"] = base + np.uint8(i + 1)
            else:
                conn.run_cell(f"b = np.full({size}, {i % 250 + 1}, np.uint8)", ns,
                              transfer=TransferOptions(no_pull=True))
            gc.collect()
            wait_quiet()
            t0 = time.perf_counter()
            if side == "push":
                conn.run_cell("n = a.nbytes", ns)
            else:
                conn.pull(["b"], ns)
            elapsed = time.perf_counter() - t0
            assert (ns["n"] if side == "push" else ns["b"].nbytes) == size
            return elapsed
        finally:
            ns.clear()
            conn_mod.disconnect(name)
            get_backend("local").delete(name)

    def empty_receive_pool() -> None:
        from pod_kernel import recvpool

        pool = recvpool.pool()
        cap, pool.cap_bytes = pool.cap_bytes, 0
        try:
            pool.trim()  # every free map is over a cap of 0
        finally:
            pool.cap_bytes = cap

    def tcp(i: int) -> float:  # a new array sent into new memory, as a push does (the new array takes memory too)
        payload = base + np.uint8(i + 1)
        gc.collect()
        wait_quiet()
        return raw_tcp_transfer(payload, fresh=True)

    ways: list[tuple[str, Callable[[int], float]]] = [
        ("kt_push", lambda i: on_new_pod(i, "push")), ("kt_pull", lambda i: on_new_pod(i, "pull")),
        ("raw_tcp_fresh_memory", tcp)]
    for i in range(reps):  # each way goes first in turn: the memory the one before freed is the cheapest to get
        for name, way in ways[i % 3:] + ways[:i % 3]:
            samples[name].append(way(i))
    row: dict[str, Any] = {"size_bytes": size, **{k: rate(size, v) for k, v in samples.items()}}
    for side in ("push", "pull"):
        row[f"kt_{side}_vs_tcp_fresh"] = row[f"kt_{side}"]["MBps"] / row["raw_tcp_fresh_memory"]["MBps"]
    results["first_transfer"] = row


def bench_unchanged_rerun(size: int, results: dict[str, Any], rounds: int = 3, reruns: int = 5) -> None:
    """The same %%kt cell again with a big unchanged global: the rerun must not resend it.

    Each round binds a new array (so the first run of the cell sends it), then reruns
    the cell ``reruns`` times; first and rerun times are medians over all of them.
    """
    from kt_jupyter import connection as conn_mod
    from kt_jupyter.backends import get_backend
    from kt_jupyter.compute import Compute

    conn = conn_mod.connect(Compute(name="bench-rerun"))
    cell = "s = float(big[:10].sum())"
    firsts, seconds = [], []
    try:
        for k in range(rounds):
            ns = {"big": np.full(size // 8, float(k))}
            t0 = time.perf_counter()
            first = conn.run_cell(cell, ns)
            firsts.append(time.perf_counter() - t0)
            assert first.bytes_pushed >= size
            for _ in range(reruns):
                t0 = time.perf_counter()
                second = conn.run_cell(cell, ns)
                seconds.append(time.perf_counter() - t0)
                assert second.bytes_pushed == 0 and "big" in second.skipped_unchanged
            del ns
            gc.collect()
    finally:
        conn_mod.disconnect("bench-rerun")
        get_backend("local").delete("bench-rerun")
    first_s, second_s = statistics.median(firsts), statistics.median(seconds)
    results["unchanged_rerun"] = {"size_bytes": size, "first_s": first_s, "second_s": second_s,
                                  "ratio": second_s / first_s, "first_runs": len(firsts), "reruns": len(seconds),
                                  "second_p95_s": pct(seconds, 95)}


def bench_hot_reload(reps: int, results: dict[str, Any]) -> None:
    """Edit a local module -> the next fn call sees it; vs restarting the kernel."""
    import importlib

    import kt_jupyter as kt
    from kt_jupyter import connection as conn_mod
    from kt_jupyter.backends import get_backend

    old_cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="kt-bench-reload-"))
    os.chdir(work)
    sys.path.insert(0, str(work))
    try:
        mod = work / "benchmod.py"
        mod.write_text("def f():\n    return 0\n")
        benchmod = importlib.import_module("benchmod")
        remote = kt.fn(benchmod.f, name="bench-reload").to(kt.Compute())
        remote()
        samples = []
        for i in range(1, reps + 1):
            mod.write_text(f"def f():\n    return {i}\n")
            t0 = time.perf_counter()
            assert remote() == i
            samples.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        conn_mod.disconnect("bench-reload")
        get_backend("local").delete("bench-reload")
        remote = kt.fn(benchmod.f, name="bench-reload").to(kt.Compute())
        remote()
        restart_s = time.perf_counter() - t0
        results["hot_reload"] = {"edit_to_effect_p50_ms": pct(samples, 50), "edit_to_effect_p95_ms": pct(samples, 95),
                                 "reps": reps, "restart_kernel_ms": restart_s * 1e3}
    finally:
        conn_mod.disconnect("bench-reload")
        get_backend("local").delete("bench-reload")
        os.chdir(old_cwd)
        sys.path.remove(str(work))


def bench_cold_start(reps: int, ipp_cold_s: float, results: dict[str, Any]) -> None:
    """Launch a local pod kernel and get the first result: a fresh process, and the process kept started ahead
    (what a notebook that loaded the extension gets: it had time to start while the user typed the cell)."""
    from kt_jupyter.backends import get_backend
    from kt_jupyter.compute import Compute

    backend = get_backend("local")
    samples: dict[str, list[float]] = {"fresh": [], "prestarted": []}
    ahead = hasattr(backend, "prestart")  # (an older checkout, measured for comparison, has no such thing)
    for kind, taken in samples.items():
        if kind == "prestarted" and ahead:
            backend.prestart()
        for i in range(reps):
            if kind == "prestarted" and ahead:
                backend._spares.ready_pid()
                wait_quiet()  # its imports are done once it is idle
            t0 = time.perf_counter()
            handle = backend.launch(Compute(name=f"bench-cold-{i}"))
            session = handle.session()
            session.execute("1")
            taken.append(time.perf_counter() - t0)
            session.close()
            backend.delete(f"bench-cold-{i}", grace_period_s=1)
    if ahead:
        backend.stop_prestart()
    results["cold_start"] = {"kt_p50_s": pct(samples["prestarted"], 50), "kt_p95_s": pct(samples["prestarted"], 95),
                             "fresh_process_p50_s": pct(samples["fresh"], 50),
                             "fresh_process_p95_s": pct(samples["fresh"], 95), "reps": reps,
                             "ipyparallel_cluster_s": ipp_cold_s}


def _add(x: int, y: int) -> int:
    return x + y


def bench_fn_call(reps: int, ipp: IPP, results: dict[str, Any]) -> None:
    """Seed-API call overhead vs ipyparallel apply_sync."""
    import kt_jupyter as kt
    from kt_jupyter.backends import get_backend

    remote = kt.fn(_add, name="bench-fn").to(kt.Compute())
    try:
        results["fn_call"] = interleaved({
            "kt.fn call (json)": lambda: remote(1, 2),
            "kt.fn call (pickle)": lambda: remote(1, 2, serialization="pickle"),
            "ipyparallel apply_sync": lambda: ipp.view.apply_sync(_add, 1, 2),
        }, reps)
    finally:
        get_backend("local").delete("bench-fn")


# ---------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    out = [f"Machine: {results['machine']}", ""]
    if "round_trip" in results:
        rt = results["round_trip"]
        kt_ = rt["%%kt (kt_jupyter)"]["p50_ms"]
        px = rt["%%px (ipyparallel, 1 engine)"]["p50_ms"]
        out += ["| warm trivial cell via ipykernel | p50 ms | p95 ms | reps |", "|---|---|---|---|"]
        out += [f"| {k} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {v['reps']} |" for k, v in rt.items()]
        above = paired_p50_ms(rt["%%kt (kt_jupyter)"], rt["local cell (same ipykernel)"])
        out += [f"| **%%kt / %%px (target <= 0.5)** | **{kt_ / px:.2f}** | | |",
                (f"| **%%kt above a local cell, median of paired differences (target <= 1.0 ms)** | **{above:.2f}** "
                "| | |")]
        if "round_trip_held" in results:
            held = results["round_trip_held"]
            out.append("| %%kt above a local cell, the notebook holding 50 small values, five 2 MB arrays and a "
                       "100k-row DataFrame on the pod (paired) | "
                       f"{paired_p50_ms(held['%%kt (kt_jupyter)'], held['local cell (same ipykernel)']):.2f} | | "
                       f"{held['%%kt (kt_jupyter)']['reps']} |")
        out.append("")
    if "workers" in results:
        out += [("| N workers, via ipykernel | all ranks ready s: %%kt --workers N (median, max) "
                "| ipyparallel N engines started and answering s (median, max) | warm cell p50 ms: %%kt --workers N "
                "| %%px on N engines | p95 ms: kt, px |"), "|---|---|---|---|---|---|"]
        for n, w in results["workers"].items():
            ready, rt_ = w["all_ranks_ready_s"], list(w["round_trip"].values())
            out.append(f"| {n} | {ready['kt']:.2f}, {ready['kt_max']:.2f} | {ready['ipp']:.2f}, {ready['ipp_max']:.2f} "
                       f"| {rt_[0]['p50_ms']:.2f} | {rt_[1]['p50_ms']:.2f} | {rt_[0]['p95_ms']:.2f}, "
                       f"{rt_[1]['p95_ms']:.2f} |")
        out.append("")
    def mbps(r: dict[str, float]) -> str:
        return f"{r['MBps']:.0f} ({r['min_MBps']:.0f}-{r['max_MBps']:.0f})"

    if "transfers" in results:
        out += [("MB/s, median of the row's fresh arrays (slowest-fastest; how many: after the size); kt push = a "
                 "%%kt cell reading the array, kt pull = `%kt pull`; ipyparallel = view.push / view.pull; "
                 "the torch row moves torch tensors (uint8) the same ways"), "",
                ("| array | raw TCP | raw TCP, fresh memory | kt push | kt pull | ipp push | ipp pull "
                "| kt/TCP push, pull (target >= 0.8) | kt/TCP-fresh push, pull | kt/ipp push, pull "
                "| kt peak extra x payload (notebook, pod) |"),
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for size, r in results["transfers"].items():
            pe, pu = r["kt_push_peak_extra_x_payload"], r["kt_pull_peak_extra_x_payload"]
            out.append(
                f"| {size} ({r['kt_push']['reps']}) | {mbps(r['raw_tcp'])} | {mbps(r['raw_tcp_fresh_memory'])} "
                f"| {mbps(r['kt_push'])} "
                f"| {mbps(r['kt_pull'])} | {mbps(r['ipp_push'])} | {mbps(r['ipp_pull'])} "
                f"| {r['kt_push_vs_tcp']:.2f}, {r['kt_pull_vs_tcp']:.2f} "
                f"| {r['kt_push_vs_tcp_fresh']:.2f}, {r['kt_pull_vs_tcp_fresh']:.2f} "
                f"| {r['kt_push_vs_ipp']:.2f}, {r['kt_pull_vs_ipp']:.2f} "
                f"| push {pe['notebook']:.2f}, {pe['pod']:.2f}; pull {pu['notebook']:.2f}, {pu['pod']:.2f} |")
        out.append("")
        out += ["The pod's receives into a reused buffer (recvpool.py: one whose value was gone, or a spare it faulted "
                "in ahead after a receive into fresh memory; the others faulted fresh memory in), the spares it made, "
                "and the memory its pool kept idle after the row: " + "; ".join(
                    f"{size}: {r['pod_receives_into_reused_buffers']} of {r['kt_push']['reps'] + 1} pushes, "
                    f"{r.get('pod_spares_faulted_ahead', 0)} spare(s), {r['pod_idle_pool_bytes'] / 2**20:.0f} MiB idle"
                    for size, r in results["transfers"].items() if "pod_idle_pool_bytes" in r), ""]
    if "first_transfer" in results:
        r = results["first_transfer"]
        out += [("| first transfer into a new pod kernel (no buffer to reuse) | kt push | kt pull "
                 "| raw TCP, fresh memory | kt/TCP-fresh push, pull |"), "|---|---|---|---|---|",
                (f"| {r['size_bytes'] / 2**20:g} MiB, MB/s ({r['kt_push']['reps']}) | {mbps(r['kt_push'])} "
                 f"| {mbps(r['kt_pull'])} | {mbps(r['raw_tcp_fresh_memory'])} "
                 f"| {r['kt_push_vs_tcp_fresh']:.2f}, {r['kt_pull_vs_tcp_fresh']:.2f} |"), ""]
    if "unchanged_rerun" in results:
        r = results["unchanged_rerun"]
        out += [("| unchanged global re-run | first run s (median) | rerun s (median) | rerun p95 s | runs | "
                "rerun/first (target <= 0.05) |"),
                "|---|---|---|---|---|---|",
                (f"| {r['size_bytes'] / 2**20:g} MiB | {r['first_s']:.3f} | {r['second_s']:.3f} | "
                f"{r['second_p95_s']:.3f} | {r['first_runs']} + {r['reruns']} | {r['ratio']:.3f} |"), ""]
    if "hot_reload" in results:
        r = results["hot_reload"]
        out += ["| edit local module -> effect | p50 ms | p95 ms | restart kernel instead, ms | reps |",
                "|---|---|---|---|---|",
                (f"| kt.fn call after edit (target <= 50 ms) | {r['edit_to_effect_p50_ms']:.1f} "
                f"| {r['edit_to_effect_p95_ms']:.1f} | {r['restart_kernel_ms']:.0f} | {r['reps']} |"), ""]
    if "cold_start" in results:
        r = results["cold_start"]
        out += ["| cold start to first result | p50 s | p95 s | ipyparallel cluster start s | reps |",
                "|---|---|---|---|---|",
                (f"| local pod kernel, started ahead (target <= 0.1 s) | {r['kt_p50_s']:.3f} | {r['kt_p95_s']:.3f} "
                f"| {r['ipyparallel_cluster_s']:.2f} | {r['reps']} |"),
                (f"| local pod kernel, fresh process | {r.get('fresh_process_p50_s', float('nan')):.3f} "
                f"| {r.get('fresh_process_p95_s', float('nan')):.3f} | | {r['reps']} |"), ""]
    if "fn_call" in results:
        out += ["| call overhead | p50 ms | p95 ms | reps |", "|---|---|---|---|"]
        out += [f"| {k} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {v['reps']} |" for k, v in results["fn_call"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run everything; write JSON; print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    p.add_argument("--out", default=None, help="JSON file to write (default benchmarks/results/<time>.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("KT_HOME", tempfile.mkdtemp(prefix="kt-bench-home-"))
    reps = 10 if args.quick else 200
    sizes = [2**20, 8 * 2**20] if args.quick else [2**20, 100 * 2**20, 2**30]
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {psutil.cpu_count()} CPUs, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ipp = IPP()
    try:
        bench_kernel_round_trips(reps, results, worker_counts=(2,) if args.quick else (2, 4),
                                 cold_reps=1 if args.quick else 3)
        bench_transfers(sizes, ipp, results, quick=args.quick)
        bench_fn_call(reps, ipp, results)
    finally:
        ipp.stop()
    bench_first_transfer(8 * 2**20 if args.quick else 2**30, results, reps=1 if args.quick else 3)
    bench_unchanged_rerun(8 * 2**20 if args.quick else 2**30, results)
    bench_hot_reload(5 if args.quick else 30, results)
    bench_cold_start(2 if args.quick else 10, ipp.cold_start_s, results)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n[results written to {out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
