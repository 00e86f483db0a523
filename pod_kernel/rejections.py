"""Rejected connections, logged so that a flood cannot fill the disk.

Anyone who can reach a pod kernel's port can make it refuse connections
(no token, a wrong one, garbage). Each refusal used to write log lines; a
handshake flood grew the kernel log by gigabytes an hour. Here the first
refusal of each kind in a window is logged at once, with its peer, and the
rest of the window is summed up in one line when it ends: counts by kind
and the busiest peers. Memory is bounded too: at most
:data:`PEERS_TRACKED` peers are counted per kind, the rest as "others".
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("pod_kernel.server")

#: Seconds summed up per summary line.
WINDOW_S = 60.0
#: Distinct peers counted per kind and window; more are counted as "others".
PEERS_TRACKED = 16
#: Peers named in a summary line, busiest first.
PEERS_SHOWN = 3


class RejectionLog:
    """Counts refused connections and logs them at most once per kind and window (plus one summary)."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._window_start = clock()
        self._counts: dict[str, Counter[str]] = {}
        #: refusals since the kernel started, by kind (for tests and metrics)
        self.totals: Counter[str] = Counter()

    def refused(self, kind: str, peer: object) -> None:
        """One connection was refused for ``kind`` (e.g. "missing or wrong token") from ``peer``."""
        self._roll()
        host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
        self.totals[kind] += 1
        peers = self._counts.get(kind)
        if peers is None:
            self._counts[kind] = Counter({host: 1})
            log.warning("refused a connection from %s: %s (more of these are summed up every %g s)",
                        host, kind, self.window_s)
            return
        if host in peers or len(peers) < PEERS_TRACKED:
            peers[host] += 1
        else:
            peers["others"] += 1

    def flush(self) -> None:
        """Log the summary of the current window now if it has ended (called periodically)."""
        self._roll()

    def _roll(self) -> None:
        now = self._clock()
        if now - self._window_start < self.window_s:
            return
        for kind, peers in self._counts.items():
            more = sum(peers.values()) - 1  # the first one was logged when it happened
            if more > 0:
                busiest = ", ".join(f"{host} ({n})" for host, n in peers.most_common(PEERS_SHOWN))
                log.warning("refused %d more connection(s) in the last %.0f s: %s; from %s",
                            more, now - self._window_start, kind, busiest)
        self._counts.clear()
        self._window_start = now
