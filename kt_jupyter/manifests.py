"""Compute -> Kubernetes objects, as plain dicts. Pure and deterministic.

One compute is a token Secret, a ConfigMap carrying the ``pod_kernel``
source (so a stock Python image works), PersistentVolumeClaims for volumes
with a size, a ClusterIP Service and a Deployment. Every object carries
``app.kubernetes.io/managed-by: kt-jupyter`` and ``kt.dev/compute: <service
name>``, so ``label_selector(compute)`` finds all of them, and
``kt.dev/component`` says which part each is.

The container runs :func:`startup_script`: it installs the pod kernel's
dependencies unless the image has them, runs the image's setup steps once
per container, then ``exec``s ``python -m pod_kernel``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import shlex
from typing import TYPE_CHECKING, Any

from .compute import POD_KERNEL_PORT
from .errors import ComputeSpecError

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
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
KAI_SCHEDULER = "kai-scheduler"
KAI_QUEUE_LABEL = "kai.scheduler/queue"
CONTAINER_NAME = "pod-kernel"
PORT_NAME = "kernel"
#: Where the ConfigMap's source is mounted (first on PYTHONPATH).
SRC_DIR = "/opt/kt/src"
#: An emptyDir that survives container restarts: dependencies (``site``) and pip's cache (``pip``).
CACHE_DIR = "/opt/kt/cache"
#: What the pod kernel needs besides the standard library.
POD_KERNEL_DEPS = ("websockets>=14", "cloudpickle>=3.0", "ipython>=8.20", "psutil>=5.9")
#: ConfigMaps hold at most 1 MiB; leave room for metadata.
MAX_SOURCE_BYTES = 900 * 1024

_SOURCE_PATH_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_DEPS_CHECK = ('import sys, websockets, cloudpickle, IPython, psutil; '
               'sys.exit(int(websockets.__version__.split(".")[0]) < 14)')


# ---------------------------------------------------------------------- names and labels

def token_secret_name(compute: "Compute") -> str:
    """Name of the Secret holding the compute's token."""
    return f"{compute.service_name}-token"


def source_configmap_name(compute: "Compute") -> str:
    """Name of the ConfigMap holding the pod_kernel source."""
    return f"{compute.service_name}-src"


def selector_labels(compute: "Compute") -> dict[str, str]:
    """The labels that select this compute's pods (and, with :func:`label_selector`, all its objects)."""
    return {COMPUTE_LABEL: compute.service_name}


def label_selector(compute: "Compute") -> str:
    """A label selector string matching every object of this compute."""
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{COMPUTE_LABEL}={compute.service_name}"


def object_labels(compute: "Compute", component: str) -> dict[str, str]:
    """User labels plus ours: managed-by, compute, name and component."""
    ours = {MANAGED_BY_LABEL: MANAGED_BY, COMPUTE_LABEL: compute.service_name, NAME_LABEL: compute.name,
            COMPONENT_LABEL: component}
    return dict(sorted({**compute.labels, **ours}.items()))


def _metadata(compute: "Compute", name: str, component: str,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": compute.namespace, "labels": object_labels(compute, component)}
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


# ---------------------------------------------------------------------- Secret, ConfigMap, Service, PVCs

def build_secret(compute: "Compute", token: str) -> dict[str, Any]:
    """The Secret holding the token (key ``token``) the pod kernel reads as ``KT_TOKEN``."""
    if not isinstance(token, str) or not token:
        raise ComputeSpecError("build_secret needs a non-empty token string")
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": _metadata(compute, token_secret_name(compute), "token"),
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
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


def build_source_configmap(compute: "Compute", files: dict[str, str]) -> dict[str, Any]:
    """The ConfigMap carrying ``files`` (relative path -> text), mounted at :data:`SRC_DIR`."""
    files = _check_source(files)
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _metadata(compute, source_configmap_name(compute), "source",
                              {SOURCE_HASH_ANNOTATION: source_hash(files)}),
        "data": {_source_key(p): text for p, text in files.items()},
    }


def build_service(compute: "Compute") -> dict[str, Any]:
    """A ClusterIP Service on the pod kernel's port."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(compute, compute.service_name, "service"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(compute),
            "ports": [{"name": PORT_NAME, "port": POD_KERNEL_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def build_volume_claims(compute: "Compute") -> list[dict[str, Any]]:
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


# ---------------------------------------------------------------------- the startup script

def _env_split(compute: "Compute") -> tuple[dict[str, str], dict[str, str]]:
    """(plain env for the container spec, env with ``$`` references the shell must expand)."""
    env = {**compute.image.env_vars, **compute.env_vars}
    expand = {k: v for k, v in env.items() if "$" in v}
    return {k: v for k, v in sorted(env.items()) if k not in expand}, dict(sorted(expand.items()))


def _shell_expandable(value: str) -> str:
    """Double-quoted so ``$VAR`` expands, but no command substitution runs."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$(", "\\$(")
    return f'"{escaped}"'


def _setup_lines(compute: "Compute") -> list[str]:
    image = compute.image
    if not image.steps:
        return []
    install = image.install_cmd or '"$KT_PY" -m pip install --disable-pip-version-check --no-input'
    lines = [
        "# image setup steps: once per container (marker next to site-packages, so it goes when they go)",
        '[ -n "${KT_MARKER_DIR:-}" ] || KT_MARKER_DIR="$("$KT_PY" -c '
        '\'import sysconfig; print(sysconfig.get_paths()["purelib"])\' 2>/dev/null || echo /tmp)"',
        '[ -w "$KT_MARKER_DIR" ] || KT_MARKER_DIR="${HOME:-/tmp}"',
        f'KT_SETUP_MARKER="$KT_MARKER_DIR/.kt-setup-{image.setup_hash}"',
        'if [ -f "$KT_SETUP_MARKER" ]; then KT_SETUP_DONE=1; else KT_SETUP_DONE=0; '
        f'echo "[kt] running {len(image.steps)} image setup step(s)" >&2; fi',
    ]
    if any(s.kind == "run_bash" for s in image.steps):
        lines.append('KT_SH="$(command -v bash || echo sh)"')
    for step in image.steps:
        if step.kind == "pip_install":
            reqs, force = step.args
            cmd = f"{install} {' '.join(shlex.quote(r) for r in reqs)}"
        elif step.kind == "run_bash":
            command, force = step.args
            cmd = f'"$KT_SH" -c {shlex.quote(command)}'
        else:  # set_env_vars: in the container's env already
            continue
        lines.append(cmd if force else f'[ "$KT_SETUP_DONE" = 1 ] || {cmd}')
    lines.append('touch "$KT_SETUP_MARKER"')
    return lines


def startup_script(compute: "Compute") -> str:
    """The container's ``/bin/sh -c`` script: dependencies, image setup, then ``exec python -m pod_kernel``.

    Idempotent: dependencies go to an emptyDir that outlives container
    restarts and are skipped when importable; setup steps run once per
    container, keyed by :attr:`~kt_jupyter.image.Image.setup_hash`. With
    ``freeze=True`` nothing is installed: the image must hold the pod kernel.
    ``KT_SRC_DIR``, ``KT_CACHE_DIR``, ``KT_MARKER_DIR`` and ``KT_PORT`` in the
    environment override where it looks, writes and listens (for a test that
    runs it outside a pod).
    """
    py = shlex.quote(compute.image.python_path) if compute.image.python_path else \
        '"$(command -v python || command -v python3 || true)"'
    lines = [
        "set -e",  # not -u: user env values may name unset variables ("$LD_LIBRARY_PATH:/x")
        f"KT_PY={py}",
        '[ -n "$KT_PY" ] || { echo "[kt] no python or python3 in the image; use a Python image" >&2; exit 1; }',
        f'KT_SRC_DIR="${{KT_SRC_DIR:-{SRC_DIR}}}"',
        f'KT_CACHE_DIR="${{KT_CACHE_DIR:-{CACHE_DIR}}}"',
        'export PYTHONPATH="$KT_SRC_DIR:$KT_CACHE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"',
        'export PIP_CACHE_DIR="$KT_CACHE_DIR/pip"',
    ]
    _, expand = _env_split(compute)
    lines += [f"export {k}={_shell_expandable(v)}" for k, v in expand.items()]
    check = f'"$KT_PY" -c {shlex.quote(_DEPS_CHECK)} 2>/dev/null'
    if compute.freeze:
        lines.append(f'{check} || {{ echo "[kt] freeze=True but the image lacks the pod kernel dependencies '
                     f'({", ".join(POD_KERNEL_DEPS)}); bake them in or drop freeze" >&2; exit 1; }}')
    else:
        deps = " ".join(shlex.quote(d) for d in POD_KERNEL_DEPS)
        lines += [
            f"if ! {check}; then",
            '  echo "[kt] installing pod kernel dependencies (cached for container restarts)" >&2',
            f'  "$KT_PY" -m pip install --quiet --disable-pip-version-check --no-input --upgrade '
            f'--target "$KT_CACHE_DIR/site" {deps}',
            "fi",
        ]
    lines += _setup_lines(compute)
    argv = ["--compute-name", compute.name, "--allowed-serialization", ",".join(compute.allowed_serialization),
            "--log-level", compute.logging_config.level.upper()]
    kernel = (f'"$KT_PY" -m pod_kernel --host 0.0.0.0 --port "${{KT_PORT:-{POD_KERNEL_PORT}}}" '
              + " ".join(shlex.quote(a) for a in argv))
    if compute.inactivity_ttl_s:
        # on Kubernetes an exited kernel would be restarted: the guard scales the Deployment to 0 instead
        # (kt_jupyter/backends/pod_guard.py, shipped as kt_pod_guard)
        kernel = (f'"$KT_PY" -m kt_pod_guard --namespace {shlex.quote(compute.namespace)} --deployment '
                  f'{shlex.quote(compute.service_name)} -- {kernel} --inactivity-ttl {compute.inactivity_ttl_s:g}')
    lines.append(f"exec {kernel}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the Deployment

def pod_node_selector(compute: "Compute") -> dict[str, str]:
    """Node selector: the compute's, plus ``nvidia.com/gpu.product`` for ``gpu_type``."""
    selector = dict(compute.node_selector)
    if compute.gpu_type:
        selector[GPU_PRODUCT_LABEL] = compute.gpu_type
    return dict(sorted(selector.items()))


def pod_tolerations(compute: "Compute") -> list[dict[str, Any]]:
    """Tolerations: the compute's, plus the GPU toleration when a GPU is asked for and none covers it."""
    tolerations = [dict(t) for t in compute.tolerations]
    if compute.gpu_count and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def pod_affinity(compute: "Compute") -> dict[str, Any] | None:
    """Node affinity keeping a GPU-less pod off GPU nodes when ``gpu_anti_affinity`` is set."""
    if not compute.gpu_anti_affinity or compute.gpu_count:
        return None
    term = {"matchExpressions": [{"key": GPU_PRESENT_LABEL, "operator": "NotIn", "values": ["true"]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _container_env(compute: "Compute") -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KT_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret_name(compute), "key": "token"}}},
        {"name": "KT_SERVICE_NAME", "value": compute.service_name},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    plain, _ = _env_split(compute)
    env += [{"name": k, "value": v} for k, v in plain.items()]
    for secret in compute.secrets:
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
                for var, key in secret.env_vars.items()]
    return env


def _volumes(compute: "Compute", with_source: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shm: dict[str, Any] = {"medium": "Memory"}
    limit = compute.shared_memory_limit or compute.memory
    if limit:
        shm["sizeLimit"] = limit
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


def build_deployment(compute: "Compute", *, source_files: dict[str, str] | None = None,
                     suspended: bool = False) -> dict[str, Any]:
    """The Deployment running the pod kernel; ``suspended`` sets replicas to 0.

    With ``source_files`` the ConfigMap's items are listed and their hash
    annotates the pod template (a change rolls the pod). ``service_template``
    is deep-merged last.
    """
    with_source = not compute.freeze
    volumes, mounts = _volumes(compute, with_source)
    pod_annotations = dict(compute.annotations)
    if compute.image.steps:
        pod_annotations[SETUP_HASH_ANNOTATION] = compute.image.setup_hash
    if source_files and with_source:
        pod_annotations[SOURCE_HASH_ANNOTATION] = source_hash(source_files)
        next(v for v in volumes if v["name"] == "kt-src")["configMap"]["items"] = _source_items(source_files)
    if compute.gpu_memory:
        pod_annotations["gpu-memory"] = str(-(-compute.gpu_memory_bytes // 2**20))  # KAI: MiB, rounded up
    pod_labels = object_labels(compute, "pod-kernel")
    if compute.queue:
        pod_labels = dict(sorted({**pod_labels, KAI_QUEUE_LABEL: compute.queue}.items()))

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": compute.image.image_id,
        "command": ["/bin/sh", "-c", startup_script(compute)],
        "ports": [{"name": PORT_NAME, "containerPort": POD_KERNEL_PORT, "protocol": "TCP"}],
        "env": _container_env(compute),
        "volumeMounts": mounts,
        "readinessProbe": {"tcpSocket": {"port": PORT_NAME}, "periodSeconds": 2, "failureThreshold": 3},
    }
    env_from = [{"secretRef": {"name": s.name}} for s in compute.secrets if not s.mount_path and not s.env_vars]
    if env_from:
        container["envFrom"] = env_from
    if compute.resources:
        container["resources"] = compute.resources
    if compute.image_pull_policy:
        container["imagePullPolicy"] = compute.image_pull_policy
    if compute.working_dir:
        container["workingDir"] = compute.working_dir

    pod: dict[str, Any] = {"containers": [container], "volumes": volumes, "enableServiceLinks": False}
    optional = {
        "nodeSelector": pod_node_selector(compute),
        "tolerations": pod_tolerations(compute),
        "affinity": pod_affinity(compute),
        "priorityClassName": compute.priority_class_name,
        "serviceAccountName": compute.service_account_name,
        "schedulerName": KAI_SCHEDULER if compute.queue or compute.gpu_memory else None,
    }
    pod.update({k: v for k, v in optional.items() if v})

    template_meta: dict[str, Any] = {"labels": pod_labels}
    if pod_annotations:
        template_meta["annotations"] = dict(sorted(pod_annotations.items()))
    annotations = {**compute.annotations, SPEC_ANNOTATION: json.dumps(compute.to_dict(), sort_keys=True,
                                                                      separators=(",", ":"))}
    if compute.inactivity_ttl_s:
        annotations[INACTIVITY_TTL_ANNOTATION] = f"{compute.inactivity_ttl_s:g}"
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(compute, compute.service_name, "deployment", annotations),
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


def build_all(compute: "Compute", token: str, source_files: dict[str, str] | None = None, *,
              suspended: bool = False) -> list[dict[str, Any]]:
    """Every object of a compute, in apply order: Secret, ConfigMap, PVCs, Service, Deployment."""
    objects = [build_secret(compute, token)]
    if source_files and not compute.freeze:
        objects.append(build_source_configmap(compute, source_files))
    objects += build_volume_claims(compute)
    objects.append(build_service(compute))
    objects.append(build_deployment(compute, source_files=source_files, suspended=suspended))
    return objects


# ---------------------------------------------------------------------- back from a manifest

def compute_from_deployment(manifest: dict[str, Any]) -> "Compute":
    """The Compute behind a Deployment: from its ``kt.dev/spec`` annotation, else read from its fields."""
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
    labels = {k: v for k, v in (meta.get("labels") or {}).items()
              if k not in (MANAGED_BY_LABEL, COMPUTE_LABEL, NAME_LABEL, COMPONENT_LABEL)}
    ours = ("KT_TOKEN", "KT_SERVICE_NAME", "PYTHONUNBUFFERED")
    return Compute(
        name=(meta.get("labels") or {}).get(NAME_LABEL) or meta.get("name") or "default",
        backend="kubernetes",
        cpus=requests.get("cpu"), memory=requests.get("memory") or limits.get("memory"),
        disk_size=requests.get("ephemeral-storage"), gpus=limits.get(GPU_RESOURCE),
        gpu_type=selector.pop(GPU_PRODUCT_LABEL, None), node_selector=selector,
        namespace=meta.get("namespace"), labels=labels,
        tolerations=[t for t in pod.get("tolerations") or [] if t != GPU_TOLERATION],
        service_account_name=pod.get("serviceAccountName"), priority_class_name=pod.get("priorityClassName"),
        image=container.get("image"), image_pull_policy=container.get("imagePullPolicy"),
        working_dir=container.get("workingDir"),
        env_vars={e["name"]: e["value"] for e in container.get("env") or []
                  if "value" in e and e["name"] not in ours},
        replicas=max(1, int((manifest.get("spec") or {}).get("replicas", 1) or 1)),
    )
