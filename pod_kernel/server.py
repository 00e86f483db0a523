"""The pod kernel's network side: a websockets server with auth, sessions and replay.

It runs an asyncio loop in a background thread; cells run in the main thread
(:mod:`pod_kernel.executor`). One handler per request type, found through
:attr:`PodKernelServer.handlers`; a handler's exception becomes an
``error_reply`` and the connection stays up. A frame that breaks the
protocol closes its connection (code 1002, with the reason) and nothing
else: other clients keep being served.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import coherence, logfile, tensors
from . import protocol as P
from .bulk import BULK_MIN_BYTES, SPARES_PER_OWNER, BulkServer, listen_socket
from .calls import CallRunner
from .codesync import CodeSync
from .executor import CellJob, Executor, write_cell_file
from .lanes import MAX_LANE_FRAME, Lane, LaneError
from .metrics import MetricsSampler
from .outbox import Outbox
from .pushes import Pushes
from .rejections import RejectionLog
from .wsconn import DirectReads, DirectWrites

log = logging.getLogger("pod_kernel.server")


logging.getLogger("websockets.server").addFilter(P.RedactBearer())

#: Execute request ids remembered per session to drop resent duplicates.
SEEN_IDS_KEPT = 4096
#: How long a disconnected session's replay buffer waits for the client to resume.
SESSION_KEEP_S = 600
#: Disconnected sessions kept for resuming at most; the oldest are dropped first.
SESSIONS_DETACHED_MAX = 64
#: Detached sessions a welcome reports at most (the most recent).
DETACHED_REPORTED_MAX = 8
#: Requests that do not count as activity for the inactivity TTL.
PASSIVE_TYPES = frozenset({"metrics", "ping", "inventory"})
#: Requests that change the namespace and so wait for the running cell to end: each is served in a task
#: of its own, and the connection goes on reading (an interrupt for that cell, pings).
BETWEEN_CELLS_TYPES = frozenset({"delete"})
#: Fraction of available memory one inbound bundle may declare.
INBOUND_MEMORY_FRACTION = 0.9


class RequestRefused(Exception):
    """A request that cannot be served; becomes an error_reply with this type name."""

    def __init__(self, ename: str, message: str) -> None:
        super().__init__(message)
        self.ename = ename


class KtServerConnection(DirectReads, DirectWrites, ServerConnection):
    """A server connection whose heartbeat pings never touch the user's ``random`` state, on which the main thread
    writes a cell's reply itself, and whose requests a loop reads from an inbox of its own (see
    :mod:`pod_kernel.wsconn`)."""


class Pump:
    """How far one connection got through its session's messages; shared by the loop's pump (:meth:`Server._pump`)
    and the main thread's direct writes (:meth:`Server.send_direct`), under :attr:`lock`."""

    def __init__(self, ws: KtServerConnection, sent: int) -> None:
        self.ws = ws
        #: the last seq written on ``ws``
        self.sent = sent
        #: the pump is writing (a direct write now would pass messages it has not written yet)
        self.busy = False
        self.lock = threading.Lock()


@dataclass
class Session:
    """State of one client session; it outlives its connections."""

    id: str
    outbox: Outbox
    ws: ServerConnection | None = None
    seen_exec: dict[str, None] = field(default_factory=dict)
    #: the connection's pump (None: no connection yet)
    pump: Pump | None = None
    #: the last seq sent to a client when the last connection dropped (after it: unseen)
    detached_seq: int = 0
    detached_at: float = 0.0
    #: the ``held`` of this session's last check that carried one: a check saying ``held_same`` means it (the
    #: notebook leaves out what did not change since; see pod_kernel.coherence.parse_check)
    held: dict[str, Any] | None = None

    @property
    def sent_seq(self) -> int:
        """The last seq sent to a client."""
        return self.pump.sent if self.pump is not None else 0


@dataclass
class Inbound:
    """A bundle being received on a connection: header and assembler (or bytes to discard)."""

    header: dict[str, Any]
    assembler: P.BundleAssembler | None
    discard_left: int = 0
    refusal: RequestRefused | None = None


def _lane_part(entries: list[tuple[int, bytes]], first: int, reply: int) -> tuple[int, int]:
    """Which of ``entries`` (seq, frame) go on a lane: ``entries[cut:end]``, the reply (seq ``reply``) and the
    outputs just before it from seq ``first`` on, as many as fit in one lane write with it. Those after the reply
    (another thread's) do not; none do when the reply is not there, or too big for a lane."""
    end = len(entries)
    while end and entries[end - 1][0] > reply:
        end -= 1
    if not end or entries[end - 1][0] != reply:
        return end, end
    room = MAX_LANE_FRAME - len(entries[end - 1][1])
    if room < 0:
        return end, end
    cut = end - 1
    while cut > 0 and entries[cut - 1][0] >= first and len(entries[cut - 1][1]) <= room:
        cut -= 1
        room -= len(entries[cut][1])
    return cut, end


class PodKernelServer:
    """Serves one compute's executor over WebSockets."""

    def __init__(
        self,
        executor: Executor,
        token: str,
        compute_name: str = "default",
        allowed_serialization: tuple[str, ...] = P.SERIALIZATIONS,
        inactivity_ttl_s: float | None = None,
        code_dir: str | Path | None = None,
    ) -> None:
        self.executor = executor
        self.calls = CallRunner(executor.namespace)
        tensors.NAMESPACE = executor.namespace
        self.code = CodeSync(Path(code_dir) if code_dir else executor.cells_dir.parent / "code")
        self._token = token.encode()
        self.compute_name = compute_name
        self.allowed_serialization = tuple(allowed_serialization)
        self.inactivity_ttl_s = inactivity_ttl_s
        self.sessions: dict[str, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.stopping: asyncio.Event | None = None
        self.stop_reason = ""
        #: notebook kernels (pids) this kernel lives for; None: it was asked to stay (--keep, Kubernetes)
        self.owners: dict[int, int] | None = None  # pid -> pidfd
        self.owner_grace_s = 0.0
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._sampler: MetricsSampler | None = None
        self.rejections = RejectionLog()
        #: requests served in tasks of their own (:meth:`_in_background`)
        self._tasks: set[asyncio.Task] = set()
        #: pushes an execute may follow (``after``): their outcomes, and the cells queued behind their values
        self.pushes = Pushes(executor)
        #: executes come from the network thread and, through lanes, the main thread: one is queued at a time
        self._queue_lock = threading.Lock()
        self.handlers: dict[str, Callable[[Session, ServerConnection, dict, memoryview], Awaitable[None]]] = {
            "execute": self.on_execute,
            "interrupt": self.on_interrupt,
            "pull": self.on_pull,
            "inventory": self.on_inventory,
            "delete": self.on_delete,
            "metrics": self.on_metrics,
            "ping": self.on_ping,
            "shutdown": self.on_shutdown,
            "sync": self.on_sync,
            "release": self.on_release,
            "input_reply": self.on_input_reply,
            "debug": self.on_debug,
            "adopt": self.on_adopt,
            "cell_file": self.on_cell_file,
        }
        self.bundle_handlers: dict[str, Callable[[Session, ServerConnection, dict, dict], Awaitable[None]]] = {
            "push": self.on_push,
            "call": self.on_call,
            "files": self.on_files,
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop :meth:`serve` runs on (what runs on it runs only while it does)."""
        assert self.loop is not None, "the pod kernel server is not serving"
        return self.loop

    async def serve(self, host: str, port: int, on_ready: Callable[[int], None]) -> None:
        """Listen until stopped; ``on_ready(port)`` is called once bound."""
        self.loop = asyncio.get_running_loop()
        threading.current_thread().pydev_do_not_trace = True  # type: ignore[attr-defined]  # debugpy: not ours
        self.stopping = asyncio.Event()
        self._sampler = await asyncio.to_thread(MetricsSampler)
        self.bulk = BulkServer(host)
        _quiet_websockets_log()
        self._flush_rejections()
        async with serve(
            self.handle,
            sock=listen_socket(host, port),  # '::' is dual-stack (asyncio alone would make it IPv6-only)
            process_request=self.check_handshake,
            create_connection=KtServerConnection,
            compression=None,
            max_size=P.MAX_FRAME_BYTES,
            ping_interval=P.HEARTBEAT_INTERVAL_S,
            ping_timeout=P.HEARTBEAT_TIMEOUT_S,
            server_header=None,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("pod kernel %r serving on %s:%d (pid %d)", self.compute_name, host, self.port, os.getpid())
            if self.inactivity_ttl_s:
                self._arm_ttl(self.inactivity_ttl_s)
            on_ready(self.port)
            await self.stopping.wait()
            log.info("stopping: %s", self.stop_reason)
            for session in self.sessions.values():
                session.outbox.flush()
                if session.ws is not None:
                    await session.ws.close(1001, self.stop_reason[:100])

    def request_stop(self, reason: str) -> None:
        """Stop serving (thread-safe); the running cell is interrupted first."""
        def _stop() -> None:
            if self.stopping is not None and not self.stopping.is_set():
                self.stop_reason = reason
                self.executor.interrupt()
                self.stopping.set()

        if self.loop is not None:
            self.loop.call_soon_threadsafe(_stop)

    def watch_owner(self, pid: int, grace_s: float = 0.0) -> None:
        """Live for process ``pid`` (a notebook kernel); stop ``grace_s`` after the last such owner exits.

        Within the grace period a notebook that reattaches (a restarted notebook
        kernel running its next %%kt cell) sends ``adopt`` and becomes an owner,
        so a restart keeps the kernel and its variables while a closed notebook
        still stops it. Runs on the event loop.
        """
        assert self.loop is not None
        if self.owners is None:
            self.owners = {}
            self.owner_grace_s = max(grace_s, 0.0)
        if pid in self.owners:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            if not self.owners:
                self._orphaned(f"owner process {pid} is gone")
            return
        self.owners[pid] = fd
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None
            log.info("process %d reattached and owns this kernel now", pid)

        def _gone() -> None:
            self.running_loop.remove_reader(fd)
            os.close(fd)
            if self.owners is not None and self.owners.pop(pid, None) is not None and not self.owners:
                self._orphaned(f"owner process {pid} exited")

        self.running_loop.add_reader(fd, _gone)

    def _orphaned(self, why: str) -> None:
        grace = self.owner_grace_s
        if grace <= 0:
            self.request_stop(why)
            return
        log.info("%s; stopping in %g s unless a notebook reattaches", why, grace)
        self._orphan_timer = self.running_loop.call_later(
            grace, self.request_stop, f"{why} and no notebook reattached within {grace:g} s")

    def _flush_rejections(self) -> None:
        """Log the refused-connections summary of each window, also when no more refusals come."""
        self.rejections.flush()
        self.running_loop.call_later(self.rejections.window_s, self._flush_rejections)

    def _arm_ttl(self, delay_s: float) -> None:
        self.running_loop.call_later(max(delay_s, 0.05), self._check_ttl)

    def _check_ttl(self) -> None:
        ttl = self.inactivity_ttl_s or 0
        idle = time.monotonic() - self.last_activity
        if self.executor.current is not None:
            self.last_activity = time.monotonic()
            self._arm_ttl(ttl)
        elif idle >= ttl:
            self.request_stop(f"inactive for {idle:.0f} s (inactivity_ttl {ttl:g} s)")
        else:
            self._arm_ttl(ttl - idle)

    # ------------------------------------------------------------------ handshake

    def check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer probes, reject a bad handshake before anything runs; the one place the upgrade is validated.

        ``GET /healthz`` -> 200 (no token: probes cannot hold one, and it tells
        nothing). Otherwise exactly one ``Authorization: Bearer`` header with the
        token (else 401), our protocol version (else 426), and well-formed kt
        headers (else 400). :meth:`handle` relies on what is checked here.
        """
        if request.path == P.HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "ok\n")
        auths = request.headers.get_all(P.HEADER_AUTH)
        auth = auths[0] if len(auths) == 1 else ""
        presented = auth[7:].encode() if auth.startswith("Bearer ") else b""
        if not hmac.compare_digest(presented, self._token):
            self.rejections.refused("missing or wrong token", connection.remote_address)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "kt pod kernel: missing or wrong token\n")
        versions = request.headers.get_all(P.HEADER_PROTOCOL)
        version = versions[0] if len(versions) == 1 else ""
        if version != str(P.PROTOCOL_VERSION):
            self.rejections.refused(f"client speaks protocol {version[:16]!r}, not {P.PROTOCOL_VERSION}",
                                    connection.remote_address)
            return connection.respond(
                HTTPStatus.UPGRADE_REQUIRED,
                f"kt pod kernel speaks protocol {P.PROTOCOL_VERSION}, the client speaks "
                f"{version[:16] or 'none'}: install the same kt_jupyter version on both sides\n",
            )
        problem = _header_problem(request)
        if problem:
            self.rejections.refused(f"malformed kt headers ({problem})", connection.remote_address)
            return connection.respond(HTTPStatus.BAD_REQUEST, f"kt pod kernel: {problem}\n")
        return None

    # ------------------------------------------------------------------ connections

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one connection of a session until it closes."""
        assert ws.request is not None  # served connections completed their handshake
        headers = ws.request.headers  # validated by check_handshake
        sid = headers.get(P.HEADER_SESSION) or uuid.uuid4().hex
        last_seq = int(headers.get(P.HEADER_LAST_SEQ, "0"))
        session = self.sessions.get(sid)
        if session is None:
            session = self.sessions[sid] = Session(sid, Outbox(self.running_loop, on_text=_tee_to_log))
            session.outbox.direct = partial(self.send_direct, session)
        elif session.ws is not None:
            await session.ws.close(1000, "replaced by a newer connection of the same session")
        session.ws = ws  # a connection is not activity (kt-idle): a sidebar or status poll must not keep a GPU alive
        running = self.executor.current
        welcome = P.encode_frame(
            {
                "type": "welcome",
                "protocol": P.PROTOCOL_VERSION,
                "proof": P.pod_proof(self._token, headers[P.HEADER_NONCE], sid),
                "pid": os.getpid(),
                "compute": self.compute_name,
                "session": sid,
                "last_seq": session.outbox.last_seq,
                "running": running.req_id if running and running.outbox is session.outbox else None,
                "allowed_serialization": list(self.allowed_serialization),
                "started": self.started,
                "bulk_port": self.bulk.port,
                "bulk_keepalive_s": self.bulk.keepalive_s,  # a bulk connection waits that long for its next ticket
                "held_same": True,  # a check may say held_same: the held of this session's last one (Session.held)
                # pushes that name one send their bytes at once (see pod_kernel/bulk.py)
                "bulk_spares": [t for t in (self.bulk.reserve(ws) for _ in range(SPARES_PER_OWNER)) if t],
                # executes straight to the main thread (see pod_kernel/lanes.py)
                "lane": self.bulk.issue_lane(ws, partial(self._lane_opened, session, ws)),
                "detached": self._detached_report(session),
            }
        )
        pump: asyncio.Task | None = None
        inbound: Inbound | None = None
        try:
            await ws.send(welcome)  # in the try: a connection gone already gives its spare tickets back below
            assert isinstance(ws, KtServerConnection)  # what serve's create_connection makes
            session.pump = Pump(ws, last_seq)
            pump = asyncio.create_task(self._pump(session, session.pump))

            def execute_early(message: bytes | str) -> bool:
                """An execute that comes while this loop waits for a message, and no bundle is coming in: its cell
                is queued for the main thread as the frame is parsed, not on the loop's next turn."""
                if inbound is not None or not isinstance(message, bytes):
                    return False
                try:
                    header, _payload = P.decode_frame(message)
                    if header["type"] != "execute":
                        return False
                    P.check_request(header)
                except P.ProtocolError:
                    return False  # the loop below closes the connection, as for any frame that breaks the protocol
                self.last_activity = time.monotonic()
                try:
                    self._queue_cell(session, header)
                except Exception as exc:  # answered as _dispatch answers a request that failed
                    self._in_background(self._send_error(ws, header["id"], exc))
                return True

            ws.take_early = execute_early
            while True:
                message = await ws.next_message()
                try:
                    header, payload = P.decode_frame(message)  # it refuses a text frame itself
                    if inbound is not None:
                        inbound = await self._continue_inbound(session, ws, inbound, header, payload)
                        continue
                    P.check_request(header)
                    if header["type"] in P.BUNDLE_TYPES:
                        inbound = await self._start_inbound(session, ws, header, payload)
                        continue
                    if header["type"] == "chunk":
                        raise P.ProtocolError("chunk frame outside a bundle")
                    if header["type"] not in PASSIVE_TYPES:  # a status panel polling is not use
                        self.last_activity = time.monotonic()
                    if header["type"] in BETWEEN_CELLS_TYPES:
                        self._in_background(self._dispatch(session, ws, header, payload))
                    else:
                        await self._dispatch(session, ws, header, payload)
                except P.ProtocolError as exc:
                    log.warning("closing a connection that broke the protocol: %s", exc)
                    await ws.close(1002, str(exc)[:120])
                    break
        except ConnectionClosed:
            pass
        finally:
            if pump is not None:
                pump.cancel()
            self.bulk.revoke(ws)  # its unused tickets: nobody can present them now; their buffers go at once
            detached = session.ws is ws
            if detached:
                session.ws = None
            self.executor.jobs.lanes.close_owned_by(ws)  # after session.ws: see _lane_opened
            if detached:
                session.detached_seq, session.detached_at = session.sent_seq, time.time()
                if session.outbox.last_seq == 0 and not session.seen_exec:
                    self.sessions.pop(sid, None)  # nothing to replay: nothing to keep
                else:
                    self.running_loop.call_later(SESSION_KEEP_S, self._forget_session, sid)
                    self._cap_detached_sessions()

    # ------------------------------------------------------------------ lanes (pod_kernel/lanes.py)

    def _lane_opened(self, session: Session, ws: ServerConnection, sock: socket.socket) -> bool:
        """A client presented its connection's lane ticket (in the bulk channel's accept thread): the main
        thread reads that lane from now on, until the connection closes. False: its connection closed (or
        was replaced) meanwhile."""
        if session.ws is not ws:
            return False
        self.executor.jobs.add_lane(Lane(sock, ws, session.outbox, on_frame=partial(self._lane_frame, session, ws),
                                         on_broken=partial(self._lane_broken, ws)))
        if session.ws is not ws:  # closed while it was added: its close may have missed it
            self.executor.jobs.lanes.close_owned_by(ws)
            return False
        return True

    def _lane_frame(self, session: Session, ws: ServerConnection, lane: Lane, frame: bytes) -> None:
        """One frame from a lane (the main thread, or the lane watcher): an execute that runs at once, queued as
        :meth:`on_execute` queues one (with ``lane_reply``, its reply goes back on the lane when it can);
        anything else breaks the protocol."""
        header, _payload = P.decode_frame(frame)
        if header["type"] != "execute":
            raise LaneError(f"a lane carries executes only, not {header['type']!r}")
        P.check_request(header)
        if header.get("after") is not None:
            raise LaneError("an execute that follows a push ('after') goes over the WebSocket")
        self.last_activity = time.monotonic()
        try:
            self._queue_cell(session, header, lane if header.get("lane_reply") is True else None)
        except Exception as exc:  # answered as _dispatch answers a request that failed
            self.running_loop.call_soon_threadsafe(self._in_background, self._send_error(ws, header["id"], exc))

    def _lane_broken(self, ws: ServerConnection, why: str, refused: bool) -> None:
        """A lane ended by itself: when it broke the protocol, its connection is closed too (the client sends
        again, on its next connection, what it had written on either)."""
        if not refused:
            return
        log.warning("closing a connection whose lane broke the protocol: %s", why)
        if isinstance(ws, KtServerConnection):
            self.running_loop.call_soon_threadsafe(ws.refuse, f"lane: {why}")

    def _detached_report(self, joining: Session) -> list[dict[str, Any]]:
        """Sessions with no client whose output nobody saw, or whose cell still runs (a notebook that
        restarted, or closed, mid-cell): a reattaching notebook shows that output and announces the cell."""
        running = self.executor.current
        queued = [job for job in self.executor.jobs.waiting() if isinstance(job, CellJob)]
        report = []
        for sid, s in self.sessions.items():
            if s is joining or s.ws is not None:
                continue
            cell = running.req_id if running is not None and running.outbox is s.outbox else None
            unseen = s.outbox.last_seq - s.detached_seq
            waiting = sum(1 for job in queued if job.outbox is s.outbox)
            if unseen > 0 or cell or waiting:
                report.append({"session": sid, "after_seq": s.detached_seq, "unseen": unseen, "running": cell,
                               "queued": waiting, "detached_s": round(time.time() - s.detached_at, 1)})
        return report[-DETACHED_REPORTED_MAX:]

    def _cap_detached_sessions(self) -> None:
        """Keep at most SESSIONS_DETACHED_MAX disconnected sessions (the oldest go first)."""
        running = self.executor.current
        detached = [sid for sid, s in self.sessions.items()
                    if s.ws is None and not (running is not None and running.outbox is s.outbox)]
        for sid in detached[:max(0, len(detached) - SESSIONS_DETACHED_MAX)]:
            del self.sessions[sid]

    def _forget_session(self, sid: str) -> None:
        """Drop a session (and its replay buffer) nobody resumed within SESSION_KEEP_S."""
        session = self.sessions.get(sid)
        running = self.executor.current
        if session is None or session.ws is not None or (running is not None and running.outbox is session.outbox):
            if session is not None and session.ws is None:
                self.running_loop.call_later(SESSION_KEEP_S, self._forget_session, sid)  # its cell still runs
            return
        del self.sessions[sid]
        log.info("forgot session %s (not resumed within %d s)", sid[:8], SESSION_KEEP_S)

    async def _dispatch(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        handler = self.handlers[header["type"]]
        try:
            await handler(session, ws, header, payload)
        except ConnectionClosed:
            raise
        except Exception as exc:
            await self._send_error(ws, header["id"], exc)

    def _in_background(self, request: Awaitable[None]) -> None:
        """Serve a request in a task of its own (kept referenced until it ends); a closed connection ends it."""
        async def serve() -> None:
            try:
                await request
            except ConnectionClosed:
                pass

        task = asyncio.create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_error(self, ws: ServerConnection, req_id: str, exc: Exception) -> None:
        # an execute following that push fails with it, unless the push's connection is gone (it comes again)
        # the protocol's close_code: websockets 14.0's connection has none of its own
        self.pushes.ended(req_id, error=exc, final=ws.protocol.close_code is None)
        payload = b""
        if isinstance(exc, RequestRefused):
            ename, tb = exc.ename, ""
        else:
            log.warning("request %s failed: %s: %s", req_id, type(exc).__name__, exc)
            ename, tb = P.type_name(exc), "".join(traceback.format_exception(exc))
            payload = P.exception_payload(exc, "pickle" in self.allowed_serialization)
        await ws.send(P.encode_frame({"type": "error_reply", "id": req_id, "ename": ename,
                                      "evalue": str(exc), "traceback": tb}, payload))

    async def _pump(self, session: Session, pump: Pump) -> None:
        """Send the session's sequenced messages after ``pump.sent``, then new ones as they come."""
        outbox, ws = session.outbox, pump.ws
        try:
            while True:
                outbox.changed.clear()
                with pump.lock:
                    entries, lost = outbox.since(pump.sent)
                    pump.busy = bool(entries or lost)
                try:
                    if lost:
                        await ws.send(P.encode_frame({"type": "notice", "level": "warning", "lost": lost,
                                                      "text": f"{lost} output messages were dropped "
                                                              "(replay buffer full) while disconnected"}))
                    for seq, frame in entries:
                        await ws.send(frame)
                        pump.sent = seq
                finally:
                    with pump.lock:
                        pump.busy = False
                await outbox.changed.wait()
        except (ConnectionClosed, asyncio.CancelledError):
            pass

    @staticmethod
    def send_direct(session: Session, lane: Lane | None = None, lane_span: tuple[int, int] = (0, 0)) -> bool:
        """From the main thread: write the session's messages not sent yet (a cell's reply) on its connection
        at once, when the pump is not writing; the loop's thread is not woken for them (see
        :mod:`pod_kernel.wsconn`). Returns whether all went: the pump sends the rest, as ever.

        With ``lane`` (the reply's client reads it), the reply (seq ``lane_span[1]``) goes on it, after the
        messages from seq ``lane_span[0]`` on (the cell's last outputs) as far as they fit, once what came
        before them is written on the WebSocket: the client takes them after all that (their seqs say so).
        """
        pump = session.pump
        if pump is None or session.ws is not pump.ws:
            return False

        def on_ws(part: list[tuple[int, bytes]]) -> bool:
            for seq, frame in part:
                if not pump.ws.send_now(frame):
                    return False
                pump.sent = seq
            return True

        with pump.lock:
            if pump.busy:
                return False
            entries, lost = session.outbox.since(pump.sent)
            if lost:
                return False
            if lane is not None and lane.owner is not pump.ws:
                lane = None
            cut, end = _lane_part(entries, *lane_span) if lane is not None else (len(entries), len(entries))
            if not on_ws(entries[:cut]):
                return False
            if cut < end and lane is not None and lane.write([frame for _seq, frame in entries[cut:end]]):
                pump.sent = entries[end - 1][0]
                cut = end
            return on_ws(entries[cut:])

    # ------------------------------------------------------------------ bundles in (push)

    async def _start_inbound(self, session: Session, ws: ServerConnection, header: dict,
                             payload: memoryview) -> Inbound | None:
        if header["type"] == "push":
            self.pushes.started(header["id"])
        ser = header["serialization"]
        sizes = header["sizes"]
        if not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise P.ProtocolError("bundle sizes must be non-negative integers")
        total = sum(sizes)
        refusal = None
        if header["type"] == "files" and ser != "json":
            refusal = RequestRefused("SerializationRefused", "source files travel as json")
        elif ser not in self.allowed_serialization:
            refusal = RequestRefused("SerializationRefused",
                                     f"this pod kernel does not accept {ser!r} payloads "
                                     f"(allowed_serialization={list(self.allowed_serialization)})")
        elif total > psutil.virtual_memory().available * INBOUND_MEMORY_FRACTION:
            refusal = RequestRefused("MemoryError",
                                     f"a push of {total} bytes does not fit in the pod's available memory")
        assembler = None
        if refusal is None:
            try:
                # address space only: a header alone commits no memory; the bulk channel faults the
                # buffers in once the ticket is presented, the WebSocket as chunks arrive
                assembler = P.BundleAssembler(ser, list(sizes))
            except (MemoryError, OSError) as exc:  # e.g. past the kernel's memory limit
                refusal = RequestRefused("MemoryError", f"a push of {total} bytes does not fit in the pod "
                                                        f"kernel's memory ({type(exc).__name__}: {exc})")
        if refusal is not None and header.get("bulk"):
            self.bulk.refuse(header.get("ticket"), ws)  # its bytes, if they come already, are not read
            await self._send_error(ws, header["id"], refusal)
            return None
        if refusal is not None:
            inbound = Inbound(header, None, discard_left=total, refusal=refusal)
        else:
            inbound = Inbound(header, assembler)
        if header.get("bulk"):
            await self._start_bulk_inbound(session, ws, inbound)
            return None
        return await self._continue_inbound(session, ws, inbound, None, payload)

    async def _start_bulk_inbound(self, session: Session, ws: ServerConnection, inbound: Inbound) -> None:
        """The bundle's bytes come over the bulk channel; the request completes when they are in."""
        loop = asyncio.get_running_loop()
        asm = inbound.assembler
        assert asm is not None  # a refused bulk push was answered before its bytes came

        def done(error: BaseException | None) -> None:
            loaded: list[Any] = []
            if error is None:  # in the transfer thread, before anything can write to the parts
                asm.vouch()
                asm.received = asm.total
                bundle = asm.bundle()
                try:  # unpickled here, in this thread already: one hop less before the values are set
                    loaded.append(P.load_values(bundle))
                except Exception as exc:
                    loaded.append(exc)

            async def finish() -> None:
                if error is None:
                    await self._complete_bundle(session, ws, inbound.header, bundle, loaded[0])
                    return
                if isinstance(error, MemoryError):
                    failure: Exception = RequestRefused(
                        "MemoryError", f"a push of {asm.total} bytes does not fit in the pod kernel's memory")
                else:
                    failure = ConnectionError(f"bulk transfer failed: {error}")
                try:
                    await self._send_error(ws, inbound.header["id"], failure)
                except ConnectionClosed:
                    pass  # the client went; its ticket was revoked and the buffers freed already

            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(finish()))

        # expired (bulk.TICKET_TTL_S) or revoked with this connection; buffers faulted in once presented
        spare = inbound.header.get("ticket")
        if spare is None:
            ticket = self.bulk.issue(True, asm.parts, done, owner=ws, prepare=asm.faulting_in, digests=asm.digests)
            await ws.send(P.encode_frame({"type": "bulk_ready", "id": inbound.header["id"], "ticket": ticket}))
            return
        # a spare this connection was given: its bytes follow the header already, no bulk_ready
        if not self.bulk.bind(spare, ws, asm.parts, done, prepare=asm.faulting_in, digests=asm.digests):
            await self._send_error(ws, inbound.header["id"], RequestRefused(
                "BulkTicketRefused", "the push names a bulk ticket that is not a spare of this connection"))
            return
        replacement = self.bulk.reserve(ws)
        if replacement is not None:
            await ws.send(P.encode_frame({"type": "spare_ticket", "ticket": replacement}))

    async def _continue_inbound(self, session: Session, ws: ServerConnection, inbound: Inbound,
                                header: dict | None, payload: memoryview) -> Inbound | None:
        if header is not None and (header.get("type") != "chunk" or header.get("id") != inbound.header["id"]):
            raise P.ProtocolError("expected the next chunk of the bundle in progress")
        if inbound.assembler is None:
            if len(payload) > inbound.discard_left:
                raise P.ProtocolError("more bundle bytes than its declared sizes")
            inbound.discard_left -= len(payload)
            if inbound.discard_left == 0:
                assert inbound.refusal is not None  # an inbound bundle with no assembler is a refused one
                await self._send_error(ws, inbound.header["id"], inbound.refusal)
                return None
            return inbound
        if len(payload):
            inbound.assembler.feed(payload)
        if not inbound.assembler.done:
            return inbound
        await self._complete_bundle(session, ws, inbound.header, inbound.assembler.bundle())
        return None

    async def _complete_bundle(self, session: Session, ws: ServerConnection, header: dict, bundle: P.Bundle,
                               loaded: dict[str, Any] | Exception | None = None) -> None:
        """A request's bundle has fully arrived: hand its values to the request's handler (``loaded``: its
        values, or the failure to unpickle them, when the bulk channel's thread loaded them already)."""
        self.last_activity = time.monotonic()
        handler = self.bundle_handlers[header["type"]]

        async def _handle() -> None:
            try:
                if isinstance(loaded, Exception):
                    raise loaded
                values = loaded if loaded is not None else await asyncio.to_thread(P.load_values, bundle)
                await handler(session, ws, header, values)
            except ConnectionClosed:
                pass
            except Exception as exc:
                await self._send_error(ws, header["id"], exc)

        if header["type"] in ("call", "push"):  # calls overlap a running cell; a push waits for it to end
            self._in_background(_handle())  # either way this connection goes on reading (interrupts)
        else:
            await _handle()

    # ------------------------------------------------------------------ bundle handlers

    async def on_push(self, session: Session, ws: ServerConnection, header: dict, values: dict) -> None:
        """Set the pushed names in the namespace (notebook functions run in it, as they did in the notebook's),
        between cells: a running cell keeps the values it started with."""
        values = await asyncio.wrap_future(self.pushes.apply(header["id"], values))
        self.pushes.ended(header["id"], sorted(values))
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "names": sorted(values),
                                      "ids": {n: id(v) for n, v in values.items()}}))

    async def on_call(self, session: Session, ws: ServerConnection, header: dict, values: dict) -> None:
        """Run a seed-API call (or define a function shipped by value, or construct an instance); reply a bundle.

        Nothing user-defined runs on this loop: imports, unpickling and the call itself run in threads
        (coroutine functions on the calls' own loop), so heartbeats go on.
        """
        ser = header["serialization"]
        calls = self.calls
        target = header["target"]
        cancel_key = target.get("cancel_key") if isinstance(target.get("cancel_key"), str) else None
        sink = (session.outbox, header["id"]) if header.get("stream") else None
        construct = header.get("construct")
        if target.get("kind") == "define":
            if not callable(values.get("fn")):
                raise RequestRefused("CallError", "a define call carries the function or class as 'fn'")
            calls.define(str(target["key"]), values["fn"])
            result: Any = True
        else:
            args = calls.deref(list(values.get("args") or []))
            kwargs = calls.deref(dict(values.get("kwargs") or {}))
            if isinstance(construct, dict):
                result = {"created": await calls.run(
                    lambda: calls.construct(str(construct["instance"]), target, args, kwargs,
                                            bool(construct.get("reuse", True))), [], {}, sink, cancel_key)}
            else:
                func = await asyncio.to_thread(calls.resolve, target)
                if target.get("deploy"):  # kt.fn(f).to(compute): found (imported) and known by its service name
                    result = True
                else:
                    result = await calls.run(func, args, kwargs, sink, cancel_key)
                    if header.get("keep"):
                        result = calls.keep(result)
        session.outbox.flush()
        bundle = await asyncio.to_thread(P.dump_values, {"result": result}, ser)
        for frame in P.bundle_frames({"type": "values", "id": header["id"]}, bundle):
            await ws.send(frame)

    async def on_files(self, session: Session, ws: ServerConnection, header: dict, values: dict) -> None:
        """Write synced source files and reload the modules loaded from them (in a thread: imports run code)."""
        reloaded = await asyncio.to_thread(self.code.apply, {str(k): str(v) for k, v in values.items()})
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "reloaded": reloaded}))

    # ------------------------------------------------------------------ handlers

    async def on_sync(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Which files of the client's manifest (path -> hash) this kernel needs."""
        manifest = {str(k): str(v) for k, v in header["files"].items()}
        need = await asyncio.to_thread(self.code.need, manifest)
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "need": need,
                                      "root": str(self.code.root)}))

    async def on_release(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Forget remote references the client no longer holds (``refs``), and cancel the calls whose
        ``cancel_key`` is in ``calls``: the client no longer waits for them (Ctrl-C)."""
        for ref in header["refs"]:
            self.calls.refs.pop(str(ref), None)
        keys = header.get("calls")
        cancelled = [k for k in keys if isinstance(k, str) and self.calls.cancel(k)] if isinstance(keys, list) else []
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "cancelled": cancelled}))

    async def on_execute(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Queue a cell; its output and execute_reply arrive through the session's outbox."""
        self._queue_cell(session, header)

    def _queue_cell(self, session: Session, header: dict, lane: Lane | None = None) -> None:
        """:meth:`on_execute`'s work, on the loop's thread (also straight from a parsed frame: see handle), or on
        the main thread for an execute from a lane (:meth:`_lane_frame`)."""
        req_id = header["id"]
        with self._queue_lock:
            if req_id in session.seen_exec:  # a client resending after a reconnect (or on its lane and after it)
                return
            session.seen_exec[req_id] = None
            while len(session.seen_exec) > SEEN_IDS_KEPT:
                session.seen_exec.pop(next(iter(session.seen_exec)))
        cell_name, label = header.get("cell_name"), header.get("cell_label")
        post_mortem, requires, after = header.get("post_mortem"), header.get("requires"), header.get("after")
        check = coherence.parse_check(header.get("check"), session.held)
        session.held = coherence.held_of(header.get("check"), check, session.held)
        job = CellJob(req_id, header["code"], session.outbox,
                      cell_name if isinstance(cell_name, str) else None,
                      label if isinstance(label, str) else None,
                      debug_wait=bool(header.get("debug_wait")),
                      check=check,
                      post_mortem=post_mortem if isinstance(post_mortem, str) else None,
                      requires=[n for n in requires if isinstance(n, str)] if isinstance(requires, list) else [],
                      lane=lane)
        others = self._others_cells(session)
        if others:  # a notebook sharing the compute would otherwise see its cell hang, and not know why
            waits_for = ("a cell of another notebook runs on this pod kernel: this cell runs when it ends"
                         if others == 1 else
                         f"{others} cells of other notebooks run or wait on this pod kernel: this cell runs when "
                         "they end")
            session.outbox.append({"type": "notice", "id": req_id, "level": "info", "text": f"[kt] {waits_for}"})
        if isinstance(after, str) and after:  # sent right behind a push, before its reply: runs once it is in
            self._in_background(self.pushes.execute_after(after, job))
            return
        self.executor.submit(job)

    def _others_cells(self, session: Session) -> int:
        """How many cells of other sessions (another notebook's, a terminal's) run or wait."""
        running = self.executor.current
        jobs = [job for job in self.executor.jobs.waiting() if isinstance(job, CellJob)]
        if running is not None:
            jobs.insert(0, running)
        return sum(1 for job in jobs if job.outbox is not session.outbox)

    async def on_input_reply(self, session: Session, ws: ServerConnection, header: dict,
                             payload: memoryview) -> None:
        """Answer a running cell's input_request (``input_id``; ``eof`` raises EOFError in the cell)."""
        input_id = header.get("input_id")
        accepted = self.executor.relay.answer(input_id if isinstance(input_id, int) else None,
                                              header["value"], bool(header.get("eof")))
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "accepted": accepted}))

    async def on_debug(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Start debugpy on the pod's loopback (once) and say where it listens and where cells are written."""
        debug = self.executor.debug
        try:
            port = await asyncio.to_thread(debug.listen)
        except RuntimeError as exc:
            raise RequestRefused("DebuggerUnavailable", str(exc)) from None
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "host": "127.0.0.1", "port": port,
                                      "pid": os.getpid(), "cells_dir": str(self.executor.cells_dir.resolve()),
                                      "code_dir": str(self.code.root), "attached": debug.connected()}))

    async def on_interrupt(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """KeyboardInterrupt in the running cell (``target`` names it, else whichever runs)."""
        target = header.get("target")
        done = self.executor.interrupt(target if isinstance(target, str) else None)
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "interrupted": done}))

    async def on_pull(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Send the named values as a bundle."""
        names = [str(n) for n in header["names"]]
        ser = header["serialization"]
        if ser not in self.allowed_serialization:
            raise RequestRefused("SerializationRefused",
                                 f"this pod kernel does not send {ser!r} payloads "
                                 f"(allowed_serialization={list(self.allowed_serialization)})")
        ns = self.executor.namespace
        missing = [n for n in names if n not in ns]
        if missing:
            raise RequestRefused("NameError", f"not defined on the pod kernel: {', '.join(missing)}")
        bundle = await asyncio.to_thread(P.dump_values, {n: ns[n] for n in names}, ser)
        if header.get("bulk") and bundle.nbytes >= BULK_MIN_BYTES:
            ticket = self.bulk.issue(False, bundle.parts, lambda error: None, owner=ws)  # pins the data till used
            await ws.send(P.encode_frame({"type": "values", "id": header["id"], "serialization": bundle.serialization,
                                          "sizes": bundle.sizes, "bulk": ticket}))
            return
        for frame in P.bundle_frames({"type": "values", "id": header["id"]}, bundle):
            await ws.send(frame)

    async def on_inventory(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Name, type, size and (when asked) content fingerprint of user values."""
        names = header.get("names")
        check = coherence.parse_check(header, session.held)
        session.held = coherence.held_of(header, check, session.held)
        if check is not None:  # after a cell whose execute_reply did not answer the check (an older client)
            state = await asyncio.to_thread(self.executor.state.check, session.outbox, check)
            await ws.send(P.encode_frame(dict(state, type="reply", id=header["id"])))
            return
        want_fp = bool(header.get("fingerprints"))
        ns = self.executor.namespace
        chosen = [n for n in names if n in ns] if isinstance(names, list) else self.executor.user_names()

        def _describe() -> list[dict[str, Any]]:
            return [
                {"name": n, "type": P.type_name(ns[n]), "size": P.approx_size(ns[n]), "id": id(ns[n]),
                 "fingerprint": P.fingerprint(ns[n]) if want_fp else None}
                for n in chosen
            ]

        items = await asyncio.to_thread(_describe)
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "values": items}))

    async def on_delete(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Remove names from the namespace, between cells (as a push: a running cell keeps its values)."""
        ns = self.executor.namespace
        names = [str(n) for n in header["names"]]

        def apply() -> list[str]:
            removed = [n for n in names if n in ns]
            for name in removed:
                del ns[name]
            return removed

        removed = await asyncio.wrap_future(self.executor.change(apply))
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "removed": removed}))

    async def on_metrics(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """One resource sample plus the kernel's state."""
        assert self._sampler is not None  # made by serve() before any connection
        sample = await asyncio.to_thread(self._sampler.sample)
        running = self.executor.current
        sample.update(
            compute=self.compute_name,
            running=running.req_id if running else None,
            queued=self.executor.jobs.qsize(),  # cells, pushes and deletes waiting for the running cell
            cells_run=self.executor.cells_run,
            idle_s=0.0 if running else time.monotonic() - self.last_activity,
            uptime_s=time.time() - self.started,
            clients=sum(1 for session in self.sessions.values() if session.ws is not None),
        )
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "metrics": sample}))

    async def on_ping(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Answer at once (a heartbeat)."""
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "pid": os.getpid()}))

    async def on_adopt(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """A notebook kernel on this host (``pid``) uses this kernel: it lives while any owner does."""
        owned = self.owners is not None
        if owned:
            self.watch_owner(header["pid"])
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "adopted": owned,
                                      "owners": sorted(self.owners or ())}))

    async def on_cell_file(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Write a cell's file for a debugger's breakpoints (here on the loop: threads may be stopped in one)."""
        try:
            written = write_cell_file(header["path"], header["text"])
        except (OSError, ValueError) as exc:
            raise RequestRefused("CellFileError", str(exc)) from None
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"], "written": written}))

    async def on_shutdown(self, session: Session, ws: ServerConnection, header: dict, payload: memoryview) -> None:
        """Acknowledge, then stop the pod kernel."""
        await ws.send(P.encode_frame({"type": "reply", "id": header["id"]}))
        self.request_stop("shutdown requested by a client")


def _quiet_websockets_log() -> None:
    """websockets logs every connection opened, closed and refused at INFO: probes, reconnects and
    floods would fill the kernel log. Refusals are logged by :class:`RejectionLog` instead; with
    ``--log-level DEBUG`` everything stays (tokens redacted). websockets 14 also logs, at ERROR and
    with a traceback, each connection closed before its handshake (a TCP probe, a port scan), which
    later versions drop: dropped here too."""
    ws_log = logging.getLogger("websockets.server")
    if not ws_log.isEnabledFor(logging.DEBUG):
        ws_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _NoFailedHandshakes) for f in ws_log.filters):
            ws_log.addFilter(_NoFailedHandshakes())


class _NoFailedHandshakes(logging.Filter):
    """Drops websockets' "opening handshake failed" records (see :func:`_quiet_websockets_log`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "opening handshake failed"


def _header_problem(request: Request) -> str:
    """What is wrong with the kt headers of an upgrade request ('' when nothing)."""
    headers = request.headers
    for name in (P.HEADER_SESSION, P.HEADER_LAST_SEQ, P.HEADER_NONCE):
        if len(headers.get_all(name)) > 1:
            return f"more than one {name} header"
    nonce = headers.get(P.HEADER_NONCE, "")
    if not _HEX_RE.fullmatch(nonce) or len(nonce) != 2 * P.NONCE_BYTES:
        return f"{P.HEADER_NONCE} must be {2 * P.NONCE_BYTES} hex digits (this client does not authenticate the pod)"
    if not _SESSION_RE.fullmatch(headers.get(P.HEADER_SESSION, "x")):
        return f"{P.HEADER_SESSION} must be 1 to 64 letters, digits, '-' or '_'"
    if not _SEQ_RE.fullmatch(headers.get(P.HEADER_LAST_SEQ, "0")):
        return f"{P.HEADER_LAST_SEQ} must be a whole number"
    return ""


_HEX_RE = re.compile(r"[0-9a-f]+")
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEQ_RE = re.compile(r"[0-9]{1,18}")


def _tee_to_log(name: str, text: str) -> None:
    """Cell output also goes to the kernel's log (its real stdout/stderr), rotated and capped (logfile.py)."""
    logfile.tee(name, text)
