"""The warm per-cell path's shortcuts keep behaviour: a parsed %%kt line reused, big unchanged globals vouched
for by write tracking instead of hashed, and every in-place write still seen on both sides."""

from __future__ import annotations

import mmap

import numpy as np
from ipshell import run

from kt_jupyter import connection as conn_mod
from kt_jupyter.compute import Compute
from pod_kernel import protocol as P
from pod_kernel import write_tracking

BIG = max(write_tracking.TRACK_MIN_BYTES, P.HASH_PARALLEL_MIN_BYTES)  # tracked on both sides, digested in transit


def magics(ip):
    return ip.magics_manager.registry["KtMagics"]


def test_a_line_is_parsed_once_per_default_compute_and_the_kernel_known_by_identity(ip):
    m = magics(ip)
    run(ip, "%%kt --name perf-line\nx = 1")
    _args, compute, explicit = m._parse_line("--name perf-line")
    run(ip, "%%kt --name perf-line\nx = 2")
    assert m._parse_line("--name perf-line")[1] is compute and explicit == {"name"} and ip.user_ns["x"] == 2
    assert next(c for c in conn_mod.connections() if c.name == "perf-line").compute is compute
    conn_mod.set_default_compute(Compute(name="perf-other"))  # the same line now asks for another spec
    again = m._parse_line("--name perf-line")[1]
    assert again is not compute and again.name == "perf-line"


def test_in_place_writes_to_a_big_tracked_global_are_seen_after_unchanged_reruns(ip):
    ip.user_ns["big"] = np.zeros(BIG, dtype=np.uint8)
    run(ip, "%%kt --name perf-big\ns = int(big.sum())")
    tracker = write_tracking.tracker()
    vouched = tracker.vouched
    for _ in range(3):
        run(ip, "%%kt --name perf-big\ns = int(big.sum())")
        assert magics(ip).last_outcome.skipped_unchanged == ["big"]
    assert tracker.vouched > vouched or not tracker.available  # not read again to learn that
    ip.user_ns["big"][BIG // 2] = 7  # written here in place: sent again
    run(ip, "%%kt --name perf-big\ns = int(big.sum())")
    assert "big" in magics(ip).last_outcome.pushed and ip.user_ns["s"] == 7
    run(ip, "%%kt --name perf-big\ns = int(big.sum())")
    run(ip, "%%kt --name perf-big\nbig[-1] = 5")  # written there in place: comes back
    assert int(ip.user_ns["big"].sum()) == 12
    run(ip, "%%kt --name perf-big\ns = int(big.sum())")
    assert ip.user_ns["s"] == 12 and magics(ip).last_outcome.bytes_pushed == 0


def test_unchanged_tensors_are_not_read_again_and_in_place_writes_to_them_are_seen(ip):
    """A model's weights in the notebook, read by every %%kt cell: fingerprints went by torch's own pickle,
    which copies the whole tensor into the stream, on each side, every cell (100 MiB float32 + 32 MiB bfloat16:
    400-500 ms a cell, now 2 ms: not read again while unchanged). In place, on either side, a change still
    travels, and a Parameter stays one."""
    import pytest

    torch = pytest.importorskip("torch")
    ip.user_ns["w"] = torch.arange(BIG // 4, dtype=torch.float32)
    ip.user_ns["h"] = torch.ones(1 << 20, dtype=torch.bfloat16)
    ip.user_ns["p"] = torch.nn.Parameter(torch.zeros(4, 4))
    cell = "%%kt --name perf-torch\ns = float(w[-1]) + float(h.sum()) + float(p.detach().sum())"
    run(ip, cell)
    tracker = write_tracking.tracker()
    vouched = tracker.vouched
    for _ in range(3):
        run(ip, cell)
        assert sorted(magics(ip).last_outcome.skipped_unchanged) == ["h", "p", "w"]
        assert magics(ip).last_outcome.bytes_pushed == 0
    assert tracker.vouched > vouched or not tracker.available  # the tensor's memory was not read again
    ip.user_ns["w"][-1] = -1.0  # in place here: sent again
    run(ip, cell)
    assert magics(ip).last_outcome.pushed == ["w"] and ip.user_ns["s"] == -1.0 + (1 << 20)
    run(ip, "%%kt --name perf-torch\nimport torch\nwith torch.no_grad():\n    p[0, 0] = 3.0\nh[0] = 2")  # there
    assert isinstance(ip.user_ns["p"], torch.nn.Parameter) and float(ip.user_ns["p"].detach()[0, 0]) == 3.0
    assert ip.user_ns["h"].dtype == torch.bfloat16 and float(ip.user_ns["h"][0]) == 2.0
    run(ip, cell)  # what came back is what the pod holds: nothing goes back
    assert magics(ip).last_outcome.bytes_pushed == 0 and magics(ip).last_outcome.pushed == []


def test_a_mid_size_array_a_cell_reads_is_not_hashed_again_while_unchanged(ip, monkeypatch):
    """Each cell fingerprints the values it reads (to send the changed ones): an array of a few MB was hashed at
    every cell. From 1 MiB it enters fingerprints as its digest, which the write tracker keeps while no page of it
    is written: hashed twice, then not again until written here."""
    size = 2 * P.BUFFER_DIGEST_MIN_BYTES
    hashed: list[int] = []
    real = P.buffer_digest
    monkeypatch.setattr(P, "buffer_digest", lambda data: hashed.append(data.nbytes) or real(data))
    # in a mapping of its own: malloc may put an array of a few MB in the heap, whose pages at its ends hold other
    # objects too, and such a buffer is not tracked (write_tracking.TRACK_HEAP_MIN_BYTES)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ip.user_ns["mid"] = np.frombuffer(mem, dtype=np.uint8)
    for _ in range(2):
        run(ip, "%%kt --name perf-mid\ns = int(mid.sum())")
    tracker = write_tracking.tracker()
    assert tracker.available
    hashed.clear()
    for _ in range(3):
        run(ip, "%%kt --name perf-mid\ns = int(mid.sum())")
        assert magics(ip).last_outcome.skipped_unchanged == ["mid"]
    assert hashed == []  # not read again to learn that
    ip.user_ns["mid"][size // 2] = 7  # written here in place: read again (twice: a changed value is hashed
    run(ip, "%%kt --name perf-mid\ns = int(mid.sum())")  # again, to tell a change from a value unstable), sent
    assert hashed and set(hashed) == {size} and magics(ip).last_outcome.pushed == ["mid"] and ip.user_ns["s"] == 7


def test_big_values_are_fingerprinted_in_transit_not_read_again(ip, monkeypatch):
    """A big array going either way is hashed as its bytes cross the bulk channel (the sender's digests come
    with them); a new array that differs from the one the pod holds is sent without being hashed first, and
    one with the same bytes is not sent at all. Every recorded fingerprint is the array's true one."""

    hashed: list[int] = []
    real = P.buffer_digest
    monkeypatch.setattr(P, "buffer_digest", lambda data: hashed.append(data.nbytes) or real(data))
    conn_of = lambda: next(c for c in conn_mod.connections() if c.name == "perf-transit")  # noqa: E731

    first = np.arange(BIG // 8, dtype=np.int64)
    ip.user_ns["big"] = first
    run(ip, "%%kt --name perf-transit\ns = int(big[-1])")
    assert ip.user_ns["s"] == BIG // 8 - 1 and magics(ip).last_outcome.pushed == ["big"]
    assert hashed == []  # never pushed before: sent at once, its fingerprint taken on the way
    monkeypatch.setattr(P, "buffer_digest", real)
    assert conn_of().held["big"].fingerprint == P.fingerprint(first.copy())  # the true one (a copy: no cache)
    monkeypatch.setattr(P, "buffer_digest", lambda data: hashed.append(data.nbytes) or real(data))

    ip.user_ns["big"] = first + 1  # a new array, other bytes: its head differs, so it goes unhashed
    run(ip, "%%kt --name perf-transit\ns = int(big[-1])")
    assert ip.user_ns["s"] == BIG // 8 and magics(ip).last_outcome.pushed == ["big"] and hashed == []

    ip.user_ns["big"] = ip.user_ns["big"].copy()  # a new array, the same bytes: hashed once, not sent
    run(ip, "%%kt --name perf-transit\ns = int(big[0])")
    assert magics(ip).last_outcome.pushed == [] and magics(ip).last_outcome.skipped_unchanged == ["big"]
    assert hashed == [BIG]

    hashed.clear()
    run(ip, f"%%kt --name perf-transit\nimport numpy as np\nmade = np.full({BIG // 8}, 3)")
    made = ip.user_ns["made"]
    assert int(made.sum()) == 3 * (BIG // 8) and hashed == []  # pulled: the pod's digests came with it
    monkeypatch.setattr(P, "buffer_digest", real)
    assert conn_of().held["made"].fingerprint == P.fingerprint(made.copy())


def test_a_big_global_is_not_read_again_on_its_first_unchanged_rerun(ip, monkeypatch):
    """A big array pushed (or pulled) once crossed the bulk channel with its digests: its memory in the notebook
    is write-protected then (as the pod's is when it arrives), so the first rerun of a cell that reads it
    unchanged reads nothing to learn so (it hashed the array, 70-80 ms per GiB here, on the first two reruns).
    A write in place after that is still seen, and the array sent again."""

    tracker = write_tracking.tracker()
    if not tracker.available:  # no userfaultfd here: every rerun hashes, which is always correct
        return
    hashed: list[int] = []
    real = P.buffer_digest
    monkeypatch.setattr(P, "buffer_digest", lambda data: hashed.append(data.nbytes) or real(data))
    ip.user_ns["big"] = np.arange(BIG // 8, dtype=np.int64)
    run(ip, "%%kt --name perf-first\ns = int(big[-1])")
    assert magics(ip).last_outcome.pushed == ["big"] and hashed == []
    run(ip, "%%kt --name perf-first\ns = int(big[-2])")
    assert magics(ip).last_outcome.skipped_unchanged == ["big"] and ip.user_ns["s"] == BIG // 8 - 2
    assert hashed == []  # vouched for: not read again
    run(ip, f"%%kt --name perf-first\nimport numpy as np\nmade = np.full({BIG // 8}, 3)")
    run(ip, "%%kt --name perf-first\nt = int(made[0]) + int(big[0])")
    assert magics(ip).last_outcome.skipped_unchanged == ["big", "made"] and ip.user_ns["t"] == 3
    assert hashed == []  # the pulled array too
    ip.user_ns["big"][3] = -1  # written here in place: seen, and sent again
    ip.user_ns["made"][0] = 4
    run(ip, "%%kt --name perf-first\nt = int(made[0]) + int(big[3])")
    assert sorted(magics(ip).last_outcome.pushed) == ["big", "made"] and ip.user_ns["t"] == 3


def test_a_new_mid_size_array_is_sent_at_once_and_fingerprinted_from_its_digest_in_transit(ip, monkeypatch):
    """From 1 MiB (the bulk channel) a value has a head digest: a new array whose head differs from the held
    one's is sent without being hashed first, and its bytes are hashed only as they go (the bulk trailer's
    digest): neither side reads them again for its fingerprint, the pod's tracker vouches for them from their
    arrival (before: the pod hashed a fresh 1-64 MiB array twice on the cell's path). One with the same bytes
    is hashed before, and not sent."""
    import inspect

    callers: list[str] = []
    hashed: list[int] = []
    real, real_digest = P.fingerprint, P.buffer_digest

    def spy(value, *args, **kwargs):
        if isinstance(value, np.ndarray):
            callers.append(inspect.stack()[1].function)
        return real(value, *args, **kwargs)

    def digest_spy(data):
        hashed.append(data.nbytes)
        return real_digest(data)

    monkeypatch.setattr(conn_mod.P, "fingerprint", spy)
    monkeypatch.setattr(P, "buffer_digest", digest_spy)
    mid = np.arange(2 * 2**20 // 8, dtype=np.int64)
    ip.user_ns["mid"] = mid
    run(ip, "%%kt --name perf-mid\nfrom pod_kernel import write_tracking\nv0 = write_tracking.tracker().vouched")
    run(ip, "%%kt --name perf-mid\ns = int(mid[-1])")
    assert magics(ip).last_outcome.pushed == ["mid"] and callers == ["_record_push"] and hashed == []
    conn = next(c for c in conn_mod.connections() if c.name == "perf-mid")
    assert conn.held["mid"].fingerprint == real(mid.copy())  # (hashes the copy: the spy sees it)
    callers.clear()
    hashed.clear()
    ip.user_ns["mid"] = mid + 1
    run(ip, "%%kt --name perf-mid\ns = int(mid[-1])\nv = write_tracking.tracker().vouched - v0")
    assert ip.user_ns["s"] == len(mid) and magics(ip).last_outcome.pushed == ["mid"]
    assert callers == ["_record_push"] and hashed == []
    assert conn.held["mid"].fingerprint == real(ip.user_ns["mid"].copy())
    if write_tracking.tracker().available:  # the pod (this machine's kernel): taken, checked, taken, unread
        assert ip.user_ns["v"] >= 3
    callers.clear()
    ip.user_ns["mid"] = ip.user_ns["mid"].copy()  # a new array, the same bytes: hashed first, not sent
    run(ip, "%%kt --name perf-mid\ns = int(mid[0])")
    assert magics(ip).last_outcome.pushed == [] and magics(ip).last_outcome.skipped_unchanged == ["mid"]
    assert callers == ["_push"]
