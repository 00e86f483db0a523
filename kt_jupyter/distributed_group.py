"""The workers of a distributed compute, connected: launch, reattach, liveness, stop; one per compute name.

A distributed compute named ``train`` with N workers is N pod kernels named
``train-r0`` .. ``train-r{N-1}`` (:func:`~kt_jupyter.distributed.rank_name`),
each an ordinary compute of its backend with its rank's environment. Separate
registry entries (rather than one entry holding N processes) reuse everything
a kernel already has per name (launch and readiness, reattaching from another
notebook, logs, status, the owner's grace period), and ``%kt logs train-r1``
shows one rank's log. The group is the unit: it is launched all at once (in
parallel), used all at once, and stopped all at once; a rank that died breaks
the engine's world, so the whole group is started again, and a group of
another size or framework under the same name is refused, never mixed, as is
a single kernel of that name.

:class:`WorkerGroup` holds one :class:`~kt_jupyter.connection.ComputeConnection`
per rank; what runs on them is :mod:`kt_jupyter.distributed_cells` (cells) and
:mod:`kt_jupyter.remote` (calls).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable

from pod_kernel import waits

from .backends import KernelHandle, get_backend, spec_mismatch, spec_mismatch_error
from .client import client_loop
from .compute import Compute
from .connection import ComputeConnection, replaced_elsewhere
from .distributed import DistributedConfig, rank_name, split_gpus, torch_env
from .errors import ComputeSpecError, KtError, LaunchError

#: The pod-side function that tears down a rank's torch.distributed group (a seed-API call target).
ABORT_TARGET = {"kind": "module", "module": "pod_kernel.distributed", "qualname": "abort_process_group"}
#: Seconds to wait for one rank's answer to a teardown request.
ABORT_TIMEOUT_S = 10.0
#: Ports above the configured MASTER_PORT that worlds formed again in pods cycle through.
MAX_PORT_GENERATIONS = 100


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def call_rank(conn: ComputeConnection, target: dict, kwargs: dict, timeout_s: float) -> object:
    """A seed-API call (JSON) on one rank's kernel, waited for here at most ``timeout_s``."""
    fut = asyncio.run_coroutine_threadsafe(conn.session.acall(target, (), kwargs, serialization="json"),
                                           client_loop())
    try:
        return waits.future_result(fut, timeout_s)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise


class WorkerGroup:
    """The N pod kernels of one distributed compute, rank order."""

    def __init__(self, compute: Compute, ranks: list[ComputeConnection]) -> None:
        self.compute = compute
        self.config: DistributedConfig = compute.distributed_config  # type: ignore[assignment]
        self.ranks = ranks
        #: cleanups to run when the group is stopped (the Ray token file, Ray's temp directory)
        self.on_delete: list[Callable[[], None]] = []
        #: worlds formed again after a failure or an interrupt (each on a fresh MASTER_PORT)
        self.generation = 0
        #: the MASTER_PORT ranks torn down since the group was last used get (None: none chosen yet)
        self.next_master_port: int | None = None

    @property
    def name(self) -> str:
        """The compute's name (its ranks are ``{name}-r{rank}``)."""
        return self.compute.name

    @property
    def head(self) -> ComputeConnection:
        """Rank 0: where names come back from, and (Ray) where cells and calls run."""
        return self.ranks[0]

    def __repr__(self) -> str:
        return f"<WorkerGroup {self.compute.backend}:{self.name} {self.config.framework} x{len(self.ranks)}>"

    def liveness(self) -> str | None:
        """None while every rank lives, else why the first dead one is gone (naming its rank)."""
        for rank, conn in enumerate(self.ranks):
            why = conn.handle.liveness() if conn.handle.liveness else None
            if why is not None:
                return f"rank {rank} of {self.name!r}: {why}"
        return None

    def abort_process_groups(self, ranks: list[int] | None = None) -> None:
        """Tear down torch.distributed's group on these ranks (all by default), so no peer stays blocked in a
        collective; the next cell calls ``init_process_group()`` again, on a fresh ``MASTER_PORT`` (the same one
        for every rank torn down until the group is next used: :meth:`fresh_master_port`). Unreachable ranks
        are skipped."""
        if self.next_master_port is None:
            self.next_master_port = self.fresh_master_port()
        kwargs = {"master_port": self.next_master_port}
        for rank in range(len(self.ranks)) if ranks is None else ranks:
            try:
                call_rank(self.ranks[rank], ABORT_TARGET, kwargs, ABORT_TIMEOUT_S)
            except (KtError, concurrent.futures.TimeoutError):
                continue

    def in_use(self) -> WorkerGroup:
        """Mark the start of a cell or call on the group: a teardown from now on chooses a new port."""
        self.next_master_port = None
        return self

    def fresh_master_port(self) -> int:
        """The rendezvous port of the next world after a failed or interrupted one: never the last one, whose
        TCPStore server rank 0 may still hold with the old world's keys (:mod:`pod_kernel.distributed`).
        Locally a free port; in pods the configured port plus a count (the ranks admit each other on any port).
        """
        self.generation += 1
        if self.compute.backend != "kubernetes":
            return free_port()
        from .manifests_distributed import master_port

        return master_port(self.compute) + 1 + (self.generation - 1) % MAX_PORT_GENERATIONS

    def close(self) -> None:
        """Close this process's sessions (the kernels keep running)."""
        for conn in self.ranks:
            conn.session.close_quietly()


# ---------------------------------------------------------------------- the process-wide registry

_groups: dict[tuple[str, str], WorkerGroup] = {}
_lock = threading.Lock()


def groups() -> list[WorkerGroup]:
    """The groups this process holds."""
    return list(_groups.values())


def existing_group(backend_name: str, name: str) -> tuple[int, str] | None:
    """(workers, framework) of the distributed compute ``name`` when its rank 0 runs (Kubernetes: when its
    StatefulSet or RayCluster exists), else None."""
    if backend_name == "kubernetes":
        from .backends.kubernetes_distributed import find_group

        found = find_group(_kubernetes_compute(name))
        return (found.config.workers, found.config.framework) if found is not None else None
    handle = get_backend(backend_name).find(rank_name(name, 0))
    spec = (handle.spec or {}).get("distributed") if handle is not None else None
    if not isinstance(spec, dict):
        return None
    try:
        config = DistributedConfig.from_dict(spec)
    except ComputeSpecError:
        return None
    return config.workers, config.framework


def check_single(compute: Compute) -> None:
    """A single-kernel compute may not take the name of a running distributed one (they never mix)."""
    found = existing_group(compute.backend, compute.name)
    if found is not None:
        raise ComputeSpecError(
            f"compute {compute.name!r} runs as {found[0]} {found[1]} workers; add --workers {found[0]}"
            f"{'' if found[1] == 'pytorch' else ' --framework ' + found[1]} to run on them, or "
            f"`%kt down {compute.name}` first, or pick another --name")


def connect_group(compute: Compute, *, keep: bool = False,
                  on_event: Callable[[str], None] | None = None) -> WorkerGroup:
    """The workers of distributed ``compute``: this process's group, the running one, or N new kernels."""
    config = compute.distributed_config
    if config is None:
        raise ComputeSpecError(f"compute {compute.name!r} is not distributed; call .distribute(...) first")
    say = on_event or (lambda _m: None)
    key = (compute.backend, compute.name)
    with _lock:
        group = _groups.get(key)
        if group is not None:
            _check_same(compute, group.config.workers, group.config.framework)
            mismatch = "" if compute is group.compute else spec_mismatch(compute, group.compute.to_dict())
            if mismatch:
                raise spec_mismatch_error(compute.name, mismatch)
            why = group.liveness()
            if why is None:
                return group.in_use()
            _groups.pop(key)
            if _restarted_elsewhere(group):  # stopping them to start others would stop that notebook's in turn
                say(f"{why.splitlines()[0]}\nAll {group.config.workers} workers of {compute.name!r} run again "
                    "already (another notebook restarted them); this notebook uses them: every worker's variables "
                    "are lost.")
                group.close()
            else:
                say(f"{why.splitlines()[0]}\nStarting all {group.config.workers} workers again: a distributed "
                    "world cannot go on without a rank, so every worker's variables are lost.")
                delete_group(compute.backend, compute.name, group)
        group = _attach_or_launch(compute, keep, say)
        _groups[key] = group
        return group.in_use()


def _restarted_elsewhere(group: WorkerGroup) -> bool:
    """Whether every rank of ``group`` now runs as another live kernel: another process restarted the group (or,
    on Kubernetes, every pod was replaced). Ranks of which some still are the dead group's are started again."""
    if group.compute.backend == "kubernetes":
        from .backends import kubernetes_distributed as kd

        try:
            running = kd.find_group(group.compute)
        except KtError:  # cannot tell: as before, this notebook starts them again
            return False
        if running is None or len(running.pods) != len(group.ranks):
            return False
        # a StatefulSet's pods keep their names: a pod is told by when it started (whole seconds)
        return all(kd.pod_started(pod) not in (0.0, conn.handle.started)
                   for pod, conn in zip(running.pods, group.ranks))
    if group.compute.backend != "local":
        return False
    backend = get_backend("local")
    return all(replaced_elsewhere(backend, conn.handle) for conn in group.ranks)


def _check_same(compute: Compute, workers: int, framework: str) -> None:
    config = compute.distributed_config
    assert config is not None
    if (workers, framework) != (config.workers, config.framework):
        raise ComputeSpecError(
            f"compute {compute.name!r} runs {workers} {framework} workers, not {config.workers} {config.framework}: "
            f"`%kt down {compute.name}` then run this again (a distributed world is not resized in place), "
            "or pick another --name")


def _attach_or_launch(compute: Compute, keep: bool, say: Callable[[str], None]) -> WorkerGroup:
    config = compute.distributed_config
    assert config is not None
    backend = get_backend(compute.backend)
    if backend.find(compute.name) is not None:
        raise ComputeSpecError(
            f"compute {compute.name!r} runs as a single kernel; `%kt down {compute.name}` first (its variables "
            f"are lost) or pick another --name for the {config.workers} workers")
    if compute.backend == "kubernetes":
        return _attach_or_launch_kubernetes(compute, say)
    found = existing_group(compute.backend, compute.name)
    if found is not None:
        _check_same(compute, *found)
        found_handles = [backend.find(rank_name(compute.name, r)) for r in range(config.workers)]
        handles = [h for h in found_handles if h is not None]
        if len(handles) == config.workers:  # another notebook (or an earlier session) started them
            return _group(compute, [backend.launch(_rank_spec(compute, h), keep=keep)  # adopts it
                                    for h in handles])
        say(f"some workers of {compute.name!r} are gone; starting all {config.workers} again: their variables "
            "are lost")
    delete_group(compute.backend, compute.name)
    if config.framework == "ray":
        from .distributed_ray import launch_local_ray

        return launch_local_ray(compute, keep=keep, on_event=say)
    return launch_local(compute, keep=keep, on_event=say)


def _kubernetes_compute(name: str) -> Compute:
    """The Kubernetes compute of that name this process knows (its namespace), else a default one."""
    return get_backend("kubernetes")._compute_for(name)


def _attach_or_launch_kubernetes(compute: Compute, say: Callable[[str], None]) -> WorkerGroup:
    """The running StatefulSet's (or RayCluster's) ranks when all are ready, else apply and wait for them all."""
    from .backends import kubernetes_distributed as kd

    found = kd.find_group(compute)
    if found is not None:
        _check_same(compute, found.config.workers, found.config.framework)
        mismatch = spec_mismatch(compute, found.running.to_dict())  # the workers run what any process applied
        if mismatch:
            raise spec_mismatch_error(compute.name, mismatch)
        if found.pods:
            say(f"reusing the running {found.config.workers} {found.config.framework} workers of {compute.name!r}")
            return _group(compute, kd.connect_ranks(compute, found))
    return _group(compute, kd.launch_group(compute, on_event=say))


def _rank_spec(compute: Compute, handle: KernelHandle) -> Compute:
    """The compute of a running rank kernel, as far as launching (adopting) it goes."""
    return compute.with_overrides(name=handle.name, distributed=None)


def _group(compute: Compute, handles: list[KernelHandle]) -> WorkerGroup:
    ranks = [ComputeConnection(compute.with_overrides(name=h.name, distributed=None), h) for h in handles]
    return WorkerGroup(compute, ranks)


def rank_computes(compute: Compute, envs: list[dict[str, str]]) -> list[Compute]:
    """One ordinary compute per rank: ``{name}-r{rank}``, the group's settings, the rank's environment.

    Their spec keeps the group's ``distributed`` settings (that is how a rank is known as one); GPUs are
    given per rank through ``CUDA_VISIBLE_DEVICES`` in ``envs`` on the local backend.
    """
    config = compute.distributed_config
    assert config is not None
    out = []
    for rank, env in enumerate(envs):
        spec = compute.to_dict()
        spec.update(name=rank_name(compute.name, rank), env_vars={**compute.env_vars, **env})
        if "CUDA_VISIBLE_DEVICES" in env:
            spec["gpus"] = None  # the backend would number them from 0; the rank's own ones are in its env
        spec["distributed"] = None
        rank_compute = Compute.from_dict(spec)
        object.__setattr__(rank_compute, "_distributed", config)  # kept in the spec at rest: marks a rank
        out.append(rank_compute)
    return out


def launch_in_parallel(backend_name: str, computes: list[Compute], keep: bool,
                       on_event: Callable[[str], None]) -> list[KernelHandle]:
    """Launch every rank's kernel at once; when one fails, the others are stopped and the error names it."""
    backend = get_backend(backend_name)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(computes), thread_name_prefix="kt-rank") as pool:
        futures = [pool.submit(backend.launch, c, keep=keep, on_event=on_event) for c in computes]
        concurrent.futures.wait(futures)
    failed = [(rank, f.exception()) for rank, f in enumerate(futures) if f.exception() is not None]
    if failed:
        for c in computes:
            try:
                backend.delete(c.name, grace_period_s=0)
            except KtError:
                pass
        rank, exc = failed[0]
        error = exc if isinstance(exc, LaunchError) else LaunchError(str(exc))
        raise type(error)(f"worker rank {rank} ({computes[rank].name}) did not start, so none of the "
                          f"{len(computes)} workers runs: {error}") from None
    return [f.result() for f in futures]


def launch_local(compute: Compute, *, keep: bool = False,
                 on_event: Callable[[str], None] | None = None) -> WorkerGroup:
    """N local pod kernels with torch.distributed's environment (rank 0 is MASTER_ADDR 127.0.0.1)."""
    from .backends.local import machine_gpu_count

    config = compute.distributed_config
    assert config is not None
    say = on_event or (lambda _m: None)
    gpus = split_gpus(compute.gpu_count, config.workers,
                      machine_gpu_count() if compute.gpu_count else 0, compute.name)
    port = int(config.distribution_args.get("master_port") or free_port())
    envs = []
    for rank in range(config.workers):
        env = torch_env(rank, config.workers, "127.0.0.1", port)
        if gpus[rank] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank]  # type: ignore[assignment]
        envs.append(env)
    t0 = time.monotonic()
    say(f"starting {config.workers} pytorch workers of {compute.name!r} (MASTER_PORT {port})")
    handles = launch_in_parallel(compute.backend, rank_computes(compute, envs), keep, say)
    say(f"all {config.workers} workers of {compute.name!r} ready in {time.monotonic() - t0:.2f} s")
    return _group(compute, handles)


def delete_group(backend_name: str, name: str, group: WorkerGroup | None = None,
                 grace_period_s: float = 5.0) -> bool:
    """Stop every worker of ``name`` (ranks 0.. until one is missing, and those this process knows); True if any
    existed. The Kubernetes backend deletes the group's objects (StatefulSet or RayCluster) instead."""
    group = group or _groups.pop((backend_name, name), None)
    if group is not None:
        group.close()
        for cleanup in group.on_delete:
            cleanup()
    if backend_name == "kubernetes":
        from .backends.kubernetes_distributed import delete_group as delete_workload

        return delete_workload(name, group.compute.namespace if group is not None else None, grace_period_s)
    backend = get_backend(backend_name)
    count = len(group.ranks) if group is not None else 0
    while _has_entry(backend, rank_name(name, count)):
        count += 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(count, 1), thread_name_prefix="kt-rank") as pool:
        existed = any(list(pool.map(lambda r: backend.delete(rank_name(name, r), grace_period_s=grace_period_s),
                                    range(count))))
    from .distributed_ray import remove_local_files

    remove_local_files(name)
    return existed


def _has_entry(backend: object, name: str) -> bool:
    """Whether the backend knows a kernel of that name, live or not."""
    try:
        backend.status(name)  # type: ignore[attr-defined]
    except KtError:
        return False
    return True


def forget(backend_name: str, name: str) -> WorkerGroup | None:
    """Drop (and close) this process's group of ``name``, leaving its kernels running."""
    with _lock:
        group = _groups.pop((backend_name, name), None)
    if group is not None:
        group.close()
    return group

