"""A pod kernel bound to ``::`` (as in a pod: :data:`kt_jupyter.startup.KERNEL_HOST`) serves IPv4 and IPv6 clients.

asyncio and ``socket.create_server`` set ``IPV6_V6ONLY`` on IPv6 sockets, so a
plain bind of ``::`` would shut IPv4 out (and ``0.0.0.0`` shuts IPv6-only
clusters out). Both the WebSocket and the bulk channel go through
:func:`pod_kernel.bulk.listen_socket`; this runs the real process.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kt_jupyter.client import Session
from kt_jupyter.startup import KERNEL_HOST
from pod_kernel.bulk import listen_socket

TOKEN = "dual-stack-test-token-0123456789"

needs_dual_stack = pytest.mark.skipif(not (socket.has_ipv6 and socket.has_dualstack_ipv6()),
                                      reason="this host has no dual-stack IPv6")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dual_stack
def test_listen_socket_takes_ipv4_and_ipv6_on_double_colon():
    with listen_socket("::", 0) as server:
        port = server.getsockname()[1]
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=5):
                conn, _ = server.accept()
                conn.close()
    with listen_socket("127.0.0.1", 0) as v4only:  # any other address binds as given
        assert v4only.family == socket.AF_INET


@needs_dual_stack
def test_pod_kernel_on_double_colon_serves_both_families_and_the_fixed_bulk_port(tmp_path):
    assert KERNEL_HOST == "::"
    bulk_port = _free_port()
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, KT_TOKEN=TOKEN, KT_READY_FD=str(write_fd), KT_BULK_PORT=str(bulk_port))
    proc = subprocess.Popen([sys.executable, "-m", "pod_kernel", "--host", KERNEL_HOST, "--port", "0",
                             "--cells-dir", str(tmp_path / "cells")], env=env, pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 30
        buf = b""
        while b"\n" not in buf:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the pod kernel did not report ready within 30 s"
            chunk = os.read(read_fd, 4096)
            assert chunk, "the pod kernel exited before it was ready"
            buf += chunk
        port = json.loads(buf.split(b"\n", 1)[0])["port"]
        for host, url_host in (("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")):
            session = Session(f"ws://{url_host}:{port}", TOKEN, name="dual", bulk_host=host)
            welcome = session.connect()
            assert welcome["bulk_port"] == bulk_port  # KT_BULK_PORT fixes it (a Service and a policy name it)
            blob = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: over the bulk channel
            session.push({"blob": blob})
            assert session.execute("float(blob.sum())").data == {"text/plain": repr(float(blob.sum()))}
            session.close()
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("host", ["127.0.0.1", "::"])
def test_listening_sockets_turn_nagle_off_for_every_connection(host):
    """Without TCP_NODELAY on the accepted socket every small reply waits for the peer's 40 ms delayed ACK
    (a warm cell took 44 ms instead of 2.5 ms): asyncio sets it only on sockets whose protocol says TCP."""
    import asyncio

    listener = listen_socket(host, 0)
    port = listener.getsockname()[1]
    seen: dict = {}

    async def main() -> None:
        accepted = asyncio.Event()

        async def on_client(reader, writer):
            sock = writer.get_extra_info("socket")
            seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            accepted.set()
            writer.close()

        server = await asyncio.start_server(on_client, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await accepted.wait()
            writer.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert seen["nodelay"] != 0
