"""Direct writes (pod_kernel/wsconn.py): a thread writes a small frame on a connection without waking its loop.

The notebook's thread writes a cell's execute, the pod's main thread the cell's reply. Frames must reach the
wire whole, none lost, whatever the loop writes at the same time, and a socket that takes only part of a frame
must not let anything in before the rest. Real sockets on 127.0.0.1, real websockets on both ends.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from kt_jupyter.client.handshake import KtClientConnection
from kt_jupyter.client.loop import client_loop
from pod_kernel import wsconn
from pod_kernel.wsconn import DIRECT_MAX_BYTES


def _on_loop(awaitable, timeout=30):
    async def run():
        return await awaitable

    return asyncio.run_coroutine_threadsafe(run(), client_loop()).result(timeout)


def _send(ws: KtClientConnection, message: bytes) -> None:
    """As the client does: directly when it can, else through the loop (waiting for it, to keep order)."""
    if not ws.send_now(message):
        _on_loop(ws.send(message))


def test_direct_and_loop_writes_from_many_threads_arrive_whole_and_once():
    received: list[bytes] = []
    done = threading.Event()
    expected = 4 * 300 + 40

    async def handler(ws):
        async for message in ws:
            received.append(message)
            if len(received) == expected:
                done.set()

    async def start():
        return await serve(handler, "127.0.0.1", 0, max_size=None, compression=None)

    server = _on_loop(start())
    port = server.sockets[0].getsockname()[1]
    ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, max_size=None,
                          compression=None))
    try:
        assert isinstance(ws, KtClientConnection)
        direct = [0]

        def writer(t):
            for i in range(300):
                message = f"{t}:{i}:".encode() + bytes([t]) * (i * 37 % 9000)
                if ws.send_now(message):
                    direct[0] += 1
                else:
                    _on_loop(ws.send(message))

        def big_writer():  # 1 MiB frames through the loop: the socket takes them in parts
            for i in range(40):
                _on_loop(ws.send(f"big:{i}:".encode() + bytes(1 << 20)))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)] + [threading.Thread(target=big_writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert done.wait(30), f"{len(received)} of {expected} messages arrived"
        assert direct[0] > 0  # the direct way was taken (and the loop's, for the rest)
        by_thread: dict[str, list[int]] = {}
        for message in received:
            kind, i, body = message.split(b":", 2)
            if kind == b"big":
                assert body == bytes(1 << 20)
                continue
            t = int(kind)
            assert body == bytes([t]) * (int(i) * 37 % 9000)  # whole: no bytes of another frame inside
            by_thread.setdefault(str(t), []).append(int(i))
        assert all(seq == list(range(300)) for seq in by_thread.values())  # each thread's in its order
        assert len(by_thread) == 4
    finally:
        _on_loop(ws.close())
        server.close()


def _raw_websocket_peer(listener: socket.socket, read_after: threading.Event, out: list[bytes]) -> None:
    """A WebSocket server on a plain socket that stops reading after the handshake until ``read_after``."""
    conn, _ = listener.accept()
    proto = ServerProtocol()
    while True:
        proto.receive_data(conn.recv(65536))
        requests = [e for e in proto.events_received() if isinstance(e, Request)]
        if requests:
            proto.send_response(proto.accept(requests[0]))
            conn.sendall(b"".join(proto.data_to_send()))
            break
    read_after.wait(30)
    conn.settimeout(5)
    while True:
        try:
            data = conn.recv(1 << 20)
        except TimeoutError:
            break
        if not data:
            break
        proto.receive_data(data)
        out.extend(e.data for e in proto.events_received() if isinstance(e, Frame) and e.opcode is Opcode.BINARY)
    conn.close()


def test_a_frame_the_socket_takes_in_part_is_finished_before_anything_else():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    read_after, out = threading.Event(), []
    peer = threading.Thread(target=_raw_websocket_peer, args=(listener, read_after, out), daemon=True)
    peer.start()
    port = listener.getsockname()[1]
    ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, compression=None))
    try:
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent: list[bytes] = []
        for i in range(200):  # the peer reads nothing: the socket fills, and one frame goes in part
            message = f"{i}:".encode() + bytes([i % 256]) * (DIRECT_MAX_BYTES - 16)
            if not ws.send_now(message):
                break
            sent.append(message)
        assert 0 < len(sent) < 200
        assert ws._direct_rest  # the part the socket did not take waits for the loop
        assert not ws.send_now(b"after")  # nothing may pass it
        last = asyncio.run_coroutine_threadsafe(ws.send(b"through the loop"), client_loop())
        read_after.set()
        last.result(30)
        time.sleep(0.2)
    finally:
        _on_loop(ws.close())
    peer.join(30)
    assert out[: len(sent)] == sent  # whole, in order
    assert out[len(sent)] == b"through the loop"


def test_this_websockets_lets_the_loops_writes_wait_for_a_direct_one():
    """Every write of websockets' asyncio connection goes through send_data, which DirectWrites wraps; a
    websockets that changed that would write nothing directly (SUPPORTED false) and fail here, not corrupt frames."""
    assert wsconn.SUPPORTED


def test_no_direct_write_when_it_cannot_go_at_once(monkeypatch):
    async def handler(ws):
        async for _ in ws:
            pass

    async def start():
        return await serve(handler, "127.0.0.1", 0, compression=None)

    server = _on_loop(start())
    port = server.sockets[0].getsockname()[1]
    ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, compression=None))
    try:
        assert not ws.send_now(bytes(DIRECT_MAX_BYTES + 1))  # too big: the loop sends it, with flow control
        assert ws.send_now(b"small")
        monkeypatch.setattr(wsconn, "SUPPORTED", False)
        assert not ws.send_now(b"small")
    finally:
        _on_loop(ws.close())
        server.close()
    assert not ws.send_now(b"closed")


def _block_loop_code(seconds: float) -> str:
    """Pod cell code that puts the pod kernel's network loop to sleep for ``seconds``, from its main thread."""
    return (
        "import asyncio, gc, time\n"
        "[loop] = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]\n"
        f"loop.call_soon_threadsafe(time.sleep, {seconds})\n"
    )


def test_the_pod_writes_a_cells_reply_from_its_main_thread(kernel):
    """The reply goes out while the pod's network loop sleeps: the main thread wrote it itself."""
    _, session = kernel
    session.execute("pass")
    t0 = time.perf_counter()
    session.execute(_block_loop_code(2.0))
    assert time.perf_counter() - t0 < 1.5
    time.sleep(2.0)
    assert session.execute("1 + 1").data == {"text/plain": "2"}  # the loop's way works on after it


def test_the_notebook_thread_writes_the_execute_itself(kernel, tmp_path):
    """The cell runs on the pod while the client's loop is blocked: the calling thread wrote the request."""
    _, session = kernel
    session.execute("pass")
    marker = tmp_path / "ran"
    client_loop().call_soon_threadsafe(time.sleep, 2.0)
    result: list = []
    t = threading.Thread(target=lambda: result.append(session.execute(f"open({str(marker)!r}, 'w').close()")))
    t.start()
    deadline = time.monotonic() + 1.5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "the cell did not run while the client loop was blocked"
    t.join(30)
    assert result and result[0].execution_count is not None  # its reply still reached the caller


@pytest.mark.parametrize("blocked", ["client", "pod"])
def test_output_and_reply_keep_their_order_either_way(kernel, blocked):
    """A cell that prints, then ends: its output comes before its reply, direct writes or not."""
    _, session = kernel
    seen: list[str] = []
    code = "for i in range(50):\n    print(i)\n"
    if blocked == "pod":
        code = _block_loop_code(0.5) + code
    else:
        client_loop().call_soon_threadsafe(time.sleep, 0.5)
    session.execute(code, on_output=lambda m: seen.append(m.get("text", "")) if m["type"] == "stream" else None)
    assert "".join(seen) == "".join(f"{i}\n" for i in range(50))
