"""Direct reads (pod_kernel/wsconn.py): each message goes to its handler as websockets parses it, in order.

And a blocking execute the notebook's thread wrote needs no coroutine on the client loop until the connection
drops (kt_jupyter/client/transport.py, Transport._watch). Real websockets on both ends, on 127.0.0.1; the pod
of the transport tests is a fake (named so): a websockets server that speaks the pod's handshake and replies.
"""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from kt_jupyter.client import Session
from kt_jupyter.client.asyncapi import AsyncSession
from kt_jupyter.client.handshake import KtClientConnection
from kt_jupyter.client.loop import client_loop
from kt_jupyter.errors import RemoteTimeoutError
from pod_kernel import protocol as P
from pod_kernel.server import KtServerConnection


def _on_loop(awaitable, timeout=30):
    async def run():
        return await awaitable

    return asyncio.run_coroutine_threadsafe(run(), client_loop()).result(timeout)


def _server(handler, **kwargs):
    async def start():
        return await serve(handler, "127.0.0.1", 0, compression=None, **kwargs)

    server = _on_loop(start())
    return server, server.sockets[0].getsockname()[1]


def test_messages_reach_the_handler_in_order_as_they_are_parsed():
    go = threading.Event()

    async def handler(ws):
        for i in range(3):  # before the client has a handler: they wait in its inbox
            await ws.send(b"early-%d" % i)
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 10)
        for i in range(200):
            await ws.send(b"live-%d" % i)
        await ws.wait_closed()

    server, port = _server(handler)
    got: list[bytes | str] = []
    in_data_received: list[bool] = []
    all_in = threading.Event()

    def on_message(message):
        got.append(message)
        in_data_received.append(any(f.function == "data_received" for f in inspect.stack(0)))
        if len(got) == 202:
            all_in.set()

    try:
        ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, compression=None))
        assert _on_loop(ws.next_message()) == b"early-0"
        _on_loop(asyncio.sleep(0.2))  # the other two are in the inbox by now
        client_loop().call_soon_threadsafe(ws.set_handler, on_message)
        _on_loop(asyncio.sleep(0.1))
        assert got == [b"early-1", b"early-2"]  # handed over when the handler was set, first
        go.set()
        assert all_in.wait(10)
        assert got == [b"early-1", b"early-2"] + [b"live-%d" % i for i in range(200)]
        assert all(in_data_received[2:])  # as websockets parsed them: not on a later turn of the loop
        _on_loop(ws.close())
    finally:
        server.close()


def test_a_text_or_fragmented_message_is_handed_over_as_what_decode_frame_refuses():
    async def handler(ws):
        await ws.send("some text")
        await ws.send([b"part one", b"part two"])  # websockets sends an iterable as one fragmented message
        await ws.send(P.encode_frame({"type": "notice"}))
        await ws.wait_closed()

    server, port = _server(handler)
    got: list[bytes | str] = []
    done = threading.Event()

    def on_message(message):
        got.append(message)
        if len(got) == 3:
            done.set()

    try:
        ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, compression=None))
        client_loop().call_soon_threadsafe(ws.set_handler, on_message)
        assert done.wait(10)
        assert got[:2] == ["a text message", "a fragmented message"]  # the latter once whole
        for message in got[:2]:
            with pytest.raises(P.ProtocolError):
                P.decode_frame(message)
        assert P.decode_frame(got[2])[0] == {"type": "notice"}  # the connection goes on: the handler decides
        _on_loop(ws.close())
    finally:
        server.close()


def test_take_early_only_while_the_reader_waits_so_the_order_holds():
    """The pod queues an execute as it is parsed only when its request loop waits for a message: one that
    comes while the loop still works on an earlier request is read after it."""
    order: list[str] = []
    done = asyncio.Event()

    async def handler(ws):
        def early(message):
            if message.startswith(b"execute"):
                order.append(f"early {message.decode()}")
                return True
            return False

        ws.take_early = early
        try:
            while True:
                message = await ws.next_message()
                order.append(f"loop {message.decode()}")
                if message == b"slow":
                    await asyncio.sleep(0.3)  # a request the loop awaits (as the pod awaits a push)
                if message == b"end":
                    done.set()
        except ConnectionClosed:
            pass

    server, port = _server(handler, create_connection=KtServerConnection)
    try:
        ws = _on_loop(connect(f"ws://127.0.0.1:{port}", compression=None))
        _on_loop(ws.send(b"execute-1"))
        _on_loop(asyncio.sleep(0.1))
        _on_loop(ws.send(b"slow"))
        _on_loop(ws.send(b"execute-2"))  # while the loop sleeps on "slow"
        _on_loop(asyncio.sleep(0.5))
        _on_loop(ws.send(b"execute-3"))
        _on_loop(asyncio.sleep(0.1))
        _on_loop(ws.send(b"end"))
        _on_loop(asyncio.wait_for(done.wait(), 10))
        assert order == ["early execute-1", "loop slow", "loop execute-2", "early execute-3", "loop end"]
        _on_loop(ws.close())
    finally:
        server.close()


def test_next_message_raises_connection_closed_once_closed():
    async def handler(ws):
        await ws.send(b"one")
        await ws.close(1000, "bye")

    server, port = _server(handler)
    try:
        ws = _on_loop(connect(f"ws://127.0.0.1:{port}", create_connection=KtClientConnection, compression=None))
        assert _on_loop(ws.next_message()) == b"one"
        with pytest.raises(ConnectionClosed):
            _on_loop(ws.next_message(), timeout=10)
    finally:
        server.close()


class FakePod:
    """A fake pod kernel (a websockets server, not pod_kernel): it passes the handshake as the pod does (the
    token's proof) and answers executes; ``garble`` first connections answer one with a text frame instead."""

    def __init__(self, token: str, garble: int = 0, after_welcome: list[dict] | None = None) -> None:
        self.token, self.garble = token, garble
        self.after_welcome = after_welcome or []
        self.connections = 0
        self.close_codes: list[int | None] = []
        self.executes: list[str] = []
        self.seq = 0

    async def handler(self, ws) -> None:
        headers = ws.request.headers
        self.connections += 1
        garble = self.connections <= self.garble
        sid = headers[P.HEADER_SESSION]
        await ws.send(P.encode_frame({
            "type": "welcome", "protocol": P.PROTOCOL_VERSION, "session": sid, "pid": 1, "compute": "fake",
            "proof": P.pod_proof(self.token.encode(), headers[P.HEADER_NONCE], sid), "last_seq": self.seq,
            "running": None, "allowed_serialization": ["json"], "started": 0.0, "bulk_port": None,
            "bulk_spares": [], "detached": []}))
        for header in self.after_welcome:
            self.seq += 1
            await ws.send(P.encode_frame(dict(header, seq=self.seq)))
        try:
            async for message in ws:
                header, _ = P.decode_frame(message)
                if header["type"] != "execute":
                    await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "interrupted": False}))
                    continue
                self.executes.append(header["id"])
                if garble:
                    await ws.send("not a frame of the protocol")
                    continue
                self.seq += 1
                await ws.send(P.encode_frame({"type": "execute_reply", "id": header["id"], "status": "ok",
                                              "execution_count": self.seq, "seq": self.seq}))
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.protocol.close_code)  # (websockets 14.0 has no ws.close_code)


@pytest.fixture
def coroutines(monkeypatch):
    """How many executes got a coroutine of their own (AsyncSession._aexecute) on the client loop."""
    started: list[str] = []
    aexecute = AsyncSession._aexecute

    async def counting(self, code, *args, **kwargs):
        started.append(code)
        return await aexecute(self, code, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "_aexecute", counting)
    return started


def test_a_direct_execute_needs_no_coroutine_and_a_dropped_one_is_sent_again(coroutines):
    pod = FakePod("t0ken", garble=1)
    server, port = _server(pod.handler)
    session = Session(f"ws://127.0.0.1:{port}", "t0ken", name="fake", accept_pickle=False)
    try:
        session.connect()
        # the fake pod answers the first execute with a text frame: the client closes that connection (1002),
        # reconnects, and sends the execute again, which the coroutine started for it does
        first = session.execute("x = 1", timeout=20)
        assert first.execution_count == 1
        assert pod.connections == 2 and pod.close_codes == [1002]
        assert len(pod.executes) == 2 and pod.executes[0] == pod.executes[1]  # the same request, sent again
        assert coroutines == ["x = 1"]
        for n in range(5):  # written by this thread, answered on the live connection: no coroutine
            assert session.execute(f"y = {n}", timeout=20).execution_count == 2 + n
        assert coroutines == ["x = 1"]
        assert pod.connections == 2
    finally:
        session.close()
        server.close()


def test_a_direct_execute_given_up_on_is_still_collected(coroutines):
    """A cell that times out: its reply, when it comes, is taken by the coroutine started then."""
    pod = FakePod("t0ken")
    replied = asyncio.Event()

    async def handler(ws):  # the fake pod, its first execute_reply held back until after the caller gave up
        send = ws.send

        async def late_send(message, *args, **kwargs):
            if isinstance(message, bytes) and b"execute_reply" in message and not replied.is_set():
                await asyncio.sleep(1.0)
                replied.set()
            return await send(message, *args, **kwargs)

        ws.send = late_send
        await pod.handler(ws)

    server, port = _server(handler)
    session = Session(f"ws://127.0.0.1:{port}", "t0ken", name="fake", accept_pickle=False)
    try:
        session.connect()
        with pytest.raises(RemoteTimeoutError):
            session.execute("slow()", timeout=0.3)
        assert coroutines == ["slow()"]  # started when the caller gave up: it collects the reply
        _on_loop(asyncio.wait_for(replied.wait(), 10))
        _on_loop(asyncio.sleep(0.2))
        assert not session._executions  # the late reply was taken: nothing waits for it any more
        assert session.execute("z = 1", timeout=20).execution_count == 2
        assert coroutines == ["slow()"]
    finally:
        session.close()
        server.close()


def test_a_full_inbox_stops_reading_until_the_reader_catches_up():
    """A peer cannot make the pod hold more than websockets' own queue would (max_queue, 16 messages) while its
    request loop is busy: the connection stops reading, the peer's sends wait, and nothing is lost."""
    go = asyncio.Event()
    seen: dict[str, object] = {}
    received: list[bytes] = []

    async def handler(ws):
        await asyncio.wait_for(go.wait(), 20)  # the request loop is busy (as with a long push)
        seen["inbox"], seen["paused"] = len(ws._inbox), ws._reading_paused
        try:
            while len(received) < 200:
                received.append(await ws.next_message())
        except ConnectionClosed:
            pass
        seen["paused_after"] = ws._reading_paused

    server, port = _server(handler, create_connection=KtServerConnection, max_size=None)
    try:
        ws = _on_loop(connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None))
        sent: list[int] = []

        async def send_all():
            for i in range(200):
                await ws.send(i.to_bytes(4, "big") * (16 << 10))  # 64 KiB each, 12.5 MiB in all
                sent.append(i)

        sender = asyncio.run_coroutine_threadsafe(send_all(), client_loop())
        _on_loop(asyncio.sleep(1.0))
        assert len(sent) < 200  # the pod stopped reading: the sender waits
        client_loop().call_soon_threadsafe(go.set)
        sender.result(30)
        _on_loop(asyncio.sleep(0.5))
        # websockets parses all the frames of one read at once: a few more than the mark may wait
        assert seen["paused"] is True and 16 <= seen["inbox"] <= 16 + 8, seen
        assert [int.from_bytes(m[:4], "big") for m in received] == list(range(200))
        assert seen["paused_after"] is False
        _on_loop(ws.close())
    finally:
        server.close()


def test_a_handler_that_fails_loses_its_message_not_the_connection(caplog):
    pod = FakePod("t0ken", after_welcome=[{"type": "stream", "id": "nobody-1", "name": "stdout", "text": "hi"}])
    server, port = _server(pod.handler)
    session = Session(f"ws://127.0.0.1:{port}", "t0ken", name="fake", accept_pickle=False)

    def broken(header):
        raise RuntimeError("a bug in a handler")

    session.on_unsolicited = broken  # called for the stream of a request this session did not send
    try:
        session.connect()
        assert session.execute("x = 1", timeout=20).execution_count == 2
        assert pod.connections == 1 and pod.close_codes == []
        assert any("a bug in a handler" in (r.exc_text or "") or (r.exc_info and "a bug in a handler" in
                   str(r.exc_info[1])) for r in caplog.records), caplog.records
    finally:
        session.close()
        server.close()
