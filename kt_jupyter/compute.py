"""``Compute``: where a pod kernel runs, as in the seed's ``kt.Compute``.

Every parameter of the seed reference is parsed, validated and normalised at
construction, with no I/O; a bad one raises a
:class:`~kt_jupyter.errors.ComputeSpecError` that names it and shows a good
value. A few things are resolved lazily, in properties: the namespace (from
the environment and config files, see :func:`resolve_namespace`) and the
user name in :attr:`Compute.service_name`.
"""

from __future__ import annotations

import difflib
import getpass
import json
import os
import shlex
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pod_kernel.protocol import SERIALIZATIONS

from .autoscaling import AutoscalingConfig
from .distributed import DistributedConfig
from .errors import ComputeSpecError
from .gpus import check_gpu_node_selector, check_gpu_type
from .image import Image, as_image, check_env_vars
from .k8s_fields import (
    LoggingConfig,
    Secret,
    Volume,
    as_logging_config,
    as_secrets,
    as_volumes,
    check_abs_path,
    check_bool,
    check_dns_label,
    check_dns_subdomain,
    check_label_value,
    check_string_map,
    check_tolerations,
    dns1123_label,
    resolve_namespace,
)
from .lifecycle import ComputeLifecycle, operations
from .names import check_compute_name
from .quantities import parse_cpus, parse_duration, parse_gpus, parse_memory

if TYPE_CHECKING:
    from .backends import KernelInfo
    from .rsync import RsyncResult

__all__ = ["Compute", "Image", "LoggingConfig", "Secret", "Volume", "resolve_namespace"]

#: Backends a compute can name.
BACKENDS = ("local", "kubernetes")
#: The port a pod kernel listens on inside a pod.
POD_KERNEL_PORT = 32300
#: Seconds to wait for a kernel to become ready, unless ``launch_timeout`` or ``KT_LAUNCH_TIMEOUT`` says otherwise.
DEFAULT_LAUNCH_TIMEOUT_S = 900.0
#: Image pull policies Kubernetes knows.
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
#: Label keys kt_jupyter sets itself; user labels may not override them.
RESERVED_LABELS = ("app.kubernetes.io/managed-by", "kt.dev/compute", "kt.dev/name", "kt.dev/component")
#: Environment variables kt_jupyter sets in the pod itself.
RESERVED_ENV = ("KT_TOKEN", "KT_TOKEN_FILE", "KT_READY_FD")
#: Environment variables Knative sets in an autoscaled compute's pods (its webhook refuses them in env).
KNATIVE_RESERVED_ENV = ("PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION")

#: ``autoscale()``'s keyword settings beyond the seed's three (see :class:`~kt_jupyter.autoscaling.AutoscalingConfig`).
AUTOSCALE_SETTINGS = ("metric", "target", "target_utilization", "window", "initial_replicas", "scale_down_delay",
                      "scale_to_zero_pod_retention_period", "container_concurrency", "autoscaler_class")


def _check_int(value: object, param: str, minimum: int, example: int) -> int:
    if isinstance(value, bool):
        raise ComputeSpecError(f"{param} must be a whole number like {example}; got {value!r}")
    try:
        number = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ComputeSpecError(f"{param} must be a whole number >= {minimum}, e.g. {example}; got {value!r}")
    return number


def _optional(value: Any, check: Any, *args: Any) -> Any:
    return None if value is None else check(value, *args)


class Compute(ComputeLifecycle):
    """The resources and Kubernetes settings of one pod kernel (the seed's ``kt.Compute``).

    ``name`` and ``backend`` are our additions: the same ``name`` reaches the
    same warm kernel; ``backend`` is ``"local"`` (a subprocess here, the
    default) or ``"kubernetes"``. A Compute is immutable; use
    :meth:`with_overrides` for a changed copy. All parameters are keyword-only:

    - ``cpus`` ``2``/``"0.5"``/``"500m"``; ``memory``, ``disk_size``, ``gpu_memory``,
      ``shared_memory_limit`` ``"4Gi"``/``"4G"``/bytes; ``gpus`` whole GPUs;
      ``gpu_type`` ``"A100"``/``"L4"``/``"nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB"`` -> node
      affinity over the GPU labels of GPU Feature Discovery, GKE and Karpenter (implies one GPU);
      ``gpu_memory`` shares one GPU through the KAI scheduler.
    - ``namespace`` (else resolved lazily, see :func:`resolve_namespace`), ``labels``,
      ``annotations``, ``node_selector``, ``tolerations`` (the GPU toleration is added
      for GPU pods), ``service_account_name``, ``service_template`` (deep-merged
      into the Deployment last).
    - ``image`` an :class:`~kt_jupyter.image.Image` or image name; ``env_vars``;
      ``secrets`` Secret names or :class:`Secret`; ``volumes`` PVC names or
      :class:`Volume`; ``working_dir`` absolute.
    - ``queue`` (Kueue's ``kueue.x-k8s.io/queue-name``; KAI's queue with ``gpu_memory`` or a
      ``kai-scheduler`` schedulerName in ``service_template``), ``priority_class_name``, ``replicas``, ``freeze``
      (code and dependencies baked into the image), ``inactivity_ttl`` (``"30m"``,
      seconds), ``launch_timeout`` (default 900 s or ``KT_LAUNCH_TIMEOUT``),
      ``image_pull_policy``, ``gpu_anti_affinity`` (or ``KT_GPU_ANTI_AFFINITY``),
      ``logging_config``, ``kubeconfig_path``, ``allowed_serialization``
      (``["json", "pickle"]`` or a subset).
    - ``autoscaling``: what :meth:`autoscale` sets (an :class:`~kt_jupyter.autoscaling.AutoscalingConfig`
      or its ``to_dict()``), so copies and specs sent over REST keep it.
    - ``distributed``: what :meth:`distribute` sets (a :class:`~kt_jupyter.distributed.DistributedConfig`
      or its ``to_dict()``), likewise.

    Every attribute below is set once, validated, by the constructor; none can be set afterwards.
    """

    name: str
    #: ``"local"`` or ``"kubernetes"``
    backend: str
    #: Kubernetes' canonical CPU quantity (``"500m"``) and the same in cores
    cpus: str | None
    cpu_cores: float | None
    #: canonical quantities (``"4Gi"``) and the same in bytes
    memory: str | None
    memory_bytes: int | None
    disk_size: str | None
    disk_bytes: int | None
    gpu_memory: str | None
    gpu_memory_bytes: int | None
    shared_memory_limit: str | None
    shm_bytes: int | None
    gpu_type: str | None
    #: whole GPUs (``gpu_type``/``gpu_memory`` imply one); ``gpus`` the same as a string, None for none
    gpu_count: int
    gpus: str | None
    labels: dict[str, str]
    annotations: dict[str, str]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    service_account_name: str | None
    service_template: dict[str, Any]
    image: Image
    env_vars: dict[str, str]
    secrets: list[Secret]
    volumes: list[Volume]
    working_dir: str | None
    queue: str | None
    priority_class_name: str | None
    replicas: int
    freeze: bool
    inactivity_ttl_s: float | None
    launch_timeout_s: float
    image_pull_policy: str | None
    gpu_anti_affinity: bool
    logging_config: LoggingConfig
    kubeconfig_path: str | None
    allowed_serialization: list[str]
    _namespace: str | None
    _resolved_namespace: str | None
    _autoscaling: AutoscalingConfig | None
    _distributed: DistributedConfig | None

    def __init__(
        self,
        *,
        name: str = "default",
        backend: str = "local",
        cpus: str | float | None = None,
        memory: str | int | None = None,
        disk_size: str | int | None = None,
        gpus: str | int | None = None,
        gpu_type: str | None = None,
        gpu_memory: str | int | None = None,
        shared_memory_limit: str | int | None = None,
        namespace: str | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        node_selector: dict[str, str] | None = None,
        tolerations: list[dict[str, Any]] | None = None,
        service_account_name: str | None = None,
        service_template: dict[str, Any] | None = None,
        image: Image | str | dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
        secrets: list[str | Secret] | None = None,
        volumes: list[str | Volume] | None = None,
        working_dir: str | None = None,
        queue: str | None = None,
        priority_class_name: str | None = None,
        replicas: int = 1,
        freeze: bool = False,
        inactivity_ttl: str | float | None = None,
        launch_timeout: str | float | None = None,
        image_pull_policy: str | None = None,
        gpu_anti_affinity: bool | None = None,
        logging_config: LoggingConfig | dict[str, Any] | None = None,
        kubeconfig_path: str | None = None,
        allowed_serialization: list[str] | str | None = None,
        autoscaling: AutoscalingConfig | dict[str, Any] | None = None,
        distributed: DistributedConfig | dict[str, Any] | None = None,
    ) -> None:
        """Validate and normalise every parameter; see the seed reference for their meaning."""
        s = object.__setattr__
        s(self, "name", check_compute_name(name))
        if backend not in BACKENDS:
            raise ComputeSpecError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        s(self, "backend", backend)

        # resources
        cpu = _optional(cpus, parse_cpus, "cpus")
        s(self, "cpus", cpu and cpu[0])
        s(self, "cpu_cores", cpu and cpu[1])
        mem = _optional(memory, parse_memory, "memory")
        s(self, "memory", mem and mem[1])
        s(self, "memory_bytes", mem and mem[0])
        disk = _optional(disk_size, parse_memory, "disk_size")
        s(self, "disk_size", disk and disk[1])
        s(self, "disk_bytes", disk and disk[0])
        gmem = _optional(gpu_memory, parse_memory, "gpu_memory")
        s(self, "gpu_memory", gmem and gmem[1])
        s(self, "gpu_memory_bytes", gmem and gmem[0])
        shm = _optional(shared_memory_limit, parse_memory, "shared_memory_limit")
        s(self, "shared_memory_limit", shm and shm[1])
        s(self, "shm_bytes", shm and shm[0])
        if shm and mem and shm[0] > mem[0]:
            raise ComputeSpecError(
                f"shared_memory_limit ({shm[1]}) is larger than memory ({mem[1]}); /dev/shm counts against the "
                f"memory limit, so raise memory or lower shared_memory_limit, e.g. shared_memory_limit='{mem[1]}'")
        s(self, "gpu_type", _optional(gpu_type, check_gpu_type, "gpu_type"))
        count = parse_gpus(gpus)
        wants_gpu = [p for p, v in (("gpu_type", gpu_type), ("gpu_memory", gpu_memory)) if v is not None]
        if wants_gpu and gpus is not None and count == 0:
            raise ComputeSpecError(
                f"{wants_gpu[0]} asks for a GPU but gpus={gpus!r}; drop {wants_gpu[0]} or set gpus=1")
        if wants_gpu and count == 0:
            count = 1  # gpu_type / gpu_memory imply one GPU
        if gmem and count > 1:
            raise ComputeSpecError(
                f"gpu_memory shares a single GPU, but gpus={gpus!r}; use gpus=1 with gpu_memory, or drop gpu_memory")
        s(self, "gpu_count", count)
        s(self, "gpus", str(count) if count else None)

        # kubernetes
        s(self, "_namespace", _optional(namespace, check_dns_label, "namespace"))
        s(self, "labels", check_string_map(labels, "labels", values="label", reserved=RESERVED_LABELS))
        s(self, "annotations", check_string_map(annotations, "annotations", values="any"))
        s(self, "node_selector", check_string_map(node_selector, "node_selector", values="label"))
        check_gpu_node_selector(self.gpu_type, self.node_selector)
        s(self, "tolerations", check_tolerations(tolerations))
        s(self, "service_account_name", _optional(service_account_name, check_dns_subdomain, "service_account_name"))
        if service_template is not None and not isinstance(service_template, dict):
            raise ComputeSpecError(
                "service_template must be a dict shaped like a Deployment, e.g. "
                f"{{'spec': {{'template': {{'spec': {{'hostIPC': True}}}}}}}}; got {service_template!r}")
        try:
            template = json.loads(json.dumps(service_template or {}))
        except (TypeError, ValueError) as exc:
            raise ComputeSpecError(f"service_template must hold only JSON values (dicts, lists, strings, "
                                   f"numbers, booleans, None): {exc}") from None
        s(self, "service_template", template)

        # image & environment
        s(self, "image", as_image(image))
        env = check_env_vars(env_vars, "env_vars")
        clash = sorted(set(env) & set(RESERVED_ENV))
        if clash:
            raise ComputeSpecError(f"env_vars: {clash[0]} is set by kt_jupyter itself; choose another name")
        s(self, "env_vars", env)
        s(self, "secrets", as_secrets(secrets))
        s(self, "volumes", as_volumes(volumes))
        mounts = [m for m in [v.mount_path for v in self.volumes] + [x.mount_path for x in self.secrets] if m]
        dup = sorted({m for m in mounts if mounts.count(m) > 1} | ({"/dev/shm"} & set(mounts)))
        if dup:
            raise ComputeSpecError(
                f"volumes/secrets: mount path {dup[0]!r} is used twice (or is /dev/shm, which "
                "shared_memory_limit owns); give each its own mount_path")
        s(self, "working_dir", _optional(working_dir, check_abs_path, "working_dir", "/app"))

        # scheduling & behaviour
        s(self, "queue", _optional(queue, check_label_value, "queue"))
        s(self, "priority_class_name", _optional(priority_class_name, check_dns_subdomain, "priority_class_name"))
        s(self, "replicas", _check_int(replicas, "replicas", 1, 1))
        s(self, "freeze", check_bool(freeze, "freeze"))
        s(self, "inactivity_ttl_s", _optional(inactivity_ttl, parse_duration, "inactivity_ttl"))
        if launch_timeout is None and os.environ.get("KT_LAUNCH_TIMEOUT"):
            launch_s = parse_duration(os.environ["KT_LAUNCH_TIMEOUT"], "KT_LAUNCH_TIMEOUT (environment variable)")
        else:
            launch_s = _optional(launch_timeout, parse_duration, "launch_timeout") or DEFAULT_LAUNCH_TIMEOUT_S
        s(self, "launch_timeout_s", launch_s)
        if image_pull_policy is not None:
            policy = {p.lower(): p for p in PULL_POLICIES}.get(str(image_pull_policy).lower())
            if policy is None:
                raise ComputeSpecError(
                    f"image_pull_policy must be one of {', '.join(PULL_POLICIES)}; got {image_pull_policy!r}")
            image_pull_policy = policy
        s(self, "image_pull_policy", image_pull_policy)
        if gpu_anti_affinity is None:
            env_value = os.environ.get("KT_GPU_ANTI_AFFINITY")
            anti = check_bool(env_value, "KT_GPU_ANTI_AFFINITY (environment variable)") if env_value else False
        else:
            anti = check_bool(gpu_anti_affinity, "gpu_anti_affinity")
            if anti and count:
                raise ComputeSpecError(
                    "gpu_anti_affinity=True keeps the pod off GPU nodes, but this compute asks for a GPU; "
                    "drop one of them")
        s(self, "gpu_anti_affinity", anti)
        s(self, "logging_config", as_logging_config(logging_config))
        if kubeconfig_path is not None and (not isinstance(kubeconfig_path, str) or not kubeconfig_path.strip()):
            raise ComputeSpecError(
                f"kubeconfig_path must be a file path like '~/.kube/config'; got {kubeconfig_path!r}")
        s(self, "kubeconfig_path", kubeconfig_path)
        s(self, "allowed_serialization", self._check_serialization(allowed_serialization))
        s(self, "_resolved_namespace", None)
        s(self, "_autoscaling", None if autoscaling is None else self._check_autoscaling(
            AutoscalingConfig.from_dict(autoscaling)))
        s(self, "_distributed", None)
        if distributed is not None:
            s(self, "_distributed", self._check_distributed(DistributedConfig.from_dict(distributed)))

    def _check_autoscaling(self, config: AutoscalingConfig) -> AutoscalingConfig:
        """``config``, if this compute's other settings go with Knative autoscaling."""
        if self.backend != "kubernetes":
            raise ComputeSpecError(f"autoscale needs Knative Serving on a Kubernetes cluster, but this compute's "
                                   f"backend is {self.backend!r} (one subprocess here, nothing to scale); use "
                                   "Compute(backend='kubernetes', ...).autoscale(...)")
        if getattr(self, "_distributed", None) is not None:
            raise ComputeSpecError("autoscale: a distributed compute (distribute()) cannot also be autoscaled; "
                                   "drop autoscale() or distribute()")
        if self.replicas != 1:
            raise ComputeSpecError(f"autoscale sets the number of pods (min_replicas..max_replicas), but this "
                                   f"compute has replicas={self.replicas}; drop replicas")
        if self.inactivity_ttl_s is not None:
            raise ComputeSpecError("autoscale: an autoscaled compute scales itself to zero when idle; drop "
                                   "inactivity_ttl and use min_replicas=0 (and scale_to_zero_pod_retention_period)")
        clash = sorted(set(self.env_vars) & set(KNATIVE_RESERVED_ENV))
        if clash:
            raise ComputeSpecError(f"env_vars: Knative sets {clash[0]} in an autoscaled compute's pods; "
                                   "choose another name")
        return config

    def _check_distributed(self, config: DistributedConfig) -> DistributedConfig:
        """``config``, if this compute's other settings go with running on several workers."""
        if self._autoscaling is not None:
            raise ComputeSpecError("distribute: an autoscaled compute (Knative) cannot also be distributed; "
                                   "drop autoscale() or distribute()")
        if self.replicas != 1:
            raise ComputeSpecError(f"distribute sets the number of pods (workers), but this compute has "
                                   f"replicas={self.replicas}; drop replicas")
        config.check_name(self.name)
        config.check_env(self.env_vars)
        return config

    @staticmethod
    def _check_serialization(value: object) -> list[str]:
        if value is None:
            return list(SERIALIZATIONS)
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or any(v not in SERIALIZATIONS for v in items):
            raise ComputeSpecError(
                f"allowed_serialization must be a non-empty subset of {list(SERIALIZATIONS)}, e.g. ['json']; "
                f"got {value!r}")
        return [v for v in SERIALIZATIONS if v in items]

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Compute is immutable; use compute.with_overrides({key}=...) for a changed copy")

    # ------------------------------------------------------------------ seed properties

    @property
    def namespace(self) -> str:
        """The Kubernetes namespace: explicit, else resolved once by :func:`resolve_namespace`."""
        if self._namespace is not None:
            return self._namespace
        resolved = self._resolved_namespace
        if resolved is None:
            resolved = resolve_namespace(kubeconfig_path=self.kubeconfig_path)[0]
            object.__setattr__(self, "_resolved_namespace", resolved)
        return resolved

    @property
    def username(self) -> str:
        """Whose compute this is: ``KT_USERNAME``, else the login name."""
        return os.environ.get("KT_USERNAME") or getpass.getuser()

    @property
    def service_name(self) -> str:
        """``{username}-{name}``, cleaned into a DNS-1123 label (the Kubernetes object name)."""
        return dns1123_label(f"{self.username}-{self.name}")

    @property
    def endpoint(self) -> str | None:
        """The in-cluster URL of the pod kernel's Service (``None`` for the local backend).

        A Deployment's Service listens on the pod kernel's port; an autoscaled
        compute's Knative Service on port 80 of its cluster-local address (Knative's
        ingress routes it, waking a scaled-to-zero compute).
        """
        if self.backend != "kubernetes":
            return None
        host = f"{self.service_name}.{self.namespace}.svc.cluster.local"
        return f"ws://{host}" if self.deployment_mode == "knative" else f"ws://{host}:{POD_KERNEL_PORT}"

    @property
    def inactivity_ttl(self) -> float | None:
        """Seconds of inactivity after which the kernel stops (the seed's name for :attr:`inactivity_ttl_s`)."""
        return self.inactivity_ttl_s

    @property
    def launch_timeout(self) -> float:
        """Seconds to wait for the kernel to be ready (the seed's name for :attr:`launch_timeout_s`)."""
        return self.launch_timeout_s

    @property
    def deployment_mode(self) -> str:
        """``"knative"`` once :meth:`autoscale` was called (a Knative Service), ``"raycluster"`` (KubeRay) or
        ``"statefulset"`` (torch.distributed, one pod per rank) once :meth:`distribute` was, else ``"deployment"``."""
        if self._distributed is not None:
            return "raycluster" if self._distributed.framework == "ray" else "statefulset"
        return "knative" if self._autoscaling is not None else "deployment"

    @property
    def autoscaling_config(self) -> AutoscalingConfig | None:
        """What :meth:`autoscale` set (``.to_dict()`` for a plain dict); None when not autoscaled."""
        return self._autoscaling

    @property
    def distributed_config(self) -> DistributedConfig | None:
        """What :meth:`distribute` set (``.to_dict()`` for a plain dict); None: this compute is not distributed."""
        return self._distributed

    def distribute(self, framework: str = "pytorch", workers: int | None = None,
                   distribution_args: dict[str, Any] | None = None) -> Compute:
        """Run on ``workers`` pod kernels that ``framework``'s engine connects: ``"pytorch"`` or ``"ray"``.

        As in the seed (and like :meth:`autoscale`), this changes the compute in place before it is
        launched and returns it, so both a statement and a chained call work. pytorch: every worker gets
        torch.distributed's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``NODE_RANK``, ``MASTER_ADDR`` and
        ``MASTER_PORT``, so ``init_process_group()`` needs no arguments; cells and ``kt.fn`` calls run on
        every worker. ray: a head and ``workers - 1`` Ray workers; cells and calls run on the head, where
        ``ray.init()`` connects to the cluster. ``distribution_args``: see
        :data:`~kt_jupyter.distributed.DISTRIBUTION_ARGS`. The compute's resources are per worker.
        """
        config = DistributedConfig.from_arguments(framework, workers, distribution_args)
        object.__setattr__(self, "_distributed", self._check_distributed(config))
        return self

    def autoscale(self, min_replicas: int | None = None, max_replicas: int | None = None,
                  target_concurrency: float | None = None, **knative: Any) -> Compute:
        """Run as a Knative Serving ``Service`` that scales between ``min_replicas`` and ``max_replicas``.

        As in the seed, this changes the compute in place (before it is launched) and returns it,
        so ``compute.autoscale(...)`` as a statement and chained calls both work. Knative's other
        knobs (``metric``, ``target``, ``target_utilization``, ``window``, ``initial_replicas``,
        ``scale_down_delay``, ``scale_to_zero_pod_retention_period``, ``container_concurrency``,
        ``autoscaler_class``) are described in :class:`~kt_jupyter.autoscaling.AutoscalingConfig`;
        each is validated here. Needs ``backend="kubernetes"`` and Knative Serving in the cluster
        (a local compute refuses, here). Each replica is its own pod kernel (its own
        variables): autoscaling suits ``fn``/``cls`` services, not stateful ``%%kt`` cells.
        """
        for key in knative:
            if key not in AUTOSCALE_SETTINGS:
                close = difflib.get_close_matches(key, ("min_replicas", "max_replicas", "target_concurrency")
                                                  + AUTOSCALE_SETTINGS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(AUTOSCALE_SETTINGS)}"
                raise ComputeSpecError(f"autoscale: unknown setting {key!r}{hint}")
        config = AutoscalingConfig.from_arguments(min_replicas=min_replicas, max_replicas=max_replicas,
                                                  target_concurrency=target_concurrency, **knative)
        object.__setattr__(self, "_autoscaling", self._check_autoscaling(config))
        return self

    @property
    def resources(self) -> dict[str, dict[str, str]]:
        """Container ``resources``: ``{"requests": {...}, "limits": {...}}`` (empty parts left out)."""
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.cpus:
            requests["cpu"] = self.cpus
        if self.memory:
            requests["memory"] = limits["memory"] = self.memory
        if self.disk_size:
            requests["ephemeral-storage"] = limits["ephemeral-storage"] = self.disk_size
        if self.gpu_count and not self.gpu_memory:  # gpu_memory: the KAI scheduler shares a GPU instead
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(self.gpu_count)
        return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    @property
    def manifest(self) -> dict[str, Any]:
        """The Deployment this compute runs as (see :mod:`kt_jupyter.manifests`)."""
        return operations().deployment(self)

    @property
    def pod_spec(self) -> dict[str, Any]:
        """The pod spec inside :attr:`manifest`."""
        return self.manifest["spec"]["template"]["spec"]

    # ------------------------------------------------------------------ copies and round trips

    def _params(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this compute."""
        return {
            "name": self.name, "backend": self.backend, "cpus": self.cpus, "memory": self.memory,
            "disk_size": self.disk_size, "gpus": self.gpus, "gpu_type": self.gpu_type, "gpu_memory": self.gpu_memory,
            "shared_memory_limit": self.shared_memory_limit, "namespace": self._namespace,
            "labels": dict(self.labels), "annotations": dict(self.annotations),
            "node_selector": dict(self.node_selector), "tolerations": [dict(t) for t in self.tolerations],
            "service_account_name": self.service_account_name,
            "service_template": json.loads(json.dumps(self.service_template)),
            "image": self.image.copy(), "env_vars": dict(self.env_vars), "secrets": list(self.secrets),
            "volumes": list(self.volumes), "working_dir": self.working_dir, "queue": self.queue,
            "priority_class_name": self.priority_class_name, "replicas": self.replicas, "freeze": self.freeze,
            "inactivity_ttl": self.inactivity_ttl_s, "launch_timeout": self.launch_timeout_s,
            "image_pull_policy": self.image_pull_policy, "gpu_anti_affinity": self.gpu_anti_affinity,
            "logging_config": self.logging_config, "kubeconfig_path": self.kubeconfig_path,
            "allowed_serialization": list(self.allowed_serialization),
            "autoscaling": self._autoscaling and self._autoscaling.to_dict(),
            "distributed": self._distributed and self._distributed.to_dict(),
        }

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """Every constructor parameter, in order."""
        return tuple(cls.__init__.__kwdefaults__ or ())

    @classmethod
    def _check_keys(cls, keys: Any, where: str) -> None:
        names = cls.parameter_names()
        for key in keys:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"
                raise ComputeSpecError(f"{where}: unknown Compute parameter {key!r}{hint}")

    def with_overrides(self, **overrides: Any) -> Compute:
        """A new Compute: this one's parameters with ``overrides`` applied (validated again).

        Values may be strings, as magics pass them (``replicas="2"``, ``freeze="yes"``);
        ``image="name"`` replaces the whole image, setup steps included.
        """
        self._check_keys(overrides, "with_overrides")
        return Compute(**{**self._params(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters; :meth:`from_dict` rebuilds an equal Compute."""
        out = self._params()
        plain = self.image == Image(image_id=self.image.image_id)
        out["image"] = self.image.image_id if plain else self.image.to_dict()  # a bare name when that says it all
        out["secrets"] = [x.to_dict() for x in self.secrets]
        out["volumes"] = [v.to_dict() for v in self.volumes]
        out["logging_config"] = self.logging_config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Compute:
        """Rebuild a Compute from :meth:`to_dict` output (e.g. a spec sent over REST)."""
        if not isinstance(data, dict):
            raise ComputeSpecError(f"a Compute spec must be a dict; got {type(data).__name__}")
        cls._check_keys(data, "from_dict")
        return cls(**data)

    @classmethod
    def from_template(cls, service_info: dict[str, Any]) -> Compute:
        """The Compute of an existing Deployment: ``{"resource": manifest}`` or the manifest itself."""
        resource = service_info.get("resource", service_info) if isinstance(service_info, dict) else None
        if not isinstance(resource, dict) or resource.get("kind") != "Deployment":
            raise ComputeSpecError(
                "from_template expects {'resource': <Deployment manifest dict>}; got "
                f"{type(resource).__name__ if not isinstance(resource, dict) else resource.get('kind')!r}")
        return operations().from_deployment(resource)

    def magic_line(self) -> str:
        """The ``%%kt`` line that asks for this compute (options the magic has; others left out)."""
        default = Compute()
        parts = ["%%kt"]
        for key in ("name", "backend", "cpus", "memory", "gpus", "gpu_type", "namespace"):
            value = getattr(self, "_namespace" if key == "namespace" else key)
            if value is not None and value != getattr(default, "_namespace" if key == "namespace" else key):
                parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
        if self.image != default.image:
            parts += ["--image", shlex.quote(self.image.image_id)]
        for key, value in self.env_vars.items():
            parts += ["--env", shlex.quote(f"{key}={value}")]
        if self.launch_timeout_s != default.launch_timeout_s:
            parts += ["--launch-timeout", f"{self.launch_timeout_s:g}"]
        if self.inactivity_ttl_s is not None:
            parts += ["--inactivity-ttl", f"{self.inactivity_ttl_s:g}"]
        return " ".join(parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compute) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        mine, default = self.to_dict(), Compute().to_dict()
        shown = [f"name={self.name!r}", f"backend={self.backend!r}"]
        shown += [f"{k}={mine[k]!r}" for k in self.parameter_names()
                  if k not in ("name", "backend", "image") and mine[k] != default[k]]
        if self.image != Compute().image:
            shown.append(f"image={self.image!r}")
        return f"Compute({', '.join(shown)})"

    # ------------------------------------------------------------------ cluster state (through kt_jupyter.operations)

    def status(self) -> KernelInfo:
        """This compute's state as its backend reports it."""
        return operations().status(self)

    def is_up(self) -> bool:
        """Whether the pod kernel is running and ready."""
        return operations().is_up(self)

    def logs(self, follow: bool = False, tail: int | None = 100) -> str | Iterator[str]:
        """The last ``tail`` log lines (all with None); with ``follow``, an iterator of new output."""
        return operations().logs(self, follow, tail)

    def rsync(self, paths: str | os.PathLike[str] | list[str | os.PathLike[str]], dest: str | None = None, *,
              contents: bool = False, delete: bool = False, exclude: list[str] | tuple[str, ...] = (),
              progress: bool | Callable[[int, int, int, int], None] = True) -> RsyncResult:
        """Copy files and directories to the pod's working directory (or ``dest`` there), sending only changes.

        ``"src"`` lands as ``src/``; ``"src/"`` or ``contents=True`` copies what is inside. Files deleted
        here stay on the pod unless ``delete=True`` (as ``rsync --delete``, under the synced directories).
        ``exclude``: name patterns (``"*.pyc"``, ``".git"``). ``progress``: a line on stderr, or a callback
        ``(bytes_sent, bytes_total, files_done, files_total)``. Launches the compute if it is not running.
        """
        return operations().sync_files(
            self, paths, dest, contents=contents, delete=delete, exclude=exclude, progress=progress)

    def ssh(self) -> int | None:
        """An interactive shell where the pod kernel runs (launching it if needed), in its working directory.

        In a terminal (IPython, a script): a real TTY here until the shell exits; returns its exit code.
        In a notebook: a Jupyter terminal opened by the server extension, and a link to it shown.
        Local: ``$SHELL`` with the kernel's environment; Kubernetes: ``kubectl exec -it`` through the API.
        """
        return operations().ssh(self)

    def client_port(self) -> int:
        """The local port that reaches the pod kernel (launching it if needed): on Kubernetes a port-forward
        to its port, locally the kernel's own port on 127.0.0.1."""
        return operations().client_port(self)

    def pods(self) -> list[Any]:
        """The pods of this compute (Kubernetes backend)."""
        return operations().pods(self)

