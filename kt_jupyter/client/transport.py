"""One pod kernel's WebSocket: open, authenticate, reconnect and replay, route frames, send requests.

Every frame the pod sends reaches one handler through :attr:`Transport.handlers`
(one per message type, as :mod:`pod_kernel.server` dispatches requests). A
dropped connection is resumed: the transport reconnects with the last sequence
number it saw and the pod replays what came after; requests in flight are sent
again (executes are deduplicated by id on the pod).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from pod_kernel import protocol as P
from pod_kernel import waits
from pod_kernel.bulk import BULK_MIN_BYTES, Abort, client_transfer, parse_ticket
from pod_kernel.lanes import LANE_OUTPUTS, ClientLane, open_lane

from ..errors import AuthError, ConnectionLostError, KernelDiedError, KtError, ProtocolMismatchError, TransferError
from .exceptions import rebuild_exception
from .handshake import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, OPEN_TIMEOUT_S, KtClientConnection, handshake

log = logging.getLogger("kt_jupyter.client")

#: Longest an execute's caller waits on its lane in one go (see :mod:`pod_kernel.waits`).
WAIT_SLICE_MS = int(waits.MAIN_WAIT_SLICE_S * 1000)
#: How long a dropped connection is retried before giving up.
RECONNECT_TIMEOUT_S = 30.0

OutputCallback = Callable[[dict[str, Any]], None]
#: Answers a remote ``input()`` / pdb prompt: (prompt, password) -> the line typed. EOFError: no answer.
InputCallback = Callable[[str, bool], str]
ProgressCallback = Callable[[int, int], None]
#: Returns None while the kernel lives, else a sentence saying how it ended.
Liveness = Callable[[], str | None]
#: A frame's handler: (header, payload).
Handler = Callable[[dict[str, Any], memoryview], None]

PDB_PROMPT = P.PDB_PROMPT


def fallback_answer(prompt: str) -> str | None:
    """The answer when nothing can answer a remote prompt: continue pdb; None (EOFError) for input()."""
    return "c" if PDB_PROMPT in prompt else None


@dataclass
class _Execution:
    on_output: OutputCallback | None
    reply: asyncio.Future[tuple[dict[str, Any], bytes]]
    #: input_request messages go to on_output, whose caller answers them (Session.execute); else automatic
    answers_input: bool = False
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: called on the client loop with the reply as it arrives: a blocking caller finishes the execute in its own
    #: thread (Session.execute), without waiting for the loop to finish it
    on_reply: Callable[[tuple[dict[str, Any], bytes]], None] | None = None
    #: starts the coroutine that follows the execute to its end (resends it after a reconnect, reports a failure):
    #: an execute its caller's thread wrote has none until it needs one (see :meth:`Transport._watch`)
    start_watch: Callable[[_Execution], concurrent.futures.Future[Any]] | None = None
    watcher: concurrent.futures.Future[Any] | None = None
    #: the connection the caller's thread wrote the execute on (None: the loop sends it)
    sent_on: _Conn | None = None


class Inbox:
    """Where a blocking execute's outputs and reply wait for its thread (:meth:`Transport.take`).

    The client loop puts what it routes; with a lane claimed for the execute
    (:attr:`lane`), its thread also reads the reply from that lane itself,
    waiting on it and on a wake-up that a put writes while it sleeps there.
    """

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        #: the lane this execute's reply may come on (set before the execute is sent, so before any put)
        self.lane: ClientLane | None = None
        #: what of this execute was read from the lane (its last outputs, then its reply: (header, payload)), until
        #: the messages sent before them were routed
        self.lane_held: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        #: whether the caller took the execute's reply (or its end)
        self.replied = False

    def put(self, item: Any) -> None:
        """From the client loop: an output, or the reply routed from the WebSocket."""
        self.items.append(item)
        lane = self.lane
        if lane is None:
            self._tokens.put(None)
        elif lane.sleeping:
            lane.wake()

    def get(self, timeout: float | None) -> Any:
        """The next item, without a lane; queue.Empty after ``timeout``.

        The wait goes in slices (:mod:`pod_kernel.waits`), and a token only says that an item came: the items are
        looked at first. A Ctrl-C raised between taking a token and its item (a handler run late, as the wait
        ends) leaves the item for the next call; it used to be stranded, and the reply with it, for good.
        """
        for wait_s in waits.slices(timeout):
            if self.items:
                return self.items.popleft()
            with contextlib.suppress(queue.Empty):
                self._tokens.get(timeout=wait_s)
        if self.items:
            return self.items.popleft()
        raise queue.Empty


@dataclass
class _Pending:
    """A value request waiting for its reply (or a bundle being received for it)."""

    reply: asyncio.Future[tuple[Any, bytes]]
    on_progress: ProgressCallback | None = None
    assembler: P.BundleAssembler | None = None
    header: dict[str, Any] = field(default_factory=dict)
    bulk_ready: asyncio.Future[str] | None = None
    #: ends the bulk transfer of a push or pull in flight (:meth:`Transport.abort_transfer`)
    abort: Abort | None = None


@dataclass
class _Conn:
    ws: KtClientConnection
    closed: asyncio.Future[None]
    welcome: dict[str, Any]
    #: spare bulk tickets the pod gave this connection: a push naming one sends its bytes at once
    spares: list[str] = field(default_factory=list)
    #: this connection's lane ticket until the lane is asked for (see :mod:`pod_kernel.lanes`), and the lane
    lane_ticket: str | None = None
    lane: ClientLane | None = None
    #: how long the pod keeps a bulk connection for its next transfer (its welcome's, checked; 0: it does not)
    bulk_keepalive_s: float = 0.0


#: Seqs not routed yet below the last one routed that a transport remembers at most (see _first_sight).
MAX_SEQ_GAPS = 1024
#: Spare bulk tickets a connection keeps at most (the pod hands out two).
MAX_SPARES = 4


def _spare_tickets(value: Any) -> list[str]:
    """The spare bulk tickets in a welcome or spare_ticket message: hex strings of the ticket's length, at most
    :data:`MAX_SPARES` (anything else from the wire is dropped)."""
    if not isinstance(value, list):
        return []
    return [t for t in value if parse_ticket(t) is not None][:MAX_SPARES]


def _keepalive_s(welcome: dict[str, Any]) -> float:
    """How long the pod keeps a bulk connection for its next ticket (its welcome's ``bulk_keepalive_s``, a
    number in [0, 3600]; 0 when it says nothing else)."""
    value = welcome.get("bulk_keepalive_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        return 0.0
    return float(value)


class _Resend(Exception):
    """The connection dropped before a value request was answered: send it again."""


def _receive_bulk(asm: P.BundleAssembler, address: tuple[str, int], ticket: str,
                  progress: ProgressCallback | None, reuse_s: float, abort: Abort | None) -> None:
    """Receive a bundle over the bulk channel straight into its buffers (in a worker thread)."""
    with asm.faulting_in() as ready:  # new memory faulted in while the bytes arrive, off the event loop
        asm.digests.update(client_transfer(address, ticket, receive=asm.parts, progress=progress, reuse_s=reuse_s,
                                           ready=ready, abort=abort))
    asm.vouch()  # before anything can write to the parts: the next fingerprint of the value reads nothing


class Transport:
    """The connection to one pod kernel at ``url`` (``ws://host:port``), shared by the session's requests."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        name: str = "default",
        liveness: Liveness | None = None,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        on_notice: Callable[[dict[str, Any]], None] | None = None,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        bulk_host: str | None = None,
        accept_pickle: bool = True,
        bulk_resolver: Callable[[int], tuple[str, int] | None] | None = None,
        path_error: Callable[[], str] | None = None,
    ) -> None:
        self.url = url
        #: why the way to the kernel (a port-forward) failed last, when it knows ("" when it does not)
        self.path_error = path_error
        #: whether pickled payloads from the pod are loaded here; False for a JSON-only compute, so a
        #: misbehaving pod cannot make the notebook unpickle anything (False too once the pod says it is)
        self.accept_pickle = accept_pickle
        #: host of the pod's bulk channel (None: bundles travel over the WebSocket only)
        self.bulk_host = bulk_host
        #: the pod's bulk port -> the address reaching it from here (a port-forward's), or None: WebSocket only.
        #: Without one, the bulk channel is at bulk_host and the pod's own port.
        self.bulk_resolver = bulk_resolver
        self._token = token
        self.name = name
        self.session_id = uuid.uuid4().hex
        self.liveness = liveness
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_notice = on_notice
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        #: why the last connection dropped, when we know (e.g. no heartbeat answer)
        self.last_drop: str | None = None
        self.last_seq = 0
        self.reconnects = 0
        self.pod_pid: int | None = None
        #: whether the pod resolves a check's ``held_same`` (its welcome says so)
        self.pod_held_same = False
        self.allowed_serialization: list[str] = list(P.SERIALIZATIONS)
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._connect_lock = asyncio.Lock()  # binds to the client loop on first contention
        self._send_lock = asyncio.Lock()
        self._executions: dict[str, _Execution] = {}
        self._watch_lock = threading.Lock()
        #: pushes started without waiting (Session.start_push) -> done once what must precede a request that
        #: follows them is on the wire: an execute naming one in ``after`` is sent only then
        self._preceding: dict[str, asyncio.Future[None]] = {}
        self._streams: dict[str, OutputCallback] = {}
        self._lane_tasks: set[asyncio.Future[None]] = set()
        #: last_seq is advanced by the loop and, for what a lane carried, by the thread that read it
        self._seq_lock = threading.Lock()
        #: seqs below last_seq not routed yet: two threads route (the loop; a cell's caller what its lane carried),
        #: so one may route a message before another routes those before it (see :meth:`_first_sight`)
        self._gaps: set[int] = set()
        #: the seq the last connection asked the pod to replay after
        self._asked_from = 0
        #: the seq of the last sequenced message handed to its handler (a lane's reply waits for those before it)
        self.routed_seq = 0
        #: replies the caller's thread read from a lane
        self.lane_replies = 0
        #: whether an execute was sent in this session (its connections then open a lane)
        self._runs_cells = False
        self._pending: dict[str, _Pending] = {}
        self._closed = False
        self._dead: KtError | None = None
        #: called (on the client loop) with sequenced messages of requests this session did not send:
        #: a follower of a detached session (Session.follow) shows them
        self.on_unsolicited: Callable[[dict[str, Any]], None] | None = None
        # the API layers' state, here so that one typed constructor serves them all:
        #: name -> id() of the object the pod bound, for the last push (tells a rebinding apart)
        self.last_push_ids: dict[str, int] = {}
        #: check answers of executions given up on (timeout), taken by the next cell (Session.take_orphan_states)
        self._orphan_states: collections.deque[dict[str, Any]] = collections.deque()
        #: message type -> its handler (types not listed are ignored: a newer pod may send more)
        self.handlers: dict[str, Handler] = {
            **{kind: self._on_output for kind in LANE_OUTPUTS},
            "input_request": self._on_input_request,
            "execute_reply": self._on_execute_reply,
            "reply": self._on_reply,
            "error_reply": self._on_error_reply,
            "values": self._on_values,
            "bulk_ready": self._on_bulk_ready,
            "spare_ticket": self._on_spare_ticket,
            "chunk": self._on_chunk,
            "notice": self._on_notice,
        }

    def new_id(self) -> str:
        """A fresh request id."""
        return f"{self.session_id[:8]}-{next(self._ids)}"

    def _start_execute(self, loop: asyncio.AbstractEventLoop, req_id: str, header: dict[str, Any],
                       on_output: OutputCallback | None, answers_input: bool, *, send: bool = True,
                       on_reply: Callable[[tuple[dict[str, Any], bytes]], None] | None = None,
                       start_watch: Callable[[_Execution], concurrent.futures.Future[Any]] | None = None,
                       inbox: Inbox | None = None) -> tuple[_Execution, _Conn | None]:
        """From the caller's thread, before the client loop takes over: register the execution, and (when
        ``send``) write its request on the live connection at once if it can (see :meth:`DirectWrites.send_now`):
        the loop's thread is not woken to send it. Returns the execution and the connection it went on (None:
        the loop sends it). ``start_watch``: see :meth:`_watch`. ``inbox``: the caller's thread waits there
        (:meth:`take`), so its reply may come on the connection's lane, which that thread then reads."""
        ex = _Execution(on_output, loop.create_future(), answers_input=answers_input and on_output is not None,
                        on_reply=on_reply, start_watch=start_watch)
        self._executions[req_id] = ex  # first: its reply may come before the loop runs anything of ours
        self._runs_cells = True  # its connections open a lane (see _open_lane)
        conn = self._conn
        if conn is None or conn.closed.done():
            return ex, None
        lane = conn.lane
        if lane is None and conn.lane_ticket is not None:  # for the next cells (this one cannot wait for it)
            loop.call_soon_threadsafe(self._open_lane, conn)
        if not send:
            return ex, None
        # on the lane only when no request of this session waits for its reply: the pod's main thread reads the
        # lane at once, maybe before its network thread read what went before on the WebSocket
        on_lane = lane if lane is not None and not self._pending else None
        if on_lane is not None and inbox is not None and on_lane.claim():
            inbox.lane = on_lane  # its reply may come back on the lane: this thread reads it (the pod ignores
            header = dict(header, lane_reply=True)  # lane_reply on an execute that came on the WebSocket)
        try:
            frame = P.encode_frame(header)
        except P.ProtocolError:  # too big for a header: the loop's send says so
            frame = b""
        if on_lane is not None and frame and on_lane.send(frame):
            ex.sent_on = conn
            return ex, conn
        if on_lane is not None and inbox is not None and inbox.lane is on_lane:  # nothing sent, nothing put yet
            inbox.lane = None
            on_lane.release()
        if not frame:
            return ex, None
        if conn.ws.send_now(frame):
            ex.sent_on = conn
        return ex, ex.sent_on

    def take(self, inbox: Inbox, req_id: str, timeout: float | None) -> Any:
        """The next output or the reply of execute ``req_id`` (``(header, payload)``), in the order the pod sent
        them; queue.Empty after ``timeout``. In the execute's caller's thread, which reads the lane, if any."""
        lane = inbox.lane
        if lane is None:
            return inbox.get(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        held = inbox.lane_held
        while True:
            if inbox.items:
                return inbox.items.popleft()
            # what was read from the lane, once every message before it was routed: an output is routed here
            # (into this inbox, to be taken first), the reply taken
            if held and self.routed_seq >= held[0][0]["seq"] - 1:
                header, payload = held.popleft()
                if header["type"] != "execute_reply":
                    self._route(header, memoryview(payload))
                elif self._took_lane_reply((header, payload)):
                    return header, payload
                continue
            replied = bool(held) and held[-1][0]["type"] == "execute_reply"
            wait_ms = WAIT_SLICE_MS if deadline is None else \
                max(0, min(WAIT_SLICE_MS, int((deadline - time.monotonic()) * 1000)))
            if held:  # the loop routes the messages before them, which may not be this execute's
                wait_ms = min(wait_ms, 1)
            lane.sleeping = True
            try:
                if inbox.items:
                    continue
                frames, ended = lane.wait(wait_ms, read=not replied)
            finally:
                lane.sleeping = False
            for frame in frames:
                self._lane_frame(inbox, req_id, frame)
            if ended and not replied:
                log.debug("the lane to %s ended; the reply comes on the WebSocket", self.name)
            if deadline is not None and time.monotonic() >= deadline and not inbox.items and not held:
                raise queue.Empty

    def _lane_frame(self, inbox: Inbox, req_id: str, frame: bytes) -> None:
        """A frame read from the lane: this execute's last outputs and reply wait in ``inbox``; another's are
        routed by the loop."""
        try:
            header, payload = P.decode_frame(frame)
            seq = header.get("seq")
            if header["type"] != "execute_reply" and header["type"] not in LANE_OUTPUTS:
                raise P.ProtocolError(f"a lane carries replies and outputs only, not {header['type']!r}")
            if not isinstance(seq, int):
                raise P.ProtocolError("a lane frame without its seq")
        except P.ProtocolError as exc:  # the pod broke the protocol: its connection is closed, the reply replayed
            log.warning("pod kernel %s sent a bad frame on its lane: %s", self.name, exc)
            conn = self._conn
            if conn is not None:
                conn.closed.get_loop().call_soon_threadsafe(conn.ws.refuse, f"lane: {exc}")
            return
        if header.get("id") == req_id:
            inbox.lane_held.append((header, bytes(payload)))
        else:  # an execute given up on: as if it came on the WebSocket
            conn = self._conn
            if conn is not None:
                conn.closed.get_loop().call_soon_threadsafe(self._route, header, memoryview(bytes(payload)))

    def _first_sight(self, seq: int) -> bool:
        """Whether message ``seq`` is seen here for the first time (it counts as seen from now on); False for one
        routed already (a replay after a reconnect, or a copy that came both ways). Under the seq lock."""
        last = self.last_seq
        if seq > last:
            if seq > last + 1:  # those between come later, from the other routing thread (or were lost)
                self._gaps.update(range(max(last + 1, seq - MAX_SEQ_GAPS), seq))
                if len(self._gaps) > MAX_SEQ_GAPS:
                    self._gaps = set(sorted(self._gaps)[-MAX_SEQ_GAPS:])
            self.last_seq = seq
            return True
        if seq in self._gaps:
            self._gaps.discard(seq)
            return True
        return False

    def _replay_from(self) -> int:
        """The seq a new connection asks the pod to replay after: the last one seen, or before the first one
        still missing (a lane's message not routed yet when its connection dropped)."""
        with self._seq_lock:
            self._asked_from = min(self._gaps) - 1 if self._gaps else self.last_seq
            return self._asked_from

    def _took_lane_reply(self, reply: tuple[dict[str, Any], bytes]) -> bool:
        """The caller's thread takes its reply from the lane: the loop's replay and watcher know it. False: the
        loop routed it already (a replay), into the caller's inbox."""
        header = reply[0]
        seq = header["seq"]
        with self._seq_lock:
            if not self._first_sight(seq):
                return False
            self.routed_seq = max(self.routed_seq, seq)
        self.lane_replies += 1
        ex = self._executions.get(header.get("id", ""))
        if ex is None:
            return True
        with self._watch_lock:
            ex.start_watch = None  # no coroutine follows it from now on
            watcher = ex.watcher
        if watcher is not None:  # one follows it already (a reconnect): it gets the reply too
            def finish() -> None:
                if not ex.reply.done():
                    ex.reply.set_result(reply)
            ex.reply.get_loop().call_soon_threadsafe(finish)
        return True

    def leave_lane(self, inbox: Inbox, req_id: str) -> None:
        """The execute's caller stops waiting: with its reply, the lane is free for the next; without (it gave
        up, or failed), the loop routes what this thread read of it and reads the lane from now on, where that
        reply may still come, and hands the lane back to the next cells once it came."""
        lane = inbox.lane
        if lane is None:
            return
        if inbox.replied:
            lane.release()
            return
        lane.adopted = True
        held, inbox.lane_held = list(inbox.lane_held), collections.deque()
        conn = self._conn
        if conn is not None:
            conn.closed.get_loop().call_soon_threadsafe(self._adopt_lane, conn, lane, req_id, held)

    def _adopt_lane(self, conn: _Conn, lane: ClientLane, req_id: str,
                    held: list[tuple[dict[str, Any], bytes]]) -> None:
        def route(header: dict[str, Any], payload: memoryview) -> bool:
            """Route it; whether it is that execute's reply (nothing more comes on the lane for it)."""
            self._route(header, payload)
            return header["type"] == "execute_reply" and header.get("id") == req_id

        replied = False
        for header, payload in held:
            replied = route(header, memoryview(payload)) or replied
        if conn.lane is not lane or conn.closed.done() or lane.closed:
            return
        if replied:
            lane.hand_back()
            return
        loop = asyncio.get_running_loop()

        def readable() -> None:
            frames, ended = lane.read_frames()
            replied = False
            for frame in frames:
                try:
                    header, payload = P.decode_frame(frame)
                except P.ProtocolError:
                    ended = True
                    break
                replied = route(header, payload) or replied
            if ended or replied:
                loop.remove_reader(lane.sock.fileno())
            if ended:
                lane.close()
            elif replied:
                lane.hand_back()
        loop.add_reader(lane.sock.fileno(), readable)

    @staticmethod
    def _close_lane(conn: _Conn) -> None:
        """On the client loop: close ``conn``'s lane (the loop stops reading it first, if it does)."""
        lane = conn.lane
        if lane is None:
            return
        if lane.adopted and not lane.closed:
            asyncio.get_running_loop().remove_reader(lane.sock.fileno())  # before its fd is closed, and reused
        lane.close()

    def _open_lane(self, conn: _Conn) -> None:
        """On the client loop: connect ``conn``'s lane in a worker thread (once); the next executes go on it.
        Asked for by the first execute, and by each new connection of a session that ran one."""
        ticket, conn.lane_ticket = conn.lane_ticket, None
        if ticket is None or conn.closed.done():
            return

        def connect_lane() -> Any:
            address = self._bulk_address(conn)  # a port-forward's, on Kubernetes: maybe started now
            return None if address is None else open_lane(address, ticket)

        async def connect() -> None:
            try:
                sock = await asyncio.to_thread(connect_lane)
            except Exception as exc:  # the WebSocket serves on: executes go on it, as without a lane
                log.debug("no lane to %s: %s", self.name, exc)
                return
            if sock is None:
                return
            if conn.closed.done():
                sock.close()
            else:
                conn.lane = ClientLane(sock)

        task = asyncio.ensure_future(connect())
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    def _watch(self, ex: _Execution) -> concurrent.futures.Future[Any] | None:
        """The coroutine that follows ``ex`` to its end: started now if it was not (once, from any thread).

        A blocking caller whose thread wrote the execute waits for its reply
        without one: starting a coroutine wakes the client loop's thread, which
        then competes with both kernels for the CPU while the cell runs. It is
        started only when the execute needs more than its reply: the connection
        dropped (it resends the execute, or reports why it cannot), or the caller
        gave up waiting (it collects the reply). None for an execute that
        ``start_watch`` does not describe (the coroutine is its caller's own).
        """
        with self._watch_lock:
            if ex.watcher is None and ex.start_watch is not None:
                ex.watcher = ex.start_watch(ex)
            return ex.watcher

    def _watch_all(self) -> None:
        """A connection dropped, or the kernel is gone: every execute still waiting gets its coroutine."""
        for ex in list(self._executions.values()):  # a copy: a caller's thread may register one meanwhile
            if not ex.reply.done():
                self._watch(ex)

    async def arequest(self, header: dict[str, Any], *, bundle: P.Bundle | None = None,
                       on_progress: ProgressCallback | None = None, req_id: str | None = None,
                       resend: bool = True, on_sent: Callable[[], None] | None = None) -> Any:
        """Send a request and return its reply header or bundle.

        After a reconnect the request is sent again, unless ``resend`` is
        False (a call that may already have run): then ConnectionLostError.
        ``on_sent`` is called once what must precede a later request on the
        WebSocket is written: the header of a bulk push, else every frame.
        """
        req_id = req_id or self.new_id()
        header = dict(header, id=req_id)
        while True:
            loop = asyncio.get_running_loop()
            pending = _Pending(loop.create_future(), on_progress, bulk_ready=loop.create_future(),
                               abort=Abort() if bundle is not None or header.get("bulk") else None)
            self._pending[req_id] = pending
            try:
                reply, _payload = await self._until_reply(header, pending.reply, bundle, on_progress, once=True,
                                                          bulk_ready=pending.bulk_ready, on_sent=on_sent,
                                                          abort=pending.abort)
                return reply
            except _Resend:
                if not resend:
                    raise ConnectionLostError(
                        f"the connection to {self.name!r} dropped during {header['type']!r}; "
                        "it may or may not have run remotely"
                    ) from None
                continue
            except asyncio.CancelledError:  # given up (a Ctrl-C on a kt.fn call, a timeout): so are its bytes, whose
                if pending.abort is not None:  # thread would move them all otherwise
                    pending.abort.set()
                raise
            finally:
                self._pending.pop(req_id, None)

    async def areply_input(self, input_id: Any, value: str | None) -> bool:
        """Answer a cell's input_request; ``value`` None raises EOFError in the cell. False if none waited."""
        header: dict[str, Any] = {"type": "input_reply", "value": value or "", "eof": value is None}
        if isinstance(input_id, int):
            header["input_id"] = input_id
        return bool((await self.arequest(header))["accepted"])

    async def aclose(self) -> None:
        """Close the connection; pending operations fail with ConnectionLostError."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_lane(conn)
            await conn.ws.close()

    # ------------------------------------------------------------------ sending

    async def _until_reply(self, header: dict[str, Any], reply: asyncio.Future[Any],
                           bundle: P.Bundle | None = None, on_progress: ProgressCallback | None = None,
                           once: bool = False, bulk_ready: asyncio.Future[str] | None = None,
                           on_sent: Callable[[], None] | None = None,
                           sent_on: _Conn | None = None, abort: Abort | None = None) -> tuple[Any, bytes]:
        """Send ``header`` (and bundle) and wait for ``reply``, resending after reconnects.

        A big bundle goes over the bulk channel when the pod has one: the
        header asks for it, the pod answers with a one-time ticket, and the
        bytes flow over plain TCP from their own memory. ``sent_on``: the
        connection the request was written on already (by the caller's thread):
        it is sent again only on a later one.
        """
        while True:
            if reply.done():  # answered already (an execute the caller's thread wrote): nothing to send again
                return reply.result()
            conn = await self._ensure_conn()
            address = self._bulk_address() if bundle is not None and bundle.nbytes >= BULK_MIN_BYTES else None
            try:
                if conn is sent_on:
                    pass
                elif bundle is not None and address is not None and bulk_ready is not None:
                    # a spare ticket: the bytes go at once, else the pod answers the header with a ticket
                    spare = conn.spares.pop() if conn.spares else None
                    bulk_header = dict(header, bulk=True, serialization=bundle.serialization, sizes=bundle.sizes)
                    if spare is not None:
                        bulk_header["ticket"] = spare
                    await conn.ws.send(P.encode_frame(bulk_header))
                    if on_sent is not None:
                        on_sent()
                    ticket = spare
                    if ticket is None:
                        await asyncio.wait([bulk_ready, reply, conn.closed], return_when=asyncio.FIRST_COMPLETED)
                        ticket = bulk_ready.result() if bulk_ready.done() and not reply.done() else None
                    if ticket is not None:
                        try:
                            # the digests taken as the big parts went: this side's fingerprints of them
                            bundle.digests.update(await asyncio.to_thread(
                                client_transfer, address, ticket, send=bundle.parts, progress=on_progress,
                                reuse_s=conn.bulk_keepalive_s, abort=abort))
                        except OSError as exc:  # the pod answers a failed transfer, or the connection drops
                            log.debug("bulk push to %s failed: %s", self.name, exc)
                else:
                    async with self._send_lock:
                        await self._send(conn, header, bundle, on_progress)
                    if on_sent is not None:
                        on_sent()
            except ConnectionClosed:
                pass
            await asyncio.wait([reply, conn.closed], return_when=asyncio.FIRST_COMPLETED)
            if reply.done():
                return reply.result()
            if once:
                raise _Resend()

    @staticmethod
    async def _send(conn: _Conn, header: dict[str, Any], bundle: P.Bundle | None,
                    on_progress: ProgressCallback | None) -> None:
        """Send a request over the WebSocket: its header, then its bundle's chunks."""
        if bundle is None:
            await conn.ws.send(P.encode_frame(header))
            return
        frames = P.bundle_frames(header, bundle)
        await conn.ws.send(next(frames))
        sent, total = 0, bundle.nbytes
        for frame in frames:
            await conn.ws.send(frame)
            sent = min(total, sent + P.CHUNK_BYTES)
            if on_progress is not None:
                on_progress(sent, total)

    def abort_transfer(self, req_id: str) -> bool:
        """End the bulk transfer of request ``req_id`` now, from any thread (a Ctrl-C while a push or a pull is
        on its way): the pod sees it cut short and fails the request (a push: and the cell that follows it). False
        when that request has no bulk transfer to end."""
        pending = self._pending.get(req_id)
        if pending is None or pending.abort is None:
            return False
        pending.abort.set()
        return True

    def _bulk_address(self, conn: _Conn | None = None) -> tuple[str, int] | None:
        conn = conn or self._conn
        port = conn.welcome.get("bulk_port") if conn is not None else None
        if port and self.bulk_resolver is not None:  # reached through a forward (Kubernetes)
            return self.bulk_resolver(int(port))
        return (self.bulk_host, int(port)) if self.bulk_host and port else None

    async def _bulk_receive(self, pending: _Pending, ticket: str) -> None:
        asm, address = pending.assembler, self._bulk_address()
        try:
            if asm is None or address is None:
                raise ConnectionLostError("the connection dropped before the transfer began")
            await asyncio.to_thread(_receive_bulk, asm, address, ticket, pending.on_progress,
                                    self._conn.bulk_keepalive_s if self._conn is not None else 0.0, pending.abort)
        except Exception as exc:
            if not pending.reply.done():
                pending.reply.set_exception(TransferError(f"bulk transfer from {self.name!r} failed: {exc}"))
                pending.reply.exception()  # retrieved: its request may have ended meanwhile (a Ctrl-C, a close)
            return
        asm.received = asm.total
        if not pending.reply.done():
            pending.reply.set_result((asm.bundle(), b""))

    # ------------------------------------------------------------------ connecting

    async def _ensure_conn(self) -> _Conn:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise ConnectionLostError(f"session to {self.name!r} is closed")
        conn = self._conn
        if conn is not None and not conn.closed.done():
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.closed.done():
                return conn
            reconnecting = conn is not None
            self._conn = conn = await self._open(reconnecting)
            if reconnecting:
                self.reconnects += 1
            return conn

    def _died(self) -> KtError | None:
        if self.liveness is None:
            return None
        why = self.liveness()
        return None if why is None else KernelDiedError(why)

    async def _open(self, reconnecting: bool) -> _Conn:
        deadline = time.monotonic() + (self.reconnect_timeout_s if reconnecting else OPEN_TIMEOUT_S)
        delay = 0.02
        last_error: Exception | None = None
        while True:
            dead = self._died()
            if dead is not None:
                self._fail_all(dead)
                raise dead
            try:
                ws, welcome = await handshake(
                    self.url, self._token, self.session_id, self._replay_from(), name=self.name,
                    open_timeout_s=max(0.05, min(OPEN_TIMEOUT_S, deadline - time.monotonic())),
                    heartbeat_interval_s=self.heartbeat_interval_s, heartbeat_timeout_s=self.heartbeat_timeout_s)
                break
            except InvalidStatus as exc:
                body = (exc.response.body or b"").decode(errors="replace").strip()
                if exc.response.status_code == 401:
                    raise AuthError(f"pod kernel {self.name!r} rejected the token: {body}") from None
                if exc.response.status_code == 426:
                    raise ProtocolMismatchError(body) from None
                last_error = exc
            except (TimeoutError, OSError, EOFError, ConnectionClosed, InvalidHandshake, P.ProtocolError) as exc:
                # EOFError: a connection closed before the pod's answer (a kernel that dies meanwhile); websockets
                # 14 raises it as it is, later versions wrap it in InvalidMessage (an InvalidHandshake)
                last_error = exc
            if time.monotonic() >= deadline:
                why = f"{self.last_drop}, and " if reconnecting and self.last_drop else ""
                path = self.path_error() if self.path_error is not None else ""
                why += f"{path}; " if path else ""
                err = ConnectionLostError(
                    f"cannot reach pod kernel {self.name!r} at {self.url}: {why}{last_error or 'no answer'}. "
                    "Check it with `%kt status`; `%kt restart` starts it again."
                )
                if reconnecting:
                    self._fail_all(err)
                raise err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.last_drop = None
        self.pod_pid = welcome.get("pid")
        self.pod_held_same = welcome.get("held_same") is True
        self.allowed_serialization = welcome.get("allowed_serialization", self.allowed_serialization)
        if "pickle" not in self.allowed_serialization:
            self.accept_pickle = False
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn = _Conn(ws, closed, welcome, _spare_tickets(welcome.get("bulk_spares")),
                     lane_ticket=welcome["lane"] if parse_ticket(welcome.get("lane")) is not None else None,
                     bulk_keepalive_s=_keepalive_s(welcome))
        asyncio.create_task(self._read(conn))
        if self._runs_cells:
            self._open_lane(conn)
        return conn

    def _fail_all(self, exc: KtError) -> None:
        self._dead = exc if isinstance(exc, KernelDiedError) else None
        self._watch_all()  # which reports the failure to a caller whose thread wrote its execute
        # a copy: a caller's thread may register an execution meanwhile (_start_execute)
        replies: list[asyncio.Future[Any]] = [ex.reply for ex in list(self._executions.values())]
        replies += [pending.reply for pending in self._pending.values()]
        for reply in replies:
            if not reply.done():
                reply.set_exception(exc)
                reply.add_done_callback(lambda f: f.exception())  # retrieved even if nobody awaits

    # ------------------------------------------------------------------ receiving

    async def _read(self, conn: _Conn) -> None:
        """Route every frame of one connection as it arrives (see :class:`DirectReads`), until it closes."""
        ws = conn.ws
        try:
            ws.set_handler(functools.partial(self._on_message, conn))
            await ws.wait_closed()
            sent = ws.protocol.close_sent
            log.debug("connection to %s ended: %s", self.name, ws.protocol.close_exc)
            if sent is not None and sent.reason == "keepalive ping timeout":
                self.last_drop = (f"it answered no heartbeat for {self.heartbeat_timeout_s:g} s (stopped, "
                                  "hung in native code that holds the GIL, or its network is down)")
        finally:
            self._ended(conn)

    def _ended(self, conn: _Conn) -> None:
        """``conn`` is closed, or no longer read: what waited on it is resent or fails."""
        if not conn.closed.done():
            conn.closed.set_result(None)
        self._close_lane(conn)
        self._watch_all()  # after closed is set: an execute registered later sees it, and is not written on it
        for pending in self._pending.values():
            pending.assembler = None  # a bundle cut mid-way is requested again

    def _on_message(self, conn: _Conn, message: bytes | str) -> None:
        """One message of ``conn``, on the client loop as websockets parses it."""
        if conn.closed.done():  # refused already: what follows on it is not read
            return
        try:
            header, payload = P.decode_frame(message)
        except P.ProtocolError as exc:
            self._ended(conn)  # nothing more is routed from it; the next request reconnects
            conn.ws.refuse(str(exc))
            return
        try:
            self._route(header, payload)
        except Exception:  # a handler's bug: that message is lost, the connection and the others go on
            log.exception("handling a %r message from pod kernel %s failed", header.get("type"), self.name)

    def _route(self, header: dict[str, Any], payload: memoryview) -> None:
        """Hand one frame to its type's handler, once (a replayed frame seen before is dropped)."""
        seq = header.get("seq")
        if seq is not None:
            with self._seq_lock:
                if not self._first_sight(seq):
                    return  # already seen before a reconnect (or read from the lane)
        try:
            handler = self.handlers.get(header["type"])
            if handler is not None:
                handler(header, payload)
        finally:
            if seq is not None and seq > self.routed_seq:
                with self._seq_lock:  # the caller's thread routes a lane's outputs too
                    self.routed_seq = max(self.routed_seq, seq)

    def _on_output(self, header: dict[str, Any], payload: memoryview) -> None:
        kind = header["type"]
        if kind in ("display", "execute_result") and header.pop("data_in_payload", False):
            header["data"] = json.loads(bytes(payload))  # a mime bundle too big for a header (up to 4 MiB)
        ex = self._executions.get(header.get("id", ""))
        if ex is None:
            callback = self._streams.get(header.get("id", "")) or self.on_unsolicited
            if callback is not None:
                callback(header)
            return
        if kind == "execute_result":
            ex.data = header.get("data")
            ex.metadata = header.get("metadata") or {}
        if ex.on_output is not None:
            ex.on_output(header)

    def _on_input_request(self, header: dict[str, Any], payload: memoryview) -> None:
        ex = self._executions.get(header.get("id", ""))
        if ex is not None and ex.answers_input and ex.on_output is not None:
            ex.on_output(header)  # Session.execute answers it in the caller's thread
        elif ex is not None:  # nobody here can type: continue pdb, EOFError for input()
            task = asyncio.ensure_future(self.areply_input(header.get("input_id"),
                                                           fallback_answer(str(header.get("prompt", "")))))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_execute_reply(self, header: dict[str, Any], payload: memoryview) -> None:
        ex = self._executions.get(header.get("id", ""))
        if ex is not None and not ex.reply.done():
            reply = (header, bytes(payload))
            ex.reply.set_result(reply)
            if ex.on_reply is not None:
                ex.on_reply(reply)
        elif ex is None and self.on_unsolicited is not None:
            self.on_unsolicited(header)

    def _waiting(self, header: dict[str, Any]) -> _Pending | None:
        """The value request a frame answers, if one still waits for it."""
        pending = self._pending.get(header.get("id", ""))
        return None if pending is None or pending.reply.done() else pending

    def _on_reply(self, header: dict[str, Any], payload: memoryview) -> None:
        pending = self._waiting(header)
        if pending is not None:
            pending.reply.set_result((header, b""))

    def _on_error_reply(self, header: dict[str, Any], payload: memoryview) -> None:
        pending = self._waiting(header)
        if pending is not None:
            pending.reply.set_exception(rebuild_exception(
                {"ename": header.get("ename"), "evalue": header.get("evalue"),
                 "traceback": [header.get("traceback", "")]}, bytes(payload), self.accept_pickle))

    def _on_values(self, header: dict[str, Any], payload: memoryview) -> None:
        pending = self._pending.get(header.get("id", ""))
        if pending is None:
            return
        pending.header = header
        pending.assembler = P.BundleAssembler(header["serialization"], header["sizes"])
        if header.get("bulk"):
            asyncio.ensure_future(self._bulk_receive(pending, header["bulk"]))
        else:
            self._bundle_progress(pending)

    def _on_spare_ticket(self, header: dict[str, Any], payload: memoryview) -> None:
        conn = self._conn
        if conn is not None and len(conn.spares) < MAX_SPARES:
            conn.spares.extend(_spare_tickets([header.get("ticket")]))

    def _on_bulk_ready(self, header: dict[str, Any], payload: memoryview) -> None:
        pending = self._pending.get(header.get("id", ""))
        if pending is not None and pending.bulk_ready is not None and not pending.bulk_ready.done():
            pending.bulk_ready.set_result(header["ticket"])

    def _on_chunk(self, header: dict[str, Any], payload: memoryview) -> None:
        pending = self._pending.get(header.get("id", ""))
        if pending is not None and pending.assembler is not None:
            pending.assembler.feed(payload)
            self._bundle_progress(pending)

    def _on_notice(self, header: dict[str, Any], payload: memoryview) -> None:
        lost = header.get("lost")
        if isinstance(lost, int) and not isinstance(lost, bool):  # the replay's first message: those never come
            with self._seq_lock:
                self._gaps = {seq for seq in self._gaps if seq > self._asked_from + lost}
        log.log(logging.INFO if header.get("level") == "info" else logging.WARNING, "pod kernel %s: %s", self.name,
                header.get("text"))
        if self.on_notice is not None:
            self.on_notice(header)
        for ex in list(self._executions.values()):  # a copy: see _fail_all
            if ex.on_output is not None:
                ex.on_output(header)

    @staticmethod
    def _bundle_progress(pending: _Pending) -> None:
        asm = pending.assembler
        if asm is None:
            return
        if pending.on_progress is not None:
            pending.on_progress(asm.received, asm.total)
        if asm.done and not pending.reply.done():
            pending.reply.set_result((asm.bundle(), b""))
            pending.assembler = None
