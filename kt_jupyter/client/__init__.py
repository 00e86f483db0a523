"""One WebSocket session to one pod kernel: execute, stream, interrupt, push/pull, reconnect.

Layers, each on the one below it:

- :mod:`.loop`: the process-wide asyncio loop in a daemon thread (ipykernel's
  own loop runs in the notebook's main thread);
- :mod:`.handshake`: opening one WebSocket, token out, the pod's proof back;
- :mod:`.transport`: the connection, reconnect and replay, one handler per
  frame type, requests and their replies, the bulk channel;
- :mod:`.exceptions`: a pod's exception rebuilt here;
- :mod:`.asyncapi`: every operation as a coroutine (:class:`AsyncSession`);
- :mod:`.session`: the same as blocking methods for the magics (:class:`Session`).
"""

from .asyncapi import AsyncSession, ExecuteOptions, ExecuteResult
from .exceptions import rebuild_exception
from .handshake import HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, OPEN_TIMEOUT_S
from .loop import client_loop
from .session import Session
from .transport import (
    PDB_PROMPT,
    RECONNECT_TIMEOUT_S,
    InputCallback,
    Liveness,
    OutputCallback,
    ProgressCallback,
    fallback_answer,
)

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TIMEOUT_S",
    "OPEN_TIMEOUT_S",
    "PDB_PROMPT",
    "RECONNECT_TIMEOUT_S",
    "AsyncSession",
    "ExecuteOptions",
    "ExecuteResult",
    "InputCallback",
    "Liveness",
    "OutputCallback",
    "ProgressCallback",
    "Session",
    "client_loop",
    "fallback_answer",
    "rebuild_exception",
]
