"""``Compute.distribute(...)``: the settings of a distributed compute and each worker's environment. Pure.

A distributed compute is N pod kernels ("workers", ranks ``0..N-1``) that the
engines themselves connect: torch.distributed through its ``env://``
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``...), so
``torch.distributed.init_process_group()`` needs no arguments; Ray through
one head node and N-1 workers, the address of the head in ``RAY_ADDRESS`` so
``ray.init()`` connects. We launch, fan out and collect; the engines do the
collective work and the scheduling.

Every rank is its own node as far as the engine can tell: ``LOCAL_RANK`` is
0, ``NODE_RANK`` the rank, and the rank's GPUs (if any) are the only ones it
sees, numbered from 0, so ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))``
works the same on the local backend (GPUs split through
``CUDA_VISIBLE_DEVICES``) and on Kubernetes (one pod per rank).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ComputeSpecError
from .names import MAX_NAME_CHARS, shown

#: Engines a compute can be distributed over.
FRAMEWORKS = ("pytorch", "ray")
#: Most workers one distributed compute may have.
MAX_WORKERS = 256
#: The port torch.distributed's rendezvous listens on in a pod (Kubernetes; locally a free port is chosen).
DEFAULT_MASTER_PORT = 29500
#: The Ray head's GCS port in a pod (Kubernetes; locally a free port is chosen).
DEFAULT_RAY_PORT = 6379
#: Environment variables a distributed compute sets in every worker (a user's env_vars may not set them).
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
             "MASTER_ADDR", "MASTER_PORT")
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
#: ``distribution_args`` each framework understands, with what each one is.
DISTRIBUTION_ARGS = {
    "pytorch": {"master_port": "the rendezvous port of rank 0 (default: a free port locally, 29500 in pods)"},
    "ray": {"port": "the head's GCS port (default: a free port locally, 6379 in pods)",
            "num_cpus": "CPUs each Ray node offers to tasks (default: the compute's cpus, else Ray's count)",
            "ray_version": "the Ray version of the image (KubeRay's rayVersion; default: the one installed here)"},
}


def rank_name(name: str, rank: int) -> str:
    """The compute name of one worker: ``{name}-r{rank}`` (its own kernel, logs and registry entry)."""
    return f"{name}-r{rank}"


def _port(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65535:
        raise ComputeSpecError(f"distribute: {param} must be a port number from 1024 to 65535, e.g. "
                               f"{param}={DEFAULT_MASTER_PORT}; got {shown(value)}")
    return value


@dataclass(frozen=True)
class DistributedConfig:
    """What :meth:`~kt_jupyter.compute.Compute.distribute` set: the engine, the number of workers, its options."""

    #: ``"pytorch"`` (torch.distributed) or ``"ray"``
    framework: str
    #: pod kernels in all (Ray: the head and N-1 workers)
    workers: int
    #: the framework's options (see :data:`DISTRIBUTION_ARGS`), validated
    distribution_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arguments(cls, framework: object = "pytorch", workers: object = None,
                       distribution_args: object = None) -> DistributedConfig:
        """Validate the seed's three parameters; a ComputeSpecError names a bad one and shows a good value."""
        if framework not in FRAMEWORKS:
            raise ComputeSpecError(f"distribute: framework must be one of {', '.join(map(repr, FRAMEWORKS))}; "
                                   f"got {shown(framework)}")
        if isinstance(workers, str) and workers.strip().isdigit():
            workers = int(workers)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise ComputeSpecError(f"distribute: workers must be a whole number from 1 to {MAX_WORKERS}, e.g. "
                                   f"workers=2; got {shown(workers)}")
        if distribution_args is None:
            distribution_args = {}
        if not isinstance(distribution_args, dict):
            raise ComputeSpecError(f"distribute: distribution_args must be a dict, e.g. "
                                   f"{{'master_port': {DEFAULT_MASTER_PORT}}}; got {shown(distribution_args)}")
        known = DISTRIBUTION_ARGS[str(framework)]
        args: dict[str, Any] = {}
        for key, value in distribution_args.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else \
                    "; known: " + "; ".join(f"{k} ({v})" for k, v in known.items())
                raise ComputeSpecError(f"distribute: {framework} has no distribution_args key {shown(key)}{hint}")
            if key in ("master_port", "port"):
                args[key] = _port(value, key)
            elif key == "num_cpus":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ComputeSpecError(f"distribute: num_cpus must be a whole number >= 1, e.g. num_cpus=2; "
                                           f"got {shown(value)}")
                args[key] = value
            else:  # ray_version
                if not isinstance(value, str) or not value.replace(".", "").isalnum() or len(value) > 32:
                    raise ComputeSpecError(f"distribute: ray_version must be a version like '2.60.0'; "
                                           f"got {shown(value)}")
                args[key] = value
        return cls(str(framework), workers, args)

    @classmethod
    def from_dict(cls, data: object) -> DistributedConfig:
        """Rebuild from :meth:`to_dict` (a spec sent over REST, kept in a registry), validating again."""
        if isinstance(data, DistributedConfig):
            return data
        if not isinstance(data, dict) or set(data) - {"framework", "workers", "distribution_args"}:
            raise ComputeSpecError("distributed must be a dict like {'framework': 'pytorch', 'workers': 2}; "
                                   f"got {shown(data)}")
        return cls.from_arguments(data.get("framework", "pytorch"), data.get("workers"),
                                  data.get("distribution_args"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (:meth:`from_dict` rebuilds it)."""
        return {"framework": self.framework, "workers": self.workers,
                "distribution_args": dict(self.distribution_args)}

    def check_name(self, name: str) -> None:
        """The workers' names (``{name}-r{rank}``) must be valid compute names too."""
        longest = rank_name(name, self.workers - 1)
        if len(longest) > MAX_NAME_CHARS:
            raise ComputeSpecError(f"distribute: worker names are {name}-r0..{longest}, longer than "
                                   f"{MAX_NAME_CHARS} characters; pick a shorter compute name")

    def check_env(self, env_vars: dict[str, str]) -> None:
        """A user's env_vars may not set what the workers' environment is made of."""
        clash = sorted(set(env_vars) & set(TORCH_ENV + RAY_ENV))
        if clash:
            raise ComputeSpecError(f"env_vars: {clash[0]} is set for each worker by distribute(); choose another "
                                   "name")


def torch_env(rank: int, workers: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The ``env://`` variables of torch.distributed for one rank (each rank is its own node)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(workers), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "NODE_RANK": str(rank), "GROUP_RANK": str(rank), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port)}


def split_gpus(per_worker: int, workers: int, available: int, name: str) -> list[str | None]:
    """Each rank's ``CUDA_VISIBLE_DEVICES`` on one machine (None: no GPUs), or a clear error when too few."""
    if not per_worker:
        return [None] * workers
    wanted = per_worker * workers
    if wanted > available:
        raise ComputeSpecError(
            f"compute {name!r} asks for {per_worker} GPU(s) on each of {workers} workers ({wanted} in all) but this "
            f"machine has {available}; ask for fewer workers or GPUs, or use --backend kubernetes")
    return [",".join(str(rank * per_worker + i) for i in range(per_worker)) for rank in range(workers)]


#: How a distributed compute's phase follows its ranks': the first of these any rank is in.
GROUP_PHASE_ORDER = ("failed", "stopped", "launching", "running", "ready")


def fold_workers(rows: list[Any]) -> list[Any]:
    """``list`` rows (:class:`~kt_jupyter.backends.KernelInfo`) with each distributed compute's ranks
    (``{name}-r{k}``, known by the ``distributed`` settings their spec keeps) folded into one row: ``NAME``,
    ``N pytorch workers``, in the phase of its least ready rank, the ranks that are not ready in its detail."""
    groups: dict[str, list[tuple[int, Any]]] = {}
    out: list[Any] = []
    for row in rows:
        spec = (row.spec or {}).get("distributed")
        base, _, rank = row.name.rpartition("-r")
        if not isinstance(spec, dict) or not base or not rank.isdigit():
            out.append(row)
            continue
        if base not in groups:
            groups[base] = []
            out.append(base)  # the group's place in the list: where its rank 0 (or first rank) was
        groups[base].append((int(rank), row))
    return [_group_row(item, groups[item]) if isinstance(item, str) else item for item in out]


def _group_row(name: str, ranks: list[tuple[int, Any]]) -> Any:
    ranks.sort(key=lambda pair: pair[0])
    first = ranks[0][1]
    try:
        config = DistributedConfig.from_dict(first.spec["distributed"])
    except ComputeSpecError:
        config = DistributedConfig("pytorch", len(ranks))
    phases = {r: row.phase for r, row in ranks}
    missing = [r for r in range(config.workers) if r not in phases]
    phase = "stopped" if missing and "failed" not in phases.values() else \
        next((p for p in GROUP_PHASE_ORDER if p in phases.values()), first.phase)
    notes = [f"rank {r}: {row.phase}" + (f" - {row.detail.splitlines()[0]}" if row.detail else "")
             for r, row in ranks if row.phase != "ready"] + [f"rank {r}: gone" for r in missing]
    where = f"{config.workers} {config.framework} workers (rank 0: {dict(ranks).get(0, first).where})"
    return replace(first, name=name, phase=phase, where=where, detail="; ".join(notes),
                   pid=dict(ranks)[0].pid if 0 in dict(ranks) else None)
