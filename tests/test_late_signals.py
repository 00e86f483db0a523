"""A Ctrl-C whose Python handler runs late still ends the main thread's waits.

CPython runs a signal's Python handler in the main thread only, between two bytecodes. When the SIGINT reaches
the main thread just before it blocks (its C handler runs, then the thread enters its system call), or the kernel
gives it to another thread, the handler waits until the main thread runs Python again. Sent here to another
thread with ``pthread_kill``, the signal is in exactly that state, every time: a wait without end never sees it.
Seen for real: an interrupt at a remote pdb prompt, under load, left the pod waiting at the prompt for good.
"""
from __future__ import annotations

import signal
import threading
import time
from types import SimpleNamespace

import pytest

from pod_kernel import waits
from pod_kernel.debugging import InputRelay


def _sigint_on_another_thread(after_s: float = 0.3) -> None:
    """SIGINT, ``after_s`` from now, to a new thread of this process: its Python handler becomes due in the main
    thread, which is not woken (by then waiting)."""

    def send() -> None:
        time.sleep(after_s)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=send, daemon=True).start()


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt) during the test; this runs in the main thread."""
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_pdb_prompt_wait_ends_when_the_interrupt_is_handled_late(ctrl_c):
    relay = InputRelay(SimpleNamespace(current=None))
    job = SimpleNamespace(req_id="r1", outbox=SimpleNamespace(append=lambda header: _sigint_on_another_thread()))
    fallback = threading.Timer(5.0, lambda: relay.answer(None, "c"))  # bounds the test when the wait misses it
    fallback.start()
    t0 = time.monotonic()
    try:
        answer = relay.ask(job, "(Pdb) ")
    finally:
        fallback.cancel()
    took = time.monotonic() - t0
    assert answer == "q", answer  # the interrupt quit pdb; "c" would be the fallback's answer after 5 s
    assert took < 5 * waits.MAIN_WAIT_SLICE_S + 1.0, took
    assert relay.waiting == []


@pytest.mark.parametrize("way", ["websocket", "lane"])
def test_a_remote_cell_is_interrupted_when_the_ctrl_c_is_handled_late(kernel, ctrl_c, way):
    """The caller's thread waits for the reply on the WebSocket's inbox (a session's first cell) or reads it from
    the lane (the cells after it). Before: the interrupt waited for the cell's end, and then, raised between the
    inbox's token and its item, stranded the reply: the caller waited for good."""
    _, session = kernel
    if way == "lane":
        session.execute("pass")  # the first cell asks for the lane
        deadline = time.monotonic() + 10
        while (session._conn is None or session._conn.lane is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session._conn.lane is not None
    started = threading.Event()
    printed: list[str] = []

    def on_output(msg) -> None:
        printed.append(msg.get("text", ""))
        if "in" in msg.get("text", "") and not started.is_set():
            started.set()
            _sigint_on_another_thread()  # lands once this thread (the caller's, main) went back to its wait

    code = "import time\nprint('in', flush=True)\nfor _ in range(100):\n    time.sleep(0.1)\nprint('ran on')\n"
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # the remote cell's, raised as its own type
        session.execute(code, on_output=on_output)
    took = time.monotonic() - t0
    assert started.is_set() and "ran on" not in "".join(printed)
    assert took < 8.0, took  # the cell runs 10 s when the interrupt is lost until its end
    assert session.execute("21 * 2").data == {"text/plain": "42"}  # the session goes on


def test_waits_never_block_the_main_thread_longer_than_a_slice():
    event = threading.Event()
    t0 = time.monotonic()
    assert waits.wait_event(event, 0.5) is False
    assert 0.45 <= time.monotonic() - t0 < 2.0
    slices = list(waits.slices(1.0))
    assert all(0 <= s <= waits.MAIN_WAIT_SLICE_S for s in slices) and len(slices) >= 5
    forever = waits.slices(None)
    assert [next(forever) for _ in range(3)] == [waits.MAIN_WAIT_SLICE_S] * 3
    threading.Timer(0.3, event.set).start()
    assert waits.wait_event(event) is True


def slow_steps(n: int) -> int:
    """Sleeps ``n`` tenths of a second on the pod, a step at a time."""
    import time

    for _ in range(n):
        time.sleep(0.1)
    return n


def test_a_kt_fn_call_is_cancelled_when_the_ctrl_c_is_handled_late(cleanup_connections, ctrl_c):
    import kt_jupyter as kt

    remote = kt.fn(slow_steps, name="late-ctrl-c").to(kt.Compute())
    assert remote(1) == 1  # the pod kernel runs and the function has travelled
    _sigint_on_another_thread(0.5)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        remote(100)  # 10 s when the interrupt waits for the call's end
    assert time.monotonic() - t0 < 8.0
    assert remote(2) == 2


def test_a_cell_waiting_behind_an_async_cell_stops_when_the_ctrl_c_is_handled_late(ip, ctrl_c):
    from ipshell import run

    run(ip, "%%kt --async --name late-async\nimport time\nfor _ in range(40):\n    time.sleep(0.1)\n")
    _sigint_on_another_thread(0.5)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run(ip, "%%kt --name late-async\nafter = 1")  # waits for the --async cell's end (4 s)
    assert time.monotonic() - t0 < 3.0
    assert "after" not in ip.user_ns
    run(ip, "%kt wait")


class _CtrlCWhilePickled:
    """A value whose pickling is where the Ctrl-C lands (fingerprinting or dumping it, before the cell goes)."""

    def __reduce__(self):
        raise KeyboardInterrupt


def test_a_ctrl_c_before_the_cell_was_sent_says_it_did_not_run(ip):
    from ipshell import run

    run(ip, "%%kt --name late-before\nx = 1")
    ip.user_ns["stuck"] = _CtrlCWhilePickled()
    result = ip.run_cell("%%kt --name late-before\ny = stuck")
    exc = result.error_in_exec
    assert isinstance(exc, KeyboardInterrupt) and "did not run" in str(exc)
    assert exc._render_traceback_() == [f"KeyboardInterrupt: {exc}"]  # one line, no frames of ours
    del ip.user_ns["stuck"]
    run(ip, "%%kt --name late-before\nseen = 'y' in dir()")
    assert ip.user_ns["seen"] is False
