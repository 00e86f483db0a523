"""Pod-side helpers of distributed computes, called by the notebook as seed-API calls (module targets).

- :func:`abort_process_group`: after an error or an interrupt on any rank, each
  rank tears down its torch.distributed default group. A rank blocked in a
  collective waiting for a peer (native code no interrupt reaches) is freed
  when a peer closes its connections: gloo raises "Connection closed by peer".
  Every rank is given a fresh ``MASTER_PORT`` for the next world (see there why).
- :func:`start_ray_node`: the Ray node of this worker (the head on rank 0),
  ``ray start --block`` as a child of the pod kernel: in its process group
  (stopping the kernel stops it) and told to stop when the kernel exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pod_kernel.distributed")

#: What ``ray start`` prints once its node runs.
RAY_STARTED_LINE = "Ray runtime started"
#: Lines of ``ray start`` output quoted when it fails.
RAY_ERROR_LINES = 12

_ray_node: subprocess.Popen | None = None


def abort_process_group(master_port: int | None = None) -> bool:
    """Destroy torch.distributed's default process group if this process has one (True if it had); with
    ``master_port``, the next ``init_process_group()`` here rendezvous on that port (``MASTER_PORT``).

    A fresh port is what lets the world form again after a failed collective: rank 0's old process group
    outlives ``destroy_process_group()`` then (held inside torch, not by Python; a cleanly destroyed group is
    freed), and with it its TCPStore server, which torch's env:// rendezvous shares per port. A new world on
    the same port would reuse that server and read the old world's keys: every rank would dial the old
    ranks' closed gloo addresses ("Gloo connectFullMesh failed ... Connection refused").
    """
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(int(master_port))
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    try:
        dist.destroy_process_group()
    except Exception as exc:  # already broken: nothing left to tear down
        log.warning("destroy_process_group: %s", exc)
    return True


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for the child (between fork and exec) that makes the kernel's exit SIGTERM it (Linux
    ``prctl(PR_SET_PDEATHSIG)``; ``ray start --block`` then stops the node's processes). libc is loaded here,
    in the parent: the child only makes one system call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_ray_node(head: bool, address: str, num_cpus: int | None = None, num_gpus: int | None = None,
                   temp_dir: str | None = None, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start this worker's Ray node and return when it runs: the head listening on ``address``'s port, or a
    worker joining the head at ``address``. Idempotent: a second call finds the node running.

    Ray's token authentication is on when ``RAY_AUTH_MODE=token`` is in the environment (the compute sets it,
    with the token in a file or a Secret), so only processes holding the compute's token join or connect.
    """
    global _ray_node
    if _ray_node is not None and _ray_node.poll() is None:
        return {"pid": _ray_node.pid, "already": True}
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    argv = [ray_cli] if ray_cli else [sys.executable, "-m", "ray.scripts.scripts"]
    argv += ["start", "--block", "--disable-usage-stats"]
    port = address.rpartition(":")[2]
    if head:
        argv += ["--head", "--port", port, "--include-dashboard=false"]
    else:
        argv += ["--address", address]
    if num_cpus is not None:
        argv += ["--num-cpus", str(int(num_cpus))]
    if num_gpus is not None:
        argv += ["--num-gpus", str(int(num_gpus))]
    if temp_dir:
        argv += ["--temp-dir", temp_dir]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_parent_death_signal())  # noqa: PLW1509 - one syscall
    started = threading.Event()
    tail: list[str] = []

    def read() -> None:  # the node's output goes on to the kernel log, always drained
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            del tail[:-RAY_ERROR_LINES]
            log.info("ray: %s", line)
            if RAY_STARTED_LINE in line:
                started.set()
        started.set()  # it exited: the caller looks at why

    threading.Thread(target=read, name="kt-ray-node-log", daemon=True).start()
    if not started.wait(timeout_s) or proc.poll() is not None:
        proc.kill()
        proc.wait()
        timed_out = proc.returncode == -signal.SIGKILL
        what = f"did not start within {timeout_s:g} s" if timed_out else f"exited with code {proc.returncode}"
        raise RuntimeError(f"the Ray {'head' if head else 'worker'} node {what}; `ray start` said:\n"
                           + "\n".join(tail))
    _ray_node = proc
    return {"pid": proc.pid, "already": False}
