"""What the Kubernetes backend applies beyond :func:`kt_jupyter.manifests.build_all`. Pure.

* the files the source ConfigMap carries: the ``pod_kernel`` package;
* for a compute with ``inactivity_ttl``, a single-kernel Job instead of the
  Deployment (:func:`build_job`): the pod kernel exits 0 when idle, the Job
  completes and its pod ends, so the node (and its GPU) is free with no RBAC
  beyond a namespace's ``edit`` role; a crash restarts the kernel in place,
  up to :data:`JOB_BACKOFF_LIMIT` times;
* a hash of the pod template, written on the template itself, so readiness
  ignores pods of an older template;
* a NetworkPolicy admitting only the notebook (its pod inside the cluster; none
  from outside, where the port-forward enters the pod without the pod network),
  unless ``KT_NETWORK_POLICY=0``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..manifests import COMPONENT_LABEL, build_all
from ..pod_security import notebook_peer

if TYPE_CHECKING:
    from ..compute import Compute

#: Pod-template annotation: a hash of the template we applied, so readiness ignores older pods.
TEMPLATE_HASH_ANNOTATION = "kt.dev/template-hash"
#: ``KT_NETWORK_POLICY=0`` (or false/off): apply no NetworkPolicy (a namespace that forbids creating them).
NETWORK_POLICY_ENV = "KT_NETWORK_POLICY"
#: Crashes (container restarts) a compute's Job survives before it fails for good; an idle exit (0) completes it.
JOB_BACKOFF_LIMIT = 6
#: The workload kinds a compute runs as: a Deployment, or a Job when it has an ``inactivity_ttl``.
WORKLOAD_KINDS = ("Deployment", "Job")


def pod_kernel_source_files() -> dict[str, str]:
    """What the ConfigMap carries: the ``pod_kernel`` package."""
    import pod_kernel

    root = Path(pod_kernel.__file__).resolve().parent
    return {f"pod_kernel/{p.name}": p.read_text() for p in sorted(root.glob("*.py"))}


def workload_kind(compute: Compute) -> str:
    """What runs the compute's pod: a Job when it stops when idle (``inactivity_ttl``), else a Deployment."""
    return "Job" if compute.inactivity_ttl_s else "Deployment"


def build_job(deployment: dict[str, Any]) -> dict[str, Any]:
    """The single-kernel Job running the pod of ``deployment`` (same metadata, same pod template).

    ``restartPolicy: OnFailure``: a crashed kernel restarts in its pod (the
    Job fails after :data:`JOB_BACKOFF_LIMIT` crashes, so a crash never loops
    forever); a clean exit (its inactivity TTL) completes the Job, which ends
    the pod and frees its node. ``spec.suspend`` is left to ``suspend`` and
    ``resume`` (and to Kueue, which suspends a queued Job until it admits it).
    """
    template = copy.deepcopy(deployment["spec"]["template"])
    template["spec"]["restartPolicy"] = "OnFailure"
    metadata = copy.deepcopy(deployment["metadata"])
    metadata["labels"][COMPONENT_LABEL] = "job"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {"completions": 1, "parallelism": 1, "backoffLimit": JOB_BACKOFF_LIMIT, "template": template}}


def stamp_template(workload: dict[str, Any]) -> str:
    """Write the hash of the Deployment's (or Job's) pod template onto the template; return it."""
    template = workload["spec"]["template"]
    annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
    annotations.pop(TEMPLATE_HASH_ANNOTATION, None)
    blob = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    annotations[TEMPLATE_HASH_ANNOTATION] = hashlib.sha256(blob).hexdigest()[:16]
    return annotations[TEMPLATE_HASH_ANNOTATION]


def network_policy_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether computes get a NetworkPolicy: yes unless ``KT_NETWORK_POLICY`` is 0, false or off."""
    env = os.environ if environ is None else environ
    return env.get(NETWORK_POLICY_ENV, "1").strip().lower() not in ("0", "false", "off")


def backend_objects(compute: Compute, token: str) -> list[dict[str, Any]]:
    """Every object the backend applies, in order: build_all's (with the NetworkPolicy that admits only
    the notebook, unless ``KT_NETWORK_POLICY=0``), the workload last (:func:`workload_kind`), stamped."""
    peer = notebook_peer() if network_policy_wanted() else None
    objects = build_all(compute, token, pod_kernel_source_files(), peer=peer)
    workload = objects.pop()
    if workload_kind(compute) == "Job":
        workload = build_job(workload)
    stamp_template(workload)
    return objects + [workload]
