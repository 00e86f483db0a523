"""Opening one WebSocket to a pod kernel: bearer token out, the pod's proof that it holds the token back."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pod_kernel import protocol as P
from pod_kernel.wsconn import DirectReads, DirectWrites

from ..errors import AuthError

#: The logger our websockets connections use (``websockets.client`` would print the token at DEBUG).
ws_log = logging.getLogger("kt_jupyter.client.websockets")
ws_log.addFilter(P.RedactBearer())

#: Connection attempt timeout (TCP + WebSocket handshake).
OPEN_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = P.HEARTBEAT_INTERVAL_S
HEARTBEAT_TIMEOUT_S = P.HEARTBEAT_TIMEOUT_S


class KtClientConnection(DirectReads, DirectWrites, ClientConnection):
    """A client connection whose heartbeat pings never touch the user's ``random`` state, on which the
    notebook's thread writes a cell's execute itself, and whose messages reach the transport as they are parsed
    (see :mod:`pod_kernel.wsconn`)."""


async def handshake(url: str, token: str, session_id: str, last_seq: int, *, name: str, open_timeout_s: float,
                    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> tuple[KtClientConnection, dict[str, Any]]:
    """Connect to the pod kernel at ``url`` as session ``session_id``; returns the connection and its welcome.

    ``last_seq``: the last message seen, so the pod replays what came after.
    Raises websockets' and OS errors as they come (the caller retries) and
    AuthError when the pod does not prove it holds ``token``.
    """
    nonce = secrets.token_hex(P.NONCE_BYTES)
    ws = await connect(
        url,
        additional_headers={
            P.HEADER_AUTH: f"Bearer {token}",
            P.HEADER_PROTOCOL: str(P.PROTOCOL_VERSION),
            P.HEADER_SESSION: session_id,
            P.HEADER_LAST_SEQ: str(last_seq),
            P.HEADER_NONCE: nonce,
        },
        compression=None,
        max_size=P.MAX_FRAME_BYTES,
        open_timeout=open_timeout_s,
        ping_interval=heartbeat_interval_s,
        ping_timeout=heartbeat_timeout_s,
        close_timeout=min(OPEN_TIMEOUT_S, heartbeat_timeout_s),
        user_agent_header=None,
        logger=ws_log,
        create_connection=KtClientConnection,
    )
    assert isinstance(ws, KtClientConnection)  # what create_connection made
    welcome, _ = P.decode_frame(await ws.next_message())
    await _check_proof(ws, welcome, token, nonce, session_id, url, name)
    return ws, welcome


async def _check_proof(ws: ClientConnection, welcome: dict[str, Any], token: str, nonce: str, session_id: str,
                       url: str, name: str) -> None:
    """The pod proves it holds our token before anything it sends is used (mutual authentication).

    A process that took a dead kernel's port accepts any bearer token; without
    this check the notebook would load its pickles.
    """
    proof = welcome.get("proof")
    expected = P.pod_proof(token.encode(), nonce, session_id)
    if welcome.get("type") == "welcome" and isinstance(proof, str) and hmac.compare_digest(proof, expected):
        return
    try:
        await ws.close(1008, "the pod kernel did not prove it holds the token")
    except ConnectionClosed:
        pass
    raise AuthError(
        f"the process answering at {url} did not prove that it holds compute {name!r}'s token, "
        "so it is not your pod kernel (another process may have taken its port after it stopped): "
        "nothing it sent was used. `%kt status` shows the compute; `%kt restart` starts a new kernel.")
