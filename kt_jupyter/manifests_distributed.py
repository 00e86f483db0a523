"""A distributed compute on Kubernetes as objects, plain dicts. Pure but for what :mod:`kt_jupyter.manifests` reads.

**pytorch** (torch.distributed): a headless Service and a StatefulSet of N
pods, one pod kernel per rank, built from the very pod template the
single-kernel Deployment gets (:func:`kt_jupyter.manifests.build_deployment`:
security context, probes, env, bulk port, GPUs per pod). A StatefulSet rather
than an indexed Job because:

- each rank has a stable DNS name through the headless Service,
  ``<sts>-<rank>.<svc>.<ns>.svc``, known before any pod exists: rank 0's is
  ``MASTER_ADDR``, and with ``publishNotReadyAddresses`` it resolves while
  the ranks still start (rendezvous happens before anyone is Ready);
- a pod kernel is a server that runs until it is deleted, not a task that
  completes: a Job counts an exited kernel as done or failed and backs off,
  while a StatefulSet restarts one rank in place, same name and DNS name;
- ``podManagementPolicy: Parallel`` starts every rank at once (the default
  ``OrderedReady`` would start them one after the other);
- ``%kt down`` deletes one object in the foreground and its pods go with it.

RANK comes from the pod's ordinal: the container's shell takes it from its
hostname's suffix (``<sts>-<ordinal>``, set on every Kubernetes version; the
``apps.kubernetes.io/pod-index`` label says the same on 1.28+). Ranks are
spread over nodes by a preferred pod anti-affinity on the hostname.

``volumes`` are shared: every rank mounts the one PersistentVolumeClaim of
each volume, as a single kernel does, because what ranks keep on a volume
(the dataset they read, rank 0's checkpoints the others load) is meant to be
seen by all of them; a claim per rank (``volumeClaimTemplates``) would give
each rank a private disk and an empty one to a rank added later. A sized
volume therefore needs ``access_mode="ReadWriteMany"`` once ranks run on
several nodes (``ReadWriteOnce`` mounts on one node only; ``ReadWriteOncePod``
is refused).

**ray**: a KubeRay ``ray.io/v1`` ``RayCluster``: the head group's pod runs
the pod kernel next to the Ray head (``ray.io/overwrite-container-cmd``: our
command starts KubeRay's generated ``ray start`` itself, KubeRay >= 1.1), and
N-1 workers run only Ray. Ray's token authentication is on
(``authOptions.mode: token``, KubeRay >= 1.5), and ``RAY_ADDRESS`` in the
head's environment makes ``ray.init()`` connect.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .distributed import DEFAULT_MASTER_PORT, DEFAULT_RAY_PORT, torch_env
from .errors import ComputeSpecError
from .manifests import (
    CONTAINER_NAME,
    SPEC_ANNOTATION,
    build_deployment,
    build_service,
    object_labels,
    selector_labels,
)

if TYPE_CHECKING:
    from .compute import Compute

#: The StatefulSet controller's label carrying a pod's ordinal (Kubernetes 1.28+).
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
#: Name of the rendezvous port (rank 0's TCPStore) in pods and the headless Service.
RENDEZVOUS_PORT_NAME = "rendezvous"
#: KubeRay annotation: keep our container command (it runs ``$KUBERAY_GEN_RAY_START_CMD`` itself).
RAY_OVERWRITE_CMD_ANNOTATION = "ray.io/overwrite-container-cmd"
#: The env var holding the ``ray start`` command KubeRay generated for a pod.
RAY_START_CMD_ENV = "KUBERAY_GEN_RAY_START_CMD"
#: The Ray version a RayCluster names when neither ``ray_version`` nor an installed ray says one.
DEFAULT_RAY_VERSION = "2.60.0"
#: The worker group's name in the RayCluster.
RAY_WORKER_GROUP = "workers"
#: Weight of the preferred anti-affinity that spreads ranks over nodes.
SPREAD_WEIGHT = 100
#: Ray wants many open files (KubeRay's own generated command starts with the same ulimit).
_ULIMIT = "ulimit -n 65536 2>/dev/null || true"
#: The shell lines that give a rank its number from its hostname's ordinal suffix.
RANK_FROM_HOSTNAME = ('RANK="${HOSTNAME##*-}"\n'
                      'case "$RANK" in ""|*[!0-9]*) echo "[kt] pod name $HOSTNAME has no ordinal suffix" >&2; '
                      'exit 1;; esac\n'
                      'export RANK NODE_RANK="$RANK" GROUP_RANK="$RANK"\n')


def headless_service_name(compute: Compute) -> str:
    """The headless Service (and StatefulSet) name: the compute's service name."""
    return compute.service_name


def rank_pod_name(compute: Compute, rank: int) -> str:
    """The pod of one rank: ``<sts>-<rank>``."""
    return f"{compute.service_name}-{rank}"


def rank_dns_name(compute: Compute, rank: int) -> str:
    """A rank's stable DNS name through the headless Service: ``<sts>-<rank>.<svc>.<ns>.svc``."""
    return f"{rank_pod_name(compute, rank)}.{headless_service_name(compute)}.{compute.namespace}.svc"


def _config(compute: Compute, framework: str) -> Any:
    config = compute.distributed_config
    if config is None or config.framework != framework:
        raise ComputeSpecError(f"compute {compute.name!r} is not distributed over {framework}")
    if compute.inactivity_ttl_s:
        raise ComputeSpecError(f"compute {compute.name!r}: inactivity_ttl is not supported with distribute() on "
                               "Kubernetes yet; drop inactivity_ttl and `%kt down` the workers when done")
    return config


def _pod_compute(compute: Compute, env: Mapping[str, str]) -> Compute:
    """The compute one pod runs: the group's settings and ``env``, not marked distributed (a plain pod)."""
    from .compute import Compute

    spec = compute.to_dict()
    spec.update(env_vars={**compute.env_vars, **env}, distributed=None)
    return Compute.from_dict(spec)


def _spec_annotation(compute: Compute) -> dict[str, str]:
    """The group compute (with its ``distributed`` settings) on the workload object, as the Deployment has it."""
    return {SPEC_ANNOTATION: json.dumps(compute.to_dict(), sort_keys=True, separators=(",", ":"))}


def _metadata(compute: Compute, name: str, component: str,
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": compute.namespace,
                            "labels": object_labels(compute, component)}
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


def _template(compute: Compute, env: Mapping[str, str], source_files: dict[str, str] | None,
              install_env: Mapping[str, str] | None) -> dict[str, Any]:
    """The single-kernel Deployment's pod template for ``compute`` with ``env`` added (a copy)."""
    deployment = build_deployment(_pod_compute(compute, env), source_files=source_files, install_env=install_env)
    return copy.deepcopy(deployment["spec"]["template"])


def _container(template: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in template["spec"]["containers"] if c["name"] == CONTAINER_NAME)


def _spread(template: dict[str, Any], compute: Compute) -> None:
    """Prefer one rank per node (a preferred pod anti-affinity on the hostname), keeping the node affinity."""
    affinity = template["spec"].setdefault("affinity", {})
    affinity["podAntiAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": SPREAD_WEIGHT, "podAffinityTerm": {
            "labelSelector": {"matchLabels": selector_labels(compute)}, "topologyKey": "kubernetes.io/hostname"}}]}


# ---------------------------------------------------------------------- pytorch: headless Service + StatefulSet

def master_port(compute: Compute) -> int:
    """Rank 0's rendezvous port in the pods (``distribution_args['master_port']``, default 29500)."""
    config = compute.distributed_config
    return int((config.distribution_args if config else {}).get("master_port") or DEFAULT_MASTER_PORT)


def build_headless_service(compute: Compute) -> dict[str, Any]:
    """The headless Service giving each rank a DNS name, resolvable before the rank is Ready."""
    service = build_service(compute)
    service["metadata"] = _metadata(compute, headless_service_name(compute), "headless-service")
    service["spec"].pop("type", None)
    service["spec"].update(clusterIP="None", publishNotReadyAddresses=True)
    service["spec"]["ports"].append({"name": RENDEZVOUS_PORT_NAME, "port": master_port(compute),
                                     "targetPort": RENDEZVOUS_PORT_NAME, "protocol": "TCP"})
    return service


def build_statefulset(compute: Compute, *, source_files: dict[str, str] | None = None,
                      install_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The StatefulSet of the N ranks: torch.distributed's environment, RANK from the pod's ordinal."""
    config = _config(compute, "pytorch")
    check_shared_volumes(compute, config.workers)
    port = master_port(compute)
    env = {k: v for k, v in torch_env(0, config.workers, rank_dns_name(compute, 0), port).items()
           if k not in ("RANK", "NODE_RANK", "GROUP_RANK")}
    template = _template(compute, env, source_files, install_env)
    container = _container(template)
    container["command"][-1] = RANK_FROM_HOSTNAME + container["command"][-1]
    container["ports"].append({"name": RENDEZVOUS_PORT_NAME, "containerPort": port, "protocol": "TCP"})
    _spread(template, compute)
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _metadata(compute, compute.service_name, "statefulset",
                              {**compute.annotations, **_spec_annotation(compute)}),
        "spec": {
            "serviceName": headless_service_name(compute),
            "replicas": config.workers,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(compute)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": template,
        },
    }


def check_shared_volumes(compute: Compute, workers: int) -> None:
    """Every rank mounts the same claim of each volume (one PVC per volume, as for one kernel): refuse a volume
    made ``ReadWriteOncePod``, which only one pod can mount, when there are several ranks."""
    for vol in compute.volumes:
        if workers > 1 and vol.access_mode == "ReadWriteOncePod":
            raise ComputeSpecError(
                f"volume {vol.name!r} is ReadWriteOncePod, but all {workers} workers of {compute.name!r} mount it "
                "(one claim shared by every rank); use access_mode='ReadWriteMany' (ranks on several nodes) or "
                "'ReadWriteOnce' (all ranks on one node)")


# ---------------------------------------------------------------------- ray: a KubeRay RayCluster

def ray_port(compute: Compute) -> int:
    """The Ray head's GCS port (``distribution_args['port']``, default 6379)."""
    config = compute.distributed_config
    return int((config.distribution_args if config else {}).get("port") or DEFAULT_RAY_PORT)


def ray_version(compute: Compute) -> str:
    """``distribution_args['ray_version']``, else the version of the ray installed here, else a default."""
    config = compute.distributed_config
    asked = (config.distribution_args if config else {}).get("ray_version")
    if asked:
        return str(asked)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return DEFAULT_RAY_VERSION


def _ray_start_params(compute: Compute, head: bool) -> dict[str, str]:
    config = compute.distributed_config
    params = {"port": str(ray_port(compute)), "include-dashboard": "false"} if head else {}
    cpus = (config.distribution_args if config else {}).get("num_cpus")
    if cpus:
        params["num-cpus"] = str(cpus)
    return params


def build_raycluster(compute: Compute, *, source_files: dict[str, str] | None = None,
                     install_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The RayCluster: the head pod runs Ray's head and the pod kernel (``RAY_ADDRESS`` set), N-1 workers Ray."""
    config = _config(compute, "ray")
    head = _template(compute, {"RAY_ADDRESS": f"127.0.0.1:{ray_port(compute)}", "RAY_USAGE_STATS_ENABLED": "0"},
                     source_files, install_env)
    container = _container(head)
    # KubeRay's ray start (with --block; eval: its words may be quoted) in the background, the pod kernel in the
    # foreground: the container lives as long as the kernel; a Ray head that exits is seen by ray.init() in a cell.
    container["command"][-1] = f'{_ULIMIT}\neval "${RAY_START_CMD_ENV}" &\n' + container["command"][-1]
    workers = _template(compute, {"RAY_USAGE_STATS_ENABLED": "0"}, source_files, install_env)
    worker = _container(workers)
    worker["command"] = ["/bin/sh", "-c", f'{_ULIMIT}\neval "exec ${RAY_START_CMD_ENV}"']
    for key in ("ports", "startupProbe", "readinessProbe"):
        worker.pop(key, None)  # KubeRay gives Ray's own probes to a container without them
    _spread(head, compute)
    _spread(workers, compute)
    spec: dict[str, Any] = {
        "rayVersion": ray_version(compute),
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": _ray_start_params(compute, True), "template": head},
        "workerGroupSpecs": [],
    }
    if config.workers > 1:
        n = config.workers - 1
        spec["workerGroupSpecs"].append({"groupName": RAY_WORKER_GROUP, "replicas": n, "minReplicas": n,
                                         "maxReplicas": n, "rayStartParams": _ray_start_params(compute, False),
                                         "template": workers})
    annotations = {**compute.annotations, **_spec_annotation(compute), RAY_OVERWRITE_CMD_ANNOTATION: "true"}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": _metadata(compute, compute.service_name, "raycluster", annotations), "spec": spec}
