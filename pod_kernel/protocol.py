"""The kt wire protocol, shared by the pod kernel and the notebook side.

Standard library and cloudpickle only: this module is imported by pod kernels
running in any Python image.

Transport: one WebSocket per client session, binary messages only. Each
WebSocket message is one *frame*::

    u32 big-endian header length | JSON header (UTF-8 object) | payload bytes

The header always has a ``type`` (one of :data:`CLIENT_TYPES` or
:data:`SERVER_TYPES`). Requests carry an ``id`` chosen by the client; every
reply names the ``id`` it answers.

Authentication and versioning happen on the HTTP upgrade: the client sends
``Authorization: Bearer <token>``, ``X-KT-Protocol: <version>``,
``X-KT-Session: <session id>``, ``X-KT-Last-Seq: <n>`` and ``X-KT-Nonce: <64
hex digits, fresh per connection>``. A missing or wrong token (or more than one
``Authorization`` header) is answered 401, another protocol version 426,
malformed kt headers 400, all with a plain-text reason. ``GET /healthz``
answers 200 ``ok`` without a token (probes; it reveals nothing).

Authentication is mutual: the first frame, ``welcome``, carries ``proof``,
:func:`pod_proof` of the client's nonce, which only a process holding the
compute's token can compute. A client checks it before it reads anything
else from the connection, so a process that took a dead kernel's port (or a
planted registry entry's) never gets a pickle loaded by the notebook.

Ordering: messages the pod kernel sends about cells (``stream``, ``display``,
``execute_result``, ``execute_reply`` ...) carry ``seq``, increasing by one per
session. The pod kernel keeps the recent ones; a client reconnecting with
``X-KT-Last-Seq: n`` first receives every kept message after ``n``. Replies
to value requests (push/pull/inventory/metrics) carry no ``seq``: a client
whose connection dropped sends those requests again. A ``push`` or ``delete``
is applied in the pod's main thread between cells, never under a running one
(an ``--async`` cell sees a stable namespace); while it waits, the connection
goes on serving pings and interrupts, and the ``metrics`` reply counts the
waiting jobs in ``queued``. An ``execute`` may name, in ``after``, the id of a
push sent just before it and not answered yet: the cell is queued right
behind the change that sets those values (and its check holds them as the
objects just set); a push refused or failed for good fails the cell unrun
(``PushFailed``), and one cut off with its connection is waited for until it
is sent again (up to ``PUSH_WAIT_S`` in pushes.py).

Values: a set of named values travels as a *bundle*: ``serialization``
(``"pickle"`` or ``"json"``) and ``sizes``, the byte length of each part. For
pickle the first part is the cloudpickle protocol-5 stream and the others
are its out-of-band buffers (a numpy array's memory, sent from where it
lies); for json there is one part. The parts' bytes, concatenated, are the
payload of the bundle's own frame and of the ``chunk`` frames that follow it
(at most :data:`CHUNK_BYTES` each), so no frame is large and progress can be
reported.

Bundles of ``bulk.BULK_MIN_BYTES`` and more may say ``bulk: true`` instead:
their bytes go over the bulk channel (``pod_kernel/bulk.py``), with a ticket
the pod answers in ``bulk_ready``, or, for a push, with one of the
connection's spare tickets named in the header's ``ticket`` (the welcome's
``bulk_spares``; each one used is replaced by a ``spare_ticket`` message), so
that the bytes leave with the header, without a round trip. Both fields are
optional on both sides: a peer that does not know them goes the old way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import write_tracking

log = logging.getLogger("pod_kernel.protocol")

#: 4: every bulk part of BUFFER_DIGEST_MIN_BYTES+ carries its digest in the trailer (3: from 64 MiB)
PROTOCOL_VERSION = 4

#: Largest JSON header a peer accepts; a frame declaring more is malformed.
MAX_HEADER_BYTES = 1 << 20
#: Payload bytes carried per frame of a bundle.
CHUNK_BYTES = 4 << 20
#: Largest WebSocket message either side accepts.
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_HEADER_BYTES + 4

HEADER_AUTH = "Authorization"
HEADER_PROTOCOL = "X-KT-Protocol"
HEADER_SESSION = "X-KT-Session"
HEADER_LAST_SEQ = "X-KT-Last-Seq"
HEADER_NONCE = "X-KT-Nonce"
#: Path of the unauthenticated health endpoint on the WebSocket port (probes).
HEALTH_PATH = "/healthz"
#: Seconds between heartbeats (WebSocket pings) on both sides, whether a cell runs or not.
HEARTBEAT_INTERVAL_S = 10.0
#: A peer that answers no heartbeat within this many seconds is taken as unreachable. Generous, because a cell
#: in native code that holds the GIL also keeps the pod's network thread from answering.
HEARTBEAT_TIMEOUT_S = 30.0
#: What pdb's prompt contains; a prompt nothing can answer is answered "c" by clients (the cell goes on).
PDB_PROMPT = "(Pdb)"
#: Bytes of randomness in a client's handshake nonce (sent as hex).
NONCE_BYTES = 32

SERIALIZATIONS = ("json", "pickle")

#: Requests a client may send, and the header fields each requires (name -> type).
CLIENT_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    # optional: cell_name, cell_label, debug_wait; ``check`` (names to fingerprint when the cell ends, held
    # ids and fingerprints: the answer is the reply's ``state``), ``requires`` (names the pod must hold, else
    # nothing runs and the reply's status is ``missing``), ``post_mortem`` (pdb on the last failed cell's frames)
    "execute": {"id": str, "code": str},
    "interrupt": {"id": str},
    "push": {"id": str, "serialization": str, "sizes": list},
    "pull": {"id": str, "names": list, "serialization": str},
    "inventory": {"id": str},
    "delete": {"id": str, "names": list},
    "metrics": {"id": str},
    "ping": {"id": str},
    "chunk": {"id": str},
    "shutdown": {"id": str},
    "call": {"id": str, "serialization": str, "sizes": list, "target": dict},
    "sync": {"id": str, "files": dict},
    "files": {"id": str, "serialization": str, "sizes": list},
    "release": {"id": str, "refs": list},
    "input_reply": {"id": str, "value": str},  # answers an input_request (``input_id``; ``eof``: raise EOFError)
    "debug": {"id": str},  # start debugpy on the pod's loopback (once); the reply says its port
    "adopt": {"id": str, "pid": int},  # a notebook kernel on the pod's host uses it: live while one does
    "cell_file": {"id": str, "path": str, "text": str},  # write a cell's file (absolute path) unless it exists
}

#: Requests whose header starts a bundle (its bytes follow in ``chunk`` frames).
BUNDLE_TYPES = frozenset({"push", "call", "files"})

#: Messages a pod kernel sends.
SERVER_TYPES = frozenset(
    {
        "welcome",  # first message on every connection: pid, compute, protocol, next seq
        "stream",  # stdout/stderr text of a running cell (coalesced)
        "display",  # display_data / update_display_data mime bundle (in the payload when ``data_in_payload``)
        "clear_output",
        "execute_result",  # the value of a cell's last expression, as a mime bundle
        "execute_reply",  # the end of a cell: status ok | error | aborted | missing; ``state``, ``post_mortem``
        "reply",  # a request succeeded; fields depend on the request
        "values",  # a bundle answering pull (followed by chunk frames)
        "chunk",  # more bytes of the bundle before it
        "error_reply",  # a request failed: ename, evalue, traceback
        "bulk_ready",  # a bulk push may start: its one-time ticket
        "spare_ticket",  # a new spare bulk ticket, replacing one a push just used (see pod_kernel/bulk.py)
        "notice",  # something the user should know (output elided, shutting down ...)
        "input_request",  # a running cell reads input (pdb, input()): prompt, password, input_id
        "error",  # an error output that is not the cell's own end (a callback's, e.g. a matplotlib draw)
    }
)

#: Server messages that carry a sequence number and are replayed on resume.
SEQUENCED_TYPES = frozenset(
    {"stream", "display", "clear_output", "execute_result", "execute_reply", "notice", "input_request", "error"}
)


class RedactBearer(logging.Filter):
    """websockets logs handshake headers at DEBUG: a bearer token never reaches a log (either side)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and a.startswith("Bearer ") for a in record.args):
            record.args = tuple("Bearer <redacted>" if isinstance(a, str) and a.startswith("Bearer ") else a
                                for a in record.args)
        return True


class ProtocolError(Exception):
    """A frame or message that does not follow this protocol."""


def pod_proof(token: bytes, nonce: str, session: str) -> str:
    """What a pod kernel sends in its welcome to prove it holds ``token``: HMAC-SHA256 of the client's nonce.

    The session id is bound in too, so a proof seen on one connection is
    worth nothing on another (each connection has its own nonce anyway).
    """
    message = b"kt-pod-proof\0" + nonce.encode("ascii") + b"\0" + session.encode("ascii")
    return hmac.new(token, message, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- framing

_LEN = struct.Struct(">I")


def encode_frame(header: Mapping[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """Build one frame: length-prefixed JSON header followed by ``payload``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join((_LEN.pack(len(head)), head, payload))


def decode_frame(frame: bytes | bytearray | memoryview | str) -> tuple[dict[str, Any], memoryview]:
    """Split a frame into its header (a dict with a string ``type``) and payload view."""
    if isinstance(frame, str):
        raise ProtocolError("text messages are not part of this protocol; send binary frames")
    view = memoryview(frame)
    if len(view) < 4:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than its length prefix")
    (head_len,) = _LEN.unpack(view[:4])
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"declared header length {head_len} exceeds {MAX_HEADER_BYTES}")
    if head_len > len(view) - 4:
        raise ProtocolError(f"declared header length {head_len} exceeds the frame's {len(view) - 4} bytes")
    try:
        header = json.loads(bytes(view[4 : 4 + head_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header must be a JSON object with a string 'type'")
    return header, view[4 + head_len :]


def check_request(header: Mapping[str, Any]) -> None:
    """Raise ProtocolError unless ``header`` is a known client request with the right fields."""
    kind = header["type"]
    spec = CLIENT_TYPES.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown request type {kind!r}")
    for name, typ in spec.items():
        if not isinstance(header.get(name), typ):
            raise ProtocolError(f"request {kind!r} needs field {name!r} of type {_typename(typ)}")


def _typename(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


# --------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    """Serialized named values: ``parts`` are the byte views, ``serialization`` their format."""

    serialization: str
    parts: list[memoryview]
    #: part index -> its digest (:func:`buffer_digest`), where the bulk channel carried one with the bytes
    digests: dict[int, bytes] = field(default_factory=dict)

    def known_digests(self) -> dict[tuple[int, int], bytes]:
        """(address, length) -> digest of the parts with one, for :func:`fingerprint`'s ``known``."""
        return {(write_tracking.buffer_address(self.parts[i]), self.parts[i].nbytes): d
                for i, d in self.digests.items() if i < len(self.parts)}

    @property
    def sizes(self) -> list[int]:
        """Byte length of each part."""
        return [p.nbytes for p in self.parts]

    @property
    def nbytes(self) -> int:
        """Total bytes the bundle puts on the wire."""
        return sum(self.sizes)


class SerializationRefused(Exception):
    """The pod kernel does not allow this serialization."""


def _tensor_from_numpy(array: Any, requires_grad: bool, parameter: bool = False) -> Any:
    """Rebuild a torch tensor (an ``nn.Parameter`` when it was one) from the numpy array it travelled as."""
    import torch

    return _as_sent(torch.from_numpy(array), requires_grad, parameter)


def _tensor_from_bits(array: Any, dtype: str, requires_grad: bool, parameter: bool) -> Any:
    """Rebuild a torch tensor of a dtype numpy lacks (bfloat16, the float8s) from its bits as integers."""
    import torch

    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        raise TypeError(f"not a torch dtype: {dtype!r}")
    return _as_sent(torch.from_numpy(array).view(kind), requires_grad, parameter)


def _as_sent(tensor: Any, requires_grad: bool, parameter: bool) -> Any:
    import torch

    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_() if requires_grad else tensor


#: The integer type whose bits stand for a tensor element of each size, when numpy lacks the tensor's dtype.
_BITS_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _is_tensor(obj: Any) -> bool:
    kind = type(obj)
    return kind.__module__.startswith("torch") and kind.__name__ in ("Tensor", "Parameter")


def _reduce_tensor(obj: Any, to_cpu: bool) -> Any:
    """A torch tensor as the numpy array it travels as (out of band, not copied; a dtype numpy lacks, such as
    bfloat16, as its bits), or None for torch's own pickling (sparse, quantized or conjugate tensors; a GPU tensor
    unless ``to_cpu``: then it is copied to the CPU first, so GPU tensors come back as CPU tensors). torch's
    own pickle copies the memory into the stream, and differs between two equal tensors."""
    try:
        parameter = type(obj).__name__ == "Parameter"
        if obj.device.type != "cpu":
            if not to_cpu:
                return None
            obj = obj.detach().cpu()
        if obj.is_sparse or obj.is_quantized:
            return None
        requires_grad = bool(obj.requires_grad)
        array, bits_of = _tensor_array(obj)
    except Exception:  # a dtype without integers of its size, a conjugate tensor, ...
        return None
    if bits_of is not None:
        return _tensor_from_bits, (array, bits_of, requires_grad, parameter)
    return _tensor_from_numpy, (array, requires_grad, parameter)


def _tensor_as_array(tensor: Any) -> tuple[Any, str | None]:
    """A CPU tensor's memory as a numpy array, and the name of its dtype when numpy lacks it (then the array
    holds its bits as integers of its size)."""
    try:
        return tensor.detach().numpy(), None
    except TypeError:  # a dtype numpy lacks
        import torch

        bits = getattr(torch, _BITS_OF_SIZE[tensor.element_size()])
        return tensor.detach().view(bits).numpy(), str(tensor.dtype).removeprefix("torch.")


#: CPU tensors at least this big keep the array they travel as (see :func:`_tensor_array`).
TENSOR_ARRAY_MIN_BYTES = 1 << 20
#: Tensors :func:`_tensor_array` keeps an array for at most (the oldest are forgotten first): a big model has
#: hundreds of weights of 1 MiB or more (a 7B one ~290), and an entry holds no copy, only views.
TENSOR_ARRAYS_KEPT = 4096

_MISSING = object()


class _PerObject:
    """Something remembered about each of up to ``kept`` live objects (the oldest forgotten first), with a stamp
    that says the object is still as it was; an entry goes with its object (a weak reference's callback)."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._lock = threading.Lock()
        #: id(object) -> (weak reference, stamp, what is remembered)
        self._entries: dict[int, tuple[Any, Any, Any]] = {}

    def get(self, obj: Any, stamp: Any) -> Any:
        """What was remembered about ``obj`` with this ``stamp``, else :data:`_MISSING`."""
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0]() is obj and entry[1] == stamp:
            return entry[2]
        return _MISSING

    def put(self, obj: Any, stamp: Any, value: Any) -> None:
        """Remember ``value`` about ``obj`` (nothing when ``obj`` takes no weak reference)."""
        key = id(obj)
        try:
            ref = weakref.ref(obj, functools.partial(_forget_entry, self._entries, key))
        except TypeError:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (ref, stamp, value)
            while len(self._entries) > self.kept:
                self._entries.pop(next(iter(self._entries)), None)


def _forget_entry(entries: dict[int, tuple[Any, ...]], key: int, ref: Any) -> None:
    """A weak reference's callback: drop ``entries[key]`` if it is still that reference's. Without a lock: the
    callback runs wherever the object dies, also in a garbage collection that an allocation started while this
    thread held the cache's lock (a plain lock waited for itself there, for good)."""
    entry = entries.get(key)
    if entry is not None and entry[0] is ref:
        entries.pop(key, None)


_tensor_arrays = _PerObject(TENSOR_ARRAYS_KEPT)


def _tensor_array(tensor: Any) -> tuple[Any, str | None]:
    """:func:`_tensor_as_array` of a CPU tensor, the same array while the tensor is as it was.

    ``tensor.numpy()`` makes a new array, over a new alias of the tensor, at each call. The write tracker keeps
    a big buffer's digest only while the object that exported it lives: with a new array every time, an
    unchanged 100 MiB tensor was hashed again before and after every cell that read it (12 ms each side here).
    The array is kept while the tensor lives and still has the memory, shape, strides and dtype it was made
    of (``set_``, ``resize_`` or ``.data =`` give it others: a new array is made).
    """
    if tensor.numel() * tensor.element_size() < TENSOR_ARRAY_MIN_BYTES:
        return _tensor_as_array(tensor)
    layout = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
    made = _tensor_arrays.get(tensor, layout)
    if made is _MISSING:
        made = _tensor_as_array(tensor)
        _tensor_arrays.put(tensor, layout, made)
    return made


def _code_reduce_keeping_filename(code: Any) -> Any:
    """cloudpickle's reduction of a code object, with its real ``co_filename``.

    cloudpickle 3.1.3 writes every by-value function's file as "<dynamic-code>"
    (for byte-identical pickles). A notebook function then loses what names it:
    tracebacks, pdb's listing and an attached IDE (debugpy skips "<...>" files
    as not the user's code, so its breakpoints never stop) need the cell's file.
    """
    import cloudpickle

    rebuild, args = cloudpickle.cloudpickle._code_reduce(code)
    if code.co_filename not in args:
        args = tuple(code.co_filename if type(a) is str and a == "<dynamic-code>" else a for a in args)
    return rebuild, args


@functools.lru_cache(maxsize=1)
def _pickler_class() -> type:
    import collections
    import types

    import cloudpickle

    class TensorPickler(cloudpickle.Pickler):
        """cloudpickle, plus torch tensors as numpy arrays (out of band, no copy) on the CPU."""

        to_cpu = True
        dispatch_table: ClassVar[collections.ChainMap[Any, Any]] = collections.ChainMap(
            {types.CodeType: _code_reduce_keeping_filename}, cloudpickle.Pickler.dispatch_table)

        def reducer_override(self, obj: Any) -> Any:
            if _is_tensor(obj):
                reduced = _reduce_tensor(obj, self.to_cpu)
                if reduced is not None:
                    return reduced
            return super().reducer_override(obj)

    return TensorPickler


def dump_values(values: Mapping[str, Any], serialization: str = "pickle") -> Bundle:
    """Serialize ``values`` (name -> object); pickle keeps large buffers out of band, uncopied.

    torch tensors travel as numpy arrays (so also out of band) and tensors on
    a GPU are moved to the CPU first, so they load where there is no GPU.
    """
    if serialization == "json":
        return Bundle("json", [memoryview(json.dumps(dict(values)).encode())])
    if serialization != "pickle":
        raise ValueError(f"unknown serialization {serialization!r}; use one of {SERIALIZATIONS}")
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _pickler_class()(out, protocol=5, buffer_callback=buffers.append).dump(dict(values))
    return Bundle("pickle", [out.getbuffer()] + [b.raw() for b in buffers])


def load_values(bundle: Bundle) -> dict[str, Any]:
    """Inverse of :func:`dump_values`; the out-of-band parts become the values' memory."""
    if bundle.serialization == "json":
        values = json.loads(bytes(bundle.parts[0]))
    elif bundle.serialization == "pickle":
        values = pickle.loads(bundle.parts[0], buffers=bundle.parts[1:])
    else:
        raise ProtocolError(f"unknown serialization {bundle.serialization!r}")
    if not isinstance(values, dict):
        raise ProtocolError("a bundle must hold a mapping of names to values")
    return values


def iter_chunks(parts: Iterable[memoryview], chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Yield the concatenation of ``parts`` as slices of at most ``chunk_bytes`` (no copies)."""
    for part in parts:
        part = part.cast("B") if part.format != "B" or part.ndim != 1 else part
        for start in range(0, part.nbytes, chunk_bytes):
            yield part[start : start + chunk_bytes]


def bundle_frames(header: Mapping[str, Any], bundle: Bundle, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Frames that carry ``bundle``: ``header`` (+ sizes) then ``chunk`` frames.

    The first frame carries no payload; each following ``chunk`` frame carries
    up to ``chunk_bytes``. Only one chunk is copied at a time.
    """
    head = dict(header, serialization=bundle.serialization, sizes=bundle.sizes)
    yield encode_frame(head)
    chunk_head = {"type": "chunk", "id": header["id"]}
    for piece in iter_chunks(bundle.parts, chunk_bytes):
        yield encode_frame(chunk_head, piece)


#: Parts at least this big are received into anonymous memory maps, not bytearrays.
MMAP_MIN_BYTES = 1 << 20


def _buffer(size: int, fresh: list[Any] | None = None) -> Any:
    """A writable buffer of ``size`` bytes; big ones are anonymous maps backed by huge pages where the kernel allows
    (``fresh`` gets each new map).

    Fresh memory costs page faults on first touch: the kernel zeroes each page.
    Huge pages (transparent huge pages in "madvise" or "always" mode) make a
    fault per 2 MiB instead of per 4 KiB; zeroing stays memory-bound (1 GiB
    faulted in: 0.27-0.37 s here on 2026-12-02, spikes to ~1 s). The map is only
    reserved here (no memory committed): a bulk receive faults it in while the
    bytes arrive (:meth:`BundleAssembler.faulting_in`). A map of the same size
    whose value is gone, or a spare faulted in ahead, is used instead, faulted
    in already (``recvpool.py``): no fault cost at all.
    """
    if size < MMAP_MIN_BYTES:
        return bytearray(size)
    from . import recvpool

    reused = recvpool.pool().take(size)  # a map whose value is gone, faulted in already (see recvpool.py)
    if reused is not None:
        return reused
    buf = recvpool.new_map(size)
    recvpool.pool().lend(buf)
    if fresh is not None:
        fresh.append(buf)
    return buf  # else the copy faults pages as chunks arrive (huge pages: 512x fewer faults)


def _no_wait(_index: int, _end: int) -> None:
    """``ready`` of a receive with nothing to fault in."""


@dataclass
class BundleAssembler:
    """Receives a bundle's bytes chunk by chunk into preallocated part buffers."""

    serialization: str
    sizes: list[int]
    max_bytes: int | None = None
    _parts: list[Any] = field(init=False)
    _index: int = field(init=False, default=0)
    _offset: int = field(init=False, default=0)
    received: int = field(init=False, default=0)
    #: part index -> the sender's digest of it (a bulk transfer's trailer)
    digests: dict[int, bytes] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.serialization not in SERIALIZATIONS:
            raise ProtocolError(f"unknown serialization {self.serialization!r}")
        if not self.sizes or not all(isinstance(s, int) and s >= 0 for s in self.sizes):
            raise ProtocolError("bundle sizes must be a non-empty list of non-negative integers")
        if self.serialization == "json" and len(self.sizes) != 1:
            raise ProtocolError("a json bundle has exactly one part")
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise ProtocolError(f"bundle of {self.total} bytes exceeds the limit of {self.max_bytes}")
        self._fresh: list[Any] = []  # the parts received into new maps: spares follow (recvpool.py)
        self._parts = [_buffer(s, self._fresh) for s in self.sizes]
        self._skip_empty()

    @property
    def parts(self) -> list[Any]:
        """The preallocated part buffers (filled in place by a bulk transfer)."""
        return self._parts

    @contextlib.contextmanager
    def faulting_in(self) -> Iterator[Callable[[int, int], None]]:
        """While a bulk transfer fills the parts: their new maps faulted in by a thread, ahead of the bytes,
        chunk by chunk (:func:`~pod_kernel.recvpool.populate`). Gives ``ready(index, end)``, which waits until
        part ``index`` is faulted in up to byte ``end`` (at once for a part that is not new). On exit the
        thread stops after its chunk and is joined (then the maps can be unmapped).

        All of a new 1 GiB map faulted in before the first byte was read (as this
        did before) left the sender waiting all that time. A first push of 1 GiB
        into a new pod kernel, same sitting, 2026-12-02: 2.33-2.65 s before,
        0.74-1.52 s after; in a quieter hour, each way in turn: all first
        0.50-1.39 s (median 0.54), ahead 0.39 s (0.386-0.394), the copy faulting
        the pages itself (no thread) 0.39-1.73 s; raw TCP 0.29-0.37 s.
        """
        fresh = {id(buf): buf for buf in self._fresh}
        if not fresh:
            yield _no_wait
            return
        from . import recvpool

        faulted = {key: 0 for key in fresh}
        cond = threading.Condition()
        stop = threading.Event()
        parts = self._parts

        def fault_in() -> None:
            try:
                for key, buf in fresh.items():
                    def done(end: int, key: int = key) -> None:
                        with cond:
                            faulted[key] = end
                            cond.notify_all()
                    recvpool.populate(buf, stop, done)
            except Exception:  # e.g. a map closed under it (a failed transfer): the receive goes on without it
                log.debug("faulting receive buffers in ahead failed", exc_info=True)
            finally:  # the receive never waits for a thread that ended (failed): it faults pages itself
                with cond:
                    for key in faulted:
                        faulted[key] = sys.maxsize
                    cond.notify_all()

        def ready(index: int, end: int) -> None:
            key = id(parts[index])
            if key in faulted and faulted[key] < end:
                with cond:
                    cond.wait_for(lambda: faulted[key] >= end)

        thread = threading.Thread(target=fault_in, name="kt-fault-ahead", daemon=True)
        thread.start()
        try:
            yield ready
        finally:
            stop.set()
            thread.join()

    @property
    def total(self) -> int:
        """Bytes the whole bundle holds."""
        return sum(self.sizes)

    @property
    def done(self) -> bool:
        """Whether every byte has arrived."""
        return self.received == self.total

    def _skip_empty(self) -> None:
        while self._index < len(self.sizes) and self._offset == self.sizes[self._index]:
            self._index += 1
            self._offset = 0

    def feed(self, data: memoryview) -> None:
        """Copy ``data`` into place; too many bytes is a ProtocolError."""
        pos = 0
        n = len(data)
        if self.received + n > self.total:
            raise ProtocolError("more bundle bytes than its declared sizes")
        while pos < n:
            part = self._parts[self._index]
            take = min(n - pos, len(part) - self._offset)
            part[self._offset : self._offset + take] = data[pos : pos + take]
            pos += take
            self._offset += take
            self._skip_empty()
        self.received += n

    def bundle(self) -> Bundle:
        """The complete bundle (raises ProtocolError if bytes are missing)."""
        if not self.done:
            raise ProtocolError(f"bundle incomplete: {self.received} of {self.total} bytes")
        if self._fresh:  # the next receive of these sizes finds a map faulted in (see recvpool.py)
            from . import recvpool

            for buf in self._fresh:
                recvpool.pool().ready_spare(len(buf))
            self._fresh = []
        return Bundle(self.serialization, [memoryview(p) for p in self._parts], dict(self.digests))

    def vouch(self) -> int:
        """Have this process's write tracker vouch for the received big parts' digests (see
        :meth:`~pod_kernel.write_tracking.WriteTracker.seed`); how many it took."""
        tracker = write_tracking.tracker()
        return sum(tracker.seed(memoryview(self._parts[i]), digest, self._parts[i])
                   for i, digest in self.digests.items() if i < len(self._parts))


# --------------------------------------------------------------------------- fingerprints


@functools.lru_cache(maxsize=1)
def hash_kind() -> tuple[str, Callable[..., Any]]:
    """This side's hash: its fingerprint prefix and the constructor of a 16-byte digest."""
    try:
        import xxhash  # ~30 GB/s here, vs ~1.3 GB/s for blake2b: a 1 GB array is checked in ~35 ms

        return "xxh3:", xxhash.xxh3_128
    except ImportError:
        return "b2:", functools.partial(hashlib.blake2b, digest_size=16)


def _hasher() -> Any:
    prefix, kind = hash_kind()
    return prefix, kind()


def fingerprint(value: Any, known: Mapping[tuple[int, int], bytes] | None = None) -> str:
    """A content hash of ``value`` (of its pickle, buffers hashed in place), or '' if unpicklable.

    The algorithm is part of the result, so two sides with different hash
    libraries never mistake each other's fingerprints for equal. ``known``:
    (address, length) -> :func:`buffer_digest` of big buffers whose digest was
    taken as their bytes crossed the bulk channel; those are not read again.
    """
    plain = is_plain(value)
    if plain:  # (see _out_of_band; here without its other steps: every cell fingerprints held values)
        with contextlib.suppress(RecursionError):
            prefix, kind = hash_kind()
            return prefix + kind(pickle.dumps(value, protocol=5)).hexdigest()
    pickled = _out_of_band(value, plain=plain)
    if pickled is None:
        return ""
    stream, buffers = pickled
    prefix, digest = _hasher()
    digest.update(stream)
    for buf in buffers:
        _hash_buffer(digest, buf.raw(), known)
    return prefix + digest.hexdigest()


def _out_of_band(value: Any, plain: bool | None = None) -> tuple[bytes, list[pickle.PickleBuffer]] | None:
    """``value``'s cloudpickle stream and its out-of-band buffers (not copied), or None if it does not pickle.

    Plain data (see :func:`is_plain`) is pickled by the C pickler alone, to the very same bytes: cloudpickle's
    pickler is that pickler plus a Python call for each object (2.4 us for ``[1, 2, 3]`` here, 0.4 without),
    and every cell fingerprints the small values either side holds. ``plain``: :func:`is_plain`'s answer, when
    the caller has it (a walk over up to :data:`PLAIN_OBJECTS_MAX` objects).
    """
    if is_plain(value) if plain is None else plain:
        with contextlib.suppress(RecursionError):  # too deep for the pickler: cloudpickle says so too
            return pickle.dumps(value, protocol=5), []
    buffers: list[pickle.PickleBuffer] = []
    if _plain_array(value):  # the same bytes and buffers, 2-3x sooner (numpy's reduce is the rest)
        with contextlib.suppress(Exception):
            return pickle.dumps(value, protocol=5, buffer_callback=buffers.append), buffers
        buffers = []
    try:
        out = io.BytesIO()
        _fingerprint_pickler()(out, protocol=5, buffer_callback=buffers.append).dump(value)
        return out.getvalue(), buffers
    except Exception:
        return None


#: Object arrays of at least this many items, all exact ``str``, enter fingerprints (and head digests) as the
#: digest of their strings' pickle, which :func:`_strings_digest` remembers while the array's pointers stay.
STR_ARRAY_MIN_ITEMS = 4096
#: Object arrays :func:`_strings_digest` remembers at most (the oldest are forgotten first).
STR_ARRAYS_KEPT = 64


@functools.lru_cache(maxsize=1)
def _fingerprint_pickler() -> type:
    """cloudpickle's pickler, but an object array of strings goes as its :func:`_strings_digest`, and a CPU
    torch tensor as the numpy array it travels as (its memory hashed in place, like an array's)."""
    import cloudpickle

    class FingerprintPickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            kind = type(obj)
            if kind.__name__ == "ndarray" and kind.__module__ == "numpy" and obj.dtype.kind == "O":
                digest = _strings_digest(obj)
                if digest is not None:
                    return _strings_of_digest, (digest.hex(), obj.shape)
            elif _is_tensor(obj):  # its memory as a buffer, as it travels (torch's own pickle copies it in band)
                reduced = _reduce_tensor(obj, to_cpu=False)
                if reduced is not None:
                    return reduced
            return super().reducer_override(obj)

    return FingerprintPickler


def _strings_of_digest(digest: str, shape: tuple[int, ...]) -> Any:
    """What a fingerprint's stream names in place of an object array of strings (never unpickled: fingerprints
    are only compared)."""
    raise RuntimeError("a fingerprint's stream is never unpickled")


_string_arrays = _PerObject(STR_ARRAYS_KEPT)


def _strings_digest(arr: Any) -> bytes | None:
    """The digest of the strings of a big object array of strings (a DataFrame's text column), remembered while
    the array's pointers stay as they were; None when it is small, not contiguous or not all exact str.

    Pickling 100k strings to fingerprint a DataFrame that a cell read took 11 ms of
    16 here, on each side, every cell. An array whose pointers (8 bytes an item,
    hashed in ~0.1 ms) are the ones it had when all its items were found to be
    exact ``str`` holds the same strings: a ``str`` never changes, and a copy of
    the array kept with the digest holds every one of them, so none can be freed
    and another string take its address (an item replaced by None, then by a new
    string, would otherwise look unchanged). The digest is that of the strings'
    pickle, so both sides, remembering or not, give the same one.
    """
    if arr.size < STR_ARRAY_MIN_ITEMS or not arr.flags.c_contiguous:
        return None
    import ctypes

    _prefix, kind = hash_kind()
    pointers = kind((ctypes.c_char * arr.nbytes).from_address(arr.ctypes.data)).digest()
    known = _string_arrays.get(arr, pointers)
    if known is not _MISSING:
        return known[0]
    items = arr.ravel().tolist()
    content = kind(pickle.dumps(items, protocol=5)).digest() if all(type(x) is str for x in items) else None
    _string_arrays.put(arr, pointers, (content, arr.copy() if content is not None else None))
    return content


def _plain_array(value: Any) -> bool:
    """Whether ``value`` is a numpy array (exactly) of numbers, strings or records without objects: pickled by
    numpy's own reduce, the same by pickle and cloudpickle."""
    kind = type(value)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not value.dtype.hasobject


#: Types of values that never change in place, whose pickles cloudpickle's and pickle's are the same.
_ATOMS = frozenset({int, float, complex, bool, type(None), str, bytes})
#: Containers pickled the same by both (exact types: a subclass may pickle any way it likes).
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_FROZEN = frozenset({tuple, frozenset})
#: Most objects :func:`is_plain` and :func:`is_immutable` look at before saying no.
PLAIN_OBJECTS_MAX = 10_000


def is_plain(value: Any) -> bool:
    """Whether ``value`` is builtin data only: numbers, strings, bytes, None, in lists, tuples, dicts and sets
    (exact types, at most :data:`PLAIN_OBJECTS_MAX` objects)."""
    return _made_of(value, _CONTAINERS)


def is_immutable(value: Any) -> bool:
    """Whether ``value`` cannot change in place: an atom (a number, string, bytes, None) or tuples and frozensets
    of them (exact types, at most :data:`PLAIN_OBJECTS_MAX` objects). One that keeps its ``id`` kept its
    content."""
    return _made_of(value, _FROZEN)


def _made_of(value: Any, containers: frozenset[type]) -> bool:
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind not in containers:
        return False
    todo, seen, budget = [value], {id(value)}, PLAIN_OBJECTS_MAX
    while todo:
        obj = todo.pop()
        items = (*obj, *obj.values()) if type(obj) is dict else obj
        budget -= len(items)
        if budget < 0:
            return False
        for item in items:
            kind = type(item)
            if kind in _ATOMS:
                continue
            if kind not in containers:
                return False
            if id(item) not in seen:
                seen.add(id(item))
                todo.append(item)
    return True


#: Bytes of each end of a buffer that :func:`head_digest` reads (a new array of other bytes differs there).
HEAD_BYTES = 64 << 10


def head_digest(value: Any) -> str:
    """A cheap digest of ``value``: its pickle without the buffers, each buffer's length and its first and
    last :data:`HEAD_BYTES`. Two values whose head digests differ differ (their fingerprints would too); equal
    head digests say nothing. '' if unpicklable."""
    pickled = _out_of_band(value)
    if pickled is None:
        return ""
    stream, buffers = pickled
    prefix, digest = _hasher()
    digest.update(stream)
    for buf in buffers:
        data = buf.raw()
        digest.update(data.nbytes.to_bytes(8, "little"))
        digest.update(data[:HEAD_BYTES])
        digest.update(data[max(HEAD_BYTES, data.nbytes - HEAD_BYTES):])
    return prefix + digest.hexdigest()


#: Buffers at least this big are hashed in :data:`HASH_CHUNK_BYTES` pieces on several threads.
HASH_PARALLEL_MIN_BYTES = 64 << 20
#: Buffers at least this big enter a fingerprint as their :func:`buffer_digest`, which the write tracker keeps
#: while nothing writes to them (a 2 MB array held by a notebook was hashed after every cell).
BUFFER_DIGEST_MIN_BYTES = 1 << 20
#: Fixed, so a value's fingerprint does not depend on the machine's core count.
HASH_CHUNK_BYTES = 16 << 20


@functools.lru_cache(maxsize=1)
def _hash_pool_of(pid: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="kt-hash")


def _hash_pool() -> Any:
    """This process's hashing threads (a forked child has none of its parent's: it starts its own)."""
    return _hash_pool_of(os.getpid())


def buffer_digest(data: memoryview) -> bytes:
    """The digest a big buffer (>= :data:`BUFFER_DIGEST_MIN_BYTES`) enters a fingerprint as: the digests of
    its :data:`HASH_CHUNK_BYTES` pieces, one after the other (hashed on several threads from
    :data:`HASH_PARALLEL_MIN_BYTES`)."""
    _prefix, kind = hash_kind()
    n = data.nbytes
    pieces = (data[i : i + HASH_CHUNK_BYTES] for i in range(0, n, HASH_CHUNK_BYTES))
    if n < HASH_PARALLEL_MIN_BYTES:
        return b"".join(kind(piece).digest() for piece in pieces)
    return b"".join(_hash_pool().map(lambda piece: kind(piece).digest(), pieces))


def _hash_buffer(digest: Any, data: memoryview, known: Mapping[tuple[int, int], bytes] | None = None) -> None:
    """Feed ``data`` to ``digest``; a big buffer goes in as its :func:`buffer_digest`.

    Hashing is memory-bound and xxhash releases the GIL, so pieces hash in
    parallel: 1 GiB in ~60 ms on 2 cores here instead of ~105 ms on one. This is
    what an unchanged 1 GB global costs when its cell runs again, unless the
    write tracker vouches for it, or ``known`` has it (digested in transit).
    """
    n = data.nbytes
    if n < BUFFER_DIGEST_MIN_BYTES:
        digest.update(data)
        return
    digest.update(n.to_bytes(8, "little"))
    taken = known.get((write_tracking.buffer_address(data), n)) if known else None
    # a big buffer no page of which was written since it was hashed is not read again (write_tracking.py)
    digest.update(taken if taken is not None else write_tracking.tracker().digest(data, buffer_digest))


def approx_size(value: Any) -> int:
    """Bytes a value occupies: ``nbytes`` for arrays and tensors, else ``sys.getsizeof``."""
    if type(value) in _ATOMS or type(value) in _CONTAINERS:  # (a failed getattr costs more than the rest)
        return sys.getsizeof(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    try:
        return sys.getsizeof(value)
    except Exception:
        return 0


def type_name(value: Any) -> str:
    """``module.QualName`` of a value's type (builtins unqualified)."""
    t = type(value)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def exception_payload(exc: BaseException, allow_pickle: bool) -> bytes:
    """The pickled exception (without traceback) when allowed and possible, else b''."""
    if not allow_pickle:
        return b""
    import cloudpickle

    try:
        data = cloudpickle.dumps(exc.with_traceback(None), protocol=5)
        pickle.loads(data)  # must round-trip here, or the client would fail on it
        return data
    except Exception:
        return b""


ProgressCallback = Callable[[int, int], None]
