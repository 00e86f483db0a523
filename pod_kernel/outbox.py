"""A session's ordered, bounded log of sequenced messages, shared by threads.

Any thread appends (the main thread running a cell, the network loop); each
append gets the next sequence number under one lock, so order on the wire is
the order things happened. Stream text is coalesced: writes accumulate and
become one ``stream`` message when another message is appended, when enough
text has gathered, or when the loop's flush timer fires.

The log keeps the most recent ``replay_bytes``; a reconnecting client asks
for everything after the last number it saw. Messages already trimmed are
reported with a ``notice`` so the client knows what was lost.

Output floods are bounded: one request's stream text goes out live up to
``stream_limit_chars``; beyond that it is elided (the kernel log still gets
all of it) except for its last ``STREAM_TAIL_CHARS``, which are sent, after a
``notice`` saying how much was elided, before the request's next message
(for a cell: its result and reply). No stream message is larger than
``STREAM_FLUSH_BYTES`` characters, so no frame outgrows the peer's limit.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from .lanes import LANE_OUTPUTS
from .protocol import CHUNK_BYTES, MAX_HEADER_BYTES, ProtocolError, encode_frame

#: Stream text gathered before it is sent without waiting for the timer.
STREAM_FLUSH_BYTES = 64 << 10
#: How long stream text may wait to be coalesced with more.
STREAM_FLUSH_DELAY_S = 0.01
#: Sequenced bytes kept for replay after a dropped connection.
REPLAY_BYTES = 64 << 20
#: Stream text (characters) one request sends live; the rest is elided.
STREAM_LIMIT_CHARS = 4 << 20
#: Elided text kept and sent when the request's next message comes (its end, for a cell).
STREAM_TAIL_CHARS = 64 << 10
#: Requests whose stream budget is remembered (oldest forgotten first).
STREAM_BUDGETS_KEPT = 256


#: Characters kept of one string field of a message too big for a frame header.
FIELD_KEEP_CHARS = 16 << 10
#: Traceback entries kept at each end of a traceback too big for a frame header.
TRACEBACK_KEEP_ENTRIES = 50


def _cut(text: str, keep: int = FIELD_KEEP_CHARS) -> str:
    if len(text) <= keep:
        return text
    return f"{text[:keep]}\n[kt: {len(text) - keep:,} more characters elided]"


def fit_header(header: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``header`` whose JSON fits in :data:`MAX_HEADER_BYTES`, saying what was cut.

    A mime bundle too big to carry becomes a text/plain note with its start;
    long strings (an exception's message, traceback entries) are cut.
    """
    out = dict(header)
    data = out.get("data")
    if isinstance(data, dict):
        sizes = {str(k): len(json.dumps(v)) for k, v in data.items()}
        plain = data.get("text/plain")
        start = _cut(plain, 2000) if isinstance(plain, str) else ""
        note = (f"[kt: this output ({sum(sizes.values()):,} bytes of {', '.join(sizes)}) is larger than one "
                f"message may carry ({MAX_HEADER_BYTES:,} bytes) and was not sent]")
        out["data"] = {"text/plain": f"{start}\n{note}" if start else note}
        out["metadata"] = {}
        out["elided_mime"] = sizes
    tb = out.get("traceback")
    if isinstance(tb, list):
        if len(tb) > 2 * TRACEBACK_KEEP_ENTRIES:
            skipped = len(tb) - 2 * TRACEBACK_KEEP_ENTRIES
            tb = tb[:TRACEBACK_KEEP_ENTRIES] + [f"[kt: {skipped:,} traceback entries elided]"] \
                + tb[-TRACEBACK_KEEP_ENTRIES:]
        out["traceback"] = [_cut(t) if isinstance(t, str) else t for t in tb]
    for key, value in list(out.items()):
        if isinstance(value, str):
            out[key] = _cut(value)
        elif key in ("metadata", "transient") and len(json.dumps(value)) > FIELD_KEEP_CHARS:
            out[key] = {}
    if len(json.dumps(out)) <= MAX_HEADER_BYTES - 64:
        return out
    keep = ("type", "id", "status", "ename", "execution_count", "name", "level")
    small = {k: _cut(out[k], 200) if isinstance(out[k], str) else out[k]
             for k in keep if k in out and isinstance(out[k], (str, int, float, bool))}
    small.setdefault("data", {"text/plain": "[kt: this message was too big to send and was dropped]"}) \
        if header.get("type") in ("display", "execute_result") else None
    small["evalue" if header.get("type") == "execute_reply" else "text"] = \
        "[kt: this message was too big to send; its content was elided]"
    return small


def data_in_payload(header: dict[str, Any], seq: int, payload: bytes) -> bytes | None:
    """A display or result too big for a header, with its mime bundle as the frame's payload.

    The bundle's JSON goes in the payload (``data_in_payload``), which may hold up
    to :data:`CHUNK_BYTES`: a 3 MB plotly figure or HTML table arrives whole. None
    when it does not fit there either (then :func:`fit_header` says what was cut).
    """
    data = header.get("data")
    if payload or not isinstance(data, dict) or header.get("type") not in ("display", "execute_result"):
        return None
    body = json.dumps(data, separators=(",", ":")).encode()
    if len(body) > CHUNK_BYTES:
        return None
    rest = {k: v for k, v in header.items() if k != "data"}
    try:
        return encode_frame(dict(rest, seq=seq, data_in_payload=True), body)
    except ProtocolError:  # its metadata alone is too big
        return None


class _Elided:
    """What one request's output lost past its limit: counts, and the tail kept to show."""

    def __init__(self) -> None:
        self.chars = 0
        self.lines = 0
        self.tail: deque[tuple[str, str]] = deque()  # (stream name, text)
        self.tail_chars = 0
        self.cut = False  # the tail's first piece lost its beginning

    def add(self, name: str, text: str) -> None:
        self.chars += len(text)
        self.lines += text.count("\n")
        self.tail.append((name, text))
        self.tail_chars += len(text)
        while self.tail_chars > STREAM_TAIL_CHARS:
            first_name, first = self.tail[0]
            excess = self.tail_chars - STREAM_TAIL_CHARS
            self.cut = True
            if len(first) <= excess:
                self.tail.popleft()
                self.tail_chars -= len(first)
            else:
                self.tail[0] = (first_name, first[excess:])
                self.tail_chars -= excess


class Outbox:
    """Sequenced messages of one session, in order, bounded by bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, replay_bytes: int = REPLAY_BYTES,
                 on_text: Callable[[str, str], None] | None = None,
                 stream_limit_chars: int = STREAM_LIMIT_CHARS) -> None:
        self._loop = loop
        self._lock = threading.RLock()
        self._entries: deque[tuple[int, bytes]] = deque()
        self._kept_bytes = 0
        self._replay_bytes = replay_bytes
        self._next_seq = 1
        self._trimmed_through = 0
        self._pending: list[tuple[str, str, str]] = []  # (request id, stream name, text)
        self._pending_bytes = 0
        self._timer_armed = False
        self._notify_armed = False
        self._on_text = on_text
        self._stream_limit_chars = stream_limit_chars
        self._streamed: OrderedDict[str, int] = OrderedDict()  # request id -> characters sent live
        self._elided: dict[str, _Elided] = {}
        #: (request id, first seq) of the outputs of one request that the newest entries are, if they are
        self._outputs_run: tuple[Any, int] | None = None
        self.changed = asyncio.Event()
        #: writes what was appended and not sent yet from the calling thread, when the connection can take it
        #: (the server's ``send_direct``, given the lane and the seqs that may go on it: the last outputs and the
        #: reply); returns whether all of it went. None: only the loop sends
        self.direct: Callable[[Any, tuple[int, int]], bool] | None = None

    @property
    def last_seq(self) -> int:
        """The highest sequence number assigned so far."""
        return self._next_seq - 1

    def write_stream(self, req_id: str, name: str, text: str) -> None:
        """Queue cell output text; it is sent coalesced, before anything appended later."""
        if not text:
            return
        if self._on_text is not None:
            self._on_text(name, text)
        with self._lock:
            text = self._budget_locked(req_id, name, text)
            if not text:
                return
            self._pending.append((req_id, name, text))
            self._pending_bytes += len(text)
            if self._pending_bytes >= STREAM_FLUSH_BYTES:
                self._flush_locked()
                self._notify_locked()
                return
            arm = not self._timer_armed
            self._timer_armed = True
        if arm:
            self._call_in_loop(self._arm_timer)

    def append(self, header: dict[str, Any], payload: bytes = b"", *, now: bool = False, lane: Any = None) -> int:
        """Append a sequenced message (pending stream text goes first); return its seq.

        ``now``: write it (and anything before it not sent yet) from this thread at once, when its
        connection can take it (see :attr:`direct`): a request's last message, which its client waits
        for. The loop's thread is woken only for what did not go. ``lane``: where its client reads it, and
        the request's outputs just before it that were not sent yet (a cell's reply and last outputs; see
        :mod:`pod_kernel.lanes`).
        """
        with self._lock:
            self._flush_locked()
            req_id = header.get("id")
            if req_id in self._elided:
                self._add_elided_locked(req_id, self._elided.pop(req_id))
            run = self._outputs_run
            lane_from = run[1] if run is not None and run[0] == req_id else self._next_seq
            seq = self._add_locked(header, payload)
            direct = self.direct if now else None
            if direct is None:
                self._notify_locked()
                return seq
        if not direct(lane, (lane_from, seq)):
            with self._lock:
                self._notify_locked()
        return seq

    def flush(self) -> None:
        """Turn pending stream text into messages now."""
        with self._lock:
            self._timer_armed = False
            if self._pending:
                self._flush_locked()
                self._notify_locked()

    def since(self, seq: int) -> tuple[list[tuple[int, bytes]], int]:
        """Messages after ``seq``, oldest first, as (seq, frame); and the count of lost ones before them.

        Only the newest entries are looked at: a session's log keeps thousands.
        """
        with self._lock:
            lost = max(0, self._trimmed_through - seq)
            newer = []
            for entry in reversed(self._entries):
                if entry[0] <= seq:
                    break
                newer.append(entry)
            newer.reverse()
            return newer, lost

    # ------------------------------------------------------------------ internals

    def _budget_locked(self, req_id: str, name: str, text: str) -> str:
        """The part of ``text`` that may go out live; the rest is counted and tailed as elided."""
        sent = self._streamed.pop(req_id, 0)
        self._streamed[req_id] = sent  # most recently used last
        while len(self._streamed) > STREAM_BUDGETS_KEPT:
            self._streamed.popitem(last=False)
        room = self._stream_limit_chars - sent
        if len(text) <= room:
            self._streamed[req_id] = sent + len(text)
            return text
        cut = text.rfind("\n", 0, max(room, 0)) + 1  # the live part ends at a line boundary ...
        if cut == 0 and sent == 0:
            cut = max(room, 0)  # ... unless one huge line is all there is
        live, rest = text[:cut], text[cut:]
        self._streamed[req_id] = self._stream_limit_chars  # from here on, everything is elided
        elided = self._elided.get(req_id)
        if elided is None:
            elided = self._elided[req_id] = _Elided()
            while len(self._elided) > STREAM_BUDGETS_KEPT:
                self._elided.pop(next(iter(self._elided)))
            if live:
                self._pending.append((req_id, name, live))
                self._pending_bytes += len(live)
            self._flush_locked()
            limit = self._stream_limit_chars
            self._add_locked({"type": "notice", "id": req_id, "level": "warning", "elided_start": True,
                              "text": f"output passed {limit:,} characters: the rest is elided here, "
                                      f"its last {STREAM_TAIL_CHARS:,} characters are shown when the cell ends; "
                                      "`%kt logs` has all of it"})
            self._notify_locked()
            live = ""
        elided.add(name, rest)
        return live

    def _add_elided_locked(self, req_id: str, elided: _Elided) -> None:
        runs: list[tuple[str, list[str]]] = []  # consecutive pieces of one stream, joined once
        for name, text in elided.tail:
            if runs and runs[-1][0] == name:
                runs[-1][1].append(text)
            else:
                runs.append((name, [text]))
        tail = [(name, "".join(texts)) for name, texts in runs]
        if elided.cut and tail:  # start the tail at a line boundary
            name, text = tail[0]
            cut = text.find("\n")
            if 0 <= cut < len(text) - 1:
                tail[0] = (name, text[cut + 1:])
        shown = sum(len(t) for _n, t in tail)
        lines = elided.lines - sum(t.count("\n") for _n, t in tail)
        self._add_locked({"type": "notice", "id": req_id, "level": "warning",
                          "elided_chars": elided.chars - shown, "elided_lines": lines,
                          "text": f"elided {elided.chars - shown:,} characters of output "
                                  f"(about {lines:,} lines); the last {shown:,} follow; "
                                  "`%kt logs` has all of it"})
        for name, text in tail:
            self._add_stream_locked(req_id, name, text)

    def _flush_locked(self) -> None:
        # merge consecutive writes of the same request and stream into one message
        merged: list[tuple[str, str, list[str]]] = []
        for req_id, name, text in self._pending:
            if merged and merged[-1][0] == req_id and merged[-1][1] == name:
                merged[-1][2].append(text)
            else:
                merged.append((req_id, name, [text]))
        self._pending.clear()
        self._pending_bytes = 0
        for req_id, name, texts in merged:
            self._add_stream_locked(req_id, name, "".join(texts))

    def _add_stream_locked(self, req_id: str, name: str, text: str) -> None:
        # at most STREAM_FLUSH_BYTES characters per message, so one huge write never makes a huge frame
        for start in range(0, len(text), STREAM_FLUSH_BYTES):
            self._add_locked({"type": "stream", "id": req_id, "name": name,
                              "text": text[start : start + STREAM_FLUSH_BYTES]})

    def _add_locked(self, header: dict[str, Any], payload: bytes = b"") -> int:
        seq = self._next_seq
        self._next_seq += 1
        if len(payload) > CHUNK_BYTES:  # a pickled exception too big for one frame: its text still goes
            header, payload = dict(header, exception=False), b""
        try:
            frame = encode_frame(dict(header, seq=seq), payload)
        except ProtocolError:  # too big for one header: the output's data in the payload, else cut down
            frame = data_in_payload(header, seq, payload) \
                or encode_frame(dict(fit_header(header), seq=seq), payload)
        self._entries.append((seq, frame))
        self._kept_bytes += len(frame)
        req_id = header.get("id")
        if header.get("type") not in LANE_OUTPUTS or not isinstance(req_id, str):
            self._outputs_run = None
        elif self._outputs_run is None or self._outputs_run[0] != req_id:
            self._outputs_run = (req_id, seq)
        while self._kept_bytes > self._replay_bytes and len(self._entries) > 1:
            old_seq, old = self._entries.popleft()
            self._kept_bytes -= len(old)
            self._trimmed_through = old_seq
        return seq

    def _notify_locked(self) -> None:
        if not self._notify_armed:
            self._notify_armed = True
            self._call_in_loop(self._set_changed)

    def _set_changed(self) -> None:
        with self._lock:
            self._notify_armed = False
        self.changed.set()

    def _arm_timer(self) -> None:
        self._loop.call_later(STREAM_FLUSH_DELAY_S, self.flush)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)
