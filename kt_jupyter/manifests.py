"""Compute -> Kubernetes objects, as plain dicts. Deterministic; pure but for one read of the
notebook's environment (its package index and proxy settings, :func:`~kt_jupyter.startup.notebook_install_env`).

One compute is a token Secret, a ConfigMap carrying the ``pod_kernel``
source (so a stock Python image works), PersistentVolumeClaims for volumes
with a size, a ClusterIP Service, optionally a NetworkPolicy, and a
Deployment. Every object carries ``app.kubernetes.io/managed-by: kt-jupyter``
and ``kt.dev/compute: <service name>``, so ``label_selector(compute)`` finds
all of them, and ``kt.dev/component`` says which part each is.

The pod is one a namespace enforcing Pod Security ``restricted`` admits
(:mod:`kt_jupyter.pod_security`); a GPU pod asks for its GPU by the labels
real clusters give GPU nodes (:mod:`kt_jupyter.gpus`), with CPU and memory
requests and a sized ``/dev/shm``; startup and readiness probe the pod
kernel's quiet ``GET /healthz``. The container runs
:func:`~kt_jupyter.startup.startup_script`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .compute import POD_KERNEL_PORT
from .errors import ComputeSpecError
from .gpus import (
    GFD_PRODUCT_LABEL,
    gpu_node_selector_terms,
    gpu_type_from_terms,
    no_gpu_node_selector_term,
)
from .pod_security import (
    NotebookPeer,
    build_network_policy,
    container_security_context,
    pod_security_context,
)
from .startup import (
    CACHE_DIR,
    POD_KERNEL_DEPS,  # noqa: F401  (re-exported: tests import it from here)
    SRC_DIR,
    notebook_install_env,
    split_env,
    startup_script,
)

if TYPE_CHECKING:
    from .compute import Compute

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kt-jupyter"
COMPUTE_LABEL = "kt.dev/compute"
NAME_LABEL = "kt.dev/name"
COMPONENT_LABEL = "kt.dev/component"
#: The Compute's :meth:`~kt_jupyter.compute.Compute.to_dict` as JSON, so ``from_template`` can rebuild it.
SPEC_ANNOTATION = "kt.dev/spec"
SETUP_HASH_ANNOTATION = "kt.dev/setup-hash"
SOURCE_HASH_ANNOTATION = "kt.dev/source-hash"
INACTIVITY_TTL_ANNOTATION = "kt.dev/inactivity-ttl-seconds"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
KAI_SCHEDULER = "kai-scheduler"
KAI_QUEUE_LABEL = "kai.scheduler/queue"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER_NAME = "pod-kernel"
PORT_NAME = "kernel"
#: The pod kernel's bulk channel (large values as plain TCP): a fixed port, so a port-forward, the Service
#: and the NetworkPolicy can name it (``KT_BULK_PORT``, read by :mod:`pod_kernel.bulk`).
POD_KERNEL_BULK_PORT = POD_KERNEL_PORT + 1
BULK_PORT_NAME = "bulk"
#: The pod kernel's health endpoint on its WebSocket port: 200 ``ok``, no auth, no log line.
HEALTH_PATH = "/healthz"
#: How often the startup and readiness probes ask.
STARTUP_PROBE_PERIOD_S = 2
READINESS_PROBE_PERIOD_S = 5
#: Requests a GPU pod gets per GPU when it names no cpus or memory (so it is not BestEffort).
DEFAULT_GPU_POD_CPUS_PER_GPU = 1
DEFAULT_GPU_POD_MEMORY_GI_PER_GPU = 4
#: /dev/shm of a pod that names no memory and no shared_memory_limit, and is not a GPU pod.
DEFAULT_SHM_SIZE = "1Gi"
#: ConfigMaps hold at most 1 MiB; leave room for metadata.
MAX_SOURCE_BYTES = 900 * 1024

_SOURCE_PATH_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


# ---------------------------------------------------------------------- names and labels

def token_secret_name(compute: Compute) -> str:
    """Name of the Secret holding the compute's token."""
    return f"{compute.service_name}-token"


def source_configmap_name(compute: Compute) -> str:
    """Name of the ConfigMap holding the pod_kernel source."""
    return f"{compute.service_name}-src"


def selector_labels(compute: Compute) -> dict[str, str]:
    """The labels that select this compute's pods (and, with :func:`label_selector`, all its objects)."""
    return {COMPUTE_LABEL: compute.service_name}


def label_selector(compute: Compute) -> str:
    """A label selector string matching every object of this compute."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{COMPUTE_LABEL}={compute.service_name}"


def object_labels(compute: Compute, component: str) -> dict[str, str]:
    """User labels plus ours: managed-by, compute, name and component."""
    ours = {MANAGED_BY_LABEL: MANAGED_BY, COMPUTE_LABEL: compute.service_name, NAME_LABEL: compute.name,
            COMPONENT_LABEL: component}
    return dict(sorted({**compute.labels, **ours}.items()))


def _metadata(compute: Compute, name: str, component: str,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": compute.namespace, "labels": object_labels(compute, component)}
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


# ---------------------------------------------------------------------- Secret, ConfigMap, Service, PVCs

def build_secret(compute: Compute, token: str, install_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Secret holding the token (key ``token``) the pod kernel reads as ``KT_TOKEN``, and the
    notebook's package index and proxy settings (``install_env``, default: from the environment;
    an index URL may carry credentials, so they stay out of the Deployment)."""
    if not isinstance(token, str) or not token:
        raise ComputeSpecError("build_secret needs a non-empty token string")
    env = notebook_install_env(compute) if install_env is None else dict(install_env)
    data = {"token": token, **env}
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": _metadata(compute, token_secret_name(compute), "token"),
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _source_key(path: str) -> str:
    return path.replace("/", "__")


def _check_source(files: dict[str, str]) -> dict[str, str]:
    if not isinstance(files, dict):
        raise ComputeSpecError("source files must be a dict of relative path -> text")
    total = 0
    for path, text in files.items():
        if not isinstance(path, str) or not _SOURCE_PATH_RE.match(path) or ".." in path.split("/"):
            raise ComputeSpecError(f"source file path {path!r} must be relative, like 'pod_kernel/server.py'")
        if not isinstance(text, str):
            raise ComputeSpecError(f"source file {path!r} must be text")
        total += len(path) + len(text.encode())
    keys = [_source_key(p) for p in files]
    if len(set(keys)) != len(keys):
        raise ComputeSpecError("source file paths collide once '/' becomes '__' in ConfigMap keys; rename one")
    if total > MAX_SOURCE_BYTES:
        raise ComputeSpecError(
            f"the pod kernel source is {total} bytes, more than a ConfigMap holds ({MAX_SOURCE_BYTES}); "
            "use a prebuilt pod-kernel image with freeze=True instead")
    return dict(sorted(files.items()))


def source_hash(files: dict[str, str]) -> str:
    """A stable hash of the source files (changes roll the pods)."""
    blob = json.dumps(_check_source(files), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_source_configmap(compute: Compute, files: dict[str, str]) -> dict[str, Any]:
    """The ConfigMap carrying ``files`` (relative path -> text), mounted at :data:`SRC_DIR`."""
    files = _check_source(files)
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _metadata(compute, source_configmap_name(compute), "source",
                              {SOURCE_HASH_ANNOTATION: source_hash(files)}),
        "data": {_source_key(p): text for p, text in files.items()},
    }


def build_service(compute: Compute) -> dict[str, Any]:
    """A ClusterIP Service on the pod kernel's port."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(compute, compute.service_name, "service"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(compute),
            "ports": [{"name": PORT_NAME, "port": POD_KERNEL_PORT, "targetPort": PORT_NAME, "protocol": "TCP"},
                      {"name": BULK_PORT_NAME, "port": POD_KERNEL_BULK_PORT, "targetPort": BULK_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def build_volume_claims(compute: Compute) -> list[dict[str, Any]]:
    """PersistentVolumeClaims for the volumes that give a size (the others must exist)."""
    claims = []
    for vol in compute.volumes:
        if vol.size is None:
            continue
        spec: dict[str, Any] = {"accessModes": [vol.access_mode], "resources": {"requests": {"storage": vol.size}}}
        if vol.storage_class:
            spec["storageClassName"] = vol.storage_class
        claims.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": _metadata(compute, vol.name, "volume"), "spec": spec})
    return claims


# ---------------------------------------------------------------------- the Deployment

def pod_node_selector(compute: Compute) -> dict[str, str]:
    """Node selector: the compute's (``gpu_type`` is a node affinity, see :func:`pod_affinity`)."""
    return dict(sorted(compute.node_selector.items()))


def pod_tolerations(compute: Compute) -> list[dict[str, Any]]:
    """Tolerations: the compute's, plus the GPU toleration when a GPU is asked for and none covers it."""
    tolerations = [dict(t) for t in compute.tolerations]
    if compute.gpu_count and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def pod_affinity(compute: Compute) -> dict[str, Any] | None:
    """Required node affinity: nodes with ``gpu_type`` (any labelling scheme), or, with
    ``gpu_anti_affinity`` and no GPU asked for, nodes without a GPU under every scheme."""
    if compute.gpu_type:
        terms = gpu_node_selector_terms(compute.gpu_type)
    elif compute.gpu_anti_affinity and not compute.gpu_count:
        terms = [no_gpu_node_selector_term()]
    else:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def container_resources(compute: Compute) -> dict[str, dict[str, str]]:
    """The compute's resources; a GPU pod that names no cpus or memory requests some per GPU (Burstable, not
    BestEffort: the first evicted and OOM-killed)."""
    resources = copy.deepcopy(compute.resources)
    if compute.gpu_count:
        requests = resources.setdefault("requests", {})
        requests.setdefault("cpu", str(DEFAULT_GPU_POD_CPUS_PER_GPU * compute.gpu_count))
        requests.setdefault("memory", f"{DEFAULT_GPU_POD_MEMORY_GI_PER_GPU * compute.gpu_count}Gi")
        resources = {"requests": dict(sorted(requests.items())), **resources}
    return resources


def _probes(compute: Compute) -> dict[str, dict[str, Any]]:
    """Startup (covering launch_timeout, so a slow first install is not killed) and readiness, on /healthz."""
    get = {"path": HEALTH_PATH, "port": PORT_NAME}
    startup_failures = max(1, math.ceil(compute.launch_timeout_s / STARTUP_PROBE_PERIOD_S))
    return {
        "startupProbe": {"httpGet": dict(get), "periodSeconds": STARTUP_PROBE_PERIOD_S, "timeoutSeconds": 2,
                         "failureThreshold": startup_failures},
        "readinessProbe": {"httpGet": dict(get), "periodSeconds": READINESS_PROBE_PERIOD_S, "timeoutSeconds": 2,
                           "failureThreshold": 3},
    }


def _scheduler(compute: Compute) -> tuple[str | None, str]:
    """(schedulerName we set, the label key for ``queue``): KAI for gpu_memory or a kai-scheduler
    schedulerName in service_template, else Kueue's queue label and the default scheduler."""
    template = ((compute.service_template.get("spec") or {}).get("template") or {}).get("spec") or {}
    kai = bool(compute.gpu_memory) or template.get("schedulerName") == KAI_SCHEDULER
    return (KAI_SCHEDULER if compute.gpu_memory else None), (KAI_QUEUE_LABEL if kai else KUEUE_QUEUE_LABEL)


def _container_env(compute: Compute, install_env: Mapping[str, str]) -> list[dict[str, Any]]:
    own = token_secret_name(compute)
    env: list[dict[str, Any]] = [
        {"name": "KT_TOKEN", "valueFrom": {"secretKeyRef": {"name": own, "key": "token"}}},
        {"name": "KT_SERVICE_NAME", "value": compute.service_name},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KT_BULK_PORT", "value": str(POD_KERNEL_BULK_PORT)},
    ]
    plain, _ = split_env(compute)
    env += [{"name": k, "value": v} for k, v in plain.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": own, "key": k}}} for k in install_env]
    for secret in compute.secrets:
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
                for var, key in secret.env_vars.items()]
        env += [{"name": var, "value": path} for var, path in secret.file_env().items()
                if var not in compute.env_vars]  # the user's own setting wins
    return env


def _volumes(compute: Compute, with_source: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gpu_memory = f"{DEFAULT_GPU_POD_MEMORY_GI_PER_GPU * compute.gpu_count}Gi" if compute.gpu_count else None
    shm = {"medium": "Memory",
           "sizeLimit": compute.shared_memory_limit or compute.memory or gpu_memory or DEFAULT_SHM_SIZE}
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": shm}, {"name": "kt-cache", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                    {"name": "kt-cache", "mountPath": CACHE_DIR}]
    if with_source:
        volumes.append({"name": "kt-src", "configMap": {"name": source_configmap_name(compute), "optional": True}})
        mounts.append({"name": "kt-src", "mountPath": SRC_DIR, "readOnly": True})
    for vol in compute.volumes:
        volumes.append({"name": vol.name, "persistentVolumeClaim": {"claimName": vol.name}})
        mounts.append({"name": vol.name, "mountPath": vol.mount_path})
    for i, secret in enumerate(compute.secrets):
        if secret.mount_path:
            volumes.append({"name": f"kt-secret-{i}", "secret": {"secretName": secret.name}})
            mounts.append({"name": f"kt-secret-{i}", "mountPath": secret.mount_path, "readOnly": True})
    return volumes, mounts


def _source_items(files: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": _source_key(p), "path": p} for p in sorted(files)]


def build_deployment(compute: Compute, *, source_files: dict[str, str] | None = None,
                     suspended: bool = False, install_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Deployment running the pod kernel; ``suspended`` sets replicas to 0.

    With ``source_files`` the ConfigMap's items are listed and their hash
    annotates the pod template (a change rolls the pod). ``install_env`` (default:
    from the environment) names the Secret's keys passed on as env. ``service_template``
    is deep-merged last.
    """
    if install_env is None:
        install_env = notebook_install_env(compute)
    with_source = not compute.freeze
    volumes, mounts = _volumes(compute, with_source)
    pod_annotations = dict(compute.annotations)
    if compute.image.steps:
        pod_annotations[SETUP_HASH_ANNOTATION] = compute.image.setup_hash
    if source_files and with_source:
        pod_annotations[SOURCE_HASH_ANNOTATION] = source_hash(source_files)
        next(v for v in volumes if v["name"] == "kt-src")["configMap"]["items"] = _source_items(source_files)
    if compute.gpu_memory and compute.gpu_memory_bytes is not None:
        pod_annotations["gpu-memory"] = str(-(-compute.gpu_memory_bytes // 2**20))  # KAI: MiB, rounded up
    pod_labels = object_labels(compute, "pod-kernel")
    scheduler_name, queue_label = _scheduler(compute)
    queue_labels = {queue_label: compute.queue} if compute.queue else {}
    pod_labels = dict(sorted({**pod_labels, **queue_labels}.items()))

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": compute.image.image_id,
        "command": ["/bin/sh", "-c", startup_script(compute)],
        "ports": [{"name": PORT_NAME, "containerPort": POD_KERNEL_PORT, "protocol": "TCP"},
                  {"name": BULK_PORT_NAME, "containerPort": POD_KERNEL_BULK_PORT, "protocol": "TCP"}],
        "env": _container_env(compute, install_env),
        "volumeMounts": mounts,
        **_probes(compute),
        "securityContext": container_security_context(),
    }
    env_from = [{"secretRef": {"name": s.name}} for s in compute.secrets if not s.mount_path and not s.env_vars]
    if env_from:
        container["envFrom"] = env_from
    resources = container_resources(compute)
    if resources:
        container["resources"] = resources
    if compute.image_pull_policy:
        container["imagePullPolicy"] = compute.image_pull_policy
    if compute.working_dir:
        container["workingDir"] = compute.working_dir

    pod: dict[str, Any] = {"containers": [container], "volumes": volumes, "enableServiceLinks": False,
                           "securityContext": pod_security_context()}
    optional = {
        "nodeSelector": pod_node_selector(compute),
        "tolerations": pod_tolerations(compute),
        "affinity": pod_affinity(compute),
        "priorityClassName": compute.priority_class_name,
        "serviceAccountName": compute.service_account_name,
        "schedulerName": scheduler_name,
    }
    pod.update({k: v for k, v in optional.items() if v})

    template_meta: dict[str, Any] = {"labels": pod_labels}
    if pod_annotations:
        template_meta["annotations"] = dict(sorted(pod_annotations.items()))
    annotations = {**compute.annotations, SPEC_ANNOTATION: json.dumps(compute.to_dict(), sort_keys=True,
                                                                      separators=(",", ":"))}
    if compute.inactivity_ttl_s:
        annotations[INACTIVITY_TTL_ANNOTATION] = f"{compute.inactivity_ttl_s:g}"
    metadata = _metadata(compute, compute.service_name, "deployment", annotations)
    if queue_labels.get(KUEUE_QUEUE_LABEL):  # Kueue's Deployment integration reads the Deployment's own label
        metadata["labels"] = dict(sorted({**metadata["labels"], **queue_labels}.items()))
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 0 if suspended else compute.replicas,
            "selector": {"matchLabels": selector_labels(compute)},
            "strategy": {"type": "Recreate"},  # never two kernels (or two GPU claims) at once
            "template": {"metadata": template_meta, "spec": pod},
        },
    }
    return deep_merge(deployment, compute.service_template)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` merged into a copy of ``base``.

    Dicts merge recursively; a ``None`` in ``overlay`` deletes the key; lists
    whose items are all dicts with a ``name`` merge item by item on that name
    (containers, env, volumes...), other lists are replaced.
    """
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list) and _named_items(value) \
                and _named_items(out[key]):
            merged = {item["name"]: item for item in out[key]}
            for item in value:
                merged[item["name"]] = deep_merge(merged.get(item["name"], {}), item)
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def _named_items(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)


def network_policy(compute: Compute, peer: NotebookPeer) -> dict[str, Any]:
    """The NetworkPolicy letting only the notebook (``peer``) reach this compute's pods."""
    return build_network_policy(compute, peer, _metadata(compute, compute.service_name, "network-policy"),
                                selector_labels(compute))


def supporting_objects(compute: Compute, token: str, source_files: dict[str, str] | None,
                       install_env: Mapping[str, str]) -> list[dict[str, Any]]:
    """What a compute's pod needs, whatever runs it (Deployment or Knative): Secret, source ConfigMap, PVCs."""
    objects = [build_secret(compute, token, install_env)]
    if source_files and not compute.freeze:
        objects.append(build_source_configmap(compute, source_files))
    return objects + build_volume_claims(compute)


def build_all(compute: Compute, token: str, source_files: dict[str, str] | None = None, *,
              suspended: bool = False, install_env: Mapping[str, str] | None = None,
              peer: NotebookPeer | None = None) -> list[dict[str, Any]]:
    """Every object of a compute, in apply order: Secret, ConfigMap, PVCs, Service, NetworkPolicy
    (with ``peer``, see :func:`kt_jupyter.pod_security.notebook_peer`), Deployment."""
    if install_env is None:
        install_env = notebook_install_env(compute)
    objects = supporting_objects(compute, token, source_files, install_env)
    objects.append(build_service(compute))
    if peer is not None:
        objects.append(network_policy(compute, peer))
    objects.append(build_deployment(compute, source_files=source_files, suspended=suspended,
                                    install_env=install_env))
    return objects


# ---------------------------------------------------------------------- back from a manifest

def compute_from_deployment(manifest: dict[str, Any]) -> Compute:
    """The Compute behind a Deployment (or a Job, which carries the same metadata and pod template): from its
    ``kt.dev/spec`` annotation, else read from its fields."""
    from .compute import Compute

    meta = manifest.get("metadata") or {}
    spec_json = (meta.get("annotations") or {}).get(SPEC_ANNOTATION)
    if spec_json:
        try:
            data = json.loads(spec_json)
        except ValueError:
            raise ComputeSpecError(f"the {SPEC_ANNOTATION} annotation of {meta.get('name')!r} is not JSON") from None
        if meta.get("namespace"):
            data["namespace"] = meta["namespace"]
        return Compute.from_dict(data)
    pod = ((manifest.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or [{}]
    container = next((c for c in containers if c.get("name") == CONTAINER_NAME), containers[0])
    requests = (container.get("resources") or {}).get("requests") or {}
    limits = (container.get("resources") or {}).get("limits") or {}
    selector = dict(pod.get("nodeSelector") or {})
    terms = (((pod.get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    gpu_type = selector.pop(GFD_PRODUCT_LABEL, None) or (gpu_type_from_terms(terms) if terms else None)
    labels = {k: v for k, v in (meta.get("labels") or {}).items()
              if k not in (MANAGED_BY_LABEL, COMPUTE_LABEL, NAME_LABEL, COMPONENT_LABEL)}
    ours = ("KT_TOKEN", "KT_SERVICE_NAME", "PYTHONUNBUFFERED", "KT_BULK_PORT")
    return Compute(
        name=(meta.get("labels") or {}).get(NAME_LABEL) or meta.get("name") or "default",
        backend="kubernetes",
        cpus=requests.get("cpu"), memory=requests.get("memory") or limits.get("memory"),
        disk_size=requests.get("ephemeral-storage"), gpus=limits.get(GPU_RESOURCE),
        gpu_type=gpu_type, node_selector=selector,
        namespace=meta.get("namespace"), labels=labels,
        tolerations=[t for t in pod.get("tolerations") or [] if t != GPU_TOLERATION],
        service_account_name=pod.get("serviceAccountName"), priority_class_name=pod.get("priorityClassName"),
        image=container.get("image"), image_pull_policy=container.get("imagePullPolicy"),
        working_dir=container.get("workingDir"),
        env_vars={e["name"]: e["value"] for e in container.get("env") or []
                  if "value" in e and e["name"] not in ours},
        replicas=max(1, int((manifest.get("spec") or {}).get("replicas", 1) or 1)),
    )
