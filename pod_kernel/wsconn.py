"""What both ends add to websockets' asyncio connections: pings that leave ``random`` alone, direct writes and
direct reads.

A direct write puts a small frame on the socket from the thread that has it
(the notebook's, the pod's main thread), without waking the connection's
event-loop thread to do it. On an idle VM that wake-up is most of what a
trivial ``%%kt`` cell costs beyond a local one: 0.1-0.6 ms for each hop.

Every write of the loop goes through :meth:`DirectWrites.send_data`, under the
same lock as a direct write; a direct write is made only while the transport
has nothing queued, so frames reach the wire whole. What the socket does not
take at once is handed to the loop, which writes it before anything else.

A direct read hands each message to its handler as websockets parses it, on
the loop's thread, inside ``data_received`` (see :class:`DirectReads`). Through
websockets' own queue, a message waits for its reader coroutine's next turn of
the loop: a cell's reply took 135-221 us here from its bytes to its handler.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
from websockets.protocol import Side, State

log = logging.getLogger("pod_kernel.wsconn")

#: Frames up to this size may be written from another thread; bigger ones go through the loop.
DIRECT_MAX_BYTES = 16 << 10

#: Whether this websockets routes every write of its asyncio connections through ``send_data`` (14.0 and 17.4
#: were read to check it): only then can the loop's writes be made to wait for a direct one. Otherwise nothing is
#: written directly.
SUPPORTED = callable(getattr(Connection, "send_data", None))

# DirectReads takes every data frame in ``process_event``, which websockets' asyncio connection calls for each
# event it parses (13.0 on). Without that hook messages would go to a queue nobody reads: say so at import.
_READS_HOOK = getattr(Connection, "process_event", None)
if _READS_HOOK is None:  # pragma: no cover - a websockets we do not know
    raise ImportError("this websockets' asyncio Connection has no process_event, so kt_jupyter's connections cannot "
                      "read messages with it (websockets 14.0 to 17.4 have it)")


class DirectWrites:
    """Mixin for a websockets asyncio connection (client or server); put it first among the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # reentrant: the transport may report a lost connection from inside a write, and websockets may write then
        self._write_lock = threading.RLock()
        #: bytes of a direct write the socket did not take: the loop writes them before anything else
        self._direct_rest = b""

    async def ping(self, data: Any = None) -> Any:
        """Send a ping; its payload comes from ``os.urandom`` when none is given.

        websockets draws ping payloads from the global :mod:`random` module: every
        heartbeat would shift the numbers of a notebook that called ``random.seed``.
        """
        return await super().ping(os.urandom(8) if data is None else data)  # type: ignore[misc]

    def send_data(self) -> None:
        """The loop's writes (websockets calls this for each): after what a direct write left, under the lock."""
        with self._write_lock:
            self._write_rest()
            super().send_data()  # type: ignore[misc]

    def send_now(self, message: bytes) -> bool:
        """Write binary ``message`` as one frame from this thread (not the loop's), at once.

        False, with nothing sent, when it cannot go this way: the connection is
        not open, the loop has bytes queued, or the message is bigger than
        :data:`DIRECT_MAX_BYTES`; the caller sends it through the loop then.
        True: it is on its way, as if the loop had written it (a connection that
        fails meanwhile is reported by the loop, as for any write).

        The frame is made here, not by websockets' protocol object: that one
        belongs to the loop's thread (its list of frames to write is not safe
        to share). A frame the loop made and has not written yet may follow
        this one: frames of different requests have no order between them.
        """
        if len(message) > DIRECT_MAX_BYTES or not SUPPORTED:
            return False
        loop, transport, protocol = self.loop, self.transport, self.protocol  # type: ignore[attr-defined]
        with self._write_lock:
            if (self._direct_rest or protocol.state is not State.OPEN
                    or getattr(protocol, "expect_continuation_frame", True) or protocol.extensions
                    or transport.is_closing() or transport.get_write_buffer_size()
                    or transport.get_extra_info("sslcontext") is not None):
                return False
            sock = transport.get_extra_info("socket")
            if sock is None:
                return False
            data = Frame(Opcode.BINARY, message).serialize(mask=protocol.side is Side.CLIENT)
            try:
                sent = os.write(sock.fileno(), data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the connection is gone; the loop finds out and reports it
                return True
            if sent < len(data):  # the loop writes the rest before anything of its own
                self._direct_rest = data[sent:]
                loop.call_soon_threadsafe(self._write_rest)
        return True

    def _write_rest(self) -> None:
        with self._write_lock:
            rest, self._direct_rest = self._direct_rest, b""
            if rest and not self.transport.is_closing():  # type: ignore[attr-defined]
                self.transport.write(rest)  # type: ignore[attr-defined]


#: Messages a :class:`DirectReads` inbox holds before the connection stops reading (websockets' ``max_queue``
#: when the connection has one: 16 by default).
INBOX_HIGH = 16

#: A message handler of :class:`DirectReads`: the message's bytes, or a str for what is not a whole binary message.
MessageHandler = Callable[[bytes | str], None]


class DirectReads:
    """Mixin for a websockets asyncio connection (client or server): its messages go to a handler, in order, on
    the loop's thread, as they are parsed; never to websockets' queue (``recv()`` and ``async for`` get nothing).

    Each message of this protocol is one binary frame (websockets never fragments
    a ``bytes`` message). A text message or a fragmented one is handed over, once
    whole, as a str that names it (its parts are not kept), which
    :func:`pod_kernel.protocol.decode_frame` refuses: the handler closes the
    connection as for any frame that breaks the protocol.

    Until :meth:`set_handler`, messages wait in an inbox of their own, which
    :meth:`next_message` reads (the handshake's welcome; a server's requests); as in
    websockets' own queue, a full inbox stops the connection's reading until the
    reader catches up, so a peer cannot make it hold more.
    While that reader waits, with nothing queued, :attr:`take_early` may take a
    message at once instead (the pod queues a cell for its main thread so): it
    comes after everything the reader has read, so the order holds.
    """

    #: ``(message) -> taken``: see above; False leaves the message to the reader
    take_early: Callable[[bytes | str], bool] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox: collections.deque[bytes | str] = collections.deque()
        self._handler: MessageHandler | None = None
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._fragmented = False
        # flow control, as websockets' own queue does it: past ``high`` waiting messages the connection stops
        # reading (the peer's sends then block), and reads again once the reader brought them down to ``low``
        high = getattr(self, "max_queue_high", None)
        self._inbox_high = high if isinstance(high, int) and high > 0 else INBOX_HIGH
        self._inbox_low = self._inbox_high // 4
        self._reading_paused = False
        self._closing: asyncio.Future[None] | None = None

    def process_event(self, event: Any) -> None:
        """websockets calls this for each event parsed (in ``data_received``): data frames are ours."""
        if not isinstance(event, Frame) or event.opcode not in DATA_OPCODES:
            super().process_event(event)  # type: ignore[misc]  # the handshake, pings, pongs, the close
            return
        if not event.fin:  # its parts are not kept: the message is handed over, refused, once it is whole
            self._fragmented = True
            return
        message: bytes | str
        if self._fragmented:
            message, self._fragmented = "a fragmented message", False
        else:
            message = bytes(event.data) if event.opcode is Opcode.BINARY else "a text message"
        if self._handler is not None and not self._inbox:
            self._handler(message)
            return
        waiter = self._inbox_waiter
        if (self.take_early is not None and not self._inbox and waiter is not None and not waiter.done()
                and self.take_early(message)):
            return
        self._inbox.append(message)
        if len(self._inbox) >= self._inbox_high and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[attr-defined]
        self._wake_reader()

    def set_handler(self, handler: MessageHandler) -> None:
        """From now on, each message goes to ``handler`` as it arrives (on the loop's thread); those that
        waited in the inbox go first, now."""
        while self._inbox:
            handler(self._inbox.popleft())
        self._handler = handler
        self._resume_reading()

    async def next_message(self) -> bytes | str:
        """The inbox's next message (before :meth:`set_handler`); ConnectionClosed once the connection is."""
        while not self._inbox:
            protocol = self.protocol  # type: ignore[attr-defined]
            if protocol.state is State.CLOSED:
                raise protocol.close_exc
            self._inbox_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._inbox_waiter
            finally:
                self._inbox_waiter = None
        message = self._inbox.popleft()
        if len(self._inbox) <= self._inbox_low:
            self._resume_reading()
        return message

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[attr-defined]  # a closing transport ignores it

    def refuse(self, reason: str) -> None:
        """Close the connection for breaking the protocol (1002), from the loop's thread."""
        log.debug("closing a connection that broke the protocol: %s", reason)
        closing = self.close(CloseCode.PROTOCOL_ERROR, reason[:120])  # type: ignore[attr-defined]
        self._closing = asyncio.ensure_future(closing)  # referenced until done: the loop's reference is weak

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._inbox_waiter is not None and not self._inbox_waiter.done():
            self._inbox_waiter.set_result(None)
