"""A session's ordered, bounded log of sequenced messages, shared by threads.

Any thread appends (the main thread running a cell, the network loop); each
append gets the next sequence number under one lock, so order on the wire is
the order things happened. Stream text is coalesced: writes accumulate and
become one ``stream`` message when another message is appended, when enough
text has gathered, or when the loop's flush timer fires.

The log keeps the most recent ``replay_bytes``; a reconnecting client asks
for everything after the last number it saw. Messages already trimmed are
reported with a ``notice`` so the client knows what was lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable

from .protocol import encode_frame

#: Stream text gathered before it is sent without waiting for the timer.
STREAM_FLUSH_BYTES = 64 << 10
#: How long stream text may wait to be coalesced with more.
STREAM_FLUSH_DELAY_S = 0.01
#: Sequenced bytes kept for replay after a dropped connection.
REPLAY_BYTES = 64 << 20


class Outbox:
    """Sequenced messages of one session, in order, bounded by bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, replay_bytes: int = REPLAY_BYTES,
                 on_text: Callable[[str, str], None] | None = None) -> None:
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
        self.changed = asyncio.Event()

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

    def append(self, header: dict[str, Any], payload: bytes = b"") -> int:
        """Append a sequenced message (pending stream text goes first); return its seq."""
        with self._lock:
            self._flush_locked()
            seq = self._add_locked(header, payload)
            self._notify_locked()
        return seq

    def flush(self) -> None:
        """Turn pending stream text into messages now."""
        with self._lock:
            self._timer_armed = False
            if self._pending:
                self._flush_locked()
                self._notify_locked()

    def since(self, seq: int) -> tuple[list[bytes], int, int]:
        """Frames after ``seq``: (frames, last seq included, count of lost messages before them)."""
        with self._lock:
            lost = max(0, self._trimmed_through - seq)
            frames = [f for s, f in self._entries if s > seq]
            return frames, self._next_seq - 1, lost

    # ------------------------------------------------------------------ internals

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
            self._add_locked({"type": "stream", "id": req_id, "name": name, "text": "".join(texts)})

    def _add_locked(self, header: dict[str, Any], payload: bytes = b"") -> int:
        seq = self._next_seq
        self._next_seq += 1
        frame = encode_frame(dict(header, seq=seq), payload)
        self._entries.append((seq, frame))
        self._kept_bytes += len(frame)
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
