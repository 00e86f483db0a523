"""A TCP proxy on 127.0.0.1 that a test can cut: connections between a client and a pod kernel.

Each accepted connection gets an upstream connection and two forwarding
threads. :meth:`DropProxy.drop` cuts every live connection at once with a
TCP reset (as a network failure would); ``cut_after_bytes`` cuts them by
itself once that many bytes went one way, so a cut can land mid-frame or
mid-transfer deterministically.
"""

from __future__ import annotations

import socket
import struct
import threading

#: Bytes read per recv by the forwarding threads.
FORWARD_CHUNK_BYTES = 64 << 10


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), not a graceful FIN: the peer sees a broken connection.

    ``shutdown(SHUT_RD)`` first wakes a thread blocked in ``recv`` on it; a bare
    ``close`` would leave the connection up until the next byte arrives.
    """
    for action in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                   lambda: sock.shutdown(socket.SHUT_RD), sock.close):
        try:
            action()
        except OSError:
            pass


class _Pair:
    def __init__(self, proxy: "DropProxy", client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        _reset(self.upstream)

    def forward(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(FORWARD_CHUNK_BYTES)
                if not data:
                    break
                cut = self.proxy._count(direction, len(data))
                if cut is not None:  # forward only up to the cut point, then break the connection
                    if cut:
                        dst.sendall(data[:cut])
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self.close()
            self.proxy._forget(self)


class DropProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`drop` breaks every connection through it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._cut_after: dict[str, int] = {}
        self._counted: dict[str, int] = {"up": 0, "down": 0}
        self.accepted = 0
        self.drops = 0
        self.connected = threading.Condition(self._lock)
        self._closed = False
        threading.Thread(target=self._accept, name="drop-proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        """``ws://`` URL a Session can use instead of the kernel's."""
        return f"ws://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(self, client, upstream)
            with self._lock:
                if self._closed:
                    pair.close()
                    return
                self._pairs.add(pair)
                self.accepted += 1
                self.connected.notify_all()
            threading.Thread(target=pair.forward, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=pair.forward, args=(upstream, client, "down"), daemon=True).start()

    def _count(self, direction: str, n: int) -> int | None:
        """Account ``n`` bytes; return how many may still pass if a cut is due now, else None."""
        with self._lock:
            before = self._counted[direction]
            self._counted[direction] = before + n
            limit = self._cut_after.get(direction)
            if limit is not None and before + n >= limit:
                del self._cut_after[direction]
                self.drops += 1
                return max(0, limit - before)
        return None

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def cut_after_bytes(self, direction: str, n: int) -> None:
        """Break the connection once ``n`` more bytes went ``direction`` ('up': to the kernel, 'down')."""
        with self._lock:
            self._cut_after[direction] = self._counted[direction] + n

    def drop(self) -> int:
        """Cut every live connection (TCP reset on both sides); returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
            if pairs:
                self.drops += 1
        for pair in pairs:
            pair.close()
        return len(pairs)

    def wait_connections(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` connections were accepted in total."""
        with self._lock:
            return self.connected.wait_for(lambda: self.accepted >= count, timeout_s)

    def close(self) -> None:
        """Stop accepting and cut everything."""
        with self._lock:
            self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self.drop()

    def __enter__(self) -> "DropProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
