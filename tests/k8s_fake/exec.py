"""The API server's WebSocket subresources for the fake cluster: frames, and ``pods/exec`` (a test double).

A real API server upgrades ``GET .../pods/NAME/exec?command=sh&command=-c&...``
to a WebSocket speaking one of the ``*.channel.k8s.io`` subprotocols (the
first of the client's list it knows: ``v5.channel.k8s.io``, else
``v4.channel.k8s.io``). Every binary (or text) message is one channel byte
and its data: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize (JSON
``{"Width": W, "Height": H}``); with v5 a client may send ``255 <channel>`` to
close one (its stdin). When the command ends the server sends one Status on
the error channel — ``{"metadata":{},"status":"Success"}``, or ``Failure``
with reason ``NonZeroExitCode`` and ``details.causes[{reason: ExitCode,
message: "N"}]`` — and closes. With ``tty=true`` the command runs on a
terminal and its stderr is that terminal (no channel 2).

Here the command runs as a local process in the fake container's working
directory with its environment (:data:`FakeStore.exec_resolver`, which
:func:`install_exec` sets from the fake kubelet's running containers), on a
real pty when ``tty=true``.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pty
import select
import struct
import subprocess
import termios
import threading
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qs

import psutil
from websockets.frames import apply_mask

from .store import FakeApiError

if TYPE_CHECKING:
    from .kubelet import FakeKubelet

#: Subprotocols the fake serves, in the order it prefers them.
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
#: Seconds the server waits for the client's close frame after its own, as a real one does.
CLOSE_WAIT_S = 10.0
#: Bytes read from the command's output per message.
EXEC_READ_BYTES = 32 << 10
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def unmask(data: bytes, mask: bytes) -> bytes:
    """A client frame's payload XORed with its 4-byte mask (websockets' C routine: GB/s, not the fake's cost)."""
    if not data or mask == b"\0\0\0\0":
        return data
    return apply_mask(data, mask)


class ServerWebSocket:
    """The server end of one upgraded connection: whole frames out (thread-safe) and in (RFC 6455)."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self.rfile, self.wfile = rfile, wfile
        self._lock = threading.Lock()

    @staticmethod
    def accept_key(key: str) -> str:
        """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key``."""
        return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()

    def send(self, opcode: int, payload: bytes, *more: bytes | memoryview) -> None:
        """One unmasked frame (0x2 binary, 0x8 close, 0xA pong) of ``payload`` and ``more``, written without joining."""
        n = len(payload) + sum(len(part) for part in more)
        head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else
                                         b"\x7e" + struct.pack(">H", n) if n < 1 << 16 else
                                         b"\x7f" + struct.pack(">Q", n))
        with self._lock:
            self.wfile.write(head + payload)
            for part in more:
                self.wfile.write(part)
            self.wfile.flush()

    def recv(self) -> tuple[int, bytes] | None:
        """The next frame's (opcode, unmasked payload); None when the connection ended."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        return opcode, unmask(self.rfile.read(n), mask)


def exit_status(code: int) -> dict[str, Any]:
    """The Status the API sends on the error channel when the command ended with ``code``."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command, exit code {code}",
            "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def exec_failure(message: str) -> dict[str, Any]:
    """The Status of a command that could not start (the runtime's error, as the API relays it)."""
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError",
            "details": {"causes": [{"message": message}]}, "code": 500}


def serve_exec(handler: Any, ns: str, pod: str, raw_query: str) -> None:
    """Answer ``pods/exec`` on ``handler`` (a BaseHTTPRequestHandler): the upgrade, then the command's streams."""
    store = handler.server.store
    query = parse_qs(raw_query)
    flag = {k: (v[-1] in ("true", "1", "True")) for k, v in query.items() if k in ("stdin", "stdout", "stderr", "tty")}
    argv, container = query.get("command") or [], (query.get("container") or [""])[-1]
    if store.get("pods", ns, pod) is None:
        raise FakeApiError(404, "NotFound", f'pods "{pod}" not found')
    if handler.headers.get("Upgrade", "").lower() != "websocket":
        raise FakeApiError(400, "BadRequest", "Upgrade request required")
    if not argv:
        raise FakeApiError(400, "BadRequest", "you must specify at least 1 command")
    if not any(flag.get(k) for k in ("stdin", "stdout", "stderr")):
        raise FakeApiError(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr")
    offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocol = next((p for p in offered if p in EXEC_PROTOCOLS), None)
    if protocol is None:
        raise FakeApiError(400, "BadRequest", f"unsupported WebSocket subprotocols {offered}")
    target = store.exec_resolver(ns, pod, container) if store.exec_resolver else None
    if target is None:
        raise FakeApiError(400, "BadRequest", f'container {container!r} in pod "{pod}" is not running')
    handler.send_response(101)
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", ServerWebSocket.accept_key(handler.headers["Sec-WebSocket-Key"]))
    handler.send_header("Sec-WebSocket-Protocol", protocol)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    ws = ServerWebSocket(handler.rfile, handler.wfile)
    _run(ws, argv, *target, tty=flag.get("tty", False), stdin=flag.get("stdin", False),
         stderr=flag.get("stderr", False))


def _run(ws: ServerWebSocket, argv: list[str], cwd: str, env: dict[str, str], *, tty: bool, stdin: bool,
         stderr: bool) -> None:
    """Run ``argv`` and relay its streams over ``ws`` until it ends; then the exit Status and a close frame."""
    master = None
    try:
        if tty:
            master, slave = pty.openpty()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                    start_new_session=True,  # then the pty becomes its controlling terminal:
                                    preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509 - no lock
            os.close(slave)
            outputs = {master: STDOUT}
        else:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
                                    start_new_session=True)
            outputs = {proc.stdout.fileno(): STDOUT}
            if proc.stderr is not None:
                outputs[proc.stderr.fileno()] = STDERR
    except OSError as exc:
        ws.send(0x2, bytes([ERROR]) + json.dumps(exec_failure(
            f"failed to exec in container: failed to start exec: OCI runtime exec failed: exec failed: "
            f"unable to start container process: exec: {argv[0]!r}: {exc.strerror}: unknown")).encode())
        ws.send(0x8, b"")
        return
    writer = master if tty else (proc.stdin.fileno() if proc.stdin else None)
    reader = threading.Thread(target=_from_client, args=(ws, proc, writer, master), daemon=True)
    reader.start()
    while outputs:
        ready, _, _ = select.select(list(outputs), [], [])
        for fd in ready:
            try:
                data = os.read(fd, EXEC_READ_BYTES)
            except OSError:  # EIO: every process on the pty has exited
                data = b""
            if data:
                ws.send(0x2, bytes([outputs[fd]]) + data)
            else:
                outputs.pop(fd)
    code = proc.wait()
    try:
        ws.send(0x2, bytes([ERROR]) + json.dumps(exit_status(128 - code if code < 0 else code)).encode())
        ws.send(0x8, b"")
        # the closing handshake: the connection stays until the client's close frame (or it goes away), so
        # output it has not read yet is not dropped by a reset
        reader.join(CLOSE_WAIT_S)
    except OSError:
        pass
    finally:
        if master is not None:
            os.close(master)


def _from_client(ws: ServerWebSocket, proc: subprocess.Popen, writer: int | None, master: int | None) -> None:
    """Stdin, resizes and stream closes from the client, until it closes; hang up the command if it goes first."""
    try:
        while True:
            frame = ws.recv()
            if frame is None or frame[0] == 0x8:
                break
            opcode, data = frame
            if opcode == 0x9:
                ws.send(0xA, data)
            elif opcode in (0x1, 0x2) and data:
                channel, payload = data[0], data[1:]
                if channel == STDIN and writer is not None and payload:
                    os.write(writer, payload)
                elif channel == RESIZE and master is not None:
                    size = json.loads(payload)
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size["Height"], size["Width"], 0, 0))
                elif channel == CLOSE and payload[:1] == bytes([STDIN]) and proc.stdin is not None:
                    proc.stdin.close()
                    writer = None
    except (OSError, ValueError):
        pass
    if proc.poll() is None:  # the client went away first: what a closed kubectl exec does to the command
        try:
            os.killpg(proc.pid, 1)  # SIGHUP, as a terminal hang-up
        except ProcessLookupError:
            pass


def install_exec(kubelet: "FakeKubelet") -> None:
    """Let ``pods/exec`` run commands beside the kubelet's containers: their working directory and environment."""
    def target(ns: str, pod: str, container: str) -> tuple[str, dict[str, str]] | None:
        runtime = kubelet.pods.get((ns, pod))
        if runtime is None or not runtime.runs or (container and container != runtime.container["name"]):
            return None
        try:
            proc = psutil.Process(runtime.runs[-1].proc.pid)
            return proc.cwd(), {k: v for k, v in proc.environ().items() if k != "KT_READY_FD"}
        except psutil.Error:
            return None

    kubelet.store.exec_resolver = target
