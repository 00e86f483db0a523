"""An autoscaled compute as Kubernetes objects: a Knative Serving ``Service`` instead of a Deployment. Pure.

The pod is the Deployment's (:func:`kt_jupyter.manifests.build_deployment`:
the same container, securityContext, probes, env from the token Secret,
volumes, scheduling and ``service_template``), moved into a
``serving.knative.dev/v1`` Service and changed only where Knative's webhook
insists: one container port named ``http1``, probes without a port (Knative
points them at that port), the autoscaler's annotations
(:meth:`~kt_jupyter.autoscaling.AutoscalingConfig.annotations`) and a
progress deadline of ``launch_timeout`` on the revision template. The Service
is labelled ``networking.knative.dev/visibility: cluster-local``: it is
reachable inside the cluster only, never on Knative's public ingress.

There is no ClusterIP Service of ours (Knative makes one of the same name)
and no NetworkPolicy (requests reach the pods through Knative's activator).
Some pod fields need a Knative feature flag on the cluster
(:func:`required_feature_flags`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .compute import POD_KERNEL_PORT
from .errors import ComputeSpecError
from .manifests import CONTAINER_NAME, SPEC_ANNOTATION, build_deployment, object_labels, supporting_objects
from .startup import notebook_install_env

if TYPE_CHECKING:
    from .compute import Compute

API_VERSION = "serving.knative.dev/v1"
#: The port name Knative accepts for an HTTP/1 (and WebSocket) container port.
KNATIVE_PORT_NAME = "http1"
VISIBILITY_LABEL = "networking.knative.dev/visibility"
PROGRESS_DEADLINE_ANNOTATION = "serving.knative.dev/progress-deadline"
#: Seconds a request (a notebook's WebSocket session) may last: Knative's default ``max-revision-timeout-seconds``.
#: A session cut by it reconnects and replays what it missed, like any dropped connection.
REQUEST_TIMEOUT_S = 600
#: Pod-spec fields (and volume kinds) Knative admits only with a flag in its ``config-features`` ConfigMap
#: (recent releases enable some by default, e.g. emptyDir).
FEATURE_FLAGS = {
    "affinity": "kubernetes.podspec-affinity",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "tolerations": "kubernetes.podspec-tolerations",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "securityContext": "kubernetes.podspec-securitycontext",
    "emptyDir": "kubernetes.podspec-emptydir",
    "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
}


def build_knative_service(compute: Compute, *, source_files: dict[str, str] | None = None,
                          install_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Knative ``Service`` of an autoscaled compute (see the module docstring)."""
    config = compute.autoscaling_config
    if config is None:
        raise ComputeSpecError(f"compute {compute.name!r} is not autoscaled; call compute.autoscale(...) first")
    template = build_deployment(compute, source_files=source_files, install_env=install_env)["spec"]["template"]
    pod = template["spec"]
    for container in pod["containers"]:
        if container.get("name") != CONTAINER_NAME:
            continue
        container["ports"] = [{"name": KNATIVE_PORT_NAME, "containerPort": POD_KERNEL_PORT, "protocol": "TCP"}]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container and "httpGet" in container[probe]:
                container[probe]["httpGet"].pop("port", None)
    pod["timeoutSeconds"] = REQUEST_TIMEOUT_S
    if config.container_concurrency is not None:
        pod["containerConcurrency"] = config.container_concurrency
    annotations = {**template["metadata"].get("annotations", {}), **config.annotations(),
                   PROGRESS_DEADLINE_ANNOTATION: f"{int(compute.launch_timeout_s)}s"}
    template["metadata"]["annotations"] = dict(sorted(annotations.items()))
    spec_json = json.dumps(compute.to_dict(), sort_keys=True, separators=(",", ":"))
    metadata = {"name": compute.service_name, "namespace": compute.namespace,
                "labels": dict(sorted({**object_labels(compute, "knative-service"),
                                       VISIBILITY_LABEL: "cluster-local"}.items())),
                "annotations": dict(sorted({**compute.annotations, SPEC_ANNOTATION: spec_json}.items()))}
    return {"apiVersion": API_VERSION, "kind": "Service", "metadata": metadata, "spec": {"template": template}}


def knative_objects(compute: Compute, token: str, source_files: dict[str, str] | None = None, *,
                    install_env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every object of an autoscaled compute, in apply order: Secret, ConfigMap, PVCs, Knative Service."""
    if install_env is None:
        install_env = notebook_install_env(compute)
    objects = supporting_objects(compute, token, source_files, install_env)
    objects.append(build_knative_service(compute, source_files=source_files, install_env=install_env))
    return objects


def required_feature_flags(service: dict[str, Any]) -> list[str]:
    """The Knative ``config-features`` flags the Service's pod needs enabled (sorted); [] when none."""
    pod = service["spec"]["template"]["spec"]
    needed = {flag for field, flag in FEATURE_FLAGS.items() if pod.get(field)}
    for volume in pod.get("volumes") or []:
        needed |= {flag for kind, flag in FEATURE_FLAGS.items() if kind in volume}
    return sorted(needed)
