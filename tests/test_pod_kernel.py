"""The pod kernel as a real process on 127.0.0.1, driven through the production client."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from websockets.exceptions import InvalidStatus

from kt_jupyter.client import client_loop
from kt_jupyter.compute import Compute
from kt_jupyter.errors import AuthError, KernelDiedError, ProtocolMismatchError, RemoteError
from pod_kernel import protocol as P
from barriers import wait_until
from wire import handshake, raw_connect, upgrade_headers




def test_execute_streams_output_and_returns_last_value(kernel):
    _, s = kernel
    out = []
    r = s.execute("import sys\nprint('a')\nprint('b', file=sys.stderr)\nx = 41\nx + 1", on_output=out.append)
    assert r.data == {"text/plain": "42"}
    def stream(name: str) -> str:  # a write may reach the notebook in more than one message
        return "".join(m["text"] for m in out if m["type"] == "stream" and m["name"] == name)

    assert stream("stdout") == "a\n" and stream("stderr") == "b\n"
    assert [m["type"] for m in out][-1] == "execute_result"
    # the namespace persists between cells
    assert s.execute("x * 2").data == {"text/plain": "82"}


def test_history_names_are_bounded_and_history_kept(kernel):
    """IPython binds ``_iN`` per cell forever; the pod keeps the last few in the namespace (each cell's
    coherence snapshot walks it) and all of them in ``In``."""
    from pod_kernel.executor import HISTORY_NAMES_KEPT, HISTORY_TRIM_EVERY

    _, s = kernel
    n = HISTORY_NAMES_KEPT + 3 * HISTORY_TRIM_EVERY
    for i in range(n):
        s.execute(f"v = {i}")
    first = int(s.execute("In.index('v = 0')").data["text/plain"])
    names = eval(s.execute("sorted(n for n in globals() if n[:2] == '_i' and n[2:].isdigit())").data["text/plain"])
    assert f"_i{first}" not in names and f"_i{first + n - 1}" in names
    assert len(names) <= HISTORY_NAMES_KEPT + HISTORY_TRIM_EVERY, names
    assert s.execute(f"_i{first + n - 1}").data == {"text/plain": f"'v = {n - 1}'"}
    # nothing else keeps every cell's source: IPython's queue for its (unused) history database is emptied
    assert int(s.execute("len(get_ipython().history_manager.db_input_cache)").data["text/plain"]) <= HISTORY_TRIM_EVERY


def test_ipython_per_cell_state_behaves_as_in_ipython(kernel):
    """The pod's shell keeps IPython's per-cell state in plain attributes, not traits (pod_kernel.executor): it
    must read as IPython's does: `_i`/`_ii`/`_iii`, the execution count, the last result and success."""
    _, s = kernel
    count = int(s.execute("get_ipython().execution_count").data["text/plain"])  # IPython's: this cell's + 1
    s.execute("a = 1")
    s.execute("b = 2")
    s.execute("40 + 2")
    assert s.execute("_i, _ii, _iii, _").data == {"text/plain": "('40 + 2', 'b = 2', 'a = 1', 42)"}
    assert s.execute("get_ipython().execution_count").data == {"text/plain": str(count + 5)}
    assert s.execute(f"_i{count + 2}, Out[{count + 2}]").data == {"text/plain": "('40 + 2', 42)"}
    with pytest.raises(ZeroDivisionError):
        s.execute("1 / 0")
    ip = "get_ipython()"
    assert s.execute(f"{ip}.last_execution_succeeded").data == {"text/plain": "False"}  # the cell before's
    s.execute(f"ok = {ip}.last_execution_succeeded; r = {ip}.last_execution_result")
    assert s.execute("ok, r.success, r.result, r.info.raw_cell[:6]").data == \
        {"text/plain": "(True, True, False, 'get_ip')"}
    # a cell's writes go straight to the pod's streams: IPython 9 wraps them to copy each into history outputs,
    # which the pod does not keep
    out: list[str] = []
    s.execute("import sys\nprint(sys.stdout.write.__qualname__, sys.stderr.write.__qualname__)",
              on_output=lambda m: out.append(m.get("text", "")))
    assert "".join(out).strip() and "_tee" not in "".join(out), out


def test_stream_is_coalesced_not_one_message_per_write(kernel):
    _, s = kernel
    out = []
    s.execute("for i in range(2000): print(i)", on_output=out.append)
    text = "".join(m["text"] for m in out if m["type"] == "stream")
    assert text == "".join(f"{i}\n" for i in range(2000))
    assert len(out) < 50, f"{len(out)} messages for 2000 prints"


def test_output_is_live_while_the_cell_runs(kernel):
    _, s = kernel
    arrivals = []
    code = "import time\nprint('first', flush=True)\ntime.sleep(0.5)\nprint('second')"
    t0 = time.perf_counter()
    s.execute(code, on_output=lambda m: arrivals.append((m.get("text"), time.perf_counter() - t0)))
    first = [t for text, t in arrivals if text and "first" in text][0]
    assert first < 0.4, f"first line arrived after {first:.2f} s, not live"


def test_display_and_rich_reprs_and_magics_and_shell(kernel):
    _, s = kernel
    out = []
    s.execute(
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "!echo from-shell\n"
        "%env KT_TEST_VAR=7\n",
        on_output=out.append,
    )
    displays = [m for m in out if m["type"] == "display"]
    assert displays and displays[0]["data"]["text/html"] == "<b>bold</b>"
    text = "".join(m.get("text", "") for m in out if m["type"] == "stream")
    assert "from-shell" in text
    assert s.execute("import os; os.environ['KT_TEST_VAR']").data["text/plain"] == "'7'"


def test_remote_error_has_real_type_and_cell_line_numbers(kernel):
    _, s = kernel
    with pytest.raises(ZeroDivisionError) as info:
        s.execute("def f():\n    return 1 / 0\n\nf()")
    tb = info.value.remote_traceback
    assert "line 4" in tb and "line 2" in tb and "return 1 / 0" in tb


def test_remote_error_of_unimportable_type_is_remote_error(kernel):
    _, s = kernel
    with pytest.raises(RemoteError) as info:
        s.execute("class Custom(Exception): pass\nraise Custom('nope')")
    assert "Custom" in info.value.ename and info.value.evalue == "nope"


def test_syntax_error_is_reported(kernel):
    _, s = kernel
    with pytest.raises(SyntaxError):
        s.execute("def (:")


def test_interrupt_raises_keyboardinterrupt_and_state_survives(kernel):
    _, s = kernel
    s.execute("survivor = 'alive'")

    def on_output(msg):
        if "sleeping" in msg.get("text", ""):
            threading.Thread(target=s.interrupt).start()

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        s.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", on_output=on_output)
    assert time.perf_counter() - t0 < 10
    assert s.execute("survivor").data == {"text/plain": "'alive'"}


def test_an_interrupted_cell_that_has_not_started_does_not_run(kernel):
    """Ctrl-C while a cell waits its turn on the pod (behind another notebook's cell, or behind the push of the
    values it reads): the interrupt found no cell of that id running and was dropped, and the cell ran later
    all the same. Now it does not run, and says so."""
    handle, first = kernel
    second = handle.session()
    second.connect()
    started = threading.Event()
    runner = threading.Thread(target=first.execute, daemon=True,
                              args=("import time\nprint('holding', flush=True)\ntime.sleep(3)",),
                              kwargs={"on_output": lambda m: started.set()})
    runner.start()
    assert started.wait(30)  # the first notebook's cell holds the pod's main thread for 3 s
    main = threading.main_thread().ident
    threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()  # Ctrl-C while queued
    with pytest.raises(KeyboardInterrupt) as info:
        second.execute("ran_second = True")
    runner.join(30)
    assert "before it started" in str(info.value)
    assert first.execute("'ran_second' in dir()").data == {"text/plain": "False"}
    assert second.execute("21 * 2").data == {"text/plain": "42"}  # the next cell runs
    second.close()


def test_ctrl_c_during_the_work_done_while_a_cell_runs_interrupts_the_cell(kernel):
    """``while_waiting`` (fingerprinting what a push sent, while the pod runs the cell): a Ctrl-C there escaped
    the wait, the remote cell ran on unseen (its reply orphaned) and the next cell waited behind it."""
    _, s = kernel

    def ctrl_c() -> None:
        time.sleep(0.3)  # the cell is on the pod by now
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.execute("import time\nfor _ in range(50):\n    time.sleep(0.1)\ndone = True", while_waiting=ctrl_c)
    t0 = time.monotonic()
    assert s.execute("'done' in dir()").data == {"text/plain": "False"}  # interrupted, not finished
    assert time.monotonic() - t0 < 3


def test_push_pull_200mb_exact(kernel):
    _, s = kernel
    arr = np.random.default_rng(1).integers(0, 2**63, size=200 * 2**20 // 8, dtype=np.int64)
    progress = []
    assert s.push({"big": arr}, on_progress=lambda done, total: progress.append((done, total))) == ["big"]
    done, total = progress[-1]
    assert done == total and arr.nbytes <= total < arr.nbytes + 4096  # the array plus a small pickle stream
    assert len(progress) >= 20  # reported piece by piece (8 MiB each on the bulk channel), not once at the end
    assert s.execute("big.nbytes").data == {"text/plain": str(arr.nbytes)}
    back = s.pull(["big"])["big"]
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_push_pull_over_websocket_only_exact(kernel):
    handle, _ = kernel
    s = handle.session(bulk_host=None)  # no bulk channel: every byte in WebSocket chunk frames
    arr = np.random.default_rng(2).standard_normal(3 * 2**20)
    progress = []
    s.push({"ws": arr}, on_progress=lambda d, t: progress.append(d))
    assert len(progress) >= 6  # one report per 4 MiB chunk
    assert np.array_equal(s.pull(["ws"])["ws"], arr)


def test_bulk_port_gives_nothing_without_a_valid_ticket(kernel):
    import socket

    handle, s = kernel
    port = s._conn.welcome["bulk_port"]
    s.push({"secret_value": np.arange(2**20)})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x00" * 32)  # a guessed ticket
        sock.settimeout(10)
        assert sock.recv(1024) == b""  # closed: nothing sent
    assert s.execute("int(secret_value[-1])").data == {"text/plain": str(2**20 - 1)}


def test_inventory_fingerprints_change_with_content(kernel):
    _, s = kernel
    s.push({"v": np.zeros(100)})
    inv1 = {i["name"]: i for i in s.inventory(["v"], fingerprints=True)}
    assert inv1["v"]["type"] == "numpy.ndarray" and inv1["v"]["size"] == 800
    assert inv1["v"]["fingerprint"] == P.fingerprint(np.zeros(100))
    s.execute("v[0] = 1")
    inv2 = {i["name"]: i for i in s.inventory(["v"], fingerprints=True)}
    assert inv2["v"]["fingerprint"] != inv1["v"]["fingerprint"]
    assert s.delete(["v", "missing"]) == ["v"]
    assert s.inventory(["v"]) == []


def test_pull_of_missing_name_is_a_clear_error(kernel):
    _, s = kernel
    with pytest.raises(NameError, match="not defined on the pod kernel: nothere"):
        s.pull(["nothere"])


def test_metrics_sample(kernel):
    _, s = kernel
    m = s.metrics()
    assert m["rss_bytes"] > 10 * 2**20
    assert 0 <= m["cpu_percent"]
    assert m["host_memory_total_bytes"] > m["host_memory_used_bytes"] > 0
    assert m["gpus"] == [] or all("utilization_percent" in g for g in m["gpus"])


def test_connection_drop_mid_cell_loses_nothing_and_keeps_order(kernel):
    _, s = kernel
    text: list[str] = []  # stream messages may split a line anywhere (print writes the text, then the "\n")
    drops = {40, 120, 260}

    def on_output(msg):
        if msg["type"] != "stream":
            return
        text.append(msg["text"])
        complete = "".join(text).split("\n")[:-1]
        if drops and complete and int(complete[-1]) >= min(drops):
            drops.discard(min(drops))
            conn = s._conn
            client_loop().call_soon_threadsafe(conn.ws.transport.abort)

    code = "import time\nfor i in range(400):\n    print(i, flush=True)\n    time.sleep(0.002)\n'done'"
    r = s.execute(code, on_output=on_output)
    assert r.data == {"text/plain": "'done'"}
    assert "".join(text).splitlines() == [str(i) for i in range(400)]
    assert s.reconnects == 3


def test_cell_keeps_running_with_no_client(kernel, local_backend):
    handle, s = kernel
    s.execute("import threading, time\nflag = []\n")
    s.close()
    s2 = handle.session()
    out = []
    # a cell started by one session finishes while that session is gone; a new session sees its result
    s2.execute("time.sleep(0.2); flag.append(1); len(flag)", on_output=out.append)
    assert s2.execute("len(flag)").data == {"text/plain": "1"}


def test_wrong_or_missing_token_is_rejected_and_nothing_runs(kernel):
    handle, s = kernel
    bad = handle.session()
    bad._token = "wrong"
    with pytest.raises(AuthError, match="rejected the token"):
        bad.execute("hacked = True")
    with pytest.raises(InvalidStatus) as info:
        handshake(handle.url, upgrade_headers())
    assert info.value.response.status_code == 401
    assert s.inventory(["hacked"]) == []


def test_protocol_mismatch_is_clear_on_both_sides(kernel, local_backend, monkeypatch):
    handle, s = kernel
    pod_version = P.PROTOCOL_VERSION
    monkeypatch.setattr(P, "PROTOCOL_VERSION", 999)
    other = handle.session()
    with pytest.raises(ProtocolMismatchError, match=f"speaks protocol {pod_version}, the client speaks 999"):
        other.connect()
    assert f"client speaks protocol '999', not {pod_version}" in local_backend.logs("t")


@pytest.mark.parametrize(
    "bad_frame",
    [
        b"\x00",
        b"\xff\xff\xff\xff{}",
        P.encode_frame({"type": "nonsense", "id": "1"}),
        P.encode_frame({"type": "execute", "id": 5, "code": "x=1"}),
        P.encode_frame({"type": "chunk", "id": "1"}, b"zz"),
        P.encode_frame({"type": "push", "id": "1", "serialization": "pickle", "sizes": [4]}) ,
    ],
)
def test_malformed_frames_close_that_connection_and_server_keeps_serving(kernel, bad_frame):
    handle, s = kernel
    with raw_connect(handle.url, handle.token) as ws:
        ws.recv()  # welcome
        ws.send(bad_frame)
        if bad_frame.startswith(P.encode_frame({"type": "push", "id": "1", "serialization": "pickle", "sizes": [4]})):
            ws.send(P.encode_frame({"type": "ping", "id": "2"}))  # not the chunk the bundle needs
        with pytest.raises(Exception):
            while True:
                ws.recv(timeout=10)
        assert ws.protocol.close_code == 1002
    assert s.execute("1 + 1").data == {"text/plain": "2"}


def test_text_message_closes_connection(kernel):
    handle, s = kernel
    with raw_connect(handle.url, handle.token) as ws:
        ws.recv()
        ws.send("text is not our protocol")
        with pytest.raises(Exception):
            ws.recv(timeout=10)
        assert ws.protocol.close_code == 1002
    assert s.ping() < 5


def test_registry_reattach_from_second_process(kernel, kt_home):
    handle, s = kernel
    s.execute("shared_state = {'answer': 42}")
    script = textwrap.dedent(
        """
        from kt_jupyter.backends.local import LocalBackend
        h = LocalBackend().find("t")
        s = h.session()
        print(h.pid, s.execute("shared_state['answer']").data["text/plain"])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KT_HOME=str(kt_home)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(handle.pid), "42"]


@pytest.mark.parametrize("pidfds", [True, False])
def test_a_kernel_another_process_started_is_watched_without_reading_proc_each_cell(local_backend, monkeypatch,
                                                                                  pidfds):
    """Every %%kt cell asks whether its kernel lives. One this process did not start (another notebook's, one from
    before a notebook kernel restart) was checked through psutil each time (150 us a cell): now once, then
    through a pidfd, which still sees it die (a zombie counts as dead) and never a process that reused its pid."""
    from kt_jupyter.backends import local

    handle = local_backend.launch(Compute(name="w"))
    looked: list[int] = []
    real = local.psutil.Process
    monkeypatch.setattr(local.psutil, "Process", lambda pid: looked.append(pid) or real(pid))
    if not pidfds:
        monkeypatch.delattr(os, "pidfd_open")
    other = local.LocalBackend()  # another notebook: not its child
    found = other.find("w")
    assert found is not None and found.pid == handle.pid
    first = len(looked)
    assert first >= 1
    for _ in range(5):  # five cells
        assert found.liveness() is None
    assert len(looked) == (first if pidfds else first + 5)
    os.kill(handle.pid, signal.SIGKILL)  # the launching backend has not reaped it: a zombie
    why = wait_until(found.liveness, what="the killed kernel seen as dead")
    assert "variables are lost" in why
    assert other._pidfds == {}
    # a process that reused the pid (another create_time) is not the kernel, watched or not
    assert not other._alive({"pid": os.getpid(), "create_time": 0.0})


def test_launch_twice_returns_same_kernel(local_backend):
    h1 = local_backend.launch(Compute(name="same"))
    h2 = local_backend.launch(Compute(name="same"))
    assert h1.pid == h2.pid and h1.url == h2.url


def test_delete_leaves_no_orphans(local_backend):
    h = local_backend.launch(Compute(name="orph"))
    s = h.session()
    child = int(s.execute("import subprocess\np = subprocess.Popen(['sleep', '300'])\np.pid").data["text/plain"])
    grandchild_alive = psutil.pid_exists(child)
    assert grandchild_alive
    s.close()
    assert local_backend.delete("orph", grace_period_s=2)
    for pid in (h.pid, child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert local_backend.find("orph") is None


def test_killed_kernel_is_a_clear_error_with_signal_and_log(local_backend):
    h = local_backend.launch(Compute(name="doomed"))
    s = h.session()
    s.execute("print('last words before dying')")
    with pytest.raises(KernelDiedError) as info:
        s.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    msg = str(info.value)
    assert "SIGKILL" in msg and "doomed" in msg and "last words before dying" in msg
    assert local_backend.status("doomed").phase == "stopped"


def test_token_is_never_in_argv_env_or_log(kernel, local_backend):
    handle, s = kernel
    s.execute("print('hello')")
    proc = psutil.Process(handle.pid)
    assert handle.token not in " ".join(proc.cmdline())
    assert all(handle.token not in v for v in proc.environ().values())
    assert handle.token not in local_backend.logs("t", tail=None)
    assert handle.token not in repr(handle) and handle.token not in repr(s)
    token_file = local_backend.root / "t" / "token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"


def test_json_only_mode_refuses_pickle(local_backend):
    h = local_backend.launch(Compute(name="jsononly", allowed_serialization=["json"]))
    s = h.session()
    with pytest.raises(RemoteError, match="does not accept 'pickle'"):
        s.push({"a": np.zeros(3)})
    with pytest.raises(RemoteError, match="does not send 'pickle'"):
        s.pull(["a"])
    assert s.push({"j": {"k": [1, 2]}}, serialization="json") == ["j"]
    assert s.pull(["j"], serialization="json") == {"j": {"k": [1, 2]}}
    with pytest.raises(ZeroDivisionError):  # no pickled exception: the builtin type is rebuilt by name
        s.execute("1/0")
    with pytest.raises(RemoteError) as info:  # a type that cannot be rebuilt here arrives as RemoteError
        s.execute("class Odd(Exception): pass\nraise Odd('x')")
    assert "Odd" in info.value.ename


def test_kernel_stops_when_owner_exits(kt_home):
    script = textwrap.dedent(
        """
        from kt_jupyter.backends.local import LocalBackend
        from kt_jupyter.compute import Compute
        print(LocalBackend().launch(Compute(name="owned")).pid, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KT_HOME=str(kt_home), KT_OWNER_GRACE_S="0"))
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    try:
        psutil.Process(pid).wait(timeout=15)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class NotebookStandIn:
    """A separate process using a compute the way a notebook kernel does (launch-or-find, then cells).

    It starts, imports everything, and then waits for commands on stdin, so a test
    can make it reattach at a precise moment (e.g. right after another owner exits).
    """

    SCRIPT = textwrap.dedent(
        """
        import sys
        from kt_jupyter.backends.local import LocalBackend
        from kt_jupyter.compute import Compute
        backend, session = LocalBackend(), None
        print("ready", flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "attach":
                said = []
                handle = backend.launch(Compute(name=arg), on_event=said.append)
                session = handle.session()
                print(repr((handle.pid, said)), flush=True)
            elif cmd == "run":
                print(repr(session.execute(arg).data.get("text/plain")), flush=True)
            elif cmd == "exit":
                break
        """
    )

    def __init__(self, kt_home, grace_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, KT_HOME=str(kt_home), KT_OWNER_GRACE_S=str(grace_s)))
        assert self.read() == "ready"

    def read(self, timeout: float = 60) -> str:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the stand-in notebook said nothing in time"
        return self.proc.stdout.readline().strip()

    def ask(self, line: str):
        import ast

        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return ast.literal_eval(self.read())

    def exit(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` exits (fails past ``timeout``)."""
    t0 = time.monotonic()
    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass
    return time.monotonic() - t0


def test_restarted_notebook_adopts_its_kernel_within_the_grace_period(kt_home, local_backend):
    """A notebook kernel restart: the old process exits, the new one reattaches in time and keeps the state.

    Once the adopter exits too, the kernel stops after the grace period (it is not kept for ever).
    """
    grace = 3.0
    old, new = NotebookStandIn(kt_home, grace), NotebookStandIn(kt_home, grace)
    pid, said = old.ask("attach restarted")
    assert said[0].startswith("starting pod kernel")
    assert old.ask("run model = {'w': 41}; 'set'") == "'set'"
    old.exit()
    # the kernel noticed (pidfd) and is in its grace period: it says so in its log, and still runs
    wait_until(lambda: "unless a notebook reattaches" in local_backend.logs("restarted"), 30, "the kernel to notice")
    assert psutil.pid_exists(pid)
    adopted_pid, said = new.ask("attach restarted")
    assert adopted_pid == pid
    assert any("reattached to pod kernel 'restarted'" in m and "variables are still there" in m for m in said), said
    time.sleep(grace + 1)  # past the first grace period: the new owner keeps it alive
    assert new.ask("run model['w'] + 1") == "42"
    new.exit()
    assert wait_gone(pid, timeout=grace + 20) >= grace - 0.5
    assert "no notebook reattached within 3 s" in local_backend.logs("restarted")


def test_kernel_lives_while_any_notebook_using_it_does(kt_home, local_backend):
    """Two notebooks share a compute; the one that launched it exits first: the other keeps it."""
    grace = 2.0
    first, second = NotebookStandIn(kt_home, grace), NotebookStandIn(kt_home, grace)
    pid, _ = first.ask("attach shared")
    assert first.ask("run x = 7; x") == "7"
    assert second.ask("attach shared") == (pid, [])  # joins as a second owner, nothing to tell
    first.exit()
    time.sleep(grace + 1.5)
    assert second.ask("run x * 6") == "42"
    second.exit()
    wait_gone(pid, timeout=grace + 20)


def test_keep_survives_owner_exit(kt_home, local_backend):
    script = textwrap.dedent(
        """
        from kt_jupyter.backends.local import LocalBackend
        from kt_jupyter.compute import Compute
        print(LocalBackend().launch(Compute(name="kept"), keep=True).pid, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KT_HOME=str(kt_home)))
    pid = int(out.stdout.strip())
    h = local_backend.find("kept")
    assert h is not None and h.pid == pid
    assert h.session().ping() < 5


def test_inactivity_ttl_stops_idle_kernel(local_backend):
    h = local_backend.launch(Compute(name="ttl", inactivity_ttl=1))
    s = h.session()
    s.execute("import time; time.sleep(1.5)")  # a running cell is activity, not idleness
    t0 = time.monotonic()
    psutil.Process(h.pid).wait(timeout=15)
    assert time.monotonic() - t0 < 10
    assert "inactive for" in local_backend.logs("ttl")


def test_more_gpus_than_machine_is_clear_error(local_backend):
    from kt_jupyter.backends.local import machine_gpu_count
    from kt_jupyter.errors import ComputeSpecError

    have = machine_gpu_count()
    with pytest.raises(ComputeSpecError, match=f"asks for {have + 1} GPU"):
        local_backend.launch(Compute(name="gpu", gpus=have + 1))


def test_launch_to_ready_is_fast(local_backend):
    t0 = time.perf_counter()
    h = local_backend.launch(Compute(name="fast"))
    h.session().execute("1")
    assert time.perf_counter() - t0 < 5  # generous bound for a loaded CI box; measured figure goes in the note


def test_launch_failure_names_exit_code_and_log(local_backend, monkeypatch):
    from kt_jupyter.errors import LaunchError

    with pytest.raises(LaunchError, match="exited with code") as info:
        local_backend.launch(Compute(name="broken", env_vars={"PYTHONPATH": "/nonexistent", "PYTHONHOME": "/nonexistent"}))
    assert "Last log lines" in str(info.value)


def test_heartbeats_never_touch_the_users_random_state(kernel):
    """Seeded notebooks reproduce: neither side's keepalive pings draw from the global ``random``."""
    import asyncio
    import random

    handle, s = kernel
    random.seed(0)
    state = random.getstate()
    asyncio.run_coroutine_threadsafe(s._conn.ws.ping(), client_loop()).result(10)  # what a heartbeat does
    assert random.getstate() == state
    # the pod's own keepalive pings, sent by its server on its loop
    r = s.execute(
        "import asyncio, gc, random\n"
        "from pod_kernel.server import PodKernelServer\n"
        "random.seed(0)\n"
        "before = random.getstate()\n"
        "server = next(o for o in gc.get_objects() if isinstance(o, PodKernelServer))\n"
        "ws = next(x.ws for x in server.sessions.values() if x.ws is not None)\n"
        "asyncio.run_coroutine_threadsafe(ws.ping(), server.loop).result(10)\n"
        "random.getstate() == before")
    assert r.data == {"text/plain": "True"}


def test_a_cells_traceback_reaches_the_kernel_log(kernel, local_backend):
    """`%kt logs` shows why a cell failed, as a local kernel's terminal would."""
    _, s = kernel
    with pytest.raises(ZeroDivisionError):
        s.execute("def inner():\n    return 1 / 0\ninner()")
    log = local_backend.logs("t", tail=40)
    assert "ZeroDivisionError" in log and "return 1 / 0" in log and "\x1b[" not in log


def test_code_sync_from_two_sessions_at_once_never_collides(tmp_path):
    """Two notebooks sending the same files at once (each sync runs in its own thread on the pod)."""
    import threading

    from pod_kernel.codesync import CodeSync

    sync = CodeSync(tmp_path / "code")
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def send(i: int) -> None:
        start.wait()
        for j in range(10):
            try:
                sync.apply({"pkg/__init__.py": f"X = {i * 100 + j}\n", "pkg/mod.py": "Y = 1\n"})
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert (tmp_path / "code" / "pkg" / "mod.py").read_text() == "Y = 1\n"


def test_a_stopping_kernel_exits_even_when_its_cell_ignores_the_interrupt(local_backend, monkeypatch):
    """A cell stuck where SIGINT cannot reach it (native code: a collective, a rendezvous; here a cell that swallows
    KeyboardInterrupt) must not keep a stopped kernel alive: it exits KT_STOP_GRACE_S after the interrupt."""
    monkeypatch.setenv("KT_STOP_GRACE_S", "1")
    handle = local_backend.launch(Compute(name="stuck"))
    session = handle.session()
    session.connect()
    pid = handle.pid
    started = threading.Event()
    code = ("import time\nprint('in', flush=True)\nwhile True:\n    try:\n        time.sleep(60)\n"
            "    except KeyboardInterrupt:\n        pass\n")
    runner = threading.Thread(target=lambda: _quiet(session.execute, code, on_output=lambda m: started.set()),
                              daemon=True)
    runner.start()
    assert started.wait(30)
    os.kill(pid, signal.SIGTERM)  # what the kubelet sends; a vanished owner asks the same way
    proc = psutil.Process(pid)
    proc.wait(timeout=30)  # psutil.TimeoutExpired here: the kernel would have run forever
    assert "did not stop within 1 s of its interrupt" in local_backend.logs("stuck")
    session.close()


def _quiet(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception:  # noqa: BLE001 - the session ends with the kernel: what matters is that the kernel exits
        pass


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="tgkill by syscall number")
def test_sigterm_delivered_to_another_thread_still_stops_an_idle_kernel(local_backend):
    """The kernel picks any thread that does not block a process-directed signal; Python runs the handler in the
    main thread only. Sent straight to a non-main thread (tgkill), as the kernel sometimes does with the kubelet's
    SIGTERM, it must still stop an idle pod kernel (it used to wait in an empty queue for good)."""
    import ctypes

    handle = local_backend.launch(Compute(name="sigterm-thread"))
    session = handle.session()
    session.connect()
    assert session.execute("1").data == {"text/plain": "1"}
    pid = handle.pid
    other = next(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, pid, other, signal.SIGTERM) == 0, ctypes.get_errno()  # tgkill(pid, tid, SIGTERM)
    psutil.Process(pid).wait(timeout=10)  # psutil.TimeoutExpired: the signal was never handled
    session.close()


def test_the_job_queue_is_first_in_first_out_across_threads():
    """Executor.jobs: what several threads put comes out once each, in the order put, and ``waiting`` shows it."""
    import queue

    from pod_kernel.executor import JobQueue

    jobs = JobQueue()
    with pytest.raises(queue.Empty):
        jobs.get(timeout=0.01)
    jobs.put("a")
    jobs.put("b")
    assert jobs.waiting() == ["a", "b"] and jobs.qsize() == 2
    assert jobs.get(timeout=1) == "a"

    def put_many(who: str) -> None:
        for i in range(500):
            jobs.put(f"{who}{i}")

    threads = [threading.Thread(target=put_many, args=(who,)) for who in "xyz"]
    for t in threads:
        t.start()
    got = [jobs.get(timeout=5) for _ in range(1501)]
    for t in threads:
        t.join()
    assert got[0] == "b" and jobs.qsize() == 0
    for who in "xyz":
        assert [g for g in got if g[0] == who] == [f"{who}{i}" for i in range(500)]
