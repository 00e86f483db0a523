"""``Compute.ssh()``: an interactive shell where the pod kernel runs.

- local backend: the user's ``$SHELL`` (else ``/bin/sh``) in a new pty, in
  the kernel's working directory with the kernel's environment (read from
  the kernel process, as ``/proc/<pid>/{cwd,environ}`` hold them);
- Kubernetes: ``kubectl exec -it`` done with the official client
  (``stream(connect_get_namespaced_pod_exec, tty=True, stdin=True)``) into
  the pod kernel's container, window size included.

Either way this terminal is put in raw mode and relayed until the shell
exits. A notebook kernel has no terminal: there ``ssh()`` asks the Jupyter
server that started it (found by its runtime file) for a terminal running
``python -m kt_jupyter.shell --backend B NAME`` (:mod:`kt_jupyter.server.terminals`)
and shows a link to it. That command works in any terminal, too.
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import os
import pty
import select
import signal
import struct
import sys
import termios
import threading
import tty
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, KtError, NotFoundError
from .names import BACKENDS, check_compute_name

#: Bytes read from either side per relay step.
RELAY_READ_BYTES = 64 << 10
#: Seconds each relay step waits for input (bounds how late a resize or a closed stream is noticed).
RELAY_POLL_S = 0.1
#: Seconds to wait for the Jupyter server to create a terminal.
SERVER_TIMEOUT_S = 10.0
#: Environment the kernel was started with that a shell must not inherit.
KERNEL_ONLY_ENV = ("KT_READY_FD",)


def shell_argv(backend: str, name: str) -> list[str]:
    """The command that opens this compute's shell in a terminal (what the server's terminals run)."""
    return [sys.executable, "-m", "kt_jupyter.shell", "--backend", backend, check_compute_name(name)]


# ---------------------------------------------------------------------- local: a pty of our own

def local_target(name: str) -> tuple[list[str], str, dict[str, str]]:
    """(argv, working directory, environment) of a shell beside the local kernel ``name``."""
    import psutil

    from .backends import get_backend

    handle = get_backend("local").find(check_compute_name(name))
    if handle is None or handle.pid is None:
        raise NotFoundError(f"no running local compute named {name!r}; run a cell on it (or launch it) first")
    try:
        proc = psutil.Process(handle.pid)
        cwd, env = proc.cwd(), proc.environ()
    except psutil.Error as exc:
        raise NotFoundError(f"local compute {name!r} (pid {handle.pid}) cannot be inspected: {exc}") from None
    env = {k: v for k, v in env.items() if k not in KERNEL_ONLY_ENV}
    return [env.get("SHELL") or os.environ.get("SHELL") or "/bin/sh"], cwd, env


def _window_size(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None


def _raw_terminal(fd: int, on_resize: Callable[[], None]) -> Callable[[], None]:
    """Raw mode on ``fd`` (a tty) and resizes followed; returns what restores both."""
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd, termios.TCSADRAIN)  # not setraw's default TCSAFLUSH: it drops what was typed ahead
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGWINCH, lambda *_: on_resize()) if main_thread else None

    def restore() -> None:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if main_thread:
            signal.signal(signal.SIGWINCH, old)

    return restore


def relay_pty(argv: list[str], cwd: str, env: dict[str, str]) -> int:
    """Run ``argv`` in a new pty in ``cwd`` with ``env``, relaying this terminal to it; its exit code."""
    pid, master = pty.fork()
    if pid == 0:  # the child: become the shell
        try:
            os.chdir(cwd)
        except OSError as exc:
            os.write(2, f"kt ssh: cannot enter {cwd}: {exc.strerror}\r\n".encode())
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def resize() -> None:
        size = _window_size(stdin)
        if size is not None:
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)

    resize()
    restore = _raw_terminal(stdin, resize)
    inputs = [master, stdin]
    try:
        while True:
            try:
                ready, _, _ = select.select(inputs, [], [], RELAY_POLL_S)
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, RELAY_READ_BYTES)
                except OSError:  # EIO: the shell and everything on its pty exited
                    break
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, RELAY_READ_BYTES)
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(stdin)  # our input ended: the shell reads until it exits
    finally:
        restore()
        os.close(master)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# ---------------------------------------------------------------------- Kubernetes: exec through the API

def kubernetes_shell(name: str) -> int:
    """``kubectl exec -it`` into the pod kernel's container, relaying this terminal; the shell's exit code."""
    from kubernetes import client
    from kubernetes.stream import stream
    from kubernetes.stream.ws_client import WSClient

    from .backends import get_backend
    from .backends.kubernetes_api import load_api_client
    from .backends.kubernetes_events import is_ready
    from .compute import Compute
    from .manifests import CONTAINER_NAME

    compute = Compute(name=check_compute_name(name), backend="kubernetes")
    ready = [p for p in get_backend("kubernetes").pods(name) if is_ready(p)]
    if not ready:
        raise NotFoundError(f"compute {name!r} has no ready pod in namespace {compute.namespace!r}; run a cell on "
                            "it (or launch it) first")
    core = client.CoreV1Api(load_api_client(compute.kubeconfig_path))  # stream() patches its client: a fresh one
    # bytes: a character split between two messages stays whole (older clients, e.g. 29, relay text only)
    binary = {"binary": True} if "binary" in inspect.signature(WSClient.__init__).parameters else {}
    resp = stream(core.connect_get_namespaced_pod_exec, ready[0]["metadata"]["name"], compute.namespace,
                  container=CONTAINER_NAME, command=["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}"'],
                  stdin=True, stdout=True, stderr=True, tty=True, _preload_content=False, **binary)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def resize() -> None:
        size = _window_size(stdin)
        if size is not None:
            rows, cols = struct.unpack("HHHH", size)[:2]
            resp.write_channel(4, json.dumps({"Width": cols, "Height": rows}))  # channel 4: resize

    resize()
    restore = _raw_terminal(stdin, resize)
    try:
        while resp.is_open():
            resp.update(timeout=RELAY_POLL_S)
            for read in (resp.read_stdout, resp.read_stderr):
                data = read(timeout=0)  # also once closed: the last update may have buffered the last output
                data = data.encode() if isinstance(data, str) else data
                while data:  # a terminal may take part of a write
                    data = data[os.write(stdout, data):]
            if resp.is_open() and select.select([stdin], [], [], 0)[0]:
                data = os.read(stdin, RELAY_READ_BYTES)
                if not data:
                    break
                resp.write_stdin(data)
    finally:
        restore()
        resp.close()
    return int(resp.returncode or 0)


# ---------------------------------------------------------------------- a notebook: a terminal of the server

def notebook_server() -> dict[str, Any] | None:
    """The runtime info (url, token) of the Jupyter server that started this kernel, if any."""
    from jupyter_core.paths import jupyter_runtime_dir

    path = Path(jupyter_runtime_dir()) / f"jpserver-{os.getppid()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def open_server_terminal(backend: str, name: str, server: dict[str, Any]) -> str:
    """Ask the server for a terminal running this compute's shell; the terminal page's URL."""
    base = str(server.get("url") or "").rstrip("/") + "/"
    request = urllib.request.Request(f"{base}kt/api/computes/{backend}/{name}/terminal", data=b"{}",
                                     method="POST", headers={"Authorization": f"token {server.get('token', '')}",
                                                             "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_S) as reply:
            answer = json.loads(reply.read())
    except OSError as exc:
        message = getattr(exc, "read", lambda: b"")()
        raise KtError(f"the Jupyter server could not open a terminal for compute {name!r}: "
                      f"{json.loads(message or b'{}').get('message') or exc}") from None
    return base + str(answer["path"]).lstrip("/")


def ssh(backend: str, name: str) -> int | None:
    """An interactive shell for compute ``name``: here in a terminal, else a server terminal's link shown."""
    check_compute_name(name)
    if sys.stdin.isatty() and sys.stdout.isatty():
        return relay_pty(*local_target(name)) if backend == "local" else kubernetes_shell(name)
    server = notebook_server()
    if server is None:
        raise BackendUnavailable(f"ssh() needs a terminal, and no Jupyter server started this process; in a "
                                 f"terminal run: python -m kt_jupyter.shell --backend {backend} {name}")
    url = open_server_terminal(backend, name, server)
    from IPython.display import HTML, display

    display(HTML(f'<a href="{url}" target="_blank" rel="noopener">Open a shell on compute {name} '
                 f'(a Jupyter terminal)</a>'))
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m kt_jupyter.shell [--backend B] NAME``: a shell on the compute; errors as one line."""
    parser = argparse.ArgumentParser(prog="python -m kt_jupyter.shell", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="local")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.backend == "local":
            return relay_pty(*local_target(args.name))
        return kubernetes_shell(args.name)
    except KtError as exc:
        print(f"kt ssh: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
