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
        now = time.monotonic()
        with self._lock:
            for key in [k for k, t in self._tickets.items() if t.expires < now]:
                expired = self._tickets.pop(key)
                expired.on_done(TimeoutError("bulk transfer ticket expired unused"))
            self._tickets[ticket] = Ticket(receive, parts, on_done, now + TICKET_TTL_S)
        return ticket.hex()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kt-bulk", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                raw = b""
                while len(raw) < TICKET_BYTES:
                    chunk = conn.recv(TICKET_BYTES - len(raw))
                    if not chunk:
                        return
                    raw += chunk
            except OSError:
                return
            with self._lock:
                ticket = self._tickets.pop(raw, None)
            if ticket is None:
                return  # unknown or reused ticket: nothing is read or sent
            conn.settimeout(None)
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
        sock.settimeout(None)
        sock.sendall(bytes.fromhex(ticket))
        if send is not None:
            send_parts(sock, send, progress)
            sock.shutdown(socket.SHUT_WR)
        if receive is not None:
            recv_parts(sock, receive, progress)
