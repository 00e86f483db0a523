"""Lanes (pod_kernel/lanes.py): a session's executes straight to the pod kernel's main thread.

Real pod kernels and sockets on 127.0.0.1. What must hold: executes go on the lane once it is open, and run
there even while the pod's network loop is busy; an execute sent on both the lane and the WebSocket runs once;
a lane ticket opens one lane, for its own connection only, and dies with it; a lane frame that breaks the
protocol closes the lane and its connection, and the session goes on; a cell that waits behind another
session's cell is told so at once, lane or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import socket
import struct
import threading
import time
import uuid

import pytest
from wire import closed_by_peer

from kt_jupyter.client.loop import client_loop
from pod_kernel import protocol as P
from pod_kernel.executor import JobQueue
from pod_kernel.lanes import MAX_LANE_FRAME, Lane, LaneError, lane_frame, open_lane
from tests.test_direct_writes import _block_loop_code


def _wait_for_lane(session, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = session._conn
        if conn is not None and conn.lane is not None:
            return conn.lane
        time.sleep(0.01)
    raise AssertionError("the session opened no lane")


def _fresh_ticket(handle) -> tuple[object, str, tuple[str, int]]:
    """A new session, connected, and its connection's lane ticket (the session opens no lane of its own yet)."""
    session = handle.session()
    welcome = session.connect()
    return session, welcome["lane"], ("127.0.0.1", int(welcome["bulk_port"]))


def test_cells_go_on_the_lane_and_run_while_the_pods_network_loop_is_busy(kernel, tmp_path):
    _, session = kernel
    session.execute("pass")  # the first cell goes on the WebSocket and asks for the lane
    lane = _wait_for_lane(session)
    sent = lane.sent
    assert session.execute("21 * 2").data == {"text/plain": "42"}
    assert lane.sent == sent + 1
    # the pod's network thread sleeps 1.5 s: a cell on the lane runs at once all the same (its main thread read
    # it), and its output and reply come when the network thread is back
    session.execute(_block_loop_code(1.5))
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    done = threading.Thread(target=session.execute, args=(f"open({str(marker)!r}, 'w').close()",))
    done.start()
    while not marker.exists() and time.monotonic() - t0 < 1.2:
        time.sleep(0.005)
    assert marker.exists(), "the cell did not run while the pod's network loop was busy"
    done.join(30)
    seen: list[str] = []
    session.execute("print('after')", on_output=lambda m: seen.append(m.get("text", "")))
    assert seen == ["after\n"]


def test_replies_come_on_the_lane_after_every_output_sent_before_them(kernel):
    """The pod writes the reply on the lane when its outputs went on the WebSocket already: with the notebook's
    network loop asleep, they are not routed yet when the notebook's thread reads the reply; it waits for them."""
    _, session = kernel
    session.execute("pass")
    _wait_for_lane(session)
    before = session.lane_replies
    assert session.execute("6 * 7").data == {"text/plain": "42"}
    assert session.lane_replies == before + 1
    for _ in range(3):
        seen: list[str] = []
        client_loop().call_soon_threadsafe(time.sleep, 0.4)
        time.sleep(0.05)
        session.execute("for i in range(50):\n    print(i, flush=True)\nimport time; time.sleep(0.1)",
                        on_output=lambda m: seen.append(m.get("text", "")) if m["type"] == "stream" else None)
        assert "".join(seen) == "".join(f"{i}\n" for i in range(50))
    assert session.lane_replies == before + 4


def test_a_cells_last_outputs_come_on_the_lane_with_its_reply(kernel):
    """What a cell printed or returned that was not sent yet when it ended comes on the lane with its reply, and
    the notebook's thread routes it: the cell is done while the notebook's network loop sleeps. Outputs that do
    not fit on the lane go on the WebSocket first, and everything arrives in order."""
    _, session = kernel
    session.execute("pass")
    _wait_for_lane(session)
    loop = client_loop()
    seen: list[dict] = []
    # the pod's network loop sleeps too: its output timer cannot send the print on the WebSocket first, however
    # slowly the cell runs on a busy machine (the main thread writes what it holds when the cell ends)
    session.execute(_block_loop_code(2.0))
    loop.call_soon_threadsafe(time.sleep, 2.0)
    time.sleep(0.05)
    t0 = time.monotonic()
    result = session.execute("print('last words')\n6 * 7", on_output=seen.append)
    took = time.monotonic() - t0
    assert [m["text"] for m in seen if m["type"] == "stream"] == ["last words\n"]
    assert result.data == {"text/plain": "42"}
    assert took < 1.0, f"the cell waited {took:.2f} s for the notebook's sleeping network loop"
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)  # the loop is back
    for _ in range(3):  # 100,000 characters: more than one lane write takes
        seen.clear()
        session.execute("print('x' * 100_000)\nprint('end')", on_output=seen.append)
        assert "".join(m["text"] for m in seen if m["type"] == "stream") == "x" * 100_000 + "\nend\n"


def test_cells_that_follow_a_push_open_the_lane_too(kernel):
    """An execute that follows a push (``after``) goes through the client loop, not on a lane; it asks for the
    lane all the same, so a notebook whose cells all push something gets one."""
    from pod_kernel.protocol import dump_values

    _, session = kernel
    for i in range(3):
        push_id, pushed = session.start_push(dump_values({"x": i}, "pickle"))
        assert session.execute("x * 2", after=push_id).data == {"text/plain": str(2 * i)}
        pushed.result(10)
    lane = _wait_for_lane(session)
    push_id, pushed = session.start_push(dump_values({"x": 5}, "pickle"))
    assert session.execute("x * 2", after=push_id).data == {"text/plain": "10"}
    pushed.result(10)  # no request waits for its reply now: the next execute may take the lane
    sent = lane.sent
    assert session.execute("x + 1").data == {"text/plain": "6"}
    assert lane.sent == sent + 1


def test_a_cell_given_up_on_leaves_its_reply_to_the_loop_and_the_next_cells_are_right(kernel):
    from kt_jupyter.errors import RemoteTimeoutError

    _, session = kernel
    session.execute("n = 0")
    lane = _wait_for_lane(session)
    with pytest.raises(RemoteTimeoutError):
        session.execute("import time\ntry:\n    time.sleep(5)\nfinally:\n    n = -1", timeout=0.3)
    assert lane.adopted  # its reply may come on the lane: the client loop reads it now
    for i in range(1, 6):
        assert session.execute(f"n = {i}\nn").data == {"text/plain": str(i)}
    deadline = time.monotonic() + 10
    while lane.adopted and time.monotonic() < deadline:  # that reply came: the loop hands the lane back
        time.sleep(0.01)
    # the lane carries the next cells again: each goes on it; a reply comes back on it when the pod's network loop
    # is not writing at that moment (else it goes on the WebSocket, as any reply may: a reply just before it that
    # went that way keeps the loop busy for a while), so within a few cells a little apart
    sent, replies = lane.sent, session.lane_replies
    for i in range(1, 11):
        assert session.execute("n").data == {"text/plain": "5"}
        assert lane.sent == sent + i
        if session.lane_replies > replies:
            break
        time.sleep(0.05)
    assert session.lane_replies == replies + 1


def test_a_caller_that_fails_mid_cell_leaves_what_it_read_to_the_loop_and_gets_the_lane_back(kernel):
    """The caller's output callback raises after its thread read the cell's output and reply from the lane: the
    loop routes what it read (the reply is not lost on a lane nobody reads) and the next cells take the lane."""
    _, session = kernel
    session.execute("pass")
    lane = _wait_for_lane(session)

    def fail(message):
        raise RuntimeError("the output callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        session.execute("print('a')\n6 * 7", on_output=fail)
    deadline = time.monotonic() + 10
    while lane.adopted and time.monotonic() < deadline:
        time.sleep(0.01)
    sent, replies = lane.sent, session.lane_replies
    assert session.execute("6 * 7").data == {"text/plain": "42"}
    assert (lane.sent, session.lane_replies) == (sent + 1, replies + 1)


def test_an_execute_on_the_lane_and_again_on_the_websocket_runs_once(kernel):
    _, session = kernel
    session.execute("runs = 0")
    lane = _wait_for_lane(session)
    frame = P.encode_frame({"type": "execute", "id": f"twice-{uuid.uuid4().hex[:8]}", "code": "runs += 1"})
    assert lane.send(frame)
    assert session._conn.ws.send_now(frame)  # as a resend after a reconnect would
    time.sleep(0.3)
    assert session.execute("runs").data == {"text/plain": "1"}


def test_a_lane_ticket_opens_one_lane_for_its_own_connection_and_dies_with_it(kernel):
    handle, _ = kernel
    other, other_ticket, address = _fresh_ticket(handle)
    session, ticket, _ = _fresh_ticket(handle)
    try:
        sock = open_lane(address, ticket)
        with pytest.raises((LaneError, OSError)):  # used once already
            open_lane(address, ticket).close()
        with pytest.raises((LaneError, OSError)):  # not a ticket at all
            open_lane(address, "00" * 32).close()
        # an execute on it runs in its session: the reply comes on that session's WebSocket
        sock.setblocking(True)
        replies: queue.SimpleQueue = queue.SimpleQueue()
        session.on_unsolicited = replies.put
        sock.sendall(lane_frame(P.encode_frame({"type": "execute", "id": "on-a-lane", "code": "lane_ran = 1"})))
        reply = replies.get(timeout=10)
        assert reply["type"] == "execute_reply" and reply["id"] == "on-a-lane" and reply["status"] == "ok"
        # the other connection's ticket still works, once; the lane's connection closing closes the lane
        open_lane(address, other_ticket).close()
        session.close()
        assert closed_by_peer(sock, 10), "the lane outlived its connection"
        sock.close()
        # a ticket whose connection closed before it was used opens nothing
        third, third_ticket, _ = _fresh_ticket(handle)
        third.close()
        time.sleep(0.2)
        with pytest.raises((LaneError, OSError)):
            open_lane(address, third_ticket).close()
    finally:
        other.close()
        session.close()


def _bad_frames() -> list[tuple[str, bytes]]:
    execute = {"type": "execute", "id": "x", "code": "lane_bad = 1"}
    rng = random.Random(21)
    return [
        ("not an execute", lane_frame(P.encode_frame({"type": "ping", "id": "p"}))),
        ("an execute after a push", lane_frame(P.encode_frame(dict(execute, after="push-1")))),
        ("an execute without code", lane_frame(P.encode_frame({"type": "execute", "id": "x"}))),
        ("a header that is not JSON", lane_frame(struct.pack(">I", 5) + b"{oops")),
        ("too big", struct.pack(">I", MAX_LANE_FRAME + 1) + bytes(64)),
        ("random bytes", rng.randbytes(4096)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_frames())), ids=[name for name, _ in _bad_frames()])
def test_a_lane_frame_that_breaks_the_protocol_closes_the_lane_and_its_connection(kernel, case):
    handle, _ = kernel
    session, ticket, address = _fresh_ticket(handle)
    try:
        sock = open_lane(address, ticket)
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.sendall(_bad_frames()[case][1])
        assert closed_by_peer(sock, 10), "the lane stayed open"
        sock.close()
        deadline = time.monotonic() + 10
        while session.reconnects == 0 and time.monotonic() < deadline:  # its connection was closed: it reconnects
            with contextlib.suppress(Exception):
                session.execute("pass")
            time.sleep(0.05)
        assert session.reconnects >= 1
        assert session.execute("'lane_bad' in globals()").data == {"text/plain": "False"}
    finally:
        session.close()


def test_a_lane_cell_behind_another_sessions_cell_is_told_so_at_once(kernel):
    handle, first = kernel
    second = handle.session()
    try:
        for s in (first, second):
            s.execute("pass")
            _wait_for_lane(s)
        long_cell = threading.Thread(target=first.execute, args=("import time; time.sleep(2.0)",))
        long_cell.start()
        time.sleep(0.3)  # it runs
        notices: list[float] = []
        t0 = time.monotonic()
        second.execute("pass", on_output=lambda m: notices.append(time.monotonic() - t0)
                       if m["type"] == "notice" and "another notebook" in m.get("text", "") else None)
        long_cell.join(30)
        assert notices and notices[0] < 1.0, f"the waiting cell was told only after {notices} s"
    finally:
        second.close()


# ---------------------------------------------------------------------- the pod's end, in this process


def _lane_pair(frames: list[bytes], broken: list[tuple[str, bool]]) -> tuple[socket.socket, Lane]:
    a, b = socket.socketpair()
    return a, Lane(b, owner="conn", session="s", on_frame=lambda _lane, frame: frames.append(frame),
                   on_broken=lambda why, refused: broken.append((why, refused)))


def test_a_lane_reads_frames_cut_anywhere_and_several_at_once():
    frames: list[bytes] = []
    broken: list[tuple[str, bool]] = []
    client, lane = _lane_pair(frames, broken)
    wire = b"".join(lane_frame(b"frame-%d" % i + bytes(i * 97)) for i in range(40))
    rng = random.Random(3)
    at = 0
    while at < len(wire):
        step = rng.randrange(1, 400)
        client.sendall(wire[at:at + step])
        at += step
        lane.read()
    assert frames == [b"frame-%d" % i + bytes(i * 97) for i in range(40)]
    client.close()
    lane.read()
    assert broken == [("closed by the client", False)] and lane.closed


def test_a_reply_the_lane_cannot_take_whole_ends_it_as_broken():
    broken: list[tuple[str, bool]] = []
    client, lane = _lane_pair([], broken)
    assert lane.write([b"small"])
    assert not lane.write([bytes(MAX_LANE_FRAME + 1)])  # too big for the client to take: the WebSocket's
    assert not lane.write([bytes(MAX_LANE_FRAME // 2), bytes(MAX_LANE_FRAME // 2 + 1)])  # so are these together
    assert lane.write([b"an output", b"its reply"])
    assert not lane.closed
    expected = lane_frame(b"small") + lane_frame(b"an output") + lane_frame(b"its reply")
    assert client.recv(1 << 20) == expected  # all in one write, each after its length

    class TakesPart:  # a socket whose buffer has room for part of the frame only
        def __init__(self, sock):
            self.sock = sock

        def send(self, data):
            return self.sock.send(data[:len(data) // 2])

        def close(self):
            self.sock.close()

    lane.sock = TakesPart(lane.sock)  # type: ignore[assignment]
    assert not lane.write([b"a reply"])
    assert lane.closed and broken == [("a reply did not fit in the lane", True)]
    client.close()


def test_the_job_queue_wakes_its_waiter_for_jobs_and_lane_frames_in_order():
    jobs = JobQueue()
    frames: list[bytes] = []
    client, lane = _lane_pair(frames, [])
    got: list = []

    def main() -> None:
        while len(got) < 200:
            with contextlib.suppress(queue.Empty):
                got.append(jobs.get(timeout=0.05))

    lane.on_frame = lambda _lane, frame: jobs.put(frame)  # a frame queues a job, as the server's does
    jobs.add_lane(lane)
    waiter = threading.Thread(target=main)
    waiter.start()
    for i in range(100):
        jobs.put(("put", i))
        client.sendall(lane_frame(b"%d" % i))
        time.sleep(0.001 * (i % 3))
    waiter.join(30)
    assert [j for j in got if isinstance(j, tuple)] == [("put", i) for i in range(100)]
    assert [j for j in got if isinstance(j, bytes)] == [b"%d" % i for i in range(100)]
    client.close()


def test_a_cell_read_from_a_lane_is_queued_without_waking_its_own_reader():
    """The waiting thread reads a lane's execute and queues it itself: a wake-up would cost it four system calls
    (the write, and at its next wait a poll that returns at once and two reads). Another thread's put still wakes
    it at once."""
    jobs = JobQueue()
    client, lane = _lane_pair([], [])
    lane.on_frame = lambda _lane, frame: jobs.put(frame)
    jobs.add_lane(lane)
    woken: list[int] = []
    wake = jobs.lanes.wake
    jobs.lanes.wake = lambda: woken.append(threading.get_ident()) or wake()  # type: ignore[method-assign]
    for i in range(3):
        client.sendall(lane_frame(b"%d" % i))
        assert jobs.get(timeout=5) == b"%d" % i
    assert woken == []
    putter = threading.Timer(0.2, jobs.put, [("put", 1)])
    putter.start()
    t0 = time.monotonic()
    assert jobs.get(timeout=10) == ("put", 1)
    assert time.monotonic() - t0 < 5 and woken == [putter.ident]
    client.close()
