"""What the Kubernetes backend applies beyond :func:`kt_jupyter.manifests.build_all`. Pure.

* the files the source ConfigMap carries: the ``pod_kernel`` package, and the
  TTL guard (:mod:`~kt_jupyter.backends.pod_guard`) as the module ``kt_pod_guard``;
* for a compute with ``inactivity_ttl`` and no service account of its own: a
  ServiceAccount, Role and RoleBinding that allow the pod to scale its own
  Deployment (``get``/``patch``/``update`` on ``deployments/scale``, that one
  name only) and nothing else;
* a hash of the pod template, written on the template itself, so readiness
  ignores pods of an older template;
* a NetworkPolicy admitting only the notebook (its pod inside the cluster; none
  from outside, where the port-forward enters the pod without the pod network),
  unless ``KT_NETWORK_POLICY=0``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..manifests import build_all, object_labels
from ..pod_security import notebook_peer

if TYPE_CHECKING:
    from ..compute import Compute

#: Pod-template annotation: a hash of the template we applied, so readiness ignores older pods.
TEMPLATE_HASH_ANNOTATION = "kt.dev/template-hash"
#: The module name :mod:`~kt_jupyter.backends.pod_guard` has in the pod.
GUARD_MODULE = "kt_pod_guard"
#: ``KT_NETWORK_POLICY=0`` (or false/off): apply no NetworkPolicy (a namespace that forbids creating them).
NETWORK_POLICY_ENV = "KT_NETWORK_POLICY"


def pod_kernel_source_files() -> dict[str, str]:
    """What the ConfigMap carries: the ``pod_kernel`` package and the TTL guard (``kt_pod_guard.py``)."""
    import pod_kernel

    root = Path(pod_kernel.__file__).resolve().parent
    files = {f"pod_kernel/{p.name}": p.read_text() for p in sorted(root.glob("*.py"))}
    files[f"{GUARD_MODULE}.py"] = (Path(__file__).resolve().parent / "pod_guard.py").read_text()
    return files


def ttl_rbac_objects(compute: "Compute") -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding letting the pod scale its own Deployment (and nothing else)."""
    name, ns = f"{compute.service_name}-kt", compute.namespace

    def meta(component: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns, "labels": object_labels(compute, component)}

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("service-account"),
         "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("ttl-role"),
         "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                    "resourceNames": [compute.service_name], "verbs": ["get", "patch", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("ttl-role-binding"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
    ]


def stamp_template(deployment: dict[str, Any]) -> str:
    """Write the hash of the Deployment's pod template onto the template; return it."""
    template = deployment["spec"]["template"]
    annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
    annotations.pop(TEMPLATE_HASH_ANNOTATION, None)
    blob = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    annotations[TEMPLATE_HASH_ANNOTATION] = hashlib.sha256(blob).hexdigest()[:16]
    return annotations[TEMPLATE_HASH_ANNOTATION]


def network_policy_wanted(environ: "Mapping[str, str] | None" = None) -> bool:
    """Whether computes get a NetworkPolicy: yes unless ``KT_NETWORK_POLICY`` is 0, false or off."""
    env = os.environ if environ is None else environ
    return env.get(NETWORK_POLICY_ENV, "1").strip().lower() not in ("0", "false", "off")


def backend_objects(compute: "Compute", token: str, *, with_ttl_rbac: bool = True) -> list[dict[str, Any]]:
    """Every object the backend applies, in order: build_all's (with the NetworkPolicy that admits only
    the notebook, unless ``KT_NETWORK_POLICY=0``), the TTL RBAC, then the stamped Deployment."""
    peer = notebook_peer() if network_policy_wanted() else None
    objects = build_all(compute, token, pod_kernel_source_files(), peer=peer)
    deployment = objects.pop()
    if with_ttl_rbac and compute.inactivity_ttl_s and not compute.service_account_name:
        rbac = ttl_rbac_objects(compute)
        objects += rbac
        deployment["spec"]["template"]["spec"]["serviceAccountName"] = rbac[0]["metadata"]["name"]
    stamp_template(deployment)
    return objects + [deployment]
