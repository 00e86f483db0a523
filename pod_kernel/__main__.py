"""``python -m pod_kernel``: serve one compute.

The token comes from the environment (``KT_TOKEN``) or a file readable only
by its owner (``KT_TOKEN_FILE`` or ``--token-file``); never from the command
line. Once listening, the kernel writes ``{"port": ..., "pid": ...}`` as one
JSON line to the file descriptor in ``KT_READY_FD`` (if set) and to its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path

from . import logfile
from .protocol import SERIALIZATIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (no secrets here)."""
    p = argparse.ArgumentParser(prog="python -m pod_kernel", description="Serve a kt pod kernel.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    p.add_argument("--compute-name", default="default", help="name of the compute this kernel serves")
    p.add_argument("--token-file", help="file holding the token (must not be readable by others)")
    p.add_argument("--allowed-serialization", default=",".join(SERIALIZATIONS),
                   help="comma-separated formats accepted for values: json, pickle (default both)")
    p.add_argument("--inactivity-ttl", type=float, default=None,
                   help="exit after this many seconds with no request and no running cell")
    p.add_argument("--owner-pid", type=int, default=None,
                   help="exit when this process (and every process that adopted the kernel since) has exited")
    p.add_argument("--owner-grace", type=float, default=0.0,
                   help="seconds to wait after the last owner exits for a restarted notebook to adopt the kernel")
    p.add_argument("--cells-dir", default=None, help="where each cell's source is written before it runs")
    p.add_argument("--code-dir", default=None, help="where the user's synced source files are kept (on sys.path)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-file", default=None,
                   help="point stdout/stderr at this file (append) and rotate it past --log-max-bytes")
    p.add_argument("--log-max-bytes", type=int, default=_env_int("KT_LOG_MAX_BYTES", logfile.LOG_MAX_BYTES),
                   help=f"rotate the log file past this size (default {logfile.LOG_MAX_BYTES}; env KT_LOG_MAX_BYTES)")
    p.add_argument("--log-backups", type=int, default=_env_int("KT_LOG_BACKUPS", logfile.LOG_BACKUPS),
                   help=f"rotated copies kept: FILE.1 ... (default {logfile.LOG_BACKUPS}; env KT_LOG_BACKUPS)")
    args = p.parse_args(argv)
    if args.log_max_bytes < logfile.LOG_MIN_BYTES:
        p.error(f"--log-max-bytes must be at least {logfile.LOG_MIN_BYTES}")
    if not 0 <= args.log_backups <= logfile.LOG_MAX_BACKUPS:
        p.error(f"--log-backups must be between 0 and {logfile.LOG_MAX_BACKUPS}")
    return args


def _env_int(name: str, default: int) -> int:
    """An integer setting from the environment; ``default`` when unset or not a number."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else default


#: Seconds a stopping kernel waits for the interrupted cell to end before it exits without it (``KT_STOP_GRACE_S``).
STOP_GRACE_S = 10


def stop_grace_s() -> float:
    """How long a stopping kernel waits for its interrupted cell (``KT_STOP_GRACE_S``, whole seconds, at least 1)."""
    return max(_env_int("KT_STOP_GRACE_S", STOP_GRACE_S), 1)


def read_token(args: argparse.Namespace) -> str:
    """The token from KT_TOKEN, or from a 0600 file; exits with a clear message if absent."""
    token = os.environ.pop("KT_TOKEN", None)
    path = args.token_file or os.environ.pop("KT_TOKEN_FILE", None)
    if token is None and path:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            sys.exit(f"pod_kernel: token file {path} is readable by others; chmod 600 it")
        token = Path(path).read_text().strip()
    if not token:
        sys.exit("pod_kernel: no token; set KT_TOKEN or KT_TOKEN_FILE (never pass it as an argument)")
    return token


def main(argv: list[str] | None = None) -> None:
    """Serve until stopped; cells run in this (the main) thread."""
    args = parse_args(argv)
    if args.log_file:
        try:
            logfile.install(args.log_file, args.log_max_bytes, args.log_backups)
        except OSError as exc:  # keep serving with the inherited stdout/stderr rather than not at all
            print(f"pod_kernel: cannot use --log-file {args.log_file} ({exc.strerror or exc}); "
                  "logging to the inherited stdout/stderr, not rotated", file=sys.stderr)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = read_token(args)
    allowed = tuple(s.strip() for s in args.allowed_serialization.split(",") if s.strip())
    bad = [s for s in allowed if s not in SERIALIZATIONS]
    if bad or not allowed:
        sys.exit(f"pod_kernel: --allowed-serialization must name some of {SERIALIZATIONS}, got {allowed}")

    from .executor import Executor
    from .server import PodKernelServer

    cells_dir = Path(args.cells_dir or tempfile.mkdtemp(prefix=f"kt-cells-{os.getpid()}-"))
    executor = Executor(cells_dir, allow_pickle="pickle" in allowed)
    server = PodKernelServer(executor, token, args.compute_name, allowed, args.inactivity_ttl,
                             code_dir=args.code_dir)
    del token
    ready_fd = os.environ.pop("KT_READY_FD", None)

    def on_ready(port: int) -> None:
        line = json.dumps({"port": port, "pid": os.getpid()}) + "\n"
        logging.getLogger("pod_kernel").info("ready %s", line.strip())
        if ready_fd is not None:
            try:
                os.write(int(ready_fd), line.encode())
                os.close(int(ready_fd))
            except OSError:
                pass
        if args.owner_pid:
            server.watch_owner(args.owner_pid, args.owner_grace)  # on_ready runs on the server's loop

    failed = threading.Event()
    served = threading.Event()  # the main thread is out of its last cell

    def network() -> None:
        try:
            asyncio.run(server.serve(args.host, args.port, on_ready))
        except BaseException:
            logging.getLogger("pod_kernel").exception("network loop failed")
            failed.set()
        finally:
            executor.stop()
            grace_s = stop_grace_s()
            if not served.wait(grace_s):  # the cell ignored its interrupt (native code, a swallowed KeyboardInterrupt)
                logging.getLogger("pod_kernel").warning(
                    "the running cell did not stop within %g s of its interrupt (blocked in native code, such as a "
                    "collective or a rendezvous?): exiting without waiting for it", grace_s)
                sys.stdout.flush()
                os._exit(1 if failed.is_set() else 0)

    signal.signal(signal.SIGTERM, lambda signum, frame: server.request_stop("received SIGTERM"))
    thread = threading.Thread(target=network, name="kt-network", daemon=True)
    thread.start()
    executor.serve_forever()
    served.set()
    thread.join(timeout=5)
    logging.getLogger("pod_kernel").info("pod kernel exited")
    sys.stdout.flush()
    os._exit(1 if failed.is_set() else 0)  # 0: asked to stop (TTL, shutdown, owner gone, SIGTERM)


if __name__ == "__main__":
    main()
