"""What a hardened cluster admits: the pod's securityContext and the NetworkPolicy around it. Pure,
except :func:`notebook_peer`, which reads the settings it names.

The securityContext meets the Pod Security Standard ``restricted`` (non-root
numeric user, no privilege escalation, no capabilities, seccomp
``RuntimeDefault``); everything the pod writes goes to emptyDirs (see
:mod:`kt_jupyter.startup`). To run as root where a namespace allows it, or to
let OpenShift pick the user, remove fields through ``service_template``
(``{"spec": {"template": {"spec": {"securityContext": {"runAsUser": None}}}}}``).

The NetworkPolicy lets only the notebook reach the kernel's ports: pods
matching ``KT_NOTEBOOK_SELECTOR`` in ``KT_NOTEBOOK_NAMESPACE`` (by default
JupyterHub's single-user pods in the notebook's own namespace). Port-forward
and the kubelet's probes are not subject to NetworkPolicy, so a notebook
outside the cluster keeps working behind a policy that admits no pod at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .k8s_fields import (
    SERVICE_ACCOUNT_NAMESPACE_PATH,
    check_dns_label,
    check_string_map,
)

if TYPE_CHECKING:
    from .compute import Compute

#: The numeric user, group and fsGroup the pod kernel runs as (any non-zero id works; 1000 is the common one).
POD_UID = 1000
#: Labels JupyterHub's KubeSpawner gives single-user notebook pods (zero-to-jupyterhub).
JUPYTERHUB_NOTEBOOK_LABELS = {"component": "singleuser-server"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def pod_security_context() -> dict[str, Any]:
    """The pod-level securityContext: Pod Security ``restricted``, a numeric non-root user."""
    return {"runAsNonRoot": True, "runAsUser": POD_UID, "runAsGroup": POD_UID, "fsGroup": POD_UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """The container-level securityContext: no privilege escalation, every capability dropped."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@dataclass(frozen=True)
class NotebookPeer:
    """Where the notebook connects from: pods with ``labels`` in ``namespace`` (None: the compute's).

    ``in_cluster=False`` means the notebook reaches the kernel by port-forward
    only, so the policy admits no pod.
    """

    in_cluster: bool
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str | None = None


def notebook_peer(environ: Mapping[str, str] | None = None,
                  service_account_path: str | Path | None = None) -> NotebookPeer:
    """The notebook's side of the NetworkPolicy, from the environment.

    In a pod (``KUBERNETES_SERVICE_HOST`` set): labels from ``KT_NOTEBOOK_SELECTOR``
    (``"k=v,k2=v2"``), else JupyterHub's single-user labels when ``JUPYTERHUB_API_URL``
    is set, else any pod; namespace from ``KT_NOTEBOOK_NAMESPACE``, else the pod's own.
    """
    env = os.environ if environ is None else environ
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return NotebookPeer(in_cluster=False)
    if env.get("KT_NOTEBOOK_SELECTOR"):
        labels = check_string_map(env["KT_NOTEBOOK_SELECTOR"], "KT_NOTEBOOK_SELECTOR (environment variable)")
    else:
        labels = dict(JUPYTERHUB_NOTEBOOK_LABELS) if env.get("JUPYTERHUB_API_URL") else {}
    namespace = env.get("KT_NOTEBOOK_NAMESPACE")
    if namespace:
        namespace = check_dns_label(namespace, "KT_NOTEBOOK_NAMESPACE (environment variable)")
    else:
        sa = Path(service_account_path) if service_account_path is not None else SERVICE_ACCOUNT_NAMESPACE_PATH
        text = sa.read_text().strip() if sa.is_file() else ""
        namespace = check_dns_label(text, f"namespace in {sa}") if text else None
    return NotebookPeer(in_cluster=True, labels=labels, namespace=namespace)


def build_network_policy(compute: Compute, peer: NotebookPeer, metadata: dict[str, Any],
                         pod_labels: dict[str, str]) -> dict[str, Any]:
    """A NetworkPolicy admitting ingress to the compute's pods (``pod_labels``) from ``peer`` only, on every port."""
    ingress: list[dict[str, Any]] = []
    if peer.in_cluster:
        source: dict[str, Any] = {"podSelector": {"matchLabels": dict(sorted(peer.labels.items()))}}
        if peer.namespace and peer.namespace != compute.namespace:
            source["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: peer.namespace}}
        ingress.append({"from": [source]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
        "spec": {"podSelector": {"matchLabels": pod_labels}, "policyTypes": ["Ingress"], "ingress": ingress},
    }
