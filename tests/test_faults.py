"""Faults from the machine and hostile neighbours: a full disk, a log flood, fd exhaustion, killed bulk
clients, abandoned tickets, an interrupt storm. The pod kernel must survive every one with its variables.

Every test runs a real pod kernel process (``python -m pod_kernel``) on 127.0.0.1 and waits on
conditions with deadlines. Figures measured (RSS, fds, log sizes) go to ``test-artifacts/reliability.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from figures import record
from websockets.exceptions import ConnectionClosed
from wire import closed_by_peer, raw_connect

from kt_jupyter.client import Session
from pod_kernel import protocol as P

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


class Pod:
    """A pod kernel process started with the given options, and a connected session to it."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, session: Session) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.token = token
        self.session = session

    @property
    def bulk_port(self) -> int:
        """The pod's bulk channel port (from the session's welcome)."""
        return int(self.session._conn.welcome["bulk_port"])

    def rss(self) -> int:
        """Resident bytes of the pod kernel."""
        return psutil.Process(self.pid).memory_info().rss

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None


@contextmanager
def pod_kernel(tmp_path: Path, *args: str, stdout: Path | None = None, **env: str) -> Iterator[Pod]:
    """Start ``python -m pod_kernel *args`` (stdout/stderr appended to ``stdout``), as the local backend does."""
    token = secrets.token_urlsafe(32)
    read_fd, write_fd = os.pipe()
    penv = dict(os.environ, KT_TOKEN=token, KT_READY_FD=str(write_fd), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), **env)
    if "--cells-dir" not in args:
        args = ("--cells-dir", str(tmp_path / "cells"), *args)
    out_path = stdout or tmp_path / "stdout.log"
    with open(out_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-Xfrozen_modules=off", "-m", "pod_kernel", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=penv,
                                pass_fds=(write_fd,), start_new_session=True, cwd=tmp_path)
    os.close(write_fd)
    session = None
    try:
        line = b""
        deadline = time.monotonic() + 30
        while b"\n" not in line:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "pod kernel not ready within 30 s"
            if select.select([read_fd], [], [], remaining)[0]:
                data = os.read(read_fd, 4096)
                assert data, f"pod kernel exited while starting:\n{out_path.read_text()[-3000:]}"
                line += data
        port = int(json.loads(line.split(b"\n", 1)[0])["port"])
        session = Session(f"ws://127.0.0.1:{port}", token, name="faults", bulk_host="127.0.0.1",
                          reconnect_timeout_s=5)
        session.connect()
        yield Pod(proc, port, token, session)
    finally:
        os.close(read_fd)
        if session is not None:
            session.close_quietly()
        proc.kill()
        proc.wait(10)


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Wait until ``cond()`` is true; the seconds it took. Fails the test with ``what`` after ``timeout_s``."""
    t0 = time.monotonic()
    event = threading.Event()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"not within {timeout_s} s: {what}"
        event.wait(poll_s)  # a polling interval for a condition in another process, not a sleep-for-effect
    return time.monotonic() - t0


def stream_text(out: list[dict], name: str | None = None) -> str:
    """Text of the stream messages a cell sent (of stream ``name`` when given)."""
    return "".join(m["text"] for m in out if m.get("type") == "stream" and (name is None or m["name"] == name))


# ============================================================================ disk


@contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (skips the test when mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}; needs root or "
                    "CAP_SYS_ADMIN): test_unwritable_cell_file_is_a_warning_and_the_cell_runs injects the fault")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_never_kills_the_kernel_and_says_which_disk(tmp_path):
    """ENOSPC for real: cells and log on a 1 MiB tmpfs, filled by an output flood, then by a file."""
    with small_tmpfs(tmp_path / "disk") as disk, \
            pod_kernel(tmp_path, "--cells-dir", str(disk / "cells"), "--log-file", str(disk / "kernel.log"),
                       stdout=disk / "kernel.log") as pod:
        s = pod.session
        s.execute("state = {'precious': 42}")
        # an output flood: every byte is teed to kernel.log on the small disk, which fills up
        s.execute("for i in range(3000):\n    print('flood line', i, 'x' * 1000)", on_output=lambda m: None)
        assert pod.alive()
        assert s.execute("state['precious']").data == {"text/plain": "42"}
        # now the user's own file fills the disk: the next cell's file cannot be written
        s.execute(textwrap.dedent(f"""\
            f = open({str(disk / 'filler')!r}, 'wb')
            try:
                while True:
                    f.write(b'x' * 4096); f.flush()
            except OSError as e:
                filled = e.errno
            finally:
                try:
                    f.close()
                except OSError:
                    pass
            """))
        assert s.execute("filled").data == {"text/plain": "28"}  # ENOSPC
        out: list[dict] = []
        s.execute("state['before_debugger'] = 1", on_output=out.append)  # no debugger listens: no file to write
        assert "could not write" not in stream_text(out)
        s.debug()  # from now on each cell's file is written before it runs (the earlier ones too, here in vain)
        out.clear()
        r = s.execute("state['after'] = 1\nstate['precious'] + 1", on_output=out.append)
        assert r.data == {"text/plain": "43"}  # ran from memory
        said = stream_text(out, "stderr")
        assert "could not write this cell's file" in said and str(disk / "cells") in said, said
        assert "No space left on device" in said and "free on that disk" in said and "breakpoints" in said
        with pytest.raises(ZeroDivisionError) as info:  # a traceback still quotes the cell's lines (linecache)
            s.execute("x = 1\ny = x / 0")
        assert "y = x / 0" in info.value.remote_traceback
        os.remove(disk / "filler")
        out.clear()
        s.execute("print(sorted(state))", on_output=out.append)
        assert "could not write" not in stream_text(out) and "['after', 'before_debugger', 'precious']" in stream_text(out)
        assert pod.alive()
        record("disk", "full_disk_kernel_survived", True)


def test_unwritable_cell_file_is_a_warning_and_the_cell_runs(tmp_path):
    """The fault injected without a mount: the cells directory replaced by a file (ENOTDIR)."""
    with pod_kernel(tmp_path) as pod:
        s = pod.session
        s.execute("kept = 'yes'")
        cells = tmp_path / "cells"
        for p in cells.iterdir():
            p.unlink()
        cells.rmdir()
        cells.write_text("not a directory")
        s.debug()  # a debugger listens: each cell's file is written before it runs
        out: list[dict] = []
        assert s.execute("kept * 2", on_output=out.append).data == {"text/plain": "'yesyes'"}
        assert "could not write this cell's file" in stream_text(out, "stderr")
        assert pod.alive()


def test_debugger_cell_paths_are_confined(tmp_path):
    """A cell file name from the wire: relative names stay in cells/; absolute ones only in ipykernel's shape."""
    import tempfile

    with pod_kernel(tmp_path) as pod:
        s = pod.session
        s.execute("v = 7")
        outside = tmp_path / "outside.py"
        for bad in [str(outside), "/etc/passwd", f"{tempfile.gettempdir()}/ipykernel_1/../../x/1.py",
                    f"{tempfile.gettempdir()}/ipykernel_12/abc.py", f"{tmp_path}/nowhere/ipykernel_5/123.py"]:
            with pytest.raises(Exception, match="cell file") as info:
                s.write_cell_file(bad, "print(1)\n")
            assert type(info.value).__name__ in ("RemoteError", "CellFileError"), info.value
        assert not outside.exists()
        # a debugger path that is refused: the cell is an error that says so, and does not run
        with pytest.raises(Exception, match="cell file"):
            s.execute("v = 8", cell_name=str(outside))
        assert not outside.exists()
        assert s.execute("v").data == {"text/plain": "7"}
        # a relative name is confined to the cells directory (basename, sanitized); written once a debugger listens
        s.debug()
        s.execute("w = 1", cell_name="../../escape.py")
        assert not (tmp_path / "escape.py").exists() and (tmp_path / "cells" / "escape.py").exists()
        # JupyterLab's shape: <tmp>/ipykernel_<pid>/<digits>.py; the parent is made 0700
        good_dir = tmp_path / f"ipykernel_{os.getpid()}"
        good = good_dir / "4242.py"
        assert s.write_cell_file(str(good), "x = 1\n") is True
        assert good.read_text() == "x = 1\n" and (good_dir.stat().st_mode & 0o777) == 0o700
        assert s.write_cell_file(str(good), "x = 2\n") is False  # kept: the panel's breakpoints are set in it
        # a symlink planted at such a path is never followed
        target = tmp_path / "target.txt"
        target.write_text("keep")
        (good_dir / "77.py").symlink_to(target)
        with pytest.raises(Exception, match="cell file"):
            s.write_cell_file(str(good_dir / "77.py"), "evil\n")
        assert target.read_text() == "keep"
        assert pod.alive()


# ============================================================================ logs and cells


def log_files(path: Path) -> list[Path]:
    """kernel.log and its rotated copies."""
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_kernel_log_is_rotated_and_capped_under_a_flood(tmp_path):
    log = tmp_path / "kernel.log"
    max_bytes, backups = 1 * MiB, 2
    with pod_kernel(tmp_path, "--log-file", str(log), "--log-max-bytes", str(max_bytes),
                    "--log-backups", str(backups), stdout=log) as pod:
        s = pod.session
        s.execute("big = 'x' * (200 * 10**6)\nprint(big)\ndel big", on_output=lambda m: None)  # one 200 MB print
        after_print = sum(p.stat().st_size for p in log_files(log))
        s.execute("for i in range(100000):\n    print('line', i)", on_output=lambda m: None)  # many small writes
        # C-level writes straight to fd 1/2 (a subprocess, a C library) are caught by the periodic check
        s.execute("import os\nfor i in range(3000):\n    os.write(1, b'c-level ' * 128 + b'\\n')")
        wait_for(lambda: log.stat().st_size <= max_bytes, 10, "the periodic check rotates C-level writes")
        s.execute("print('the last line')")
        wait_for(lambda: "the last line" in log.read_text(errors="replace"), 10, "the newest line is in kernel.log")
        files = log_files(log)
        total = sum(p.stat().st_size for p in files)
        assert [p.name for p in files] == ["kernel.log", "kernel.log.1", "kernel.log.2"]
        assert total <= (backups + 1) * max_bytes + 64 * 1024, total
        assert after_print <= (backups + 1) * max_bytes + 64 * 1024, after_print
        assert pod.alive()
        record("logs", "log_bytes_after_200MB_print_and_flood", total)


def test_cells_dir_keeps_only_the_newest_cells(tmp_path):
    """Until a debugger listens, cells' files wait in memory (the newest 50 here); it writes them, then each
    cell's own before it runs, never more than 50 files."""
    with pod_kernel(tmp_path, KT_CELLS_KEPT="50") as pod:
        s = pod.session
        for i in range(80):
            s.execute(f"n = {i}", cell_name=f"kt-cell-{i}.py")
        assert list((tmp_path / "cells").iterdir()) == []
        s.debug()
        written = {p.name: p.read_text() for p in (tmp_path / "cells").iterdir()}
        assert written == {f"kt-cell-{i}.py": f"n = {i}" for i in range(30, 80)}
        for i in range(80, 110):
            s.execute(f"n = {i}", cell_name=f"kt-cell-{i}.py")
        names = sorted(p.name for p in (tmp_path / "cells").iterdir())
        assert names == sorted(f"kt-cell-{i}.py" for i in range(60, 110)), names
        assert s.execute("n").data == {"text/plain": "109"}
        with pytest.raises(ZeroDivisionError):  # the newest cell's file exists (tracebacks, debuggers)
            s.execute("1 / 0")
        record("logs", "cell_files_after_80_cells_keep_50", len(names))


# ============================================================================ bulk channel


def ws_request(ws, header: dict) -> dict:
    """Send one request on a raw connection; the first reply naming its id."""
    ws.send(P.encode_frame(header))
    while True:
        reply, _ = P.decode_frame(ws.recv(timeout=30))
        if reply.get("id") == header["id"]:
            return reply


def ticket_refused(pod: Pod, ticket: str) -> bool:
    """Whether the bulk port closes a connection that presents ``ticket`` without sending a byte."""
    with socket.create_connection(("127.0.0.1", pod.bulk_port), timeout=10) as sock:
        sock.sendall(bytes.fromhex(ticket))
        # a valid pull ticket streams its bytes at once; a valid push ticket waits for ours
        return closed_by_peer(sock, 5)


def test_bulk_channel_survives_fd_exhaustion(tmp_path):
    """An unauthenticated local peer exhausts the pod's fds: the accept thread backs off and carries on."""
    with pod_kernel(tmp_path) as pod:
        s = pod.session
        arr = np.arange(2 * MiB // 8, dtype=np.int64)
        s.push({"warm": arr})  # the bulk channel works
        proc = psutil.Process(pod.pid)
        fds_before = proc.num_fds()
        limit = fds_before + 16
        psutil.Process(pod.pid).rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
        peers = []
        try:
            for _ in range(40):  # more than the pod can hold: it reaches EMFILE on accept
                peers.append(socket.create_connection(("127.0.0.1", pod.bulk_port), timeout=10))
            wait_for(lambda: proc.num_fds() >= limit - 1, 10, "the pod's fds exhausted")
            log = tmp_path / "stdout.log"
            wait_for(lambda: "bulk channel: cannot accept" in log.read_text(), 10, "accept() failed with EMFILE")
            record("bulk", "fds_at_exhaustion", proc.num_fds())
        finally:
            for p in peers:
                p.close()
        t0 = time.monotonic()
        s.push({"after": arr})  # >= 1 MiB: over the bulk channel
        assert np.array_equal(s.pull(["after"])["after"], arr)
        took = time.monotonic() - t0
        assert took < 10, took
        assert pod.alive()
        wait_for(lambda: proc.num_fds() <= fds_before + 4, 10, "the peers' fds released")
        record("bulk", "fds_after_exhaustion_released", proc.num_fds())
        record("bulk", "push_pull_after_fd_exhaustion_s", round(took, 2))


def test_bulk_push_header_commits_no_memory_and_a_closed_connection_revokes_its_ticket(tmp_path):
    with pod_kernel(tmp_path) as pod:
        base = pod.rss()
        ws = raw_connect(pod.url, pod.token)
        P.decode_frame(ws.recv(timeout=10))  # welcome
        size = 512 * MiB
        ready = ws_request(ws, {"type": "push", "id": "p1", "serialization": "pickle", "sizes": [size],
                                "bulk": True})
        assert ready["type"] == "bulk_ready", ready
        grown = pod.rss() - base
        record("bulk", "rss_growth_after_bulk_push_header_bytes", grown)
        assert grown < 64 * MiB, grown  # nothing committed before the bytes arrive
        ws.close()
        deadline = time.monotonic() + 30  # the pod has seen the close (and revoked its tickets) once it
        while pod.session.metrics()["clients"] > 1 and time.monotonic() < deadline:  # counts one client
            time.sleep(0.05)
        # the connection that asked is gone: its ticket is revoked, the bulk port reads nothing for it
        assert ticket_refused(pod, ready["ticket"])
        assert pod.rss() - base < 64 * MiB
        assert pod.session.execute("1 + 1").data == {"text/plain": "2"}


def test_spare_tickets_let_push_bytes_come_with_or_before_their_header_and_die_with_it(tmp_path):
    """Each connection holds two spare bulk tickets (welcome), replaced as they are used: a push naming one
    needs no round trip for a ticket, and its bytes may even arrive before its header. A header naming no
    spare of this connection is refused; a refused push ends the connection that presented its spare, unread;
    a closed connection revokes its spares."""
    from pod_kernel import bulk

    def bulk_send(ticket: str, parts, before: Callable[[], None] = lambda: None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", pod.bulk_port), timeout=30)
        sock.sendall(bytes.fromhex(ticket))
        before()
        if parts is not None:
            bulk.send_parts(sock, parts)
        return sock

    def frames_until(ws, req_id: str) -> list[dict]:
        seen = []
        while True:
            header, _ = P.decode_frame(ws.recv(timeout=30))
            seen.append(header)
            if header.get("id") == req_id and header["type"] in ("reply", "error_reply", "bulk_ready"):
                return seen

    with pod_kernel(tmp_path) as pod:
        ws = raw_connect(pod.url, pod.token)
        welcome, _ = P.decode_frame(ws.recv(timeout=10))
        spares = welcome["bulk_spares"]
        assert len(spares) == 2 and all(len(t) == 2 * bulk.TICKET_BYTES for t in spares)
        value = np.arange(3 * MiB // 8, dtype=np.int64)
        bundle = P.dump_values({"early": value})
        # the ticket and bytes go first (a thread: the pod reads them once the header has bound the ticket)
        presented = threading.Event()
        sender = threading.Thread(target=lambda: bulk_send(spares[0], bundle.parts, presented.set).close())
        sender.start()
        assert presented.wait(10)
        ws.send(P.encode_frame({"type": "push", "id": "e1", "serialization": "pickle", "sizes": bundle.sizes,
                                "bulk": True, "ticket": spares[0]}))
        seen = frames_until(ws, "e1")
        sender.join(30)
        assert seen[-1]["type"] == "reply" and seen[-1]["names"] == ["early"], seen
        assert [h["type"] for h in seen].count("bulk_ready") == 0
        replacement = [h["ticket"] for h in seen if h["type"] == "spare_ticket"]
        assert len(replacement) == 1 and replacement[0] not in spares
        assert pod.session.execute("int(early[-1])").data == {"text/plain": str(value[-1])}
        assert ticket_refused(pod, spares[0])  # used: single-use as any ticket

        # a ticket that is not a spare of this connection: refused, nothing bound
        ws.send(P.encode_frame({"type": "push", "id": "e2", "serialization": "pickle", "sizes": bundle.sizes,
                                "bulk": True, "ticket": secrets.token_hex(bulk.TICKET_BYTES)}))
        refused = frames_until(ws, "e2")[-1]
        assert refused["type"] == "error_reply" and refused["ename"] == "BulkTicketRefused", refused

        # a push refused for its size: the connection that presented its spare ends, unread
        waiting = bulk_send(spares[1], None)
        ws.send(P.encode_frame({"type": "push", "id": "e3", "serialization": "pickle", "sizes": [1 << 50],
                                "bulk": True, "ticket": spares[1]}))
        assert frames_until(ws, "e3")[-1]["ename"] == "MemoryError"
        waiting.settimeout(10)
        assert waiting.recv(1) == b""
        waiting.close()

        # the connection closes: its spare (the replacement) is revoked, and a transfer waiting on one ends
        waiting = bulk_send(replacement[0], None)
        ws.close()
        waiting.settimeout(10)
        assert waiting.recv(1) == b""
        waiting.close()
        assert pod.session.execute("1 + 1").data == {"text/plain": "2"}


def test_transfers_reuse_their_threads():
    """Starting a thread costs 0.1-0.3 ms here: a transfer takes a waiting one."""
    from pod_kernel import bulk

    server = bulk.BulkServer("127.0.0.1")
    try:
        def names() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name == "kt-bulk"]

        before = len(names())
        for i in range(5):
            received = [bytearray(2 * MiB)]
            done = threading.Event()
            ticket = server.issue(True, received, lambda _error: done.set())
            bulk.client_transfer(("127.0.0.1", server.port), ticket, send=[memoryview(bytes([i]) * (2 * MiB))])
            assert done.wait(10) and received[0][:1] == bytes([i])
        assert len(names()) - before == 1
    finally:
        server.close()



def test_an_abort_ends_its_own_transfer_at_once_and_never_another():
    """bulk.Abort (a Ctrl-C in the notebook) shuts its transfer's connection down from another thread: the send
    stops within a piece and the pod's receive fails. A connection kept after its transfer ended is no longer
    that abort's: a late Ctrl-C must not cut the next transfer on it. An abort set before the transfer began
    sends nothing."""
    from pod_kernel import bulk

    server = bulk.BulkServer("127.0.0.1")
    address = ("127.0.0.1", server.port)
    try:
        def push(i: int, abort: bulk.Abort | None = None) -> None:
            received, done = [bytearray(2 * MiB)], threading.Event()
            ticket = server.issue(True, received, lambda _error: done.set())
            bulk.client_transfer(address, ticket, send=[memoryview(bytes([i]) * (2 * MiB))], reuse_s=30.0,
                                 abort=abort)
            assert done.wait(10) and received[0] == bytes([i]) * (2 * MiB)

        late = bulk.Abort()
        push(1, late)
        late.set()  # after its transfer: the kept connection carries the next one
        push(2)
        assert server.accepted == 1

        errors: list[BaseException | None] = []
        ended = threading.Event()
        ticket = server.issue(True, [bytearray(64 * MiB)], lambda error: (errors.append(error), ended.set()))
        abort = bulk.Abort()

        def paced(_done: int, _total: int) -> None:  # 8 pieces of 8 MiB, 0.3 s each: 2.4 s in all
            time.sleep(0.3)

        threading.Timer(0.4, abort.set).start()
        t0 = time.monotonic()
        with pytest.raises(bulk.TransferAborted):
            bulk.client_transfer(address, ticket, send=[memoryview(bytearray(64 * MiB))], progress=paced,
                                 reuse_s=30.0, abort=abort)
        assert time.monotonic() - t0 < 1.2
        assert ended.wait(10) and isinstance(errors[0], ConnectionError)  # the pod's receive failed
        push(3)  # the aborted connection was not kept; the next transfer works

        ended.clear()
        ticket = server.issue(True, [bytearray(2 * MiB)], lambda _error: ended.set())
        early = bulk.Abort()
        early.set()
        with pytest.raises(bulk.TransferAborted):
            bulk.client_transfer(address, ticket, send=[memoryview(bytes(2 * MiB))], reuse_s=30.0, abort=early)
    finally:
        server.close()

def test_a_bulk_connection_is_kept_for_the_next_ticket_and_given_up_when_the_pod_closed_it(monkeypatch):
    """After a clean transfer the connection waits for its next ticket (KEEPALIVE_S): the client's next
    transfer, either way, skips the connect, the accept and the hand-off. A kept connection the pod closed
    (it stopped keeping it), or one that breaks before the transfer went, is given up for a new one, and the
    transfer is made there; one that presents an unknown or a lane ticket is closed, unread. A pod that keeps no
    more connections says so, and the client does not keep that one."""
    from pod_kernel import bulk

    server = bulk.BulkServer("127.0.0.1")
    address = ("127.0.0.1", server.port)
    try:
        def push(i: int, reuse_s: float = 30.0) -> None:
            received, done = [bytearray(2 * MiB)], threading.Event()
            ticket = server.issue(True, received, lambda _error: done.set())
            bulk.client_transfer(address, ticket, send=[memoryview(bytes([i]) * (2 * MiB))], reuse_s=reuse_s)
            assert done.wait(10) and received[0] == bytes([i]) * (2 * MiB)

        def pull(i: int, reuse_s: float = 30.0) -> None:
            ticket = server.issue(False, [memoryview(bytes([i]) * (2 * MiB))], lambda _error: None)
            into = [bytearray(2 * MiB)]
            bulk.client_transfer(address, ticket, receive=into, reuse_s=reuse_s)
            assert into[0] == bytes([i]) * (2 * MiB)

        for i in range(3):
            push(i)
            pull(i)
        assert server.accepted == 1  # six transfers, one connection

        server.keepalive_s = 0.2  # the pod stops keeping it: the client finds it closed, and connects again
        push(3)
        time.sleep(0.6)
        pull(4, reuse_s=100.0)
        assert server.accepted == 2
        server.keepalive_s = 30.0

        monkeypatch.setattr(bulk, "_quiet", lambda sock: True)  # it broke just after the client looked
        for kept in list(bulk._kept._idle.get(address, [])):
            kept[1].shutdown(socket.SHUT_RDWR)
        push(5)
        assert server.accepted == 3
        for kept in list(bulk._kept._idle.get(address, [])):
            kept[1].shutdown(socket.SHUT_RDWR)
        pull(6)
        assert server.accepted == 4
        monkeypatch.undo()

        sock = bulk._kept.take(address, 10.0)
        assert sock is not None
        sock.sendall(secrets.token_bytes(bulk.TICKET_BYTES))  # unknown on a kept connection: closed, unread
        assert sock.recv(1) == b""
        sock.close()
        push(7)
        lane = server.issue_lane(object(), lambda conn: True)
        sock = bulk._kept.take(address, 10.0)
        assert sock is not None
        sock.sendall(bytes.fromhex(lane))  # a lane starts on a connection of its own only
        assert sock.recv(1) == b""
        sock.close()
        monkeypatch.setattr(bulk, "MAX_KEPT", 0)  # keeps none: says nothing, closes it after the transfer
        before = server.accepted
        push(8)
        assert not bulk._kept._idle.get(address)
        pull(9)
        assert server.accepted == before + 2
    finally:
        server.close()


def test_a_kept_bulk_connection_does_not_hold_what_it_received():
    """While a connection waits for its next ticket, the buffers of its last transfer are not referenced by it:
    a pushed value's memory goes (back to the receive pool) when the value goes, not when the connection does."""
    import gc
    import mmap
    import weakref

    from pod_kernel import bulk

    server = bulk.BulkServer("127.0.0.1")
    try:
        part = mmap.mmap(-1, 2 * MiB)
        gone, done = weakref.ref(part), threading.Event()
        ticket = server.issue(True, [part], lambda _error: done.set())
        del part
        bulk.client_transfer(("127.0.0.1", server.port), ticket, send=[memoryview(b"m" * (2 * MiB))], reuse_s=30.0)
        assert done.wait(10)
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:  # the ticket's thread lets go as it returns
            gc.collect()
            time.sleep(0.01)
        assert gone() is None and bulk._kept._idle.get(("127.0.0.1", server.port))  # freed, and still kept
    finally:
        server.close()


def test_a_presented_spare_waits_for_its_header_and_gives_up_in_time(monkeypatch):
    """A connection that presented a spare ticket waits for the push header that binds it, not forever; a spare
    is bound only by its own connection, and a connection holds SPARES_PER_OWNER at most."""
    from pod_kernel import bulk

    monkeypatch.setattr(bulk, "SPARE_BIND_WAIT_S", 0.3)
    server = bulk.BulkServer("127.0.0.1")
    try:
        owner, other = object(), object()
        spares = [server.reserve(owner) for _ in range(bulk.SPARES_PER_OWNER)]
        assert all(spares) and server.reserve(owner) is None and server.reserve(other) is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(bytes.fromhex(spares[0]))
            t0 = time.monotonic()
            assert sock.recv(1) == b""  # no header came: closed, unread
            assert time.monotonic() - t0 < 5
        assert not server.bind(spares[0], owner, [bytearray(8)], lambda _error: None)  # given up: gone
        assert not server.bind(spares[1], other, [bytearray(8)], lambda _error: None)  # not its spare
        received, done = [bytearray(2 * MiB)], threading.Event()
        assert server.bind(spares[1], owner, received, lambda _error: done.set())
        bulk.client_transfer(("127.0.0.1", server.port), spares[1], send=[memoryview(b"k" * (2 * MiB))])
        assert done.wait(10) and received[0] == b"k" * (2 * MiB)
    finally:
        server.close()


def test_pull_tickets_expire_and_free_their_memory(tmp_path):
    with pod_kernel(tmp_path, KT_BULK_TICKET_TTL_S="1") as pod:
        s = pod.session
        s.execute("big = b'x' * (128 * 2**20)")  # bytes pickle in-band: each pull's bundle is a 128 MiB copy
        base = pod.rss()
        ws = raw_connect(pod.url, pod.token)
        P.decode_frame(ws.recv(timeout=10))
        tickets = []
        for i in range(2):  # two pulls whose tickets nobody presents (the connection stays open)
            reply = ws_request(ws, {"type": "pull", "id": f"u{i}", "names": ["big"], "serialization": "pickle",
                                    "bulk": True})
            tickets.append(reply["bulk"])
        pinned = pod.rss() - base
        assert pinned > 200 * MiB, pinned  # what the tickets hold until they are used or expire
        took = wait_for(lambda: pod.rss() <= base + 32 * MiB, 8, "expired pull tickets released")
        record("bulk", "rss_pinned_by_two_unused_pull_tickets_bytes", pinned)
        record("bulk", "pull_ticket_expiry_release_s", round(took, 2))
        assert ticket_refused(pod, tickets[0])  # past the TTL: closed, nothing sent
        ws.close()
        assert s.execute("len(big)").data == {"text/plain": str(128 * MiB)}


KILLED_PUSHER = """
import os, sys, numpy as np
from kt_jupyter.client import Session
s = Session(sys.argv[1], os.environ.pop("KT_TOKEN"), bulk_host="127.0.0.1")
s.connect()
arr = np.ones(1024 * 2**20 // 8)
def progress(done, total):
    if done >= total // 4:
        print("quarter", flush=True)
        import time; time.sleep(60)  # stalls mid-push until the test kills it
s.push({"big": arr}, on_progress=progress)
"""


def test_client_killed_mid_push_leaves_no_memory_held(tmp_path):
    with pod_kernel(tmp_path) as pod:
        base = pod.rss()
        client = subprocess.Popen([sys.executable, "-c", KILLED_PUSHER, pod.url], stdout=subprocess.PIPE,
                                  env=dict(os.environ, KT_TOKEN=pod.token,
                                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
        try:
            ready = select.select([client.stdout], [], [], 60)[0]
            assert ready and client.stdout.readline().strip() == b"quarter"
            peak = pod.rss()
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        took = wait_for(lambda: pod.rss() <= base + 64 * MiB, 5, "the killed push's memory released")
        record("bulk", "rss_mid_push_bytes", peak - base)
        record("bulk", "rss_after_killed_push_bytes", pod.rss() - base)
        record("bulk", "killed_push_release_s", round(took, 2))
        assert pod.session.execute("'big' in dir()").data == {"text/plain": "False"}


# ============================================================================ interrupts


def test_interrupt_storm_never_kills_the_kernel(tmp_path):
    """2000 interrupts as fast as two connections send them while short cells run and end: the kernel lives,
    its state is intact and every cell got its one execute_reply."""
    with pod_kernel(tmp_path) as pod:
        s = pod.session
        s.execute("state = 'precious'\ncount = 0")
        sent = [0, 0]

        def storm(k: int) -> None:
            ws = raw_connect(pod.url, pod.token)
            P.decode_frame(ws.recv(timeout=10))  # welcome
            try:
                for i in range(1000):
                    ws_request(ws, {"type": "interrupt", "id": f"i{k}-{i}"})
                    sent[k] += 1
            except (ConnectionClosed, TimeoutError, OSError):
                return  # the pod died: the cells below say so
            finally:
                ws.close()

        threads = [threading.Thread(target=storm, args=(k,), daemon=True) for k in range(2)]
        cells = raw_connect(pod.url, pod.token)
        P.decode_frame(cells.recv(timeout=10))
        n_cells = 400
        for i in range(n_cells):  # queued at once: cells start and end back to back under the storm
            code = "count += 1" if i % 2 else "for _ in range(300):\n    print(_)"
            cells.send(P.encode_frame({"type": "execute", "id": f"c{i}", "code": code}))
        for t in threads:
            t.start()
        replies: dict[str, int] = {}
        interrupted = 0
        deadline = time.monotonic() + 60
        while len(replies) < n_cells:
            assert time.monotonic() < deadline and pod.alive(), f"pod kernel died after {sum(sent)} interrupts"
            try:
                header, _ = P.decode_frame(cells.recv(timeout=1))
            except TimeoutError:
                continue
            except ConnectionClosed:
                pytest.fail(f"the pod kernel closed the connection after {sum(sent)} interrupts "
                            f"(alive: {pod.alive()}):\n{(tmp_path / 'stdout.log').read_text()[-2000:]}")
            if header["type"] == "execute_reply":
                replies[header["id"]] = replies.get(header["id"], 0) + 1
                interrupted += header.get("ename") == "KeyboardInterrupt"
        for t in threads:
            t.join(30)
        cells.close()
        assert pod.alive() and sum(sent) == 2000
        assert set(replies.values()) == {1} and len(replies) == n_cells
        assert s.execute("state").data == {"text/plain": "'precious'"}
        count = int(s.execute("count").data["text/plain"])
        assert 0 < count <= n_cells // 2
        record("interrupts", "storm_interrupts_sent", sum(sent))
        record("interrupts", "storm_cells_replied", len(replies))
        record("interrupts", "storm_cells_interrupted", interrupted)


def test_local_kernels_rotate_their_log_and_logs_reads_across_the_rotation(local_backend, monkeypatch):
    """The local backend's kernels cap kernel.log; `%kt logs` still gives the last N lines right after a rotation."""
    from kt_jupyter.compute import Compute

    monkeypatch.setenv("KT_LOG_MAX_BYTES", str(64 << 10))
    handle = local_backend.launch(Compute(name="rot"))
    s = handle.session()
    s.execute("for i in range(20000):\n    print(f'line {i:05d}')")  # ~220 KB of output, teed to the log
    s.execute("print('last line')")
    s.close()
    log = local_backend.log_path("rot")
    files = [p for p in log.parent.iterdir() if p.name.startswith("kernel.log")]
    assert sum(p.stat().st_size for p in files) <= 4 * (64 << 10) + (16 << 10), [p.stat().st_size for p in files]
    assert (log.parent / "kernel.log.1").exists()
    in_current = len(log.read_text().splitlines())
    tail = local_backend.logs("rot", tail=in_current + 2000).splitlines()
    assert len(tail) == in_current + 2000  # the current file alone has too few: the rest comes from kernel.log.1
    assert any("last line" in line for line in tail[-5:])
    numbered = [line for line in tail if line.startswith("[cell] line ")]
    assert numbered == sorted(numbered) and len(numbered) > 2000, len(numbered)
