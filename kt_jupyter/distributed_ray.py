"""A Ray cluster on the local backend: N pod kernels, each hosting one Ray node (rank 0 the head).

Ray does the scheduling; we start its nodes the way KubeRay does in pods:
``ray start --head`` on rank 0, ``ray start --address`` on the others (see
:func:`pod_kernel.distributed.start_ray_node`: a child of the pod kernel, so
stopping a worker's kernel stops its node). Cells and calls run on rank 0,
whose environment has ``RAY_ADDRESS``, so ``ray.init()`` connects to the
cluster and ``ray.remote`` tasks spread over every node.

Ray on Linux refuses loopback addresses for a cluster of several nodes (it
resolves ``127.0.0.1`` to the machine's address), so the nodes listen on the
machine's address. Ray's token authentication is therefore always on
(``RAY_AUTH_MODE=token``): the compute's Ray token sits in a 0600 file under
``$KT_HOME/ray/<name>/`` (its path, never the token, in the environment), and a
process without it can neither join the cluster nor submit work.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .backends import kt_home
from .backends import local_registry as registry
from .compute import Compute
from .distributed import split_gpus
from .distributed_group import (
    WorkerGroup,
    _group,
    call_rank,
    delete_group,
    free_port,
    launch_in_parallel,
    rank_computes,
)
from .errors import KtError, LaunchError

#: The pod-side function that starts a worker's Ray node.
START_TARGET = {"kind": "module", "module": "pod_kernel.distributed", "qualname": "start_ray_node"}
#: Seconds one Ray node may take to start (a loaded machine imports Ray slowly).
RAY_NODE_START_TIMEOUT_S = 180.0


def _ray_dir(name: str, create: bool = False) -> Path:
    """``$KT_HOME/ray/<name>``: this compute's Ray token (0700 directory, 0600 file)."""
    root = registry.checked_root(kt_home() / "ray")
    return registry.fresh_entry(root, name) if create else registry.entry_path(root, name)


def temp_dir(name: str) -> str:
    """Ray's session directory for this compute: short (Ray's Unix socket paths must stay under 108 bytes)
    and of this user and KT_HOME only."""
    digest = hashlib.sha256(f"{kt_home().resolve()}\0{name}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"kt-ray-{os.getuid()}-{digest}")


def remove_local_files(name: str) -> None:
    """Remove the compute's Ray token and Ray's session files (after its nodes stopped)."""
    try:
        registry.remove_entry(registry.checked_root(kt_home() / "ray"), name)
    except (KtError, OSError, ValueError):
        pass
    shutil.rmtree(temp_dir(name), ignore_errors=True)


def launch_local_ray(compute: Compute, *, keep: bool = False,
                     on_event: Callable[[str], None] | None = None) -> WorkerGroup:
    """N pod kernels and a Ray cluster over them: the head on rank 0 (``RAY_ADDRESS`` there), N-1 workers."""
    from .backends.local import machine_gpu_count

    config = compute.distributed_config
    assert config is not None
    say = on_event or (lambda _m: None)
    gpus = split_gpus(compute.gpu_count, config.workers, machine_gpu_count() if compute.gpu_count else 0,
                      compute.name)
    port = int(config.distribution_args.get("port") or free_port())
    address = f"127.0.0.1:{port}"
    token_file = _ray_dir(compute.name, create=True) / "token"
    registry.write_private(token_file, secrets.token_hex(32).encode())
    envs = []
    for rank in range(config.workers):
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}
        if rank == 0:
            env["RAY_ADDRESS"] = address
        if gpus[rank] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank]  # type: ignore[assignment]
        envs.append(env)
    t0 = time.monotonic()
    say(f"starting a Ray cluster {compute.name!r}: a head and {config.workers - 1} worker(s), GCS port {port}")
    computes = rank_computes(compute, envs)
    handles = launch_in_parallel(compute.backend, computes, keep, say)
    group = _group(compute, handles)
    group.on_delete.append(lambda: remove_local_files(compute.name))
    cpus = config.distribution_args.get("num_cpus") or (math.ceil(compute.cpu_cores) if compute.cpu_cores else None)
    node = {"num_cpus": cpus, "num_gpus": compute.gpu_count or None, "temp_dir": temp_dir(compute.name),
            "timeout_s": RAY_NODE_START_TIMEOUT_S, "address": address}
    try:
        call_rank(group.head, START_TARGET, dict(node, head=True), RAY_NODE_START_TIMEOUT_S + 10)
        say(f"Ray head of {compute.name!r} runs ({time.monotonic() - t0:.1f} s); starting its workers")
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(config.workers - 1, 1)) as pool:
            list(pool.map(lambda conn: call_rank(conn, START_TARGET, dict(node, head=False),
                                                 RAY_NODE_START_TIMEOUT_S + 10), group.ranks[1:]))
    except BaseException as exc:
        delete_group(compute.backend, compute.name, group, grace_period_s=0)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LaunchError(f"the Ray cluster {compute.name!r} did not start, so its workers were stopped: "
                          f"{exc}") from None
    say(f"Ray cluster {compute.name!r} ready: {config.workers} node(s) in {time.monotonic() - t0:.1f} s; "
        f"`ray.init()` in a cell connects to it")
    return group

