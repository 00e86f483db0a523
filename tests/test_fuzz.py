"""Hostile input against a live pod kernel: thousands of random, truncated, oversized, wrongly typed frames.

Seeded, so every run sends the same frames. Each fuzzing connection first
sends requests that are well-formed but hostile (the server must answer each
with a reply or an error_reply and keep the connection), then one frame that
breaks the protocol (the server must close that connection with 1002 or
1009). A good client keeps working between and during them, and the pod
kernel's memory stays within a stated bound.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import threading
import time
from typing import Self

import numpy as np
import psutil
import pytest
from figures import record
from websockets.exceptions import ConnectionClosed
from wire import raw_connect

from pod_kernel import protocol as P

MiB = 1 << 20
SEED = 20261124
#: Fuzzing connections (each: some hostile-but-valid requests, then one protocol-breaking frame).
CONNECTIONS = 900
#: Pod kernel RSS growth allowed over the whole run, measured after a gc.
RSS_BOUND_BYTES = 48 * MiB

# request types a fuzzer may send *valid*: none of them runs code, stops, interrupts or writes files
SAFE_TYPES = ("ping", "inventory", "metrics", "pull", "delete", "release", "sync")
ALL_TYPES = tuple(P.CLIENT_TYPES) + ("nonsense", "", "PING", "welcome", "reply")




def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def junk_value(rng: random.Random, depth: int = 0):
    """A random JSON value of a random type."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**30])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, float("inf")]) if rng.random() < 0.5 else rng.random()
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["", "pickle", "json", "../../etc/passwd", "\x00", "fz_x"])
    if kind == 6:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(junk_value(rng, depth + 1)): junk_value(rng, depth + 1) for _ in range(rng.randrange(4))}


# ------------------------------------------------------------------ frames that must keep the connection


def hostile_request(rng: random.Random, req_id: str) -> bytes:
    """A well-formed request of a safe type whose other fields are junk; the server must answer it."""
    kind = rng.choice(SAFE_TYPES)
    header: dict = {"type": kind, "id": req_id}
    if kind == "pull":
        header["names"] = [rng.choice(["fz_missing", "", "fz_" + str(rng.random())]) for _ in range(rng.randrange(3))]
        header["serialization"] = rng.choice(["json", "pickle", "yaml", ""])
    elif kind == "delete":
        header["names"] = ["fz_" + str(rng.randrange(100)) for _ in range(rng.randrange(3))]
    elif kind == "release":
        header["refs"] = [junk_value(rng) for _ in range(rng.randrange(4))]
    elif kind == "sync":
        header["files"] = {rng.choice(["", "/etc/passwd", "../x.py", "a/b.py", "fz.py"]): str(junk_value(rng))
                           for _ in range(rng.randrange(3))}
    elif kind == "inventory":
        header["names"] = rng.choice([None, [], ["fz_missing"], [[1], {"a": 1}], "notalist"])
        header["fingerprints"] = junk_value(rng)
    for _ in range(rng.randrange(3)):  # extra fields of any type are ignored
        header["x_" + str(rng.randrange(1000))] = junk_value(rng)
    payload = rng.randbytes(rng.randrange(64)) if rng.random() < 0.3 else b""
    return P.encode_frame(header, payload)


# ------------------------------------------------------------------ frames that must close the connection


def framing_garbage(rng: random.Random) -> tuple[str, bytes | str | list]:
    """One frame that breaks the protocol, and the name of its kind."""
    kind = rng.randrange(16)
    if kind == 0:
        return "short", rng.randbytes(rng.randrange(4))
    if kind == 1:
        return "huge_declared_header", struct.pack(">I", rng.choice([0xFFFFFFFF, P.MAX_HEADER_BYTES + 1, 2**31]))
    if kind == 2:
        n = rng.randrange(1, 200)
        return "header_longer_than_frame", struct.pack(">I", n + rng.randrange(1, 1000)) + rng.randbytes(n)
    if kind == 3:
        body = rng.randbytes(rng.randrange(1, 300))
        return "binary_garbage_header", struct.pack(">I", len(body)) + body
    if kind == 4:
        body = json.dumps(rng.choice([[], 1, "type", None, [{"type": "ping"}]])).encode()
        return "header_not_object", struct.pack(">I", len(body)) + body
    if kind == 5:
        body = json.dumps({"id": "x", "type": rng.choice([None, 1, [], {}])}).encode()
        return "type_not_string", struct.pack(">I", len(body)) + body
    if kind == 6:
        return "unknown_type", P.encode_frame({"type": rng.choice(["nonsense", "", "PING", "welcome", "reply",
                                                                   "values", "bulk_ready"]), "id": "x"})
    if kind == 7:  # a known type missing or mistyping a required field
        t = rng.choice([t for t in P.CLIENT_TYPES if t != "chunk"])
        header = {"type": t, "id": "x"}
        for name in P.CLIENT_TYPES[t]:
            if name != "type" and rng.random() < 0.7:
                header[name] = junk_value(rng)
        fields = [f for f in P.CLIENT_TYPES[t]]
        broken = rng.choice(fields)
        header[broken] = rng.choice([None, 7, 1.5, [], {}, "s"]) if broken != "id" else rng.choice([None, 5, []])
        if isinstance(header[broken], P.CLIENT_TYPES[t][broken]):
            del header[broken]
        return "wrong_field_type", P.encode_frame(header)
    if kind == 8:
        return "chunk_outside_bundle", P.encode_frame({"type": "chunk", "id": "x"}, rng.randbytes(rng.randrange(100)))
    if kind == 9:
        return "text_frame", "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 100)))
    if kind == 10:
        depth = rng.choice([10_000, 100_000, 400_000])
        body = b'{"type":"ping","id":"x","deep":' + b"[" * depth + b"]" * depth + b"}"
        return "deeply_nested_header", struct.pack(">I", len(body)) + body
    if kind == 11:
        body = b'{"type":"ping","id":"' + bytes([0xFF, 0xFE, 0xC0]) + b'"}'
        return "invalid_utf8_header", struct.pack(">I", len(body)) + body
    if kind == 12:  # bad bundle declarations
        sizes = rng.choice([[-1], [1.5], ["1"], [None], [[1]], [], [True, -5]])
        return "bad_bundle_sizes", P.encode_frame({"type": rng.choice(sorted(P.BUNDLE_TYPES)), "id": "x",
                                                   "serialization": "json", "sizes": sizes,
                                                   "target": {}})
    if kind == 13:
        body = b'{"type":"nonsense","id":NaN,"x":Infinity}'
        return "json_nan_infinity_header", struct.pack(">I", len(body)) + body
    if kind == 14:  # fragmented message of text and binary parts is not our protocol either
        return "fragmented_text", ["a" * rng.randrange(1, 50), "b"]
    return "empty_frame", b""


def bundle_abuse(rng: random.Random, ws, req_id: str) -> tuple[str, int]:
    """Start a bundle, then break it: (kind, frames sent). The caller expects the close.

    Declared as json, so no random bytes are ever unpickled even if a bundle completed by chance.
    """
    kind = rng.randrange(5)
    if kind == 0:  # declares terabytes: refused, bytes would be discarded; then a non-chunk frame
        ws.send(P.encode_frame({"type": "push", "id": req_id, "serialization": rng.choice(["pickle", "json"]),
                                "sizes": [rng.choice([2**40, 2**50, 10**20])]}))
        ws.send(P.encode_frame({"type": "ping", "id": "y"}))
        return "bundle_declares_terabytes", 2
    declared = rng.randrange(300, 4096)
    ws.send(P.encode_frame({"type": "push", "id": req_id, "serialization": "json", "sizes": [declared]}))
    if kind == 1:  # more bytes than declared
        ws.send(P.encode_frame({"type": "chunk", "id": req_id}, rng.randbytes(declared + rng.randrange(1, 100))))
        return "bundle_overflow", 2
    if kind == 2:  # a chunk of another request
        ws.send(P.encode_frame({"type": "chunk", "id": req_id + "-other"}, b"zz"))
        return "bundle_wrong_chunk_id", 2
    if kind == 3:  # a chunk flood of empty and one-byte chunks, then a request in the middle of the bundle
        n = rng.randrange(10, 250)
        for _ in range(n):
            ws.send(P.encode_frame({"type": "chunk", "id": req_id}, rng.randbytes(rng.randrange(0, 2))))
        ws.send(P.encode_frame({"type": "metrics", "id": "z"}))
        return "chunk_flood_then_request", n + 2
    ws.send(P.encode_frame({"type": "chunk", "id": req_id}, rng.randbytes(declared // 2)))
    ws.send(rng.randbytes(rng.randrange(0, 8)))  # truncated frame mid-bundle
    return "bundle_truncated_frame", 3


@pytest.mark.parametrize("depth, refusal", [
    (10, None),  # shallow: parses
    (100_000, "maximum recursion depth"),  # json.loads raises RecursionError (not ValueError) on deep nesting
    (400_000, "maximum recursion depth"),
    (600_000, "exceeds"),  # over the header limit: refused before parsing
])
def test_deeply_nested_header_is_a_protocol_error_not_a_crash(depth, refusal):
    """A header nested too deep to parse is a ProtocolError, whatever json.loads raised; a shallow one parses."""
    body = b'{"type":"ping","id":"x","deep":' + b"[" * depth + b"]" * depth + b"}"
    frame = struct.pack(">I", len(body)) + body
    assert (len(body) > P.MAX_HEADER_BYTES) == (refusal == "exceeds")
    if refusal is None:
        header, _ = P.decode_frame(frame)
        assert header["type"] == "ping"
        return
    with pytest.raises(P.ProtocolError, match=refusal):
        P.decode_frame(frame)


class GoodClient:
    """A well-behaved session that keeps working, in its own thread, for the whole fuzzing run."""

    def __init__(self, handle) -> None:
        self.session = handle.session()
        self.session.execute("fz_good = 0")
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[BaseException] = []
        self.worst_s = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            t0 = time.perf_counter()
            try:
                r = self.session.execute("fz_good += 1\nfz_good", timeout=30)
                assert r.data == {"text/plain": str(n)}
                self.session.ping(timeout=30)
                self.ok += 1
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.worst_s = max(self.worst_s, time.perf_counter() - t0)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def wait_connections_below(handle, count: int, timeout_s: float) -> None:
    """Wait until the pod kernel holds fewer than ``count`` established WebSocket connections."""
    port = int(handle.url.rsplit(":", 1)[1])
    proc = psutil.Process(handle.pid)
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while True:
        open_now = sum(1 for c in proc.net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
        if open_now < count:
            return
        assert time.monotonic() < deadline, f"{open_now} connections still open after {timeout_s} s"
        tick.wait(0.02)


def pod_gc(session) -> None:
    session.execute("import gc; gc.collect()")


def pod_sessions(session) -> int:
    """How many client sessions the pod kernel's server holds (introspection for the figures)."""
    code = ("import gc\n[len(o.sessions) for o in gc.get_objects() "
            "if type(o).__name__ == 'PodKernelServer'][0]")
    return int(session.execute(code).data["text/plain"])


def test_fuzz_ten_thousand_frames_each_bad_connection_closed_server_keeps_serving(kernel):
    handle, s = kernel
    rng = random.Random(SEED)
    pod_gc(s)
    rss_before = rss(handle.pid)
    frames = 0
    answered = 0
    close_codes: dict[int, int] = {}
    kinds: dict[str, int] = {}
    t0 = time.perf_counter()
    with GoodClient(handle) as good:
        for conn_no in range(CONNECTIONS):
            with raw_connect(handle.url, handle.token) as ws:
                welcome, _ = P.decode_frame(ws.recv(timeout=10))
                assert welcome["type"] == "welcome"
                for k in range(rng.randrange(0, 14)):  # hostile but well-formed: each answered, connection kept
                    req_id = f"fz{conn_no}-{k}"
                    ws.send(hostile_request(rng, req_id))
                    frames += 1
                    reply, _ = P.decode_frame(ws.recv(timeout=30))
                    assert reply["type"] in ("reply", "error_reply", "values"), reply
                    assert reply["id"] == req_id
                    if reply["type"] == "values":  # a pull of nothing: an empty bundle, maybe with chunks
                        left = sum(reply["sizes"])
                        while left:
                            chunk, data = P.decode_frame(ws.recv(timeout=30))
                            assert chunk["type"] == "chunk" and chunk["id"] == req_id
                            left -= len(data)
                    answered += 1
                if rng.random() < 0.25:
                    kind, sent = bundle_abuse(rng, ws, f"fzb{conn_no}")
                    frames += sent
                else:
                    kind, frame = framing_garbage(rng)
                    ws.send(frame)  # a list is sent as one fragmented message
                    frames += 1
                kinds[kind] = kinds.get(kind, 0) + 1
                with pytest.raises(ConnectionClosed):
                    while True:
                        ws.recv(timeout=30)  # error replies may come first; then the close
                code = ws.protocol.close_code
                close_codes[code] = close_codes.get(code, 0) + 1
                assert code in (1002, 1009), f"{kind}: closed with {code} {ws.protocol.close_reason!r}"
            if conn_no % 100 == 0:
                assert s.execute("1 + 1").data == {"text/plain": "2"}  # and between connections, in step
        fuzz_s = time.perf_counter() - t0
    assert not good.errors, good.errors[:1]
    good_ops = good.ok
    worst_s = good.worst_s
    # oversized frames (5 MiB + 1 over the limit) close with 1009
    for size in (P.MAX_FRAME_BYTES + 1, 8 * MiB):
        with raw_connect(handle.url, handle.token) as ws:
            ws.recv(timeout=10)
            ws.send(P.encode_frame({"type": "ping", "id": "big"}, b"\0" * size))
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=30)
            assert ws.protocol.close_code == 1009
            frames += 1
            close_codes[1009] = close_codes.get(1009, 0) + 1
    pod_gc(s)
    grown = rss(handle.pid) - rss_before
    sessions = pod_sessions(s)
    assert s.execute("fz_good").data == {"text/plain": str(good_ops)}
    assert frames >= 10_000
    assert grown < RSS_BOUND_BYTES, f"pod kernel grew {grown / MiB:.1f} MiB"
    assert good_ops > 0 and worst_s < 10
    assert "Traceback" not in handle_log_tail(handle), "a fuzzed frame crashed a handler"
    record("fuzz", "frames", frames)
    record("fuzz", "connections", CONNECTIONS + 2)
    record("fuzz", "hostile_requests_answered", answered)
    record("fuzz", "close_codes", {str(k): v for k, v in sorted(close_codes.items())})
    record("fuzz", "kinds", dict(sorted(kinds.items())))
    record("fuzz", "seconds", round(fuzz_s, 1))
    record("fuzz", "good_client_ops_during", good_ops)
    record("fuzz", "good_client_worst_op_s", round(worst_s, 3))
    record("fuzz", "kernel_rss_growth_mib", round(grown / MiB, 1))
    record("fuzz", "kernel_rss_bound_mib", RSS_BOUND_BYTES // MiB)
    record("fuzz", "server_sessions_after", sessions)


def handle_log_tail(handle) -> str:
    from kt_jupyter.backends import get_backend

    return get_backend("local").logs(handle.name, tail=None)


def test_many_concurrent_half_open_bundles_and_idle_connections(kernel):
    """64 connections hold a bundle half sent while the good client works; then all are dropped. Twice.

    Afterwards no bundle buffer is left alive in the pod (counted by the garbage collector: RSS alone
    would also show what the allocator keeps for reuse)."""
    handle, s = kernel
    pod_gc(s)
    before = rss(handle.pid)
    held, after = [], []
    for round_no in range(2):
        with contextlib.ExitStack() as stack:
            for i in range(64):
                ws = stack.enter_context(raw_connect(handle.url, handle.token))
                ws.recv(timeout=10)
                ws.send(P.encode_frame({"type": "push", "id": f"half{i}", "serialization": "pickle",
                                        "sizes": [512 << 10]}))
                ws.send(P.encode_frame({"type": "chunk", "id": f"half{i}"}, b"\1" * (256 << 10)))
            t0 = time.perf_counter()
            assert s.execute("2 + 2").data == {"text/plain": "4"}
            s.push({"fz_arr": np.arange(1000)})
            assert int(s.pull(["fz_arr"])["fz_arr"].sum()) == 499500
            busy_s = time.perf_counter() - t0
            assert busy_s < 5, f"the good client took {busy_s:.1f} s"
            held.append(rss(handle.pid) - before)
        wait_connections_below(handle, 4, timeout_s=30)  # the server has let go of all 64
        pod_gc(s)
        after.append(rss(handle.pid) - before)
    # bound while held: what the bundles declared (32 MiB), once more for connection buffers, and 16 MiB
    assert max(held) < 2 * 64 * (512 << 10) + 16 * MiB, f"held {[h / MiB for h in held]} MiB"
    alive = s.execute("import gc\nsum(type(o).__name__ == 'BundleAssembler' for o in gc.get_objects())")
    assert alive.data == {"text/plain": "0"}
    record("fuzz", "half_open_bundles", 64)
    record("fuzz", "half_open_rss_held_mib", round(max(held) / MiB, 1))
    record("fuzz", "half_open_rss_after_rounds_mib", [round(a / MiB, 1) for a in after])


def test_bulk_port_garbage_and_wrong_tickets_grant_nothing(kernel):
    """The bulk side channel: no ticket, a wrong one, a truncated one -> closed, nothing read or written."""
    _, s = kernel
    welcome = s.connect()
    port = welcome.get("bulk_port")
    assert port, "every pod kernel listens on a bulk channel"
    rng = random.Random(SEED + 1)
    s.execute("fz_before = sorted(k for k in globals() if not k.startswith('_'))")
    for i in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            kind = i % 4
            if kind == 0:
                sock.sendall(rng.randbytes(32) + rng.randbytes(rng.randrange(0, 4096)))  # a wrong ticket + data
            elif kind == 1:
                sock.sendall(rng.randbytes(rng.randrange(1, 32)))  # a truncated ticket
                sock.shutdown(socket.SHUT_WR)
            elif kind == 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            else:
                sock.sendall(b"\0" * 32)
            if kind != 1:
                with contextlib.suppress(OSError):  # the server may have closed it already
                    sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                assert sock.recv(1) == b""  # closed without a byte of anybody's data
            except ConnectionResetError:
                pass
    big = np.arange(4 * MiB // 8)
    assert s.push({"fz_bulk": big}) == ["fz_bulk"]  # the real thing still works (>= 1 MiB: bulk channel)
    assert np.array_equal(s.pull(["fz_bulk"])["fz_bulk"], big)
    record("fuzz", "bulk_port_bad_connections", 200)


def test_a_bundle_header_does_not_commit_its_declared_size(kernel):
    handle, s = kernel
    pod_gc(s)
    before = rss(handle.pid)
    with raw_connect(handle.url, handle.token) as ws:
        ws.recv(timeout=10)
        ws.send(P.encode_frame({"type": "push", "id": "decl", "serialization": "pickle", "sizes": [1 << 30]}))
        ws.send(P.encode_frame({"type": "ping", "id": "p"}))  # breaks the bundle; by then the header was read
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=30)
        committed = rss(handle.pid) - before
    record("fuzz", "rss_committed_by_a_1gib_header_mib", round(committed / MiB))
    assert committed < 64 * MiB


def test_sessions_with_nothing_to_replay_are_not_kept(kernel):
    handle, s = kernel
    start = pod_sessions(s)
    for _ in range(200):
        with raw_connect(handle.url, handle.token) as ws:
            ws.recv(timeout=10)
            ws.send(P.encode_frame({"type": "ping", "id": "p"}))
            ws.recv(timeout=10)
    assert pod_sessions(s) - start < 50
