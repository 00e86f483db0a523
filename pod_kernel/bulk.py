"""The bulk channel: large bundles over a plain TCP connection, straight into their final buffers.

WebSocket framing costs copies (masking, reassembly, one frame per chunk);
for a 1 GB array that caps throughput well under the loopback limit. So a
large bundle's *bytes* may take a side channel: the pod kernel listens on a
second port (same host as the WebSocket, so loopback for local kernels); a
client that was handed a one-time ticket over its authenticated WebSocket
connects, sends the 32-byte ticket, and then the bytes flow with
``sendall`` / ``recv_into`` on preallocated buffers, in threads that release
the GIL. Tickets are single-use, expire, and are only ever sent over the
authenticated session: the bulk port alone grants nothing.
"""

from __future__ import annotations

import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

#: Bundles at least this big use the bulk channel when one is available.
BULK_MIN_BYTES = 1 << 20
#: A ticket not used within this long is dropped.
TICKET_TTL_S = 60.0
TICKET_BYTES = 32
#: A connection must present its ticket within this long.
HANDSHAKE_TIMEOUT_S = 5.0
#: Connections waiting to present a ticket at once; more are closed at once.
MAX_PENDING_HANDSHAKES = 64
#: A bulk transfer that moves no byte for this long fails.
IDLE_TIMEOUT_S = 120.0
#: Largest recv/send call.
IO_BYTES = 8 << 20

ProgressFn = Callable[[int, int], None]


def send_parts(sock: socket.socket, parts: list[memoryview], progress: ProgressFn | None = None) -> None:
    """Write every part in order (no copies beyond the kernel's)."""
    total = sum(p.nbytes for p in parts)
    done = 0
    for part in parts:
        view = part.cast("B") if part.format != "B" or part.ndim != 1 else part
        for start in range(0, view.nbytes, IO_BYTES):
            piece = view[start:start + IO_BYTES]
            sock.sendall(piece)
            done += piece.nbytes
            if progress is not None:
                progress(done, total)


def recv_parts(sock: socket.socket, parts: list[bytearray], progress: ProgressFn | None = None) -> None:
    """Fill every preallocated part in order; EOF before the end is a ConnectionError."""
    total = sum(len(p) for p in parts)
    done = 0
    for part in parts:
        view = memoryview(part)
        got = 0
        while got < len(part):
            n = sock.recv_into(view[got:], min(len(part) - got, IO_BYTES))
            if n == 0:
                raise ConnectionError(f"bulk connection closed after {done + got} of {total} bytes")
            got += n
            if progress is not None:
                progress(done + got, total)
        done += got


@dataclass
class Ticket:
    """What one bulk connection will do: receive into ``parts`` or send ``parts``."""

    receive: bool
    parts: list
    on_done: Callable[[BaseException | None], None]
    expires: float


class BulkServer:
    """The pod kernel's bulk listener; one thread per transfer."""

    def __init__(self, host: str) -> None:
        self._sock = socket.create_server((host, 0))
        self.port = self._sock.getsockname()[1]
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="kt-bulk-accept", daemon=True).start()

    def issue(self, receive: bool, parts: list, on_done: Callable[[BaseException | None], None]) -> str:
        """A one-time ticket (hex) for a transfer of ``parts``."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        self.expire()
        with self._lock:
            self._tickets[ticket] = Ticket(receive, parts, on_done, time.monotonic() + TICKET_TTL_S)
        return ticket.hex()

    def expire(self) -> None:
        """Drop tickets past their time (their buffers are freed; their requests fail)."""
        now = time.monotonic()
        with self._lock:
            expired = [self._tickets.pop(k) for k, t in list(self._tickets.items()) if t.expires < now]
        for ticket in expired:
            ticket.on_done(TimeoutError("bulk transfer ticket expired unused"))

    def _accept(self) -> None:
        """Accept connections and read their tickets in this one thread (non-blocking, with a deadline);
        only a connection that presented a valid ticket gets a transfer thread."""
        sel = selectors.DefaultSelector()
        self._sock.setblocking(False)
        sel.register(self._sock, selectors.EVENT_READ, None)
        pending: dict[socket.socket, list] = {}  # conn -> [ticket bytes so far, deadline]

        def drop(conn: socket.socket) -> None:
            pending.pop(conn, None)
            try:
                sel.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()

        while True:
            try:
                events = sel.select(1.0)
            except (OSError, ValueError):
                return  # the listener was closed
            now = time.monotonic()
            for key, _ in events:
                if key.data is None:
                    try:
                        conn, _ = self._sock.accept()
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if len(pending) >= MAX_PENDING_HANDSHAKES:
                        # the oldest silent connection goes: a real client sends its ticket at once,
                        # so a flood of idle connections cannot starve real transfers
                        drop(min(pending, key=lambda c: pending[c][1]))
                    conn.setblocking(False)
                    pending[conn] = [b"", now + HANDSHAKE_TIMEOUT_S]
                    sel.register(conn, selectors.EVENT_READ, "conn")
                    continue
                conn = key.fileobj
                state = pending.get(conn)
                if state is None:
                    continue
                try:
                    chunk = conn.recv(TICKET_BYTES - len(state[0]))
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    drop(conn)
                    continue
                state[0] += chunk
                if len(state[0]) < TICKET_BYTES:
                    continue
                pending.pop(conn)
                sel.unregister(conn)
                with self._lock:
                    ticket = self._tickets.pop(state[0], None)
                if ticket is None:
                    conn.close()  # unknown or reused ticket: nothing is read or sent
                    continue
                conn.settimeout(IDLE_TIMEOUT_S)
                try:
                    threading.Thread(target=self._transfer, args=(conn, ticket), name="kt-bulk", daemon=True).start()
                except RuntimeError as exc:  # cannot start a thread: fail this transfer, keep serving
                    conn.close()
                    ticket.on_done(exc)
            for conn in [c for c, st in pending.items() if st[1] < now]:
                drop(conn)  # no ticket within the handshake deadline

    def _transfer(self, conn: socket.socket, ticket: Ticket) -> None:
        with conn:
            try:
                if ticket.receive:
                    recv_parts(conn, ticket.parts)
                else:
                    send_parts(conn, ticket.parts)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # wait until the client has read everything
            except BaseException as exc:  # reported to the request that issued the ticket
                ticket.on_done(exc)
                return
            ticket.on_done(None)

    def close(self) -> None:
        """Stop listening."""
        self._sock.close()


def client_transfer(address: tuple[str, int], ticket: str, *, send: list[memoryview] | None = None,
                    receive: list[bytearray] | None = None, progress: ProgressFn | None = None) -> None:
    """The client side of one bulk transfer (blocking; run it in a thread)."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.settimeout(IDLE_TIMEOUT_S)  # a transfer that stalls this long fails instead of hanging
        sock.sendall(bytes.fromhex(ticket))
        if send is not None:
            send_parts(sock, send, progress)
            sock.shutdown(socket.SHUT_WR)
        if receive is not None:
            recv_parts(sock, receive, progress)
