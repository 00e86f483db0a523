"""REST handlers under ``/kt/api/``: one per resource, every method authenticated and authorised.

==========  ======================================================  =====================================
GET         ``/kt/api/computes``                                    every compute of every backend
POST        ``/kt/api/computes``                                    launch from a Compute spec (JSON body)
GET         ``/kt/api/computes/{backend}/{name}``                   one compute
DELETE      ``/kt/api/computes/{backend}/{name}``                   stop it
GET         ``/kt/api/computes/{backend}/{name}/logs?tail=N``       the last N log lines
GET         ``/kt/api/computes/{backend}/{name}/metrics``           one live resource sample
POST        ``/kt/api/computes/{backend}/{name}/terminal``          a terminal with a shell on it (ssh)
==========  ======================================================  =====================================

Errors are JSON ``{"message": ...}`` of at most :data:`MAX_MESSAGE_CHARS`: a
bad spec, compute name or parameter is 400, an unknown compute 404, a
compute that is not running 409, a request body over :data:`MAX_BODY_BYTES`
413, a kernel that does not answer 504. Backend and compute name of a URL
are checked before any backend sees them. Bodies are read in chunks and
never held beyond :data:`MAX_BODY_BYTES`: a bigger one is read and dropped
(so the client, still sending, gets the 413), or, past
:data:`MAX_DISCARD_BYTES` by its Content-Length, refused unread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.http1connection import HTTP1Connection

from ..backends import BACKENDS
from ..errors import ComputeSpecError, KtError, NotFoundError, RemoteTimeoutError
from ..names import check_compute_name, shown
from . import computes
from .computes import SPEC_EXAMPLE
from .terminals import TerminalsDisabled, open_terminal

if TYPE_CHECKING:
    from .app import KtServerApp

#: The authorisation resource every kt handler checks (``Authorizer.is_authorized(..., resource="kt")``).
AUTH_RESOURCE = "kt"
#: Log lines returned when ``?tail=`` is not given.
DEFAULT_TAIL_LINES = 200
#: Largest request body (a Compute spec), in bytes; a bigger one is refused with 413.
MAX_BODY_BYTES = 64 * 1024
#: Largest body read (and dropped) to answer 413 in order; past it the connection is closed after the answer.
MAX_DISCARD_BYTES = 16 * 1024 * 1024
#: Longest error message sent back, in characters.
MAX_MESSAGE_CHARS = 800

_NAME = r"(?P<backend>[^/]+)/(?P<name>[^/]+)"


class ApiError(web.HTTPError):
    """An HTTP error whose message is sent to the client as ``{"message": ...}``."""

    def __init__(self, status_code: int, message: str) -> None:
        message = capped(message)
        super().__init__(status_code, "%s", message)
        self.message = message


def capped(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE_CHARS` (saying so), so no request echoes a huge value."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS - 40]}... ({len(message)} characters, cut)"


def checked_target(backend: str, name: str) -> tuple[str, str]:
    """The backend and compute name from a URL, checked before anything uses them (404 / 400)."""
    if backend not in BACKENDS:
        raise ApiError(404, f"no backend {shown(backend)}: use one of {', '.join(BACKENDS)}")
    try:
        return backend, check_compute_name(name)
    except ComputeSpecError as exc:
        raise ApiError(400, str(exc)) from None


def _status_for(exc: KtError, default: int) -> int:
    if isinstance(exc, ComputeSpecError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, RemoteTimeoutError):
        return 504
    return default


@web.stream_request_body
class KtHandler(ExtensionHandlerMixin, APIHandler):
    """Base of the kt handlers: bounded bodies, JSON errors, blocking backend calls in the extension's threads."""

    auth_resource = AUTH_RESOURCE

    @property
    def kt_app(self) -> KtServerApp:
        """The extension app: its thread pool, metrics probe, listings in flight and settings."""
        return cast("KtServerApp", self.extensionapp)

    async def prepare(self) -> None:  # type: ignore[override]
        """Bound the body: one declared past :data:`MAX_DISCARD_BYTES` is refused before any of it is read."""
        self._body_chunks: list[bytes] = []
        self._declared_bytes = self._received_bytes = 0
        await super().prepare()
        length = self.request.headers.get("Content-Length", "0").strip()
        if not length.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes; got {shown(length)}")
        self._declared_bytes = int(length)
        if self._declared_bytes > MAX_DISCARD_BYTES:
            raise ApiError(413, self._too_big_message())
        if isinstance(self.request.connection, HTTP1Connection):  # always, under jupyter_server's HTTP server
            self.request.connection.set_max_body_size(MAX_DISCARD_BYTES)

    def data_received(self, chunk: bytes) -> None:
        """Keep the body's chunks up to :data:`MAX_BODY_BYTES`; drop the rest (the request gets a 413)."""
        self._received_bytes += len(chunk)
        if self._received_bytes <= MAX_BODY_BYTES:
            self._body_chunks.append(chunk)

    @property
    def body(self) -> bytes:
        """The request body; 413 when it is over :data:`MAX_BODY_BYTES` (then none of it was kept)."""
        if max(self._declared_bytes, self._received_bytes) > MAX_BODY_BYTES:
            raise ApiError(413, self._too_big_message())
        return b"".join(self._body_chunks)

    def _too_big_message(self) -> str:
        size = max(self._declared_bytes, self._received_bytes)
        return (f"the request body is {size} bytes; at most {MAX_BODY_BYTES // 1024} KiB is accepted "
                f"(a Compute spec like {SPEC_EXAMPLE})")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as ``{"message": ...}`` with the message that says what to do."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif isinstance(exc, web.HTTPError):
            message = exc.reason or f"HTTP {status_code}"
        else:
            message = f"internal error in the kt server extension: {type(exc).__name__}: {exc}"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": capped(message)}))

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the thread pool; kt errors become JSON errors with a fitting status."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.kt_app.executor, fn, *args)
        except KtError as exc:
            raise ApiError(_status_for(exc, 500), str(exc)) from None

    def reply(self, body: Any, status: int = 200) -> None:
        """Send ``body`` as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    async def describe(self, info: Any) -> dict[str, Any]:
        """Summary of one compute, with metrics when its kernel answers in time."""
        if info.phase not in computes.LIVE_PHASES:
            return computes.summarize(info)
        try:
            handle = await self.blocking(computes.live_handle, info.backend, info.name)
            if handle is None:
                return computes.summarize(info, metrics_error="not running")
            metrics = await self.kt_app.probe.sample(handle)
        except ApiError as exc:
            return computes.summarize(info, metrics_error=exc.message)
        except KtError as exc:
            return computes.summarize(info, metrics_error=str(exc))
        except Exception as exc:  # one compute's metrics never fail a listing
            self.log.warning("kt: metrics of %s/%s failed", info.backend, info.name, exc_info=True)
            return computes.summarize(info, metrics_error=f"metrics unavailable: {type(exc).__name__}: {exc}")
        return computes.summarize(info, metrics)


class ComputesHandler(KtHandler):
    """``/kt/api/computes``: list every compute, or launch one."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Every compute of every backend; backends asked concurrently, metrics with a short timeout."""
        listed = await asyncio.gather(*(self.list_backend(name) for name in BACKENDS))
        infos = [info for found, _ in listed for info in found]
        described = await asyncio.gather(*(self.describe(info) for info in infos))
        self.reply({"computes": list(described), "backends": [status for _, status in listed]})

    async def list_backend(self, name: str) -> tuple[list[Any], dict[str, Any]]:
        """One backend's listing, bounded by ``list_timeout_s``.

        A slow backend (an unreachable cluster) keeps at most one listing in
        flight: later requests wait on that one instead of taking more threads.
        """
        app = self.kt_app
        pending = app.listings.get(name)
        if pending is None or pending.done():
            pending = app.listings[name] = asyncio.get_running_loop().run_in_executor(
                app.executor, computes.list_backend, name)
        try:
            return await asyncio.wait_for(asyncio.shield(pending), app.list_timeout_s)
        except TimeoutError:
            return [], {"name": name, "available": False,
                        "message": f"the {name} backend did not answer within {app.list_timeout_s:g} s"}

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Launch a compute from the Compute spec in the body; it outlives this request (and this server)."""
        try:
            spec = json.loads(self.body)
        except ValueError as exc:
            raise ApiError(400, f"the body must be a JSON Compute spec like {SPEC_EXAMPLE}: {exc}") from None
        except RecursionError:
            raise ApiError(400, f"the body is nested too deeply; send a flat JSON Compute spec like {SPEC_EXAMPLE}"
                           ) from None
        if not isinstance(spec, dict):
            raise ApiError(400, f"the body must be a JSON object (a Compute spec); got {type(spec).__name__}")
        info, created = await self.blocking(computes.launch_compute, spec)
        self.reply(await self.describe(info), status=201 if created else 200)


class ComputeHandler(KtHandler):
    """``/kt/api/computes/{backend}/{name}``: one compute, or stop it."""

    @web.authenticated
    @authorized
    async def get(self, backend: str, name: str) -> None:
        """One compute's state, resources and metrics."""
        backend, name = checked_target(backend, name)
        info = await self.blocking(computes.compute_status, backend, name)
        self.reply(await self.describe(info))

    @web.authenticated
    @authorized
    async def delete(self, backend: str, name: str) -> None:
        """Stop the compute's kernel and remove it."""
        backend, name = checked_target(backend, name)
        await self.blocking(computes.stop_compute, backend, name)
        await self.kt_app.probe.forget(backend, name)
        self.reply({"name": name, "backend": backend, "stopped": True})


class LogsHandler(KtHandler):
    """``/kt/api/computes/{backend}/{name}/logs?tail=N``: the end of a compute's log."""

    @web.authenticated
    @authorized
    async def get(self, backend: str, name: str) -> None:
        """The last ``tail`` lines (default 200) as ``{"logs": text}``."""
        backend, name = checked_target(backend, name)
        raw = self.get_query_argument("tail", str(DEFAULT_TAIL_LINES))
        limit = self.kt_app.max_log_lines
        try:
            tail = int(raw)
        except ValueError:
            tail = 0
        if not 1 <= tail <= limit:
            raise ApiError(400, f"tail must be a whole number of lines from 1 to {limit}, e.g. tail=200; "
                                f"got {shown(raw)}")
        text = await self.blocking(computes.compute_logs, backend, name, tail)
        self.reply({"name": name, "backend": backend, "tail": tail, "logs": text})


class MetricsHandler(KtHandler):
    """``/kt/api/computes/{backend}/{name}/metrics``: one live resource sample."""

    @web.authenticated
    @authorized
    async def get(self, backend: str, name: str) -> None:
        """CPU, memory, GPUs, idle time of a running compute; 409 when it is not running."""
        backend, name = checked_target(backend, name)
        handle = await self.blocking(computes.live_handle, backend, name)
        if handle is None:
            raise ApiError(409, f"{backend} compute {name!r} is not running; launch it again to see metrics")
        try:
            metrics = await self.kt_app.probe.sample(handle)
        except KtError as exc:
            raise ApiError(_status_for(exc, 502), str(exc)) from None
        self.reply({"name": name, "backend": backend, "metrics": metrics})


class TerminalHandler(KtHandler):
    """``/kt/api/computes/{backend}/{name}/terminal``: a Jupyter terminal running a shell on the compute."""

    @web.authenticated
    @authorized
    async def post(self, backend: str, name: str) -> None:
        """201 ``{"name": terminal, "path": "terminals/<terminal>"}``; 409 when the compute is not running."""
        backend, name = checked_target(backend, name)
        if await self.blocking(computes.live_handle, backend, name) is None:
            raise ApiError(409, f"{backend} compute {name!r} is not running; run a cell on it, then ssh() again")
        try:
            terminal = open_terminal(self.settings, backend, name)
        except TerminalsDisabled as exc:
            raise ApiError(409, str(exc)) from None
        self.reply({"compute": name, "backend": backend, **terminal}, status=201)


default_handlers = [
    (r"/kt/api/computes/?", ComputesHandler),
    (rf"/kt/api/computes/{_NAME}/?", ComputeHandler),
    (rf"/kt/api/computes/{_NAME}/logs/?", LogsHandler),
    (rf"/kt/api/computes/{_NAME}/metrics/?", MetricsHandler),
    (rf"/kt/api/computes/{_NAME}/terminal/?", TerminalHandler),
]
