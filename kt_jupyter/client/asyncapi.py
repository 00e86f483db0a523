"""The session's operations as coroutines, on the client loop: for asyncio users and the seed API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pod_kernel import protocol as P

from ..errors import RemoteError, TransferError
from .exceptions import rebuild_exception
from .transport import OutputCallback, ProgressCallback, Transport, _Conn, _Execution


@dataclass
class ExecuteResult:
    """How a cell ended: its execution count and the mime bundle of its last expression."""

    execution_count: int | None
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    #: the pod's answer to the execute's ``check`` (what the cell changed; see pod_kernel.coherence), or None.
    #: A failed cell's exception carries it as ``kt_state``, and ``kt_post_mortem``: the request id whose
    #: frames the pod keeps for ``%debug``.
    state: dict[str, Any] | None = None
    #: names the execute required that the pod lacks: the cell did not run (send them, then run it again)
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExecuteOptions:
    """What an execute request carries besides its code (the fields of protocol's ``execute``)."""

    #: the file name tracebacks and debuggers show for the cell
    cell_name: str | None = None
    #: the label tracebacks show for the cell (e.g. ``Cell In[3]``)
    cell_label: str | None = None
    #: the pod waits for a debugger to attach before running the cell
    debug_wait: bool = False
    #: what the pod checks when the cell ends (``names``, ``held``, ``fingerprint_max_bytes``; see
    #: pod_kernel.coherence.CellCheck): answered in the same reply, so a cell costs one round trip
    check: Mapping[str, Any] | None = None
    #: run pdb on the frames of that failed execute instead of the code (``%debug``)
    post_mortem: str | None = None
    #: names the pod must hold, else it runs nothing and says which it lacks (:attr:`ExecuteResult.missing`)
    requires: tuple[str, ...] = ()
    #: the id of a push sent just before, not yet answered: the pod runs the cell once that push is in (and
    #: fails it, unrun, with the push's failure)
    after: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", tuple(self.requires))

    def header(self, req_id: str, code: str) -> dict[str, Any]:
        """The execute request's header."""
        header: dict[str, Any] = {"type": "execute", "id": req_id, "code": code}
        if self.cell_name:
            header["cell_name"] = self.cell_name
        if self.cell_label:
            header["cell_label"] = self.cell_label
        if self.debug_wait:
            header["debug_wait"] = True
        if self.check is not None:
            header["check"] = dict(self.check)
        if self.post_mortem is not None:
            header["post_mortem"] = self.post_mortem
        if self.requires:
            header["requires"] = list(self.requires)
        if self.after:
            header["after"] = self.after
        return header


def execute_options(options: ExecuteOptions | None, fields: Mapping[str, Any]) -> ExecuteOptions:
    """``options`` with ``fields`` (ExecuteOptions' fields by keyword) set on top."""
    if options is not None and not fields:
        return options  # frozen: nothing to copy (dataclasses.replace costs ~10 us a cell)
    return replace(options or ExecuteOptions(), **fields)


class AsyncSession(Transport):
    """A session to one pod kernel whose operations are coroutines (run them on :func:`client_loop`)."""

    def __repr__(self) -> str:
        return f"<kt Session {self.name!r} {self.url} pid={self.pod_pid}>"

    async def aconnect(self) -> dict[str, Any]:
        """Connect (or return the live connection's welcome)."""
        return (await self._ensure_conn()).welcome

    async def aexecute(self, code: str, on_output: OutputCallback | None = None,
                       options: ExecuteOptions | None = None, *, req_id: str | None = None,
                       **fields: Any) -> ExecuteResult:
        """Run ``code``; ``on_output`` is called on the client loop for each output message.

        ``fields``: :class:`ExecuteOptions` fields by keyword. A remote
        KeyboardInterrupt (or other non-Exception) arrives as RemoteError, so
        it cannot stop the caller's event loop.
        """
        result = await self._aexecute(code, on_output, execute_options(options, fields), req_id=req_id)
        if isinstance(result, Exception):
            raise result
        if isinstance(result, BaseException):
            raise RemoteError(type(result).__name__, str(result), getattr(result, "remote_traceback", ""))
        return result

    async def _aexecute(self, code: str, on_output: OutputCallback | None, options: ExecuteOptions, *,
                        req_id: str | None = None, answers_input: bool = False,
                        started: tuple[_Execution, _Conn | None] | None = None) -> ExecuteResult | BaseException:
        """Run ``code``; a remote error is returned (not raised) so the caller raises it where it belongs.

        The answer to ``options.check`` is :attr:`ExecuteResult.state`, or the exception's
        ``kt_state``; None from a pod that did not answer. A pod lacking one of
        ``options.requires`` runs nothing and its reply lists them (:attr:`ExecuteResult.missing`).
        ``started``: the execution :meth:`_start_execute` registered, and the connection it wrote the
        request on (None: not written yet).
        """
        req_id = req_id or self.new_id()
        t0 = time.perf_counter()
        preceding = self._preceding.get(options.after) if options.after else None
        if preceding is not None:  # the push it follows goes first on the wire (its header, for a bulk push)
            await preceding
        header = options.header(req_id, code)
        ex, sent_on = started or self._start_execute(asyncio.get_running_loop(), req_id, header, on_output,
                                                     answers_input, send=False)
        try:
            reply, payload = await self._until_reply(header, ex.reply, sent_on=sent_on)
        finally:
            self._executions.pop(req_id, None)
        return self._execute_result(reply, payload, options, ex, req_id, t0)

    def _execute_result(self, reply: dict[str, Any], payload: bytes, options: ExecuteOptions, ex: _Execution,
                        req_id: str, t0: float) -> ExecuteResult | BaseException:
        """What an execute_reply says: the result, or the remote error to raise (see :meth:`_aexecute`)."""
        state = reply.get("state") if isinstance(reply.get("state"), dict) else None
        requires = list(options.requires)
        if reply.get("status") == "missing" and requires:
            lacked = [n for n in reply.get("missing") or [] if n in requires]
            return ExecuteResult(None, missing=lacked or requires)
        if reply.get("status") != "ok":
            exc = rebuild_exception(reply, payload, self.accept_pickle)
            exc.kt_state = state  # type: ignore[attr-defined]
            exc.kt_post_mortem = req_id if reply.get("post_mortem") is True else None  # type: ignore[attr-defined]
            return exc
        return ExecuteResult(reply.get("execution_count"), ex.data, ex.metadata, time.perf_counter() - t0, state)

    async def apush(self, values: Mapping[str, Any], *, serialization: str = "pickle",
                    on_progress: ProgressCallback | None = None) -> list[str]:
        """Set names remotely; large buffers go out of band, chunked."""
        try:
            bundle = await asyncio.to_thread(P.dump_values, dict(values), serialization)
        except Exception as exc:
            raise TransferError(f"cannot serialize {', '.join(values)} with {serialization}: {exc}") from exc
        return await self.apush_bundle(bundle, on_progress=on_progress)

    async def apush_bundle(self, bundle: P.Bundle, *, on_progress: ProgressCallback | None = None) -> list[str]:
        """Send a serialized bundle of values."""
        reply = await self.arequest({"type": "push"}, bundle=bundle, on_progress=on_progress)
        self.last_push_ids = dict(reply.get("ids") or {})
        return list(reply["names"])

    async def apull(self, names: Iterable[str], *, serialization: str = "pickle",
                    on_progress: ProgressCallback | None = None,
                    known: dict[tuple[int, int], bytes] | None = None, req_id: str | None = None) -> dict[str, Any]:
        """Fetch named values (big ones over the bulk channel when there is one). ``known`` gets the digests
        the pod sent with their big buffers, for :func:`pod_kernel.protocol.fingerprint` (valid while the
        values live). ``req_id``: the request's id (to :meth:`abort_transfer` it)."""
        header: dict[str, Any] = {"type": "pull", "names": list(names), "serialization": serialization}
        if self._bulk_address() is not None:
            header["bulk"] = True
        bundle = await self.arequest(header, on_progress=on_progress, req_id=req_id)
        values = await asyncio.to_thread(self._load, bundle)
        if known is not None:
            known.update(bundle.known_digests())
        return values

    async def ainventory(self, names: Iterable[str] | None = None, *,
                         fingerprints: bool = False) -> list[dict[str, Any]]:
        """Describe the pod's values."""
        header: dict[str, Any] = {"type": "inventory", "fingerprints": fingerprints}
        if names is not None:
            header["names"] = list(names)
        return list((await self.arequest(header))["values"])

    async def acall(self, target: dict[str, Any], args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    *, fn: Any = None, serialization: str = "json", stream: bool = False,
                    on_output: OutputCallback | None = None, keep: bool = False,
                    construct: dict[str, Any] | None = None) -> Any:
        """Run a seed-API call on the pod (see pod_kernel.calls for ``target``); return its result."""
        values: dict[str, Any] = {"args": list(args), "kwargs": dict(kwargs or {})}
        if fn is not None:
            values["fn"] = fn
        try:
            bundle = P.dump_values(values, serialization)
        except Exception as exc:
            raise TransferError(f"cannot serialize the call's arguments with {serialization}: {exc}; "
                                "pass serialization='pickle' for Python objects") from exc
        header: dict[str, Any] = {"type": "call", "target": target, "stream": stream, "keep": keep}
        if construct is not None:
            header["construct"] = construct
        req_id = self.new_id()
        if on_output is not None:
            self._streams[req_id] = on_output
        try:
            result = await self.arequest(header, bundle=bundle, req_id=req_id, resend=False)
        finally:
            self._streams.pop(req_id, None)
        return self._load(result)["result"]

    def _load(self, bundle: P.Bundle) -> dict[str, Any]:
        """Values of a bundle from the pod; a pickle is refused, unread, when pickle is not accepted."""
        if bundle.serialization == "pickle" and not self.accept_pickle:
            raise TransferError(
                f"pod kernel {self.name!r} sent a pickled payload to a JSON-only compute "
                "(allowed_serialization=['json']); it was refused without being unpickled"
            )
        return P.load_values(bundle)

    async def async_code(self, manifest: Mapping[str, str], read: Callable[[str], str]) -> list[str]:
        """Send the files of ``manifest`` (path -> hash) the pod lacks; returns the modules it reloaded."""
        need = (await self.arequest({"type": "sync", "files": dict(manifest)}))["need"]
        if not need:
            return []
        bundle = P.dump_values({rel: read(rel) for rel in need}, "json")
        return list((await self.arequest({"type": "files"}, bundle=bundle))["reloaded"])

    async def adebug(self) -> dict[str, Any]:
        """Start debugpy in the pod kernel (once): its port there, pid, and where cells and code live."""
        return dict(await self.arequest({"type": "debug"}))

    async def ainterrupt(self, target: str | None = None) -> bool:
        """Interrupt the running cell."""
        header: dict[str, Any] = {"type": "interrupt"}
        if target:
            header["target"] = target
        return bool((await self.arequest(header))["interrupted"])
