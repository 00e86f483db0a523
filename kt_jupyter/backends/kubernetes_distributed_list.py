"""``%kt list`` on Kubernetes: each distributed compute once (its StatefulSet or RayCluster), not a row per rank.

The rows come from the workloads themselves, found by the same ownership rule as
Deployments and Jobs, each with its ranks' states folded as ``%kt status NAME``
folds them (:func:`~kt_jupyter.backends.kubernetes_distributed.group_info`).
A user who may not read StatefulSets or RayClusters (403), or a cluster with
no KubeRay (404 for RayClusters), has none: nothing to list, not an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..compute import Compute
from ..distributed import rank_name
from ..errors import KtError, NotFoundError
from ..manifests import MANAGED_BY, MANAGED_BY_LABEL, SPEC_ANNOTATION, label_selector
from . import KernelInfo
from .kubernetes_api import ApiStatusError, KubeApi
from .kubernetes_distributed import _rank_of, group_info

#: The workload kinds of distributed computes (pytorch, ray).
GROUP_KINDS = ("StatefulSet", "RayCluster")


def listed(backend: Any, kube: KubeApi, namespace: str,
           owned: Callable[[dict[str, Any]], str | None]) -> list[KernelInfo]:
    """The distributed computes in ``namespace`` that ``owned`` says are this user's, one row each."""
    out = []
    for kind in GROUP_KINDS:
        try:
            workloads = kube.list(kind, namespace, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        except NotFoundError:  # no such resource here (no KubeRay)
            continue
        except ApiStatusError as exc:
            if exc.status != 403:
                raise
            continue  # may not read them: then nobody with these rights made one
        for workload in workloads:
            name = owned(workload)
            meta = workload.get("metadata") or {}
            if name is None or meta.get("deletionTimestamp"):
                continue
            try:
                running = Compute.from_dict(json.loads((meta.get("annotations") or {})[SPEC_ANNOTATION]))
            except (KeyError, ValueError, TypeError, KtError):
                continue  # not one of ours
            config = running.distributed_config
            if config is None:
                continue
            compute = running.with_overrides(namespace=namespace)
            ray = config.framework == "ray"
            pods = kube.list("Pod", namespace, label_selector=label_selector(compute))
            ranks = [backend._info(kube, rank_name(name, r), namespace, kind, workload,
                                   [p for p in pods if _rank_of(compute, p, ray) == r])
                     for r in range(1 if ray else config.workers)]
            out.append(group_info(name, kind, running, compute, ranks))
    return out
