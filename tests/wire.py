"""A bare websockets client speaking the pod kernel's handshake, for hostile-input tests."""

from __future__ import annotations

import secrets
import socket
from typing import Any

from websockets.sync.client import connect as ws_connect

from pod_kernel import protocol as P


def upgrade_headers(token: str | None = None, **extra: str) -> dict[str, str]:
    """Headers of a well-formed upgrade (protocol version, a fresh nonce, the token when given), plus ``extra``."""
    headers = {P.HEADER_PROTOCOL: str(P.PROTOCOL_VERSION), P.HEADER_NONCE: secrets.token_hex(P.NONCE_BYTES)}
    if token is not None:
        headers[P.HEADER_AUTH] = f"Bearer {token}"
    headers.update(extra)
    return headers


def handshake(url: str, headers: dict[str, str] | list[tuple[str, str]]) -> Any:
    """Open a WebSocket with exactly these headers (a list may repeat a header); no nonce is added."""
    return ws_connect(url, additional_headers=headers, compression=None, max_size=None, open_timeout=10)


def raw_connect(url: str, token: str, **headers: str) -> Any:
    """A connection that passed the handshake with ``token`` (the welcome is still to be read)."""
    return handshake(url, upgrade_headers(token, **headers))


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes ``sock`` (or resets it) without sending a byte within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
