"""Pure tests of the wire format: framing, request checks, bundles, chunking."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from collect import dies_in_a_collection_under

from pod_kernel import protocol as P


def test_frame_round_trip():
    frame = P.encode_frame({"type": "execute", "id": "1", "code": "x"}, b"payload")
    header, payload = P.decode_frame(frame)
    assert header == {"type": "execute", "id": "1", "code": "x"}
    assert bytes(payload) == b"payload"


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"", "shorter than its length prefix"),
        (b"\x00\x00", "shorter than its length prefix"),
        (struct.pack(">I", 0xFFFFFFFF) + b"{}", "exceeds"),
        (struct.pack(">I", 50) + b"{}", "exceeds the frame"),
        (struct.pack(">I", 2) + b"\xff\xfe", "not valid JSON"),
        (struct.pack(">I", 2) + b"[]", "JSON object"),
        (struct.pack(">I", 12) + b'{"type": 3 }', "string 'type'"),
    ],
)
def test_malformed_frames_are_protocol_errors(frame, message):
    with pytest.raises(P.ProtocolError, match=message):
        P.decode_frame(frame)


def test_text_messages_are_refused():
    with pytest.raises(P.ProtocolError, match="binary"):
        P.decode_frame("hello")


@pytest.mark.parametrize(
    "header, message",
    [
        ({"type": "nope", "id": "1"}, "unknown request type"),
        ({"type": "execute", "id": "1"}, "field 'code'"),
        ({"type": "execute", "id": 1, "code": "x"}, "field 'id'"),
        ({"type": "pull", "id": "1", "names": "x", "serialization": "pickle"}, "field 'names'"),
    ],
)
def test_request_checks(header, message):
    with pytest.raises(P.ProtocolError, match=message):
        P.check_request(header)


def test_pickle_bundle_keeps_arrays_out_of_band_without_copies():
    arr = np.arange(1_000_000, dtype=np.float64)
    bundle = P.dump_values({"a": arr, "n": 3})
    assert bundle.serialization == "pickle"
    assert len(bundle.parts) == 2  # stream + the array's own buffer
    assert bundle.parts[0].nbytes < 1000
    # the out-of-band part is the array's memory itself, not a copy
    assert np.shares_memory(np.frombuffer(bundle.parts[1], dtype=np.float64), arr)
    values = P.load_values(bundle)
    assert values["n"] == 3 and np.array_equal(values["a"], arr)


def test_bundle_frames_chunk_and_reassemble():
    arr = np.random.default_rng(0).integers(0, 255, size=3 * 1024 * 1024 + 17, dtype=np.uint8)
    bundle = P.dump_values({"a": arr, "s": "text"})
    frames = list(P.bundle_frames({"type": "push", "id": "7"}, bundle, chunk_bytes=1 << 20))
    head, payload = P.decode_frame(frames[0])
    assert head["sizes"] == bundle.sizes and len(payload) == 0
    asm = P.BundleAssembler(head["serialization"], head["sizes"])
    for frame in frames[1:]:
        h, p = P.decode_frame(frame)
        assert h == {"type": "chunk", "id": "7"}
        assert len(p) <= 1 << 20
        asm.feed(p)
    assert asm.done
    out = P.load_values(asm.bundle())
    assert np.array_equal(out["a"], arr) and out["s"] == "text"


def test_assembler_rejects_extra_bytes_and_incomplete_bundles():
    asm = P.BundleAssembler("json", [3])
    with pytest.raises(P.ProtocolError, match="incomplete"):
        asm.bundle()
    with pytest.raises(P.ProtocolError, match="more bundle bytes"):
        asm.feed(memoryview(b"abcd"))


@pytest.mark.parametrize("sizes", [[], [-1], ["3"], [1, 2]])
def test_assembler_rejects_bad_sizes_for_json(sizes):
    with pytest.raises(P.ProtocolError):
        P.BundleAssembler("json", sizes)


def test_assembler_enforces_limit():
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        P.BundleAssembler("pickle", [10, 1 << 40], max_bytes=1 << 30)


def test_json_bundle():
    bundle = P.dump_values({"a": [1, 2], "b": {"c": None}}, "json")
    assert bundle.serialization == "json"
    assert json.loads(bytes(bundle.parts[0])) == {"a": [1, 2], "b": {"c": None}}
    assert P.load_values(bundle) == {"a": [1, 2], "b": {"c": None}}


def test_functions_by_value_keep_their_file_for_tracebacks_and_debuggers():
    """A notebook function sent by value still names its cell file and line (cloudpickle 3.1.3 blanks it)."""
    import traceback

    ns = {"__name__": "kt_not_importable_module"}  # not importable: cloudpickle sends it by value
    exec(compile("def f(x):\n    y = x\n    return 1 / y\n", "/cells/cell-7.py", "exec"), ns)
    g = P.load_values(P.dump_values({"f": ns["f"]}))["f"]
    assert g is not ns["f"] and g.__code__.co_filename == "/cells/cell-7.py"
    with pytest.raises(ZeroDivisionError) as info:
        g(0)
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (last.filename, last.lineno, last.name) == ("/cells/cell-7.py", 3, "f")


def test_fingerprint_tracks_content():
    a = np.zeros(1000)
    f1 = P.fingerprint(a)
    assert f1 == P.fingerprint(np.zeros(1000))
    a[3] = 1
    assert P.fingerprint(a) != f1
    assert P.fingerprint(lambda: None) != ""


def _cloudpickle_fingerprint(value):
    """The fingerprint as it was defined before plain data took the C pickler: cloudpickle's stream and
    out-of-band buffers, hashed."""
    import cloudpickle

    buffers: list = []
    prefix, digest = P._hasher()
    digest.update(cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append))
    for buf in buffers:
        P._hash_buffer(digest, buf.raw())
    return prefix + digest.hexdigest()


def count_cloudpickles(monkeypatch) -> list:
    """The values fingerprints pickle with cloudpickle's pickler (the slower way) from now on."""
    calls: list = []
    real = P._fingerprint_pickler()

    class Counting(real):
        def dump(self, obj):
            calls.append(obj)
            return super().dump(obj)

    monkeypatch.setattr(P, "_fingerprint_pickler", lambda: Counting)
    return calls


def test_plain_data_is_fingerprinted_by_the_c_pickler_to_the_same_fingerprint(monkeypatch):
    """Every cell fingerprints the small values both sides hold; plain data skips cloudpickle (6x faster here),
    and must hash exactly as before: the notebook and a pod of another version compare these."""
    shared = [1, 2]
    cyclic: list = [1]
    cyclic.append(cyclic)
    plain = [0, -1, 2**100, 1.5, float("nan"), -0.0, 1j, True, None, "", "é\ud800x", b"\x00" * 70_000,
             [], (), {}, set(), frozenset(), [1, [2, (3, {"a": {4, 5}})]], {"k": shared, "j": shared, 7: (shared,)},
             cyclic, frozenset({(1, 2), "x"}), list(range(P.PLAIN_OBJECTS_MAX - 1)), {i: str(i) for i in range(300)}]
    for value in plain:
        assert P.is_plain(value), value
        assert P.fingerprint(value) == _cloudpickle_fingerprint(value), value
    calls = count_cloudpickles(monkeypatch)
    for value in plain:
        P.fingerprint(value)
    assert calls == []
    not_plain = [[np.zeros(3)], list(range(P.PLAIN_OBJECTS_MAX + 1)), bytearray(b"ab"),
                 type("L", (list,), {})([1]), {"f": len}, [lambda: None], range(3)]
    for value in not_plain:
        assert not P.is_plain(value), value
        calls.clear()
        assert P.fingerprint(value)
        assert calls, value  # cloudpickle's: by value, buffers apart
    deep: list = []
    for _ in range(100_000):  # the C pickler gives up: cloudpickle says so too
        deep = [deep]
    assert P.fingerprint(deep) == ""


def test_numpy_arrays_are_fingerprinted_by_the_c_pickler_to_the_same_fingerprint(monkeypatch):
    """A numpy array without objects pickles the same (numpy's reduce, its buffer out of band) without
    cloudpickle's per-object call: 30 -> 11 us here for each held array after each cell."""
    arrays = [np.random.default_rng(0).random(250_000), np.arange(10, dtype=np.int32),
              np.zeros((3, 4), dtype=np.float32).T, np.array([1 + 2j]), np.array(["ab", "c"]),
              np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), np.zeros(P.BUFFER_DIGEST_MIN_BYTES + 8)]
    expected = [_cloudpickle_fingerprint(a) for a in arrays]
    calls = count_cloudpickles(monkeypatch)
    assert [P.fingerprint(a) for a in arrays] == expected and calls == []
    for other in (np.array([{"a": 1}], dtype=object), np.ma.masked_array([1, 2]), np.char.chararray((2,))):
        calls.clear()
        assert P.fingerprint(other) == _cloudpickle_fingerprint(other) and calls, other


class _CountingPickle:
    """The pickle module as protocol.py sees it, counting the pickles of lists (a string array's strings)."""

    def __init__(self) -> None:
        import pickle

        self._pickle = pickle
        self.lists = 0

    def dumps(self, value, *args, **kwargs):
        self.lists += type(value) is list
        return self._pickle.dumps(value, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pickle, name)


def test_a_dataframes_text_column_is_fingerprinted_by_its_strings_and_not_pickled_again_while_unchanged(monkeypatch):
    """A cell that read a DataFrame of 100k strings paid 16-39 ms a cell for its fingerprints (the strings
    pickled each time, on each side). A big object array of exact str enters a fingerprint as its strings'
    digest, remembered while its pointers stay: the other side's copy, remembering nothing, gives the same one."""
    import pickle

    pd = pytest.importorskip("pandas")
    n = 2 * P.STR_ARRAY_MIN_ITEMS
    df = pd.DataFrame({"x": np.arange(n), "y": [f"s{i}" for i in range(n)]})
    spy = _CountingPickle()
    monkeypatch.setattr(P, "pickle", spy)
    first = P.fingerprint(df)
    assert spy.lists == 1 and P.fingerprint(df) == first and P.fingerprint(df) == first
    assert spy.lists == 1  # remembered: the strings were not pickled again
    copy = pickle.loads(pickle.dumps(df))
    assert P.fingerprint(copy) == first and spy.lists == 2  # another array: its own strings' digest, the same
    df.loc[5, "y"] = "changed"  # in place
    assert P.fingerprint(df) != first
    df.loc[5, "y"] = "s5"
    assert P.fingerprint(df) == first
    assert P.head_digest(df) == P.head_digest(copy)  # the head digest goes the same way
    mixed = pd.DataFrame({"y": [f"s{i}" for i in range(n - 1)] + [7]})  # not all str: pickled as before
    before = spy.lists
    mixed_first = P.fingerprint(mixed)
    assert P.fingerprint(mixed) == mixed_first
    mixed.loc[0, "y"] = "t"
    assert P.fingerprint(mixed) != mixed_first and spy.lists == before


def test_a_remembered_string_array_is_never_fooled_by_a_freed_strings_address():
    """Item replaced by None (its string freed), then by a new string: with nothing holding the old one, the new
    one may take its address, and the pointers would read as before. The array's copy kept with its digest
    holds every string it vouched for, so none is freed while remembered."""
    import gc

    n = P.STR_ARRAY_MIN_ITEMS
    arr = np.array([f"s{i:05d}" for i in range(n)], dtype=object)
    first = P.fingerprint(arr)
    reused = 0
    for i in range(0, n, 97):
        head, tail = "t", f"{i:05d}"
        old = id(arr[i])
        arr[i] = None  # its string freed, if nothing else holds it
        arr[i] = head + tail  # one new string of the same size: the allocator's first pick is the block just freed
        reused += id(arr[i]) == old
        now = P.fingerprint(arr)
        assert now != first
        first = now
    assert reused == 0  # the strings it vouched for are alive: none of their addresses could be taken
    reshaped = np.array([f"s{i:05d}" for i in range(n)], dtype=object)
    flat = P.fingerprint(reshaped)
    reshaped.shape = (n // 2, 2)  # the same pointers, another shape
    assert P.fingerprint(reshaped) != flat
    key = id(reshaped)
    del reshaped
    gc.collect()
    assert key not in P._string_arrays._entries  # forgotten with its array (and the strings it kept)


def test_immutable_values_are_atoms_and_tuples_of_them():
    for value in (1, 2.5, "s", b"b", None, True, 1j, (), (1, ("a", (b"c",))), frozenset({1, (2, 3)})):
        assert P.is_immutable(value), value
    for value in ([], (1, [2]), ({},), {1}, bytearray(), np.int64(1), type("T", (tuple,), {})((1,)),
                  tuple(range(P.PLAIN_OBJECTS_MAX + 1))):
        assert not P.is_immutable(value), value


def test_fingerprint_of_big_buffers_hashes_pieces_in_parallel_and_tracks_every_byte():
    n = P.HASH_PARALLEL_MIN_BYTES + P.HASH_CHUNK_BYTES // 2  # a partial last piece too
    a = np.zeros(n, dtype=np.uint8)
    f1 = P.fingerprint(a)
    assert f1 == P.fingerprint(np.zeros(n, dtype=np.uint8))
    for where in (0, P.HASH_CHUNK_BYTES - 1, P.HASH_CHUNK_BYTES, n - 1):  # each piece, and its edges
        a[where] = 1
        assert P.fingerprint(a) != f1, where
        a[where] = 0
    assert P.fingerprint(a) == f1
    assert P.fingerprint(np.zeros(n + 1, dtype=np.uint8)) != f1  # the length counts
    assert P.fingerprint(a.view(np.uint16)) != f1  # so does the type (in the pickle stream)


def test_exception_payload_round_trips_or_is_empty():
    import pickle

    data = P.exception_payload(ValueError("bad"), allow_pickle=True)
    assert isinstance(pickle.loads(data), ValueError)
    assert P.exception_payload(ValueError("bad"), allow_pickle=False) == b""


def test_torch_tensors_travel_out_of_band_and_come_back_on_cpu():
    torch = pytest.importorskip("torch")
    t = torch.arange(1_000_000, dtype=torch.float32)
    g = torch.ones(3, requires_grad=True)
    bundle = P.dump_values({"t": t, "g": g})
    assert max(bundle.sizes) == t.numel() * 4  # the tensor's memory is its own part
    assert np.shares_memory(np.frombuffer(bundle.parts[1], dtype=np.float32), t.numpy())
    out = P.load_values(bundle)
    assert torch.equal(out["t"], t) and out["t"].device.type == "cpu"
    assert out["g"].requires_grad


def test_a_models_parameters_stay_parameters_on_the_way():
    """An nn.Module pushed or pulled: its weights travel out of band as every tensor does, and come back as
    nn.Parameter (they came back as plain tensors: assigning to them, or an isinstance check, then failed)."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    out = P.load_values(P.dump_values({"model": model, "frozen": frozen}))
    assert isinstance(out["model"].weight, torch.nn.Parameter) and out["model"].weight.requires_grad
    assert torch.equal(out["model"].weight, model.weight) and torch.equal(out["model"].bias, model.bias)
    assert isinstance(out["frozen"], torch.nn.Parameter) and not out["frozen"].requires_grad
    out["model"].weight = torch.nn.Parameter(torch.zeros(2, 3))  # what a Module refuses for a plain tensor


def test_a_tensors_fingerprint_hashes_its_memory_in_place():
    """A cell reading a 100 MiB tensor took 770 ms (numpy: 45): fingerprints pickled it with torch's own
    reduction, which copies the storage into the stream, twice a cell on each side. Now it enters as the numpy
    array it travels as: its memory a buffer, hashed in place (and its digest kept while nothing writes it)."""
    torch = pytest.importorskip("torch")
    t = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB
    stream, buffers = P._out_of_band(t)
    assert len(stream) < 1024 and len(buffers) == 1
    assert np.shares_memory(np.asarray(buffers[0].raw()).view(np.float32), t.numpy())
    fp = P.fingerprint(t)
    assert P.fingerprint(t.clone()) == fp and P.head_digest(t.clone()) == P.head_digest(t)
    changed = t.clone()
    changed[(4 << 20) // 2] = -1.0  # one value, in the middle
    assert P.fingerprint(changed) != fp
    assert P.fingerprint(t.view(torch.int32)) != fp  # the dtype is in the stream
    assert P.fingerprint(t.reshape(2, -1)) != fp  # and the shape
    assert P.fingerprint(t.clone().requires_grad_()) != fp
    assert P.fingerprint(torch.nn.Parameter(t.clone(), requires_grad=False)) != fp
    assert P.fingerprint(torch.zeros(3)) == P.fingerprint(torch.zeros(3))  # equal tensors, whichever objects


def test_tensors_of_dtypes_numpy_lacks_travel_as_their_bits():
    """bfloat16 (a model's weights) and the float8s: out of band as integers of their size, rebuilt as what they
    were. torch's own pickle, which they went by, copied them into the stream, and gave two equal tensors other
    fingerprints."""
    torch = pytest.importorskip("torch")
    w = torch.randn(1 << 20).to(torch.bfloat16)
    p = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    bundle = P.dump_values({"w": w, "p": p})
    assert max(bundle.sizes) == w.numel() * 2  # its own part, not copied into the stream
    out = P.load_values(bundle)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], w)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].dtype == torch.bfloat16 and out["p"].requires_grad
    assert P.fingerprint(w) == P.fingerprint(w.clone()) != P.fingerprint(w.to(torch.float16))
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None:
        x = torch.randn(64).to(f8)
        back = P.load_values(P.dump_values({"x": x}))["x"]
        assert back.dtype == f8 and torch.equal(back.view(torch.uint8), x.view(torch.uint8))
    with pytest.raises(TypeError):
        P._tensor_from_bits(np.zeros(2, np.int16), "Tensor", False, False)  # only a dtype's name rebuilds


def test_bulk_trailer_digests_are_taken_only_from_a_sender_of_the_same_hash():
    import socket
    import threading

    from pod_kernel import bulk

    data = np.arange(P.HASH_PARALLEL_MIN_BYTES // 8, dtype=np.int64)
    parts = [memoryview(b"head"), memoryview(data).cast("B")]

    def transfer(write_trailer) -> dict:
        left, right = socket.socketpair()
        with left, right:
            sent: dict = {}
            sender = threading.Thread(target=lambda: sent.update(write_trailer(left)))
            sender.start()
            got = bulk.recv_parts(right, [bytearray(4), bytearray(data.nbytes)])
            sender.join()
            return {"sent": sent, "got": got}

    same = transfer(lambda sock: bulk.send_parts(sock, parts))
    if P.hash_kind()[0] == "xxh3:":
        assert same["got"] == same["sent"] == {1: P.buffer_digest(parts[1])}

    def other_hash(sock) -> dict:
        for part in parts:
            sock.sendall(part)
        pieces = -(-data.nbytes // P.HASH_CHUNK_BYTES)
        sock.sendall(bytes([4]) + b"md5:" + b"\1" * 16 * pieces)
        return {}

    assert transfer(other_hash)["got"] == {}  # read (the stream stays in step) but not taken

    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"abcd" + bytes([200]) + b"x" * 200)
        with pytest.raises(ConnectionError, match="hash of 200 bytes"):
            bulk.recv_parts(right, [bytearray(4)])


def test_cache_entries_of_objects_that_die_in_a_collection_under_the_caches_lock_are_dropped():
    """The tensor and string-array caches' weak-reference callbacks took the cache's lock: an object that died
    in a garbage collection started by an allocation while that thread held the lock waited for it for ever."""
    torch = pytest.importorskip("torch")

    def tensor():
        t = torch.zeros(P.TENSOR_ARRAY_MIN_BYTES // 2)  # 2 MiB
        P.fingerprint(t)
        return t

    assert dies_in_a_collection_under(P._tensor_arrays._lock, tensor, lambda k: k in P._tensor_arrays._entries) \
        == [False]

    def strings():
        a = np.array([f"s{i}" for i in range(P.STR_ARRAY_MIN_ITEMS)], dtype=object)
        P.fingerprint(a)
        return a

    assert dies_in_a_collection_under(P._string_arrays._lock, strings, lambda k: k in P._string_arrays._entries) \
        == [False]
