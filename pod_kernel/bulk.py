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

A push need not wait for its ticket: each connection holds a few *spare*
tickets (:meth:`BulkServer.reserve`, handed out in the welcome and replaced
as they are used); a client names one in its push header and connects at
once, and the header *binds* it (:meth:`BulkServer.bind`) to the buffers it
declares. A connection that presents a spare before its header is bound
waits for it (at most :data:`SPARE_BIND_WAIT_S`); a spare refused with its
header, or revoked with its connection, ends that connection unread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import queue
import secrets
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P
from . import write_tracking
from .lanes import ACK

log = logging.getLogger("pod_kernel.bulk")

#: Bundles at least this big use the bulk channel when one is available.
BULK_MIN_BYTES = 1 << 20
#: A ticket not used within this long is dropped, its buffers freed (``KT_BULK_TICKET_TTL_S`` overrides).
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
#: A transfer thread with nothing to do for this long ends (starting one costs 0.1-0.3 ms here).
WORKER_IDLE_S = 60.0
#: Spare tickets (pushes that need no round trip for their ticket) one connection holds at most.
SPARES_PER_OWNER = 2
#: After a transfer, its connection waits this long for the next ticket (``KT_BULK_KEEPALIVE_S`` overrides; 0:
#: none): the client's next transfer skips a TCP connect, the accept thread's wake-up and the hand-off to a
#: transfer thread (1.3 ms of a 1 MiB push here; a new stream through a Kubernetes port-forward on a cluster).
#: The welcome tells the client, which reuses one only for half as long (it never finds one just closed).
KEEPALIVE_S = 30.0
#: Connections kept waiting for their next ticket at most, in all; more are closed after their transfer.
MAX_KEPT = 8
#: What the pod writes after a transfer whose connection it keeps for the next ticket (else it closes it): a
#: client keeps only a connection it was told is kept, so it never sends a transfer into one being closed.
KEPT = b"K"
#: How long a connection that presented a spare ticket waits for the push header that binds it.
SPARE_BIND_WAIT_S = 30.0
#: How often the accept thread wakes with nothing to do (expiring tickets and silent connections).
TICK_S = 0.5
#: After accept() fails for lack of resources, the listener rests this long, doubling up to the max.
ACCEPT_BACKOFF_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0
#: The log says the listener is short of resources at most this often.
ACCEPT_WARN_INTERVAL_S = 60.0
#: accept() errors that mean "out of resources for now" (file descriptors, buffers, memory).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ProgressFn = Callable[[int, int], None]


def _env_seconds(name: str, default: float, zero: bool) -> float:
    """Seconds from the environment variable ``name`` when it is a number up to 3600 (above 0; 0 too if
    ``zero``), else ``default``."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if (0 <= value if zero else 0 < value) and value <= 3600 else default


def keepalive_s() -> float:
    """How long a connection waits for its next ticket: ``KT_BULK_KEEPALIVE_S`` when it is a number in
    [0, 3600], else :data:`KEEPALIVE_S`."""
    return _env_seconds("KT_BULK_KEEPALIVE_S", KEEPALIVE_S, zero=True)


def ticket_ttl_s() -> float:
    """The ticket lifetime: ``KT_BULK_TICKET_TTL_S`` when it is a number in (0, 3600], else :data:`TICKET_TTL_S`."""
    return _env_seconds("KT_BULK_TICKET_TTL_S", TICKET_TTL_S, zero=False)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``"::"`` is dual-stack (IPv4 and IPv6) where the OS allows it.

    asyncio and ``socket.create_server`` set ``IPV6_V6ONLY`` on an IPv6
    socket, so binding ``::`` plainly would leave IPv4 clients out. Without
    IPv6 or dual-stack support, ``::`` falls back to ``0.0.0.0``. The socket is
    made with ``IPPROTO_TCP`` and ``TCP_NODELAY``: asyncio turns Nagle off only
    on accepted sockets whose protocol says TCP (``create_server``'s say 0), and
    without it every small reply waits out the peer's 40 ms delayed ACK.
    """
    if host == "::":
        if socket.has_ipv6 and socket.has_dualstack_ipv6():
            try:
                return _listen(socket.AF_INET6, ("::", port), dualstack=True)
            except OSError as exc:  # IPv6 disabled on this host (sysctl, a container without it)
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                    raise
        host = "0.0.0.0"
    return _listen(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))


def _listen(family: int, address: tuple[str, int], dualstack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


#: ``KT_BULK_PORT``: the port the bulk channel listens on (0 or unset: a free one). Clusters fix it, so a
#: port-forward, a Service and a NetworkPolicy can name it.
BULK_PORT_ENV = "KT_BULK_PORT"


def bulk_port() -> int:
    """The port from ``KT_BULK_PORT`` when it is one (1-65535), else 0 (a free port)."""
    raw = os.environ.get(BULK_PORT_ENV, "").strip()
    return int(raw) if raw.isdigit() and 0 < int(raw) < 65536 else 0


#: Big parts are sent in pieces this small, each hashed just before it is sent: read from cache, not memory.
DIGEST_IO_BYTES = 1 << 20
#: Longest hash name a trailer may carry.
MAX_DIGEST_PREFIX = 16


def _digested(part: Any) -> bool:
    """Whether a part of this size travels with its digest (see :func:`send_parts`): every part a fingerprint
    takes as its digest (:data:`~pod_kernel.protocol.BUFFER_DIGEST_MIN_BYTES`, 1 MiB). From 64 MiB only, the
    receiver of a fresh 1-16 MiB array hashed it twice on the cell's path (when it took it, when the cell
    ended): a 16 MiB push cell spent 7 of its 22 ms there."""
    return memoryview(part).nbytes >= P.BUFFER_DIGEST_MIN_BYTES


def send_parts(sock: socket.socket, parts: list[memoryview], progress: ProgressFn | None = None) -> dict[int, bytes]:
    """Write every part in order (no copies beyond the kernel's), then the trailer; returns the digests sent.

    Each part of at least :data:`~pod_kernel.protocol.BUFFER_DIGEST_MIN_BYTES` is
    hashed as it goes (:func:`~pod_kernel.protocol.buffer_digest`, a piece just
    before it is sent, so it is read from memory once), and the trailer after
    the last part carries those digests: the length of the hash's name, the
    name, then the digests in part order. Both sides then know a big value's
    fingerprint without reading it again: 1 GiB costs ~20 ms more to send and
    saves ~60 ms of hashing on each side. Without xxhash (blake2b would slow the
    send) the trailer is one zero byte. A digested part's pages are
    write-protected before it is read (``write_tracking``), and its digest
    vouched for once taken: the sender's next fingerprint of an unchanged value
    reads nothing, as the receiver's does (it seeds its tracker with the trailer).
    """
    prefix, kind = P.hash_kind()
    digesting = prefix == "xxh3:"
    tracker = write_tracking.tracker()
    total = sum(p.nbytes for p in parts)
    done = 0
    digests: dict[int, bytes] = {}
    for index, part in enumerate(parts):
        view = part.cast("B") if part.format != "B" or part.ndim != 1 else part
        hashing = digesting and _digested(view)
        guarded = hashing and tracker.protect(view)  # a write from now on is seen, even one during the send
        digest = kind() if hashing else None
        pieces: list[bytes] = []
        report = done + IO_BYTES  # progress every IO_BYTES
        # a hashed part goes in DIGEST_IO_BYTES pieces, which never straddle a HASH_CHUNK_BYTES boundary
        step = DIGEST_IO_BYTES if hashing else IO_BYTES
        for start in range(0, view.nbytes, step):
            piece = view[start:start + step]
            end = start + piece.nbytes
            if digest is not None:
                digest.update(piece)
                if end % P.HASH_CHUNK_BYTES == 0 or end == view.nbytes:
                    pieces.append(digest.digest())
                    digest = kind()
            sock.sendall(piece)
            done += piece.nbytes
            if progress is not None and (done >= report or end == view.nbytes):
                progress(done, total)
                report = done + IO_BYTES
        if hashing:
            digests[index] = b"".join(pieces)
            if guarded:
                tracker.seed(view, digests[index], view.obj, protected=guarded)
    name = prefix.encode() if digesting else b""
    sock.sendall(bytes([len(name)]) + name + b"".join(digests[i] for i in sorted(digests)))
    return digests


#: ``ready(index, end)`` of a receive: waits until part ``index`` may take bytes up to ``end`` (see recv_parts).
Ready = Callable[[int, int], None]
#: What a receive ticket's ``prepare`` is: the context the receive runs in, giving its ``ready`` (see Ticket).
Prepare = Callable[[], AbstractContextManager[Ready]]


class BulkClosed(ConnectionError):
    """The other end closed a bulk connection before all the parts came."""

    def __init__(self, received: int, total: int) -> None:
        super().__init__(f"bulk connection closed after {received} of {total} bytes")
        self.received = received


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"bulk connection closed in the trailer ({len(out)} of {n} bytes)")
        out += chunk
    return bytes(out)


def recv_parts(sock: socket.socket, parts: list[Any], progress: ProgressFn | None = None,
               digests: dict[int, bytes] | None = None, ready: Ready | None = None) -> dict[int, bytes]:
    """Fill every preallocated part in order, then read the trailer (see :func:`send_parts`); EOF before the
    end is a ConnectionError. Returns the digests of the big parts (into ``digests`` when given) when the
    sender's hash is this side's, else none. ``ready(index, end)``: waits until part ``index`` may take bytes
    up to ``end`` (its memory faulted in: :meth:`~pod_kernel.protocol.BundleAssembler.faulting_in`)."""
    total = sum(len(p) for p in parts)
    done = 0
    for index, part in enumerate(parts):
        with memoryview(part) as view:  # released even on failure, so the buffer can be unmapped at once
            got = 0
            while got < len(part):
                want = min(len(part) - got, IO_BYTES)
                if ready is not None:
                    ready(index, got + want)
                n = sock.recv_into(view[got:], want)
                if n == 0:
                    raise BulkClosed(done + got, total)
                got += n
                if progress is not None:
                    progress(done + got, total)
        done += got
    digests = {} if digests is None else digests
    length = _recv_exact(sock, 1)[0]
    if not length:
        return digests
    if length > MAX_DIGEST_PREFIX:
        raise ConnectionError(f"bulk trailer names a hash of {length} bytes")
    name = _recv_exact(sock, length)
    big = [i for i, part in enumerate(parts) if _digested(part)]
    piece_bytes = P.hash_kind()[1]().digest_size
    sizes = [-(-len(parts[i]) // P.HASH_CHUNK_BYTES) * piece_bytes for i in big]
    raw = _recv_exact(sock, sum(sizes))  # as many as the parts we allocated say: bounded
    if name.decode("ascii", "replace") == P.hash_kind()[0]:
        offset = 0
        for i, size in zip(big, sizes):
            digests[i] = raw[offset:offset + size]
            offset += size
    return digests


@dataclass
class Ticket:
    """What one bulk connection will do: receive into ``parts`` or send ``parts``."""

    receive: bool
    parts: list
    on_done: Callable[[BaseException | None], None]
    expires: float
    #: the connection that asked for it: the ticket is revoked when that connection closes
    owner: object = None
    #: the context a receive runs in, in the transfer thread once the ticket is presented (the receive buffers
    #: faulted in ahead of the bytes: :meth:`~pod_kernel.protocol.BundleAssembler.faulting_in`)
    prepare: Prepare | None = None
    #: a receive fills it: part index -> the digest the sender's trailer gave
    digests: dict[int, bytes] = field(default_factory=dict)
    #: a spare ticket (see :meth:`BulkServer.reserve`): set once a push header bound it, or refused it
    bound: threading.Event | None = None
    refused: bool = False
    #: a lane ticket (see :meth:`BulkServer.issue_lane`): takes the connection that presents it
    on_lane: Callable[[socket.socket], bool] | None = None

    def release(self) -> None:
        """Give the parts' memory back now: maps unmapped, views released (a failed or dropped transfer)."""
        for part in self.parts:
            try:
                if isinstance(part, mmap.mmap):
                    part.close()
                elif isinstance(part, memoryview):
                    part.release()
            except BufferError:  # still exported somewhere: freed when that goes
                pass
        self.parts.clear()


class BulkServer:
    """The pod kernel's bulk listener; one thread per transfer.

    The accept thread never dies of a hostile peer: accept() failing for lack
    of file descriptors (EMFILE, ENFILE) or memory rests the listener for a
    moment (backing off, not spinning) and drops the oldest connection that has
    not presented a ticket; it also expires tickets and silent connections.
    """

    def __init__(self, host: str, ticket_ttl: float | None = None, port: int | None = None) -> None:
        self._sock = listen_socket(host, bulk_port() if port is None else port)
        self.port = self._sock.getsockname()[1]
        self.ticket_ttl_s = ticket_ttl or ticket_ttl_s()
        self.keepalive_s = keepalive_s()
        #: connections waiting for their next ticket (see :data:`KEEPALIVE_S`)
        self._kept: set[socket.socket] = set()
        #: connections accepted so far (for tests: a kept connection is not accepted again)
        self.accepted = 0
        self._tickets: dict[bytes, Ticket] = {}
        #: spare tickets not bound to a push yet (presented or not)
        self._spares: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._workers = _Workers()
        threading.Thread(target=self._accept, name="kt-bulk-accept", daemon=True).start()

    def issue(self, receive: bool, parts: list, on_done: Callable[[BaseException | None], None],
              owner: object = None, prepare: Prepare | None = None,
              digests: dict[int, bytes] | None = None) -> str:
        """A one-time ticket (hex) for a transfer of ``parts``, revoked when ``owner`` closes (see :meth:`revoke`);
        a receive puts the sender's digests of the big parts into ``digests``."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        self.expire()
        with self._lock:
            self._tickets[ticket] = Ticket(receive, parts, on_done, time.monotonic() + self.ticket_ttl_s,
                                           owner, prepare, {} if digests is None else digests)
        return ticket.hex()

    def issue_lane(self, owner: object, on_lane: Callable[[socket.socket], bool]) -> str:
        """A one-time ticket (hex) for a lane (:mod:`pod_kernel.lanes`) of ``owner``'s: the connection that
        presents it is handed to ``on_lane`` in the accept thread and, when that takes it (True), answered
        :data:`~pod_kernel.lanes.ACK`. It expires like any ticket, and is revoked with ``owner``."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        self.expire()
        with self._lock:
            self._tickets[ticket] = Ticket(False, [], _no_report, time.monotonic() + self.ticket_ttl_s, owner,
                                           on_lane=on_lane)
        return ticket.hex()

    def reserve(self, owner: object) -> str | None:
        """A spare ticket (hex) for a push of ``owner``'s: its client sends the bytes right behind the push's
        header, which binds it (:meth:`bind`); revoked with ``owner``, never expires before. None when
        ``owner`` holds :data:`SPARES_PER_OWNER` already."""
        with self._lock:
            if sum(1 for t in self._spares.values() if t.owner is owner) >= SPARES_PER_OWNER:
                return None
            token = secrets.token_bytes(TICKET_BYTES)
            spare = Ticket(True, [], _no_report, float("inf"), owner, bound=threading.Event())
            self._tickets[token] = self._spares[token] = spare
        return token.hex()

    def bind(self, spare: Any, owner: object, parts: list, on_done: Callable[[BaseException | None], None],
             prepare: Prepare | None = None, digests: dict[int, bytes] | None = None) -> bool:
        """Give ``owner``'s spare ticket (hex, from the wire) a push's buffers, as :meth:`issue` would; from
        now on it expires like any ticket. False (nothing bound) for a ticket that is not such a spare."""
        token = parse_ticket(spare)
        with self._lock:
            ticket = self._spares.get(token) if token is not None else None
            if token is None or ticket is None or ticket.owner is not owner:
                return False
            del self._spares[token]
            ticket.parts, ticket.on_done, ticket.prepare = parts, on_done, prepare
            ticket.digests = {} if digests is None else digests
            ticket.expires = time.monotonic() + self.ticket_ttl_s
            assert ticket.bound is not None
            ticket.bound.set()  # under the lock: a transfer thread giving up on it sees this (see _transfer)
        return True

    def refuse(self, spare: Any, owner: object) -> None:
        """``owner``'s spare ticket goes unused (its push was refused): a connection that presented it ends."""
        token = parse_ticket(spare)
        with self._lock:
            ticket = self._spares.get(token) if token is not None else None
            if token is None or ticket is None or ticket.owner is not owner:
                return
            del self._spares[token]
            self._tickets.pop(token, None)
        _wake_refused([ticket])

    def expire(self) -> None:
        """Drop tickets past their time (their buffers are freed; their requests fail)."""
        now = time.monotonic()
        with self._lock:
            expired = [self._tickets.pop(k) for k, t in list(self._tickets.items()) if t.expires < now]
        self._end(expired, TimeoutError("bulk transfer ticket expired unused"))

    def revoke(self, owner: object) -> int:
        """Drop the unused tickets ``owner`` asked for (its connection closed), spares included; how many
        there were."""
        with self._lock:
            revoked = [self._tickets.pop(k) for k, t in list(self._tickets.items()) if t.owner is owner]
            spares = [self._spares.pop(k) for k, t in list(self._spares.items()) if t.owner is owner]
        _wake_refused(spares)
        self._end([t for t in revoked if t.bound is None or not t.refused],
                  ConnectionError("bulk transfer ticket revoked: the connection that asked for it closed"))
        return len(revoked)

    @staticmethod
    def _end(tickets: list[Ticket], error: BaseException) -> None:
        for ticket in tickets:
            ticket.release()
            ticket.on_done(error)

    def _accept(self) -> None:
        """Accept connections and read their tickets in this one thread (non-blocking, with a deadline);
        only a connection that presented a valid ticket gets a transfer thread."""
        sel = selectors.DefaultSelector()
        self._sock.setblocking(False)
        sel.register(self._sock, selectors.EVENT_READ, None)
        pending: dict[socket.socket, list] = {}  # conn -> [ticket bytes so far, deadline]
        rest = _Backoff()

        def drop(conn: socket.socket) -> None:
            pending.pop(conn, None)
            try:
                sel.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()

        while not self._closed.is_set():
            try:
                if rest.resting and rest.over():
                    sel.register(self._sock, selectors.EVENT_READ, None)
                    rest.resting = False
                events = sel.select(rest.timeout())
                now = time.monotonic()
                for key, _ in events:
                    if key.data is None:
                        self._accept_one(sel, pending, drop, rest, now)
                    elif isinstance(key.fileobj, socket.socket):  # always: only accepted conns carry data
                        self._read_ticket(sel, key.fileobj, pending, drop)
                for conn in [c for c, st in pending.items() if st[1] < now]:
                    drop(conn)  # no ticket within the handshake deadline
                self.expire()
            except Exception:  # never die: a bulk channel that stopped accepting hangs every later transfer
                if self._closed.is_set():
                    return
                log.exception("bulk channel: unexpected error in the accept loop; carrying on")
                self._closed.wait(ACCEPT_BACKOFF_MAX_S)

    def _accept_one(self, sel: selectors.BaseSelector, pending: dict, drop: Callable[[socket.socket], None],
                    rest: _Backoff, now: float) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                return  # ECONNABORTED and the like: that peer gave up; the next one is served
            if pending:  # an fd for the next accept: the oldest connection that has not presented a ticket
                drop(min(pending, key=lambda c: pending[c][1]))
            sel.unregister(self._sock)  # level-triggered: resting, not spinning on a listener that stays ready
            rest.start(now)
            if now - rest.warned_at >= ACCEPT_WARN_INTERVAL_S:  # one line a minute, however long it lasts
                log.warning("bulk channel: cannot accept a connection (%s; %d time(s) since the last warning); "
                            "retrying, backing off up to %g s", exc.strerror or exc, rest.failures,
                            ACCEPT_BACKOFF_MAX_S)
                rest.warned_at, rest.failures = now, 0
            return
        rest.reset()
        self.accepted += 1
        if len(pending) >= MAX_PENDING_HANDSHAKES:
            # the oldest silent connection goes: a real client sends its ticket at once,
            # so a flood of idle connections cannot starve real transfers
            drop(min(pending, key=lambda c: pending[c][1]))
        conn.setblocking(False)
        pending[conn] = [b"", now + HANDSHAKE_TIMEOUT_S]
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _read_ticket(self, sel: selectors.BaseSelector, conn: socket.socket, pending: dict,
                     drop: Callable[[socket.socket], None]) -> None:
        state = pending.get(conn)
        if state is None:
            return
        try:
            chunk = conn.recv(TICKET_BYTES - len(state[0]))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            drop(conn)
            return
        state[0] += chunk
        if len(state[0]) < TICKET_BYTES:
            return
        pending.pop(conn)
        sel.unregister(conn)
        with self._lock:
            ticket = self._tickets.pop(state[0], None)
        if ticket is None:
            conn.close()  # unknown, reused, expired or revoked ticket: nothing is read or sent
            return
        if ticket.on_lane is not None:
            try:
                if ticket.on_lane(conn):
                    conn.send(ACK)  # one byte into an empty socket: it takes it
                    return
            except Exception:  # the client went meanwhile
                log.debug("a lane could not start", exc_info=True)
            conn.close()
            return
        conn.settimeout(IDLE_TIMEOUT_S)
        try:
            self._workers.run(self._serve, conn, [ticket])  # a list: _serve empties it (see there)
        except RuntimeError as exc:  # cannot start a thread: fail this transfer, keep serving
            conn.close()
            self._end([ticket], exc)

    def _serve(self, conn: socket.socket, first: list[Ticket]) -> None:
        """Run the transfer of the ticket in ``first`` on ``conn``, then those of the tickets it presents next
        (kept alive, see :data:`KEEPALIVE_S`); the connection is closed when that ends. A finished transfer's
        ticket is let go before the connection waits for the next (it holds the transfer's buffers: a received
        value's memory would stay pinned, and out of the receive pool, for as long as the connection waits);
        so is ``first``'s, which the worker's arguments would otherwise hold."""
        ticket: Ticket | None = first.pop()
        with conn:
            while ticket is not None:
                receive = ticket.receive
                done = self._transfer(conn, ticket)
                ticket = None
                if not done:
                    return
                ticket = self._next_ticket(conn)
                if ticket is None and not receive and self.keepalive_s <= 0:  # as before keep-alives
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(1)  # wait until the client has read everything

    def _next_ticket(self, conn: socket.socket) -> Ticket | None:
        """Keep ``conn`` (telling its client: :data:`KEPT`) and take the next ticket it presents within the
        keep-alive time; None (the connection ends) when none comes, this channel keeps no more connections,
        or it is not a transfer's (unknown, used, a lane's). A client that is not told so never sends one."""
        with self._lock:
            if self.keepalive_s <= 0 or len(self._kept) >= MAX_KEPT or self._closed.is_set():
                return None
            self._kept.add(conn)
        try:
            conn.sendall(KEPT)
            conn.settimeout(self.keepalive_s)
            raw = _recv_exact(conn, TICKET_BYTES)
            conn.settimeout(IDLE_TIMEOUT_S)
        except OSError:  # the client closed it, or it stayed silent (a timeout): both end it
            return None
        finally:
            with self._lock:
                self._kept.discard(conn)
        with self._lock:
            ticket = self._tickets.pop(raw, None)
        return ticket if ticket is not None and ticket.on_lane is None else None  # a lane starts on its own

    def _transfer(self, conn: socket.socket, ticket: Ticket) -> bool:
        """Run one transfer on ``conn``; whether it ended cleanly, with the connection fit for another."""
        error: BaseException | None = None
        if ticket.bound is not None and not ticket.bound.wait(SPARE_BIND_WAIT_S):
            with self._lock:  # presented, but no push header came to bind it (unless one just did)
                given_up = not ticket.bound.is_set()
                if given_up:
                    for token, spare in list(self._spares.items()):
                        if spare is ticket:
                            del self._spares[token]
            if given_up:
                return False
        if ticket.refused:
            return False  # its push was refused, or its connection closed: nothing is read
        try:
            if ticket.receive:
                # memory committed now that the bytes are coming, not at the header
                with ticket.prepare() if ticket.prepare is not None else contextlib.nullcontext() as ready:
                    recv_parts(conn, ticket.parts, digests=ticket.digests, ready=ready)
            else:
                send_parts(conn, ticket.parts)  # the client reads exactly what the parts and trailer hold
        except BaseException as exc:  # reported to the request that issued the ticket
            # its traceback's frames hold views of the buffers: drop them so the memory goes now
            error = exc.with_traceback(None)
            error.__context__ = error.__cause__ = None
        if error is not None or not ticket.receive:
            ticket.release()  # a failed receive's buffers, or a sent bundle's views: nothing keeps them
        ticket.on_done(error)
        return error is None

    def close(self) -> None:
        """Stop listening; connections waiting for their next ticket end."""
        self._closed.set()
        self._sock.close()
        with self._lock:
            kept = list(self._kept)
        for conn in kept:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Workers:
    """Daemon threads that run transfers, one each, and wait up to :data:`WORKER_IDLE_S` for the next: a
    transfer starts without starting a thread. As many run as transfers do (a transfer blocks its thread for
    as long as it takes), and daemon threads never hold up the process's exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: threads waiting for a job, less the jobs queued for them already
        self._idle = 0

    def run(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in a waiting thread, else in a new one (RuntimeError if none can start)."""
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that thread's next job is this one
        if spawn:
            threading.Thread(target=self._work, args=((fn, args),), name="kt-bulk", daemon=True).start()
        else:
            self._jobs.put((fn, args))

    def _work(self, job: tuple[Callable[..., None], tuple[Any, ...]]) -> None:
        while True:
            fn, args = job
            try:
                fn(*args)
            except Exception:  # _transfer reports its own failures; never lose the thread to one
                log.exception("bulk channel: a transfer failed unexpectedly")
            del job, fn, args  # nothing of the last transfer stays referenced while waiting
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=WORKER_IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._idle > 0:  # not counted on for a queued job: this thread may go
                            self._idle -= 1
                            return


def _no_report(_error: BaseException | None) -> None:
    """What an unbound spare ticket reports when it ends: nothing (no request waits on it)."""


def _wake_refused(spares: list[Ticket]) -> None:
    """Spare tickets that will never be bound: a transfer thread waiting on one ends its connection."""
    for spare in spares:
        spare.refused = True
        if spare.bound is not None:
            spare.bound.set()


def parse_ticket(value: Any) -> bytes | None:
    """A ticket from the wire (hex of :data:`TICKET_BYTES` bytes) as its bytes; None for anything else (both
    sides check the tickets they are sent here)."""
    if not isinstance(value, str) or len(value) != 2 * TICKET_BYTES:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if len(raw) == TICKET_BYTES else None


class _Backoff:
    """The accept thread's rest after running out of resources: doubling delays, reset by a success."""

    def __init__(self) -> None:
        self.resting = False
        self.until = 0.0
        self.delay_s = 0.0
        self.failures = 0
        self.warned_at = -ACCEPT_WARN_INTERVAL_S

    def start(self, now: float) -> None:
        """Rest from ``now``, twice as long as the last time (up to the max)."""
        self.delay_s = min(ACCEPT_BACKOFF_MAX_S, self.delay_s * 2) if self.delay_s else ACCEPT_BACKOFF_S
        self.until = now + self.delay_s
        self.resting = True
        self.failures += 1

    def reset(self) -> None:
        """An accept succeeded: the next shortage starts from the shortest delay."""
        self.delay_s = 0.0

    def over(self) -> bool:
        """Whether the rest is over."""
        return time.monotonic() >= self.until

    def timeout(self) -> float:
        """How long the selector may wait now."""
        return max(0.0, min(TICK_S, self.until - time.monotonic())) if self.resting else TICK_S


class _Kept:
    """The client's bulk connections kept for their next transfer, by address (see :data:`KEEPALIVE_S`)."""

    #: connections kept per address at most
    PER_ADDRESS = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[tuple[float, socket.socket]]] = {}
        self._pid = os.getpid()

    def take(self, address: tuple[str, int], max_idle_s: float) -> socket.socket | None:
        """A kept connection to ``address`` idle for less than ``max_idle_s`` that the pod has not closed (nor
        written to: it never does between transfers), newest first; None when there is none (and always in a
        forked child: the parent's connections are the parent's)."""
        now = time.monotonic()
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    self._idle, self._pid = {}, os.getpid()
                idle = self._idle.get(address)
                if not idle:
                    return None
                since, sock = idle.pop()
            if now - since < max_idle_s and _quiet(sock):
                return sock
            sock.close()

    def give(self, address: tuple[str, int], sock: socket.socket) -> None:
        """Keep ``sock`` (its transfer ended cleanly) for the next transfer to ``address``."""
        with self._lock:
            if self._pid != os.getpid():
                sock.close()
                return
            idle = self._idle.setdefault(address, [])
            idle.append((time.monotonic(), sock))
            extra = idle[:-self.PER_ADDRESS]
            del idle[:-self.PER_ADDRESS]
        for _since, old in extra:
            old.close()


def _quiet(sock: socket.socket) -> bool:
    """Nothing to read and no hang-up on ``sock`` (a kept connection the pod still keeps)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


_kept = _Kept()


def client_transfer(address: tuple[str, int], ticket: str, *, send: list[memoryview] | None = None,
                    receive: list[Any] | None = None, progress: ProgressFn | None = None,
                    reuse_s: float = 0.0, ready: Ready | None = None, abort: Abort | None = None) -> dict[int, bytes]:
    """The client side of one bulk transfer (blocking; run it in a thread); the big parts' digests, sent or
    received (see :func:`send_parts`; ``ready``: see :func:`recv_parts`). ``reuse_s``: the pod keeps a
    connection that long for its next ticket (its welcome says; 0: it does not): a connection kept from an
    earlier transfer is used, for half as long, and this one is kept once it ends cleanly. A kept connection
    that fails before a byte of the transfer came back (the pod closed it meanwhile) is given up for a new one,
    and the transfer made again there. ``abort``: see :class:`Abort`."""
    sock = _kept.take(address, reuse_s / 2) if reuse_s > 0 else None
    if sock is not None:
        try:
            return _transfer_on(sock, address, ticket, send, receive, progress, reuse_s, ready, abort=abort)
        except _Stale:
            pass
    sock = socket.create_connection(address, timeout=30)
    sock.settimeout(IDLE_TIMEOUT_S)  # a transfer that stalls this long fails instead of hanging
    return _transfer_on(sock, address, ticket, send, receive, progress, reuse_s, ready, fresh=True, abort=abort)


def _told_kept(sock: socket.socket) -> bool:
    """Whether the pod said it keeps this connection after its transfer (else it closes it: so do we)."""
    try:
        return sock.recv(1) == KEPT
    except OSError:
        return False


class _Stale(Exception):
    """A kept connection the pod closed before it took the transfer (a new connection's failures are raised as
    they are)."""


class TransferAborted(ConnectionError):
    """A transfer ended on purpose by :meth:`Abort.set` (a Ctrl-C in the notebook)."""


class Abort:
    """Ends a transfer from another thread: the connection it moves bytes on is shut down, so the blocking
    send or receive in the transfer's thread fails at once (:class:`TransferAborted`) instead of moving the
    rest, and the other side sees the transfer cut short. A Ctrl-C during a 2 GiB push waited for all of it
    (through a Kubernetes port-forward: tens of seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.is_set = False

    def watch(self, sock: socket.socket) -> None:
        """``sock`` carries the transfer now; raises TransferAborted when it was aborted already."""
        with self._lock:
            self._sock = sock
            if not self.is_set:
                return
        raise TransferAborted("transfer aborted before it began")

    def set(self) -> None:
        """Abort: the transfer's connection is shut down (now, or as soon as it has one)."""
        with self._lock:
            self.is_set = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile (its transfer failed): nothing to end
                sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> bool:
        """The transfer is over: its connection is no longer this abort's to end (it may carry the next
        transfer). False when it was aborted first: the connection must not be kept."""
        with self._lock:
            self._sock = None
            return not self.is_set


def _transfer_on(sock: socket.socket, address: tuple[str, int], ticket: str, send: list[memoryview] | None,
                 receive: list[Any] | None, progress: ProgressFn | None, reuse_s: float,
                 ready: Ready | None = None, fresh: bool = False, abort: Abort | None = None) -> dict[int, bytes]:
    digests: dict[int, bytes] = {}
    kept = False
    try:
        if abort is not None:
            abort.watch(sock)
        try:
            sock.sendall(bytes.fromhex(ticket))
            if send is not None:
                digests = send_parts(sock, send, progress)
            if reuse_s <= 0 and send is not None:
                sock.shutdown(socket.SHUT_WR)
            if receive is not None:
                digests = recv_parts(sock, receive, progress, ready=ready)
        except OSError as exc:
            if abort is not None and abort.is_set:
                raise TransferAborted("transfer aborted") from None
            # a kept connection the pod had closed (EOF before the first byte came back): made again on a new one
            stale = isinstance(exc, BrokenPipeError | ConnectionResetError) or (
                isinstance(exc, BulkClosed) and not exc.received)
            if fresh or not stale:
                raise
            raise _Stale(str(exc)) from None
        # an aborted transfer's connection is never kept; a kept one is never aborted (another transfer's now)
        if reuse_s > 0 and _told_kept(sock) and (abort is None or abort.release()):
            _kept.give(address, sock)
            kept = True
        return digests
    finally:
        if not kept:
            sock.close()
