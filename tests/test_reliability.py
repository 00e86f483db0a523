"""Faults and load: a killed, cut, restarted, frozen or out-of-memory pod kernel; many cells, floods, crowds.

Every test runs real pod kernel processes on 127.0.0.1 and waits on events,
messages or conditions with deadlines, never on sleeps. The figures they
measure (faults survived, lines lost, memory bounds) go to
``test-artifacts/reliability.json`` and are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from barriers import wait_until
from figures import bump, record
from ipshell import run
from kernels import notebook_kernel_process
from tcp_proxy import DropProxy

from kt_jupyter import connection as conn_mod
from kt_jupyter import oom
from kt_jupyter.backends import get_backend
from kt_jupyter.client import Session
from kt_jupyter.compute import Compute
from kt_jupyter.errors import ConnectionLostError, KernelDiedError, OutOfMemoryError, RemoteError
from pod_kernel import outbox as outbox_mod
from pod_kernel import protocol as P

MiB = 1 << 20


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    return psutil.Process(pid).memory_info().rss




class Fifo:
    """A named pipe a remote cell blocks on (``readline``) until the test releases it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR)  # opening read-write never blocks, so the cell's open() returns

    def release(self) -> None:
        """Let the cell's next ``readline()`` return."""
        os.write(self._fd, b"\n")

    def close(self) -> None:
        os.close(self._fd)


class Signal:
    """A named pipe the remote cell writes to and the test waits on, with a deadline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    def wait_line(self, timeout_s: float) -> str:
        """The next line the cell wrote; fails the test after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no signal from the remote cell within {timeout_s} s"
            readable, _, _ = select.select([self._fd], [], [], remaining)
            if readable:
                self._buf += os.read(self._fd, 4096)
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self._fd)


# ============================================================================ faults


@pytest.mark.parametrize("how, expected", [("sigkill", "SIGKILL"), ("exit3", "exited with code 3")])
def test_kernel_killed_mid_cell_is_named_then_relaunch_says_state_lost(how, expected, cleanup_connections):
    events: list[str] = []
    compute = Compute(name="victim")
    conn = conn_mod.connect(compute, on_event=events.append)
    ns: dict = {}
    conn.run_cell("state = 'precious'", ns)
    old_pid = conn.handle.pid
    code = ("import os, sys, time\nprint('last words before dying', flush=True)\n"
            + ("time.sleep(120)" if how == "sigkill" else "os._exit(3)"))

    def on_output(msg):
        if how == "sigkill" and "last words" in msg.get("text", ""):
            os.kill(old_pid, signal.SIGKILL)  # from outside, while the cell runs

    t0 = time.monotonic()
    with pytest.raises(KernelDiedError) as info:
        conn.run_cell(code, ns, on_output=on_output)
    noticed_s = time.monotonic() - t0
    msg = str(info.value)
    assert expected in msg and "'victim'" in msg and "variables are lost" in msg
    assert "last words before dying" in msg  # the last log lines come with it
    assert noticed_s < 10

    events.clear()
    again = conn_mod.connect(compute, on_event=events.append)
    assert again.handle.pid != old_pid
    assert any("variables are lost" in e for e in events), events
    assert again.run_cell("'state' in globals()", {}).result.data == {"text/plain": "False"}
    bump("faults", f"kernel_{how}_survived")
    record("faults", f"kernel_{how}_noticed_s", round(noticed_s, 3))


def test_connection_cut_mid_cell_many_times_loses_nothing(kernel, kt_home):
    """A TCP proxy between client and kernel is cut again and again while a cell streams output."""
    handle, _ = kernel
    port = int(handle.url.rsplit(":", 1)[1])
    rounds, lines_per_round = 6, 1500
    gate = Fifo(kt_home / "gate")
    with DropProxy("127.0.0.1", port) as proxy:
        s = Session(proxy.url, handle.token, name="proxied", liveness=handle.liveness)
        code = textwrap.dedent(f"""
            gate = open({str(gate.path)!r})
            n = 0
            for r in range({rounds}):
                for i in range({lines_per_round}):
                    print(f"{{n:07d}} " + "x" * (n % 200), flush=(i % 7 == 0))
                    n += 1
                print(f"round {{r}} done", flush=True)
                gate.readline()  # the test cuts the connection, then lets the next round go
            ('finished', n)
        """)
        received: list[str] = []
        cuts = {"between_rounds": 0, "mid_stream": 0}

        def on_output(msg):
            if msg["type"] != "stream":
                return
            received.append(msg["text"])
            last = received[-1].rsplit("\n", 2)
            if received[-1].endswith(" done\n") and last[-2].startswith("round "):
                r = int(last[-2].split()[1])
                proxy.drop()  # cut while the cell waits ...
                cuts["between_rounds"] += 1
                if r % 2 == 0 and r < rounds - 1:  # ... and, every other round, again mid-stream, mid-frame
                    proxy.cut_after_bytes("down", 50_000 + 7_919 * r)
                    cuts["mid_stream"] += 1
                gate.release()

        t0 = time.monotonic()
        result = s.execute(code, on_output=on_output, timeout=120)
        elapsed = time.monotonic() - t0
        s.close()
        gate.close()
    seen = "".join(received).splitlines()
    expected: list[str] = []
    n = 0
    for r in range(rounds):
        for _ in range(lines_per_round):
            expected.append(f"{n:07d} " + "x" * (n % 200))
            n += 1
        expected.append(f"round {r} done")
    assert result.data == {"text/plain": f"('finished', {n})"}
    duplicates = len(seen) - len(set(seen))
    lost = len(set(expected) - set(seen))
    assert duplicates == 0 and lost == 0
    assert seen == expected  # exactly once, in order
    total_cuts = cuts["between_rounds"] + cuts["mid_stream"]
    assert proxy.drops == total_cuts
    assert s.reconnects >= total_cuts
    bump("faults", "connection_cuts_survived", total_cuts)
    record("faults", "cut_test_lines", len(expected))
    record("faults", "cut_test_lines_lost", lost)
    record("faults", "cut_test_lines_duplicated", duplicates)
    record("faults", "cut_test_seconds", round(elapsed, 2))


def test_connection_cut_mid_push_and_mid_pull_is_retried_exactly(kernel):
    """Bundles over the WebSocket (no bulk channel) cut mid-transfer arrive whole after the reconnect."""
    handle, _ = kernel
    port = int(handle.url.rsplit(":", 1)[1])
    arr = np.random.default_rng(7).integers(0, 2**63, size=24 * MiB // 8, dtype=np.int64)
    with DropProxy("127.0.0.1", port) as proxy:
        s = Session(proxy.url, handle.token, name="proxied", liveness=handle.liveness)
        s.connect()
        proxy.cut_after_bytes("up", 9 * MiB + 123)
        assert s.push({"arr": arr}) == ["arr"]
        assert proxy.drops == 1 and s.reconnects == 1
        proxy.cut_after_bytes("down", 13 * MiB + 321)
        back = s.pull(["arr"])["arr"]
        assert proxy.drops == 2 and s.reconnects == 2
        assert np.array_equal(back, arr)
        assert s.execute("int(arr[-1])").data == {"text/plain": str(int(arr[-1]))}
        s.close()
    bump("faults", "connection_cuts_survived", 2)


def test_frozen_kernel_is_noticed_by_the_heartbeat_within_bound(kernel):
    """SIGSTOP: the process lives but answers nothing; the client says so within a bounded time."""
    handle, _ = kernel
    interval_s, timeout_s, reconnect_s = 0.5, 1.0, 2.0
    s = handle.session(heartbeat_interval_s=interval_s, heartbeat_timeout_s=timeout_s,
                       reconnect_timeout_s=reconnect_s)
    s.execute("kept = 'still here'")
    stopped_at: list[float] = []

    def on_output(msg):
        if "frozen next" in msg.get("text", "") and not stopped_at:
            os.kill(handle.pid, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

    try:
        with pytest.raises(ConnectionLostError) as info:
            s.execute("import time\nprint('frozen next', flush=True)\ntime.sleep(60)", on_output=on_output,
                      timeout=60)
        noticed_s = time.monotonic() - stopped_at[0]
    finally:
        os.kill(handle.pid, signal.SIGCONT)
    assert handle.session().interrupt()  # the sleeping cell, so the next one need not wait for it
    msg = str(info.value)
    assert "answered no heartbeat for 1 s" in msg and "%kt status" in msg
    # ping interval + ping timeout + close timeout (= ping timeout) + reconnect window, and slack for CI
    bound_s = interval_s + timeout_s + timeout_s + reconnect_s + 3.0
    assert noticed_s < bound_s, f"noticed after {noticed_s:.1f} s"
    # thawed, the kernel and its state are intact: the same name reattaches
    fresh = handle.session()
    assert fresh.execute("kept").data == {"text/plain": "'still here'"}
    fresh.close()
    bump("faults", "frozen_kernel_noticed")
    record("faults", "frozen_kernel_noticed_s", round(noticed_s, 2))
    record("faults", "frozen_kernel_bound_s", bound_s)


# ---------------------------------------------------------------------------- notebook restart


def nb_run(kc, code: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Execute in the notebook kernel: (reply content, iopub messages other than status)."""
    msgs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    return reply["content"], [m for m in msgs if m["msg_type"] != "status"]


def nb_result(kc, code: str) -> str:
    reply, msgs = nb_run(kc, code)
    assert reply["status"] == "ok", reply
    results = [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"]
    return results[-1] if results else ""


def nb_text(msgs: list[dict], name: str | None = None) -> str:
    """Stream text of one stream (or all)."""
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name))


def nb_said(msgs: list[dict]) -> str:
    """Everything the user reads: streams, and the text of displays (kt's status panel falls back to text)."""
    texts = [nb_text(msgs)]
    texts += [str(m["content"]["data"].get("text/plain", "")) for m in msgs
              if m["msg_type"] in ("display_data", "update_display_data")]
    return "\n".join(texts)


def test_notebook_kernel_restart_reattaches_computes_with_their_state(kt_home, cleanup_connections, local_backend):
    """A notebook kernel restart: the same names reach the warm pod kernels and their state.

    With --keep the pod kernel outlives the notebook kernel for good; without, it
    waits out the grace period (KT_OWNER_GRACE_S) for the restarted kernel to
    reattach, and says so. The next cell on a kernel that is gone says its state is lost.
    """
    with notebook_kernel_process(kt_home, KT_OWNER_GRACE_S="120") as (km, kc):
        assert nb_result(kc, "%%kt --keep --name kept\nimport os\nmodel = {'w': 41}\nos.getpid()")
        kept_pid = int(nb_result(kc, "%%kt --name kept\nos.getpid()"))
        fleeting_pid = int(nb_result(kc, "%%kt --name fleeting\nimport os\nscratch = 1\nos.getpid()"))
        old_notebook_pid = int(nb_result(kc, "import os; os.getpid()"))

        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert int(nb_result(kc, "import os; os.getpid()")) != old_notebook_pid
        nb_run(kc, "%load_ext kt_jupyter")

        assert nb_result(kc, "%%kt --name kept\nmodel['w'] + 1") == "42"
        assert int(nb_result(kc, "%%kt --name kept\nos.getpid()")) == kept_pid

        reply, msgs = nb_run(kc, "%%kt --name fleeting\n(scratch, os.getpid())")
        assert reply["status"] == "ok", reply
        assert [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"] == [
            f"(1, {fleeting_pid})"]
        assert "reattached to pod kernel 'fleeting'" in nb_said(msgs)

        # a pod kernel that is gone: the next cell starts a new one and says the state went with it
        local_backend.delete("fleeting", grace_period_s=1)
        reply, msgs = nb_run(kc, "%%kt --name fleeting\n'scratch' in globals()")
        assert reply["status"] == "ok"
        assert [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"] == ["False"]
        assert "variables are lost" in nb_said(msgs)

        # an output flood through the real notebook path: bounded, and the user is told what was elided
        flood_mb = 100
        t0 = time.monotonic()
        reply, msgs = nb_run(kc, "%%kt --name kept\nimport sys\nblock = ''.join(f'{i:09d}' + 'y' * 90 + chr(10) "
                                 f"for i in range(10_000))\nfor _ in range({flood_mb}):\n    sys.stdout.write(block)\n"
                                 "print('the very end')")
        flood_s = time.monotonic() - t0
        assert reply["status"] == "ok"
        shown = nb_text(msgs, "stdout")
        notes = nb_said(msgs)
        assert len(shown) <= outbox_mod.STREAM_LIMIT_CHARS + outbox_mod.STREAM_TAIL_CHARS
        assert shown.startswith("000000000y") and shown.endswith("the very end\n")
        assert "elided" in notes and "%kt logs" in notes
        record("load", "notebook_flood_mb", flood_mb)
        record("load", "notebook_flood_seconds", round(flood_s, 2))
        record("load", "notebook_flood_chars_shown", len(shown))
    bump("faults", "notebook_restarts_survived")


# ---------------------------------------------------------------------------- out of memory


def test_oom_names_the_limit_state_survives_and_retry_doubles_memory(ip, capsys):
    run(ip, "%%kt --name oom --memory 1Gi\nimport numpy as np\nbefore = 'kept'")
    with pytest.raises(OutOfMemoryError) as info:
        run(ip, "%%kt --name oom --memory 1Gi\nx = np.empty(1536 << 20, dtype=np.uint8)")
    msg = str(info.value)
    assert "memory limit 1Gi" in msg and "'oom'" in msg and "--memory 2Gi" in msg and "--retry-oom" in msg
    assert info.value.memory == "1Gi"
    rendered = "\n".join(info.value._render_traceback_())
    assert "np.empty" in rendered  # the remote line that ran out
    # a MemoryError leaves the kernel and its variables alone
    assert run(ip, "%%kt --name oom --memory 1Gi\nbefore").data == {"text/plain": "'kept'"}
    pid = conn_mod.connect(Compute(name="oom", memory="1Gi")).handle.pid

    capsys.readouterr()
    run(ip, "%%kt --name oom --memory 1Gi --retry-oom\nimport numpy as np\nx = np.empty(1536 << 20, dtype=np.uint8)"
            "\nn = x.nbytes\ndel x")
    err = capsys.readouterr().err
    assert ip.user_ns["n"] == 1536 << 20
    assert "memory=1Gi" in err and "memory=2Gi" in err and "variables are lost" in err
    conn = next(c for c in conn_mod.connections() if c.name == "oom")
    assert conn.compute.memory == "2Gi" and conn.handle.pid != pid
    bump("faults", "oom_retried")


def test_oom_retry_gives_up_after_n_with_every_limit_named(cleanup_connections):
    conn = conn_mod.connect(Compute(name="greedy", memory="256Mi"))
    events: list[str] = []
    with pytest.raises(OutOfMemoryError) as info:
        oom.run_cell(conn, "import numpy as np\nx = np.empty(4 << 30, dtype=np.uint8)", {}, retry_oom=2,
                     on_event=events.append)
    assert info.value.tried == ("256Mi", "512Mi", "1Gi")
    assert "tried memory limits 256Mi, 512Mi, 1Gi" in str(info.value)
    assert len([e for e in events if "ran out of memory" in e]) == 2


def test_oom_classification_and_growth():
    assert oom.is_oom(RemoteError("builtins.MemoryError", "x"))
    assert not oom.is_oom(MemoryError("raised here, in the notebook"))
    remote = MemoryError("from the pod")
    remote.remote_traceback = "..."  # as client.rebuild_exception marks it
    assert oom.is_oom(remote)
    assert oom.is_oom(KernelDiedError("pod kernel 'x' was OOMKilled (exit 137)"))
    assert not oom.is_oom(KernelDiedError("pod kernel 'x' was killed by SIGTERM"))
    assert oom.grown_memory(Compute(name="g", memory="1Gi")) == "2Gi"
    assert oom.grown_memory(Compute(name="g", memory="300Mi"), max_bytes=400 * MiB) == "400Mi"
    assert oom.grown_memory(Compute(name="g")) is None  # no limit: nothing to grow
    no_limit = oom.oom_error(RemoteError("MemoryError", ""), Compute(name="g"))
    assert "no memory limit" in str(no_limit)


def test_push_larger_than_the_memory_limit_is_refused_not_retried_forever(local_backend):
    h = local_backend.launch(Compute(name="small", memory="512Mi"))
    s = h.session(reconnect_timeout_s=5)
    s.connect()
    with pytest.raises(MemoryError, match="does not fit"):  # refused, by name: a MemoryError here too
        s._run(s.apush({"big": np.ones(96 * MiB)}), timeout=3)  # 768 MiB
    assert s.reconnects == 0


def test_a_cell_sent_right_behind_its_push_does_not_run_when_the_push_is_refused(local_backend, monkeypatch):
    """The execute follows the push without waiting for its reply (``after``: one round trip less); a push the
    pod refuses fails the cell at once, unrun, with the push's own error, and the next cell runs normally."""
    headers: list[dict] = []
    until_reply = Session._until_reply

    async def recording(self, header, *args, **kwargs):
        headers.append(dict(header))
        return await until_reply(self, header, *args, **kwargs)

    monkeypatch.setattr(Session, "_until_reply", recording)
    conn = conn_mod.connect(Compute(name="behind", memory="512Mi"))
    ns: dict = {"small": np.arange(3 * MiB // 8)}
    conn.run_cell("total = int(small.sum())", ns)
    push, execute = [h for h in headers if h["type"] in ("push", "execute")][-2:]
    assert execute["after"] == push["id"] and ns["total"] == int(np.arange(3 * MiB // 8).sum())
    ns["big"] = np.ones(96 * MiB)  # 768 MiB: more than the pod may hold
    t0 = time.monotonic()
    with pytest.raises(MemoryError, match="does not fit"):
        conn.run_cell("ran = True\nn = big.nbytes", ns)
    assert time.monotonic() - t0 < 10  # not the execute's wait for a push that will never come
    del ns["big"]
    conn.run_cell("ran_before = 'ran' in dir()", ns)
    assert ns["ran_before"] is False and "ran" not in ns


def test_the_execute_goes_on_the_wire_after_its_push(local_backend, monkeypatch):
    """The notebook's thread hands the push and the execute that follows it to the client loop without waiting
    between them; the loop still sends the execute only after the push's header (bulk) or all of its frames
    (WebSocket), so the pod meets the values first."""
    from websockets.asyncio.client import ClientConnection

    sent: list[str] = []
    real_send = ClientConnection.send

    async def recording(self, message, *args, **kwargs):
        if isinstance(message, (bytes, bytearray, memoryview)):
            header, _ = P.decode_frame(bytes(message))
            sent.append(header["type"] + ("/bulk" if header.get("bulk") else ""))
        return await real_send(self, message, *args, **kwargs)

    monkeypatch.setattr(ClientConnection, "send", recording)
    until_reply = Session._until_reply

    async def push_held_up(self, header, *args, **kwargs):  # as when its connection is being opened again
        if header["type"] == "push":
            await asyncio.sleep(0.05)
        return await until_reply(self, header, *args, **kwargs)

    monkeypatch.setattr(Session, "_until_reply", push_held_up)
    conn = conn_mod.connect(Compute(name="order"))
    for size, push in ((3 * MiB, "push/bulk"), (64 * 1024, "push")):  # bulk channel; WebSocket frames
        ns: dict = {"v": np.arange(size // 8)}
        sent.clear()
        conn.run_cell("total = int(v.sum())", ns)
        assert ns["total"] == int(np.arange(size // 8).sum())
        moves = [t for t in sent if t.startswith(("push", "execute", "chunk"))]
        assert moves[0] == push and moves[-1] == "execute", sent


def test_a_replaced_pushed_value_is_freed_on_the_pod(local_backend):
    """What the pod keeps of a push for the execute that follows it is names, not values: the array a later push
    replaces dies at once (its memory is then free to reuse), whether or not a cell followed it."""
    conn = conn_mod.connect(Compute(name="freed"))
    ns: dict = {"arr": np.ones(2 * MiB // 8)}  # the bulk channel: the pod unpickles it in the transfer thread
    conn.run_cell("import weakref, gc\n_first = weakref.ref(arr)", ns)
    ns["arr"] = np.zeros(2 * MiB // 8)
    conn.run_cell("gc.collect()\nfreed = _first() is None and float(arr.sum()) == 0.0", ns)  # reads the new arr
    assert ns["freed"] is True


class _FailsToUnpickle:
    """Pickles here; unpickling it there raises ValueError (``int("not a number")``)."""

    def __reduce__(self):
        return int, ("not a number",)


def test_a_cell_queued_behind_a_push_whose_values_cannot_be_loaded_does_not_run(local_backend):
    conn = conn_mod.connect(Compute(name="unloadable"))
    ns: dict = {"arr": np.ones(2 * MiB // 8), "odd": _FailsToUnpickle()}  # 2 MiB: the bulk channel's thread loads it
    with pytest.raises(ValueError, match="not a number"):
        conn.run_cell("ran = True\nx = (arr.sum(), odd)", ns)
    del ns["odd"]
    conn.run_cell("ran_before = 'ran' in dir()\ntotal = float(arr.sum())", ns)
    assert ns["ran_before"] is False and ns["total"] == 2 * MiB // 8


# ============================================================================ load


def test_ten_thousand_cells_without_memory_growth(kernel):
    handle, s = kernel
    total = 10_000
    marks: dict[int, tuple[int, int]] = {}
    t0 = time.perf_counter()
    for i in range(1, total + 1):
        r = s.execute(f"x = {i}\nx + 1", cell_label=f"In[{i}]")
        assert r.data == {"text/plain": str(i + 1)}
        if i in (1000, total):
            gc.collect()
            marks[i] = (rss(handle.pid), rss(os.getpid()))
    elapsed = time.perf_counter() - t0
    # IPython's per-cell names (_iN, _N) are kept for the last 1000 cells only: the namespace is bounded too
    assert int(s.execute("len(globals())").data["text/plain"]) < 2 * 1000 + 100
    # and so are the traceback labels ("Cell In[7]") the pod's compiler keeps per cell
    assert int(s.execute("len(get_ipython().compile.labels)").data["text/plain"]) <= 1000
    kernel_growth = marks[total][0] - marks[1000][0]
    client_growth = marks[total][1] - marks[1000][1]
    record("load", "cells", total)
    record("load", "cells_seconds", round(elapsed, 2))
    record("load", "cell_round_trip_ms", round(1000 * elapsed / total, 3))
    record("load", "kernel_rss_at_1000_mib", round(marks[1000][0] / MiB, 1))
    record("load", "kernel_rss_at_10000_mib", round(marks[total][0] / MiB, 1))
    record("load", "client_rss_at_1000_mib", round(marks[1000][1] / MiB, 1))
    record("load", "client_rss_at_10000_mib", round(marks[total][1] / MiB, 1))
    # The pod kernel keeps, per cell, what IPython keeps (In/Out history, the cell's source for tracebacks:
    # about 1.5 KiB for these cells, measured on a plain InteractiveShell) plus the session's replay entries
    # (bounded by REPLAY_BYTES). Bound: 4 KiB per cell. The notebook side keeps nothing per cell.
    assert kernel_growth < 9000 * 4096, f"pod kernel grew {kernel_growth / MiB:.1f} MiB over 9000 cells"
    assert client_growth < 8 * MiB, f"client grew {client_growth / MiB:.1f} MiB over 9000 cells"
    record("load", "kernel_growth_per_cell_bytes", round(kernel_growth / 9000))
    record("load", "kernel_growth_bound_per_cell_bytes", 4096)
    record("load", "client_growth_1000_to_10000_mib", round(client_growth / MiB, 2))
    record("load", "client_growth_bound_mib", 8)


def test_output_flood_is_bounded_live_and_says_what_was_elided(kernel):
    handle, s = kernel
    flood_mb = 100
    line_chars = 100
    lines_per_block = 10_000
    code = textwrap.dedent(f"""
        import sys
        for b in range({flood_mb}):
            sys.stdout.write(''.join(f'{{b * {lines_per_block} + i:09d}}' + 'z' * {line_chars - 10} + chr(10)
                                     for i in range({lines_per_block})))
        print('last line')
        'flood done'
    """)
    stop = threading.Event()
    peaks = {"client": rss(os.getpid()), "kernel": rss(handle.pid)}
    base = dict(peaks)

    def sample():
        while not stop.wait(0.02):
            peaks["client"] = max(peaks["client"], rss(os.getpid()))
            peaks["kernel"] = max(peaks["kernel"], rss(handle.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    shown: list[str] = []
    notices: list[dict] = []
    first_output_at: list[float] = []
    t0 = time.monotonic()

    def on_output(msg):
        if not first_output_at:
            first_output_at.append(time.monotonic() - t0)
        if msg["type"] == "stream":
            shown.append(msg["text"])
        elif msg["type"] == "notice":
            notices.append(msg)

    try:
        r = s.execute(code, on_output=on_output, timeout=300)
        elapsed = time.monotonic() - t0
        s.ping(timeout=5.0)  # still answering: a deadline (RemoteTimeoutError past it), not a figure to beat
    finally:
        stop.set()
        sampler.join()
    assert r.data == {"text/plain": "'flood done'"}
    text = "".join(shown)
    flooded = flood_mb * lines_per_block * line_chars + len("last line\n")
    assert len(text) <= outbox_mod.STREAM_LIMIT_CHARS + outbox_mod.STREAM_TAIL_CHARS
    lines = text.splitlines()
    # the head arrives exactly, in order; the tail ends with the cell's last line
    head = [ln for ln in lines[: outbox_mod.STREAM_LIMIT_CHARS // line_chars - 1]]
    assert head == [f"{i:09d}" + "z" * (line_chars - 10) for i in range(len(head))]
    assert lines[-1] == "last line" and lines[-2] == f"{flood_mb * lines_per_block - 1:09d}" + "z" * (line_chars - 10)
    started = [n for n in notices if n.get("elided_start")]
    summary = [n for n in notices if "elided_chars" in n]
    assert len(started) == 1 and len(summary) == 1
    assert summary[0]["elided_chars"] + len(text) == flooded
    assert "%kt logs" in summary[0]["text"]
    client_peak = peaks["client"] - base["client"]
    kernel_peak = peaks["kernel"] - base["kernel"]
    assert client_peak < 64 * MiB  # the notebook side; the pod side: test_pod_kernel_keeps_no_cell_output
    assert first_output_at[0] < elapsed
    assert f"{flood_mb * lines_per_block - 1:09d}" in get_backend("local").logs("t", tail=30)  # all of it logged
    record("load", "flood_mb", flood_mb)
    record("load", "flood_seconds", round(elapsed, 2))
    record("load", "flood_chars_shown", len(text))
    record("load", "flood_chars_elided", summary[0]["elided_chars"])
    record("load", "flood_client_rss_peak_growth_mib", round(client_peak / MiB, 1))
    record("load", "flood_kernel_rss_peak_growth_mib", round(kernel_peak / MiB, 1))
    record("load", "flood_bound_mib", 64)


def test_pod_kernel_keeps_no_cell_output(kernel):
    handle, s = kernel
    s.execute("1")
    before = rss(handle.pid)
    for _ in range(2):
        s.execute("import sys\nfor _ in range(50):\n    sys.stdout.write(('w' * 99 + chr(10)) * 10_000)",
                  on_output=lambda m: None)
    grown = rss(handle.pid) - before
    record("load", "kernel_rss_growth_after_two_50mb_floods_mib", round(grown / MiB, 1))
    assert grown < 32 * MiB, f"the pod kernel kept {grown / MiB:.0f} MiB after printing 100 MB"


def test_one_huge_write_display_and_error_never_break_the_session(kernel):
    """Single writes, displays and exception messages bigger than a frame header may be."""
    _, s = kernel
    out: list[dict] = []
    r = s.execute("print('é' * 3_000_000)\n'after'", on_output=out.append)  # 6 MB of JSON-escaped text
    assert r.data == {"text/plain": "'after'"}
    assert all(len(m.get("text", "")) <= outbox_mod.STREAM_FLUSH_BYTES for m in out)
    assert sum(len(m.get("text", "")) for m in out if m["type"] == "stream") == 3_000_001
    out.clear()
    # a 3 MB display (a big plotly figure or table) travels whole, its bundle in the frame's payload
    s.execute("from IPython.display import HTML, display\ndisplay(HTML('<p>' + 'h' * 3_000_000))",
              on_output=out.append)
    (shown,) = [m for m in out if m["type"] == "display"]
    assert shown["data"]["text/html"] == "<p>" + "h" * 3_000_000 and "data_in_payload" not in shown
    r = s.execute("HTML('<b>' + 'r' * 2_000_000)")  # the same for a cell's value
    assert r.data["text/html"] == "<b>" + "r" * 2_000_000
    out.clear()
    # past what one frame carries (4 MiB): a note with the sizes instead of a broken session
    s.execute("display(HTML('<p>' + 'h' * 6_000_000))", on_output=out.append)
    (shown,) = [m for m in out if m["type"] == "display"]
    assert "was not sent" in shown["data"]["text/plain"] and shown["elided_mime"]["text/html"] > 6_000_000
    with pytest.raises(ValueError):
        s.execute("raise ValueError('v' * 6_000_000)")
    assert s.execute("'alive'").data == {"text/plain": "'alive'"}


def test_outbox_unit_flood_tail_and_budgets():
    """The outbox's bounds as pure logic: limit, tail at a line boundary, per-request budgets."""
    import asyncio

    from pod_kernel import protocol as P

    loop = asyncio.new_event_loop()
    try:
        box = outbox_mod.Outbox(loop, stream_limit_chars=1003)
        box.write_stream("a", "stdout", "".join(f"{i:05d}\n" for i in range(100)))
        for i in range(100, 20_000):  # 120,000 characters in all
            box.write_stream("a", "stdout", f"{i:05d}\n")
            if i == 150:
                box.write_stream("b", "stdout", "other request\n")  # its own budget
        box.append({"type": "execute_reply", "id": "a", "status": "ok"})
        entries, lost = box.since(0)
        assert lost == 0 and [seq for seq, _ in entries] == list(range(1, len(entries) + 1))
        assert box.since(entries[-2][0]) == (entries[-1:], 0)  # only what came after
        msgs = [P.decode_frame(f)[0] for _, f in entries]
        a_text = "".join(m["text"] for m in msgs if m["type"] == "stream" and m["id"] == "a")
        lines = a_text.splitlines()
        assert all(len(ln) == 5 for ln in lines)  # head and tail both cut at line boundaries
        head_end = lines.index("00166") + 1  # 1003 characters hold 167 whole lines
        assert lines[:head_end] == [f"{i:05d}" for i in range(head_end)]
        tail = lines[head_end:]
        assert tail == [f"{i:05d}" for i in range(20_000 - len(tail), 20_000)]
        assert len(a_text) - head_end * 6 <= outbox_mod.STREAM_TAIL_CHARS
        assert "other request\n" in [m.get("text") for m in msgs]
        kinds = [m["type"] for m in msgs if m.get("id") == "a"]
        assert kinds[-1] == "execute_reply" and kinds.count("notice") == 2
        summary = next(m for m in msgs if "elided_chars" in m)
        assert summary["elided_chars"] + len(a_text) == 120_000
        big = outbox_mod.fit_header({"type": "execute_reply", "id": "a", "status": "error", "ename": "E",
                                     "evalue": "e" * 5_000_000, "traceback": ["t" * 100] * 50_000})
        assert len(json.dumps(big)) < P.MAX_HEADER_BYTES and "elided" in big["evalue"]
        assert len(big["traceback"]) == 2 * outbox_mod.TRACEBACK_KEEP_ENTRIES + 1
    finally:
        loop.close()


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    """Join every thread within one deadline; fail naming how many are still running (hung)."""
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} threads still running after {timeout_s:g} s: {hung[:3]}"


def test_hundred_concurrent_seed_api_calls(cleanup_connections):
    import kt_jupyter as kt

    def rendezvous(i):
        import builtins
        import os
        import threading
        barrier = builtins.__dict__.setdefault("_kt_test_barrier", threading.Barrier(100))
        barrier.wait(timeout=60)  # returns only when all 100 calls run at the same time
        return [i, os.getpid()]

    remote = kt.fn(rendezvous, name="crowd").to(kt.Compute(cpus="1"))
    t0 = time.perf_counter()
    results: list = [None] * 100
    errors: list[BaseException] = []

    def call(i):
        try:
            results[i] = remote(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(100)]
    for t in threads:
        t.start()
    join_all(threads, 120)
    elapsed = time.perf_counter() - t0
    assert not errors, errors[:3]
    assert [r[0] for r in results] == list(range(100))
    assert len({r[1] for r in results}) == 1  # one pod kernel served them all
    record("load", "concurrent_seed_calls", 100)
    record("load", "concurrent_seed_calls_seconds", round(elapsed, 2))


def test_hundred_threads_of_session_operations(kernel):
    """pull / inventory / metrics / ping / execute from 100 notebook threads on one session."""
    _, s = kernel
    s.push({f"v{i}": np.full(1000, i) for i in range(100)})
    errors: list[BaseException] = []
    finished: set[int] = set()
    start = threading.Barrier(100)

    def worker(i):
        try:
            start.wait(timeout=30)
            assert int(s.pull([f"v{i}"])[f"v{i}"][0]) == i
            assert s.inventory([f"v{i}"])[0]["size"] == 8000
            assert s.metrics()["rss_bytes"] > 0
            s.ping()
            assert s.execute(f"int(v{i}.sum())").data == {"text/plain": str(i * 1000)}
            finished.add(i)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(100)]
    for t in threads:
        t.start()
    join_all(threads, 120)  # a thread hung in a session call fails here (before, only errors were counted)
    assert not errors, errors[:3]
    assert finished == set(range(100))
    record("load", "concurrent_session_threads", 100)
    record("load", "concurrent_session_ops_seconds", round(time.perf_counter() - t0, 2))


# ---------------------------------------------------------------------------- two notebooks, one compute

NOTEBOOK = textwrap.dedent("""
    import json, sys
    from kt_jupyter import connection as C
    from kt_jupyter.compute import Compute
    ns = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd.get("local"):  # a local cell: what the notebook itself holds
                print(json.dumps({"ok": True, "result": repr(eval(cmd["code"], ns))}), flush=True)
                continue
            if cmd.get("restart"):  # what `%kt restart NAME` does
                from kt_jupyter.backends import get_backend
                C.disconnect(cmd["restart"], "local")
                get_backend("local").delete(cmd["restart"])
                C.connect(Compute(name=cmd["restart"]), keep=True)
                print(json.dumps({"ok": True}), flush=True)
                continue
            conn = C.connect(Compute(name=cmd["compute"]), keep=True)
            outcome = conn.run_cell(cmd["code"], ns)
            data = outcome.result.data if outcome.result else None
            print(json.dumps({"ok": True, "pid": conn.handle.pid, "result": data and data.get("text/plain")}),
                  flush=True)
        except Exception as exc:
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
""")


class NotebookProcess:
    """Another notebook: a process of its own, same KT_HOME, running cells it is sent."""

    def __init__(self, kt_home: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", NOTEBOOK], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, KT_HOME=str(kt_home)))

    def send(self, code: str, compute: str = "shared") -> None:
        self.proc.stdin.write(json.dumps({"compute": compute, "code": code}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float = 60) -> dict:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert readable, f"no reply within {timeout_s} s"
        reply = json.loads(self.proc.stdout.readline())
        assert reply["ok"], reply
        return reply

    def run(self, code: str) -> dict:
        self.send(code)
        return self.reply()

    def local(self, expression: str) -> str:
        """The repr of ``expression`` evaluated in the notebook itself (a local cell)."""
        self.proc.stdin.write(json.dumps({"local": True, "code": expression}) + "\n")
        self.proc.stdin.flush()
        return self.reply()["result"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_two_notebooks_share_one_compute_by_name(kt_home, local_backend):
    a, b = NotebookProcess(kt_home), NotebookProcess(kt_home)
    started = Signal(kt_home / "started")
    gate = Fifo(kt_home / "gate")
    try:
        a.send("import os\nfrom_a = 'hello'\nos.getpid()")  # both launch at once: one kernel must win
        b.send("import os\nos.getpid()")
        pid_a, pid_b = int(a.reply()["result"]), int(b.reply()["result"])
        assert pid_a == pid_b
        assert b.run("from_a + ' from b'")["result"] == "'hello from b'"
        # a pod-side list neither notebook holds a copy of (no assignment: nothing is pulled or pushed)
        b.run("__import__('builtins').__dict__.setdefault('kt_log', [])")
        # a's cell holds the kernel; b's cell waits its turn rather than running alongside
        a.send(f"kt_log.append('a starts')\nopen({str(started.path)!r}, 'w').write('started\\n')\n"
               f"open({str(gate.path)!r}).readline()\nkt_log.append('a ends')")
        assert started.wait_line(30) == "started"
        b.send("kt_log.append('b')\nlen(kt_log)")
        gate.release()
        a.reply()
        assert b.reply()["result"] == "3"
        assert a.run("kt_log")["result"] == "['a starts', 'a ends', 'b']"
    finally:
        a.close()
        b.close()
        started.close()
        gate.close()
    record("load", "notebooks_sharing_one_compute", 2)


def test_a_cell_waiting_for_another_notebooks_cell_says_so(kernel, kt_home):
    """Two notebooks on one compute: while one's cell runs, the other's cell says why it waits (it used to hang
    without a word); a notebook's own cells in a row say nothing."""
    handle, a = kernel
    b = handle.session()
    started, gate = Signal(kt_home / "started"), Fifo(kt_home / "gate")
    try:
        b.connect()
        running = threading.Thread(target=a.execute, args=(
            f"open({str(started.path)!r}, 'w').write('started\\n')\nopen({str(gate.path)!r}).readline()",))
        running.start()
        assert started.wait_line(30) == "started"
        seen: list[dict] = []
        waiting = threading.Thread(target=b.execute, args=("x = 1",), kwargs={"on_output": seen.append})
        waiting.start()
        wait_until(lambda: seen, 30, "a notice")
        assert seen[0]["type"] == "notice" and seen[0]["level"] == "info"
        assert seen[0]["text"] == "[kt] a cell of another notebook runs on this pod kernel: this cell runs when it ends"
        gate.release()
        running.join(30)
        waiting.join(30)
        quiet: list[dict] = []
        b.execute("y = 2", on_output=quiet.append)
        assert quiet == []
    finally:
        b.close_quietly()
        started.close()
        gate.close()


def test_a_cell_whose_compute_another_process_deleted_says_so(kt_home, local_backend):
    """`%kt down` from another notebook while this one's cell runs: the cell's error says the compute was deleted
    or restarted (it said "exited with code 1", or "status unknown", and showed a log that was not its own)."""
    a = NotebookProcess(kt_home)
    started = Signal(kt_home / "started")
    try:
        a.run("x = 1")
        a.send(f"open({str(started.path)!r}, 'w').write('started\\n')\nimport time\ntime.sleep(60)")
        assert started.wait_line(30) == "started"
        assert local_backend.delete("shared", grace_period_s=1)  # what the other notebook's `%kt down` does
        readable, _, _ = select.select([a.proc.stdout], [], [], 60)
        assert readable, "the cell did not end"
        reply = json.loads(a.proc.stdout.readline())
        assert not reply["ok"] and reply["error"].startswith("KernelDiedError: pod kernel 'shared' (pid "), reply
        assert "and its compute was deleted or restarted (`%kt down`, `%kt restart`" in reply["error"], reply
        assert "Last log lines" not in reply["error"]
        assert a.run("import os\nos.getpid()")["result"]  # the next cell runs, on a new kernel
    finally:
        a.close()
        started.close()


def test_a_compute_another_notebook_restarted_is_used_not_replaced(kt_home, local_backend):
    """Notebook b restarts the compute both use (`%kt restart`: delete, launch). Notebook a's next cell finds its
    kernel gone and a new one under the name: it uses that one. It used to stop it and start its own, whose
    death b's next cell then answered the same way: every cell of either notebook lost all state."""
    a, b = NotebookProcess(kt_home), NotebookProcess(kt_home)
    try:
        first = a.run("import os\nos.getpid()")["result"]
        assert b.run("import os\nos.getpid()")["result"] == first
        b.proc.stdin.write(json.dumps({"restart": "shared"}) + "\n")
        b.proc.stdin.flush()
        b.reply()
        new = b.run("import os\nkept_by_b = 1\nos.getpid()")["result"]
        assert new != first
        for _ in range(2):  # alternating, as two notebooks in use do
            assert a.run("import os\nos.getpid()")["result"] == new
            assert b.run("import os\nkept_by_b\nos.getpid()")["result"] == new  # b's variable survived a's cells
    finally:
        a.close()
        b.close()


def test_shared_compute_newest_value_wins_and_comes_back(kt_home, local_backend):
    """Two notebooks on one compute share its variables (DESIGN: coherent state): a notebook's copy that
    another notebook has since replaced on the pod is never pushed back over it; the cell sees the pod's
    value, and the notebook gets it back, so both sides agree after the cell."""
    a, b = NotebookProcess(kt_home), NotebookProcess(kt_home)
    try:
        a.run("x = 1")
        b.run("x = 2")
        assert a.local("x") == "1"  # until a's next %%kt cell, a's notebook holds what its last cell left
        assert a.run("x")["result"] == "2"
        assert a.local("x") == "2"
        a.run("x = 3")  # a's own assignment is the newest now, for both
        assert b.run("x")["result"] == "3" and b.local("x") == "3"
    finally:
        a.close()
        b.close()


def test_a_value_another_notebook_changes_in_place_comes_back_to_one_whose_cells_never_mention_it(
        kt_home, local_backend):
    """Each notebook's cells send what it holds on the pod once, then say ``held_same``; the pod keeps each
    session's list and checks it after every cell, so another notebook's in-place change still comes back."""
    a, b = NotebookProcess(kt_home), NotebookProcess(kt_home)
    try:
        a.run("L = [1]")
        a.run("n = 1")
        a.run("n = 2")  # a's list of held values is the same from here on
        b.run("L.append(2)")
        assert a.run("n")["result"] == "2"  # a cell that does not mention L
        assert a.local("L") == "[1, 2]"
    finally:
        a.close()
        b.close()


def test_a_request_the_running_local_kernel_does_not_match_is_a_clear_error(kt_home, local_backend):
    """Another process (a restarted notebook) asking for other resources than the running kernel has."""
    from kt_jupyter.errors import ComputeSpecError

    local_backend.launch(Compute(name="sized", memory="512Mi"), keep=True)
    other = NotebookProcess(kt_home)
    try:
        other.send("x = 1", compute="sized")  # same spec as asked: reattaches
        assert other.reply()["ok"]
    finally:
        other.close()
    with pytest.raises(ComputeSpecError, match=r"already running with memory='512Mi' \(not '1Gi'\)"):
        local_backend.launch(Compute(name="sized", memory="1Gi"))
    assert local_backend.launch(Compute(name="sized")).spec.get("memory") == "512Mi"  # unset: takes the running one
