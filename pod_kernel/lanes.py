"""Lanes: a notebook's cells straight to the pod kernel's main thread, past its network thread.

A cell's execute over the WebSocket is read by the pod's network thread:
woken, websockets parses the frame, the cell is queued, the main thread is
woken. A *lane* is a plain TCP connection per WebSocket connection on which
the notebook's thread writes its executes and the pod's main thread, waiting
for its next job, reads them itself: one thread woken instead of two, and no
WebSocket parsing (measured here: 0.39 ms from the write to the cell starting
over the WebSocket, 0.24 ms over a lane). A cell's reply comes back on it the
same way, to the notebook's thread, when that thread waits for it
(``lane_reply``), together with the cell's outputs that were not sent yet
when it ended (its last ``print``, its result): that thread routes them
itself. What the session sent before them is on the WebSocket already; their
seqs tell the client to take them after all that. Everything else (outputs
sent while the cell runs, every other request) stays on the WebSocket.

Opening one: the pod hands out a one-time *lane ticket* in its welcome, over
the authenticated WebSocket; the client connects to the bulk port, sends the
ticket (:mod:`pod_kernel.bulk`) and waits for :data:`ACK`: from then on, the
executes it writes reach the main thread. The ticket is bound to that
WebSocket connection: when it closes, the lane is closed too (an execute the
client wrote on it meanwhile is sent again on the next connection, and run
once: executes are deduplicated by id).

On the wire a lane carries frames of :mod:`pod_kernel.protocol`, each after
its length (4 bytes, big-endian), of at most :data:`MAX_LANE_FRAME` bytes:
from the client, each must be an ``execute`` that runs at once (no
``after``); from the pod, each is an ``execute_reply`` or an output
(:data:`LANE_OUTPUTS`) of the execute whose reply follows it. Anything else breaks the protocol: the pod
closes the lane and its WebSocket connection (the client reconnects and sends
again what did not run), as for a WebSocket frame that breaks it.

The main thread reads a lane only while it waits for its next job, never in
the middle of one (a frame that has not all arrived waits in the lane's
buffer). While it runs a cell of one session, the lanes of the others are
read by a watcher thread (see :meth:`LaneSet.cell_started`), so their cells
are queued, and told that they wait, as over the WebSocket.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("pod_kernel.lanes")

#: Largest frame a lane carries (an execute with a bigger cell goes over the WebSocket).
MAX_LANE_FRAME = 64 << 10
#: What the pod writes on a lane once its ticket was accepted.
ACK = b"\x01"
#: How long a client waits for the pod's :data:`ACK`.
ACK_TIMEOUT_S = 5.0
#: A cell's output messages (``error``: a callback's error after the cell, shown as output): the client routes
#: them to the cell's caller; a lane carries them before the cell's reply.
LANE_OUTPUTS = frozenset({"stream", "display", "clear_output", "execute_result", "error"})
_LEN = struct.Struct(">I")
#: Bytes read from a lane per recv.
READ_BYTES = MAX_LANE_FRAME + _LEN.size


class LaneError(Exception):
    """A lane broke the protocol."""


#: Why a lane ended when its peer closed it (any other reason: it broke the protocol, or failed); said by the
#: pod's end, whose peer is the client (the client's end only asks whether its lane ended).
PEER_CLOSED = "closed by the client"


def lane_frame(frame: bytes) -> bytes:
    """``frame`` as a lane carries it: its length, then it."""
    return _LEN.pack(len(frame)) + frame


def _whole(chunk: bytes) -> bool:
    """Whether ``chunk`` is exactly one frame as a lane carries it."""
    return len(chunk) >= _LEN.size and _LEN.unpack_from(chunk)[0] == len(chunk) - _LEN.size


def take_frames(buf: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buf``, taken out of it; LaneError for a length over the limit."""
    frames = []
    while len(buf) >= _LEN.size:
        (size,) = _LEN.unpack_from(buf)
        if size > MAX_LANE_FRAME:
            raise LaneError(f"a lane frame of {size} bytes (at most {MAX_LANE_FRAME})")
        if len(buf) < _LEN.size + size:
            break
        frames.append(bytes(buf[_LEN.size:_LEN.size + size]))
        del buf[:_LEN.size + size]
    return frames


class _Waker:
    """A wake-up that any thread writes and one thread polls for. Socket objects, not a pipe's numbers: a
    wake-up after close is an error here, never a write to a file descriptor reused since."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.fd = self._r.fileno()

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:  # full of wake-ups already, or closed at exit
            pass

    def drain(self) -> None:
        try:
            while self._r.recv(256):
                pass
        except OSError:
            pass


class _End:
    """One end of a lane: its socket, closed once, under a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self._lock = threading.Lock()
        self._buffer = bytearray()  # what was read of a frame that has not all arrived

    def close(self) -> None:
        """Close it (no callback is called)."""
        with self._lock:
            self._close_locked()

    def _write_whole(self, frames: list[bytes]) -> bool | None:
        """Write ``frames``, each after its length, at once: True, all of them; None, nothing (closed, or the
        socket takes nothing now); False, only part, or the socket failed: it is closed then."""
        data = b"".join([lane_frame(frame) for frame in frames])
        with self._lock:
            if self.closed:
                return None
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                sent = -1
            if sent == len(data):
                return True
            self._close_locked()
            return False

    def _read_locked(self) -> tuple[list[bytes], str | None]:
        """The whole frames the socket holds now (never waiting), and why the lane ended (None: it did not;
        :data:`PEER_CLOSED`, or what broke). It is not closed here. Under the lock."""
        frames: list[bytes] = []
        try:
            while True:
                chunk = self.sock.recv(READ_BYTES)
                if not chunk:
                    return frames, PEER_CLOSED
                if not self._buffer and _whole(chunk):
                    frames.append(chunk[_LEN.size:])  # the usual read: one whole frame
                else:
                    self._buffer += chunk
                    frames += take_frames(self._buffer)
                if len(chunk) < READ_BYTES:
                    return frames, None
        except (BlockingIOError, InterruptedError):
            return frames, None
        except (OSError, LaneError) as exc:
            return frames, str(exc) or type(exc).__name__

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            self._buffer.clear()
            try:
                self.sock.close()
            except OSError:
                pass


class Lane(_End):
    """The pod's end of one lane: its socket, whose connection it belongs to, and what it read so far.

    ``on_frame(lane, frame)`` takes each whole frame (raising :class:`LaneError`, or
    the protocol's ProtocolError, for one that breaks the protocol);
    ``on_broken(why, refused)`` is called once when the lane ends for any
    reason but :meth:`close`: ``refused`` unless its peer closed it (it broke
    the protocol, or the connection failed: what the peer wrote on it may be
    lost, so its WebSocket connection is closed too, and the client sends it
    again).
    Reads happen under a lock: the main thread and the network thread may both
    read a lane, one frame reaches ``on_frame`` once, whole.
    """

    def __init__(self, sock: socket.socket, owner: object, session: object,
                 on_frame: Callable[[Lane, bytes], None], on_broken: Callable[[str, bool], None]) -> None:
        super().__init__(sock)
        sock.setblocking(False)
        self.fd = sock.fileno()
        #: the WebSocket connection it belongs to (closed with it)
        self.owner = owner
        #: the session it belongs to (its lanes are not watched while that session's cell runs)
        self.session = session
        self.on_frame = on_frame
        self.on_broken = on_broken
        self.executes = 0

    def read(self) -> None:
        """Read what the lane holds now (never waiting), and hand each whole frame on; ends the lane on EOF
        or on a frame that breaks the protocol."""
        with self._lock:
            if self.closed:
                return
            frames, why = self._read_locked()
            try:
                for frame in frames:
                    self.executes += 1
                    self.on_frame(self, frame)
            except Exception as exc:  # a frame that breaks the protocol (LaneError, ProtocolError)
                why = str(exc) or type(exc).__name__
            if why is not None:
                self._close_locked()
        if why is not None:
            self.on_broken(why, why != PEER_CLOSED)

    def write(self, frames: list[bytes]) -> bool:
        """Write ``frames`` (a cell's reply, after its last outputs; at most :data:`MAX_LANE_FRAME` bytes in
        all) on the lane at once, whole, or not at all (False: they go on the WebSocket). A lane that takes only
        part of them is ended, as broken: the client drops the part, and its connection is closed too (see
        ``on_broken``)."""
        if sum(len(frame) for frame in frames) > MAX_LANE_FRAME:
            return False
        written = self._write_whole(frames)
        if written is False:
            self.on_broken("a reply did not fit in the lane", True)
        return bool(written)


class LaneSet:
    """The lanes the main thread reads while it waits (see :class:`pod_kernel.executor.JobQueue`).

    Lanes are added and closed from any thread; the main thread registers
    them with its poll the next time it waits (:meth:`wait`), woken by a byte
    on its wake pipe.
    """

    def __init__(self) -> None:
        self._waker = _Waker()
        self._poll = select.poll()
        self._poll.register(self._waker.fd, select.POLLIN)
        self._lock = threading.Lock()
        self._lanes: dict[int, Lane] = {}  # fd -> lane, as the main thread's poll knows them
        self._changes: list[tuple[bool, Lane]] = []  # (added, lane) since the main thread last looked
        #: whether the main thread waits in poll() now (a put writes to the wake pipe only then)
        self.sleeping = False
        self._watcher: _Watcher | None = None

    def wake(self) -> None:
        """Wake the main thread from :meth:`wait` (any thread)."""
        self._waker.wake()

    def add(self, lane: Lane) -> None:
        """Read ``lane`` from now on (any thread)."""
        with self._lock:
            self._changes.append((True, lane))
        self.wake()

    def close_owned_by(self, owner: object) -> None:
        """Close the lanes of the connection ``owner`` (it closed; any thread)."""
        with self._lock:
            lanes = [lane for lane in self._lanes.values() if lane.owner is owner]
            lanes += [lane for added, lane in self._changes if added and lane.owner is owner]
            self._changes.extend((False, lane) for lane in lanes)
        for lane in lanes:
            lane.close()
        if lanes:
            self.wake()

    def wait(self, timeout_s: float) -> None:
        """The main thread waits until woken or a lane has something to read (then reads it), at most
        ``timeout_s``. The caller sets :attr:`sleeping` around it, and checks its queue before."""
        self._apply_changes()
        for fd, _events in self._poll.poll(int(timeout_s * 1000)):
            if fd == self._waker.fd:
                self._waker.drain()
                continue
            lane = self._lanes.get(fd)
            if lane is not None:
                lane.read()
                if lane.closed:
                    self._forget(lane)

    def cell_started(self, session: object) -> None:
        """A cell of ``session`` starts on the main thread: the other sessions' lanes are read by a watcher
        thread meanwhile (their cells are queued, and told what they wait for, as they come)."""
        if len(self._lanes) < 2:
            return
        others = [lane for lane in self._lanes.values() if lane.session is not session and not lane.closed]
        if others:
            if self._watcher is None:
                self._watcher = _Watcher()
            self._watcher.watch(others)

    def cell_ended(self) -> None:
        """The cell ended: the main thread reads every lane again."""
        if self._watcher is not None:
            self._watcher.watch([])

    def _apply_changes(self) -> None:
        if not self._changes:
            return
        with self._lock:
            changes, self._changes = self._changes, []
            for added, lane in changes:
                if added and not lane.closed:
                    self._lanes[lane.fd] = lane
                    self._poll.register(lane.fd, select.POLLIN)
                elif not added and self._lanes.get(lane.fd) is lane:
                    self._forget_locked(lane)

    def _forget(self, lane: Lane) -> None:
        with self._lock:
            if self._lanes.get(lane.fd) is lane:
                self._forget_locked(lane)

    def _forget_locked(self, lane: Lane) -> None:
        del self._lanes[lane.fd]
        try:
            self._poll.unregister(lane.fd)
        except (KeyError, ValueError):
            pass


class _Watcher:
    """A thread that reads the lanes of other sessions while the main thread runs a cell (started the first
    time two sessions have lanes). Reading a lane that another thread closed meanwhile reads nothing
    (:meth:`Lane.read` checks under its lock), so a file descriptor reused by then is never read here."""

    def __init__(self) -> None:
        self._waker = _Waker()
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        threading.Thread(target=self._run, name="kt-lane-watch", daemon=True).start()

    def watch(self, lanes: list[Lane]) -> None:
        """Read these lanes from now on (none: stop reading)."""
        with self._cond:
            if not lanes and not self._lanes:
                return
            self._lanes = lanes
            self._cond.notify()
        self._waker.wake()  # out of a poll on the lanes before

    def _run(self) -> None:
        read: list[Lane] | None = None
        while True:
            with self._cond:
                while not self._lanes or self._lanes is read:  # each list once: its lanes may all be closed
                    self._cond.wait()
                lanes = read = self._lanes
            try:
                self._read(lanes)
            except Exception:  # never die: the next cell of two sessions needs this thread again
                log.exception("reading lanes while a cell runs failed")

    def _read(self, lanes: list[Lane]) -> None:
        poll = select.poll()
        poll.register(self._waker.fd, select.POLLIN)
        by_fd = {lane.fd: lane for lane in lanes if not lane.closed}
        for fd in by_fd:
            poll.register(fd, select.POLLIN)
        while self._lanes is lanes and by_fd:
            for fd, _events in poll.poll():
                if fd == self._waker.fd:
                    self._waker.drain()
                    continue
                lane = by_fd.get(fd)
                if lane is not None:
                    lane.read()
                    if lane.closed:
                        del by_fd[fd]
                        poll.unregister(fd)


# ---------------------------------------------------------------------- the client's end


def open_lane(address: tuple[str, int], ticket: str, timeout_s: float = ACK_TIMEOUT_S) -> socket.socket:
    """Connect a lane (blocking; run it off the event loop): the ticket out, the pod's :data:`ACK` back.
    Returns the socket, non-blocking; OSError (or LaneError) when the pod did not take it."""
    sock = socket.create_connection(address, timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(bytes.fromhex(ticket))
        if sock.recv(1) != ACK:
            raise LaneError("the pod kernel refused the lane's ticket")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ClientLane(_End):
    """The client's end of a lane: frames written whole, from any thread, or not at all; replies read by the
    one thread that claimed it (:meth:`claim`), which waits on it and on a wake-up (:meth:`wait`)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sent = 0
        self._fd = sock.fileno()
        self._waker = _Waker()
        self._poll_lane = select.poll()
        self._poll_lane.register(self._fd, select.POLLIN)
        self._poll_lane.register(self._waker.fd, select.POLLIN)
        self._poll_wake = select.poll()
        self._poll_wake.register(self._waker.fd, select.POLLIN)
        self._reader = threading.Lock()
        #: whether the claiming thread waits in :meth:`wait` now (a wake-up is written only then)
        self.sleeping = False
        #: read by the client's loop (a reader left before its reply came), until that reply came: no claims or sends
        self.adopted = False

    def send(self, frame: bytes) -> bool:
        """Write ``frame`` at once; False (the caller sends it another way) when it is too big, or the lane is
        closed or cannot take all of it now (one that took part of it is closed: a frame cut short is dropped
        by the pod, with the lane, and nothing of it runs)."""
        if len(frame) > MAX_LANE_FRAME or self.adopted:
            return False
        if not self._write_whole([frame]):
            return False
        self.sent += 1
        return True

    def claim(self) -> bool:
        """Become the thread that reads this lane's replies (False: another one is, or nobody may)."""
        return not self.adopted and not self.closed and self._reader.acquire(blocking=False)

    def release(self) -> None:
        """Stop being its reader."""
        self._reader.release()

    def hand_back(self) -> None:
        """The client's loop stops reading it (the reply it read it for came): the next cells' again."""
        self.adopted = False
        self._reader.release()

    def wake(self) -> None:
        """Wake the reader from :meth:`wait` (any thread)."""
        self._waker.wake()

    def wait(self, timeout_ms: int, read: bool) -> tuple[list[bytes], bool]:
        """Wait for a wake-up or (``read``) a frame, at most ``timeout_ms`` (-1: no limit); returns the frames
        read and whether the lane ended (closed by the pod, or it broke the protocol: then it is closed)."""
        poll = self._poll_lane if read and not self.closed else self._poll_wake
        frames: list[bytes] = []
        ended = False
        for fd, _events in poll.poll(timeout_ms):
            if fd == self._fd:
                frames, ended = self.read_frames()
            else:
                self._waker.drain()
        if ended:
            self.close()
        return frames, ended

    def read_frames(self) -> tuple[list[bytes], bool]:
        """The whole frames the lane holds now (never waiting) and whether it ended; it is not closed here."""
        with self._lock:
            if self.closed:
                return [], True
            frames, why = self._read_locked()
            return frames, why is not None
