"""One port-forward stream of our own: ``v4.channel.k8s.io`` on the ``websockets`` sync client.

The wire, as kubectl and the official client speak it: ``GET
/api/v1/namespaces/NS/pods/POD/portforward?ports=P`` upgraded to a WebSocket
with the subprotocol ``v4.channel.k8s.io``; every message is binary, its first
byte the channel (0 the port's data, 1 its error), and the first message on
each channel from the server carries only the port, little-endian. Text on the
error channel ends the stream and says why (the pod went away, nothing
listens on the port).

The official ``kubernetes.stream.portforward`` pumps the same bytes through a
socket pair with ``bytes`` buffers it concatenates and slices (quadratic in
the amount in flight: a 1 GiB push did not finish). Here each direction is a
plain loop with bounded memory: a fixed buffer read from the local socket
becomes one frame; a frame from the API server is written to the local socket
from a view of it; websockets' own receive queue (a few frames) holds
the rest, and a full queue stops reading from the API server (backpressure).

The URL, TLS and bearer token come from the official client's
``Configuration`` (:func:`stream_options`), so every kubeconfig it loads works
the same; :func:`unsupported_reason` names the settings this path cannot
honour (the caller then falls back to the official client).
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import logging
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ..errors import KtError

log = logging.getLogger("kt_jupyter.portforward")

#: The subprotocol the API server's port-forward speaks over WebSockets.
PORTFORWARD_PROTOCOL = "v4.channel.k8s.io"
DATA_CHANNEL, ERROR_CHANNEL = 0, 1
#: Bytes read from the local connection into one frame.
SEND_CHUNK_BYTES = 1 << 20
#: Largest frame taken from the API server (a real one sends 32 KiB; the fake up to 1 MiB).
MAX_FRAME_BYTES = 16 << 20
#: Frames websockets queues from the API server before it stops reading (memory: this times the frame size).
MAX_QUEUED_FRAMES = 8
#: Most characters of the error channel's text kept (it is a sentence; the rest is dropped).
MAX_ERROR_CHARS = 4096
#: Seconds to open the stream (TCP, TLS, upgrade).
OPEN_TIMEOUT_S = 30.0
_CONNECT_PARAMETERS = inspect.signature(connect).parameters
#: Whether this websockets can go through an HTTP proxy (15.0 and later).
_PROXY_SUPPORTED = "proxy" in _CONNECT_PARAMETERS


class PortForwardError(KtError):
    """The API server refused or ended a port-forward; the message says why and what to do."""


@dataclass
class StreamOptions:
    """Where and how to open the stream: URL, headers, TLS, proxy (from the official client's configuration)."""

    url: str
    headers: dict[str, str]
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def unsupported_reason(configuration: Any) -> str | None:
    """Why this path cannot honour ``configuration`` (then use the official client), or None."""
    if getattr(configuration, "proxy_headers", None):
        return "the kubeconfig sets proxy headers, which the websockets client cannot send"
    if getattr(configuration, "proxy", None) and not _PROXY_SUPPORTED:
        return f"websockets {websockets.__version__} cannot use the kubeconfig's proxy-url (15.0 or later can)"
    return None


def _ssl_context(cfg: Any) -> ssl.SSLContext:
    """TLS as the official client sets it up for its WebSockets (create_websocket)."""
    if cfg.verify_ssl:
        if cfg.ssl_ca_cert:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:
            import certifi

            ctx = ssl.create_default_context(cafile=certifi.where())
        if getattr(cfg, "assert_hostname", None) is False:
            ctx.check_hostname = False
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    return ctx


def stream_options(configuration: Any, namespace: str, pod: str, port: int) -> StreamOptions:
    """The request for ``pods/POD/portforward?ports=PORT``, built from an official ``Configuration``.

    The bearer token is read on every call through ``auth_settings()``, so an
    exec plugin's or ``refresh_api_key_hook``'s fresh token is the one sent.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    base = urlsplit(configuration.host)
    scheme = {"http": "ws", "https": "wss"}.get(base.scheme)
    if scheme is None:
        raise PortForwardError(f"the Kubernetes API address {configuration.host!r} is not http(s)")
    path = f"{base.path.rstrip('/')}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}" \
           f"/portforward?ports={port}"
    headers = {}
    for setting in configuration.auth_settings().values():
        if setting.get("in") == "header" and setting.get("value"):
            headers[setting["key"]] = setting["value"]
    opts = StreamOptions(f"{scheme}://{base.netloc}{path}", headers)
    if scheme == "wss":
        opts.ssl = _ssl_context(configuration)
        opts.server_hostname = getattr(configuration, "tls_server_name", None) or None
    if "ping_interval" in _CONNECT_PARAMETERS:  # 15.0 and later ping by default; kubectl and the official client
        opts.extra["ping_interval"] = None  # do not (the stream inside keeps the connection alive)
    if _PROXY_SUPPORTED:
        proxy = getattr(configuration, "proxy", None)
        no_proxy = getattr(configuration, "no_proxy", None)
        if proxy and no_proxy and _bypasses_proxy(base.hostname or "", no_proxy):
            proxy = None
        # no proxy-url: the environment's proxy, as the official client's websocket-client does
        opts.extra["proxy"] = proxy or True
    return opts


def _bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``host`` is in a ``no_proxy`` list (names, ``.suffix``, ``*``, CIDR), as websocket-client reads it."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))):
            return True
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
    return False


def _refusal(status: int, body: bytes | bytearray, namespace: str, pod: str, port: int) -> PortForwardError:
    """The API server's answer to the upgrade, as one message that says what to do."""
    try:
        message = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        message = body[:300].decode(errors="replace").strip()
    where = f"pod {namespace}/{pod} port {port}"
    if status == 403:
        return PortForwardError(
            f"the Kubernetes API refused the port-forward to {where} (403 Forbidden: {message}). Reaching a pod "
            f"kernel from outside the cluster needs the RBAC permission `create pods/portforward` in namespace "
            f"{namespace!r} (the `edit` role has it): ask your cluster admin, or run the notebook inside the "
            "cluster (KT_K8S_CONNECT=service)")
    if status == 401:
        return PortForwardError(
            f"the Kubernetes API did not accept our credentials for the port-forward to {where} (401: {message}); "
            "log in again (refresh the kubeconfig's token)")
    if status == 404:
        return PortForwardError(f"pod {namespace}/{pod} is gone (404: {message}); run the cell again to relaunch it")
    return PortForwardError(f"the Kubernetes API refused the port-forward to {where} ({status}: {message})")


def open_stream(configuration: Any, namespace: str, pod: str, port: int) -> ClientConnection:
    """Open the port-forward WebSocket (use it as a context manager); a refusal says what to do."""
    opts = stream_options(configuration, namespace, pod, port)
    try:
        return connect(opts.url, additional_headers=opts.headers, subprotocols=[PORTFORWARD_PROTOCOL],  # type: ignore[list-item]
                       ssl=opts.ssl, server_hostname=opts.server_hostname, compression=None,
                       max_size=MAX_FRAME_BYTES, max_queue=MAX_QUEUED_FRAMES, open_timeout=OPEN_TIMEOUT_S,
                       **opts.extra)
    except InvalidStatus as exc:
        raise _refusal(exc.response.status_code, exc.response.body or b"", namespace, pod, port) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise PortForwardError(f"cannot open a port-forward to pod {namespace}/{pod} through the Kubernetes API at "
                               f"{configuration.host}: {exc}") from None


class _Channels:
    """What the server said on the channels so far: the port prefixes seen, the error text."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened = [False, False]
        self.error = ""

    def payload(self, message: bytes | str) -> memoryview | None:
        """The data bytes in ``message`` (None: nothing for the local socket); records the error channel."""
        if isinstance(message, str) or not message:
            raise PortForwardError(f"the port-forward sent a {'text' if message else 'empty'} message; it speaks "
                                   f"binary {PORTFORWARD_PROTOCOL} frames")
        channel, data = message[0], memoryview(message)[1:]
        if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
            raise PortForwardError(f"the port-forward used channel {channel}; one port has channels 0 and 1")
        if not self.opened[channel]:
            if len(data) < 2 or struct.unpack("<H", data[:2])[0] != self.port:
                raise PortForwardError(f"the port-forward's channel {channel} did not start with port {self.port}")
            self.opened[channel] = True
            data = data[2:]
        if channel == ERROR_CHANNEL:
            self.error = (self.error + bytes(data[:MAX_ERROR_CHARS]).decode(errors="replace"))[:MAX_ERROR_CHARS]
            return None
        return data


def pump(local: socket.socket, ws: ClientConnection, port: int, stopped: threading.Event) -> str:
    """Copy bytes both ways between ``local`` and the stream until either ends; the error channel's text, if any.

    Local to pod runs in a helper thread, pod to local in this one. The end of
    either side closes both (as the official client does).
    """
    channels = _Channels(port)

    def upstream() -> None:
        buf = bytearray(1 + SEND_CHUNK_BYTES)  # the channel byte, then the data: one frame without a join
        view = memoryview(buf)
        try:
            while not stopped.is_set():
                n = local.recv_into(view[1:])
                if not n:
                    break
                ws.send(view[:1 + n])
        except (OSError, ConnectionClosed):
            pass
        ws.close()

    sender = threading.Thread(target=upstream, name=f"kt-pf-up-{port}", daemon=True)
    sender.start()
    try:
        while True:
            try:
                message = ws.recv()
            except ConnectionClosed:
                break
            data = channels.payload(message)
            if channels.error:
                break
            if data:
                local.sendall(data)
    except PortForwardError as exc:
        channels.error = channels.error or str(exc)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            local.shutdown(socket.SHUT_RD)  # ends the helper's recv; the owner closes the socket (the peer's EOF)
        if channels.error:  # the server ended the stream: no closing handshake to wait for, and none may come
            with contextlib.suppress(OSError):
                ws.socket.shutdown(socket.SHUT_RDWR)
        ws.close()
        sender.join()
    return channels.error.strip()
