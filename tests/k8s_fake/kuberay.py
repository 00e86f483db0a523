"""FakeKubeRayOperator: the part of KubeRay's operator a kt ray compute meets (a test double).

:meth:`FakeKubeRayOperator.install` installs the ``ray.io`` API group (as the
operator's Helm chart installs its CRDs) and registers the operator for
``rayclusters``. For a RayCluster it creates the head pod
``<cluster>-head`` from ``headGroupSpec.template``, labelled as KubeRay labels
it (``ray.io/cluster``, ``ray.io/node-type: head``, ``ray.io/group:
headgroup``) and controlled by the RayCluster; it honours
``ray.io/overwrite-container-cmd`` by keeping the container's command and
giving it the generated start command in ``KUBERAY_GEN_RAY_START_CMD``, and
with ``authOptions.mode: token`` sets ``RAY_AUTH_MODE`` as the operator does.
Ray itself is not run: the generated command here only says what the real one
would start. Without the annotation KubeRay would replace the command with
``ray start`` and no pod kernel would run: the fake then makes no pod and
records a Warning event saying so. Worker pods are not
created (they would run only Ray); the status counts them as desired. A
deleted RayCluster's pods are collected.
"""

from __future__ import annotations

import copy
from typing import Any

from .kubelet import FakeKubelet, owned_by

GROUP = "ray.io"
OVERWRITE_ANNOTATION = "ray.io/overwrite-container-cmd"


class FakeKubeRayOperator:
    """The KubeRay operator's RayCluster controller, head pod only (see the module docstring)."""

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet, self.store = kubelet, kubelet.store

    @classmethod
    def install(cls, kubelet: FakeKubelet) -> FakeKubeRayOperator:
        """Install the ray.io CRDs and the operator on the fake cluster."""
        kubelet.store.installed_groups.add(GROUP)
        operator = kubelet.controllers["rayclusters"] = cls(kubelet)
        return operator

    def owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The RayCluster controlling ``pod``, or None."""
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "RayCluster" and ref.get("controller"):
                rc = self.store.get("rayclusters", pod["metadata"]["namespace"], ref["name"])
                if rc is not None and rc["metadata"]["uid"] == ref.get("uid"):
                    return rc
        return None

    def deleted(self, rc: dict[str, Any]) -> None:
        """The RayCluster left the API: its pods go."""
        for pod in self._pods(rc):
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", rc["metadata"]["namespace"], pod["metadata"]["name"])

    def reconcile(self, rc: dict[str, Any]) -> None:
        """Create the head pod when missing; write the status."""
        ns, name = rc["metadata"]["namespace"], rc["metadata"]["name"]
        rc = self.store.get("rayclusters", ns, name)
        if rc is None:
            return
        pods = self._pods(rc)
        if rc["metadata"].get("deletionTimestamp"):
            self.deleted(rc)
            if not pods:
                self.store.remove("rayclusters", ns, name)
            return
        if (rc["metadata"].get("annotations") or {}).get(OVERWRITE_ANNOTATION) != "true":
            self.kubelet.event(ns, "RayCluster", name, rc["metadata"]["uid"], "FakeRefused",
                               "fake KubeRay: without ray.io/overwrite-container-cmd the operator would replace the "
                               "head's command with `ray start`; the pod kernel would never run", "Warning",
                               component="kuberay-operator")
            return
        if not pods:
            self._create_head(rc)
            pods = self._pods(rc)
        ready = sum(1 for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                           for c in (p.get("status") or {}).get("conditions") or []))
        workers = sum(int(g.get("replicas", 0)) for g in rc["spec"].get("workerGroupSpecs") or [])

        def write(obj: dict[str, Any]) -> None:
            obj["status"] = {"state": "ready" if ready else "", "desiredWorkerReplicas": workers,
                             "availableWorkerReplicas": 0, "readyWorkerReplicas": 0,
                             "head": {"podName": f"{name}-head"}}
        self.store.update("rayclusters", ns, name, write)

    def _pods(self, rc: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in self.store.list("pods", rc["metadata"]["namespace"]) if owned_by(p, rc["metadata"]["uid"])]

    def _create_head(self, rc: dict[str, Any]) -> None:
        name = rc["metadata"]["name"]
        head = rc["spec"]["headGroupSpec"]
        template = head["template"]
        meta = copy.deepcopy(template.get("metadata") or {})
        meta["name"] = f"{name}-head"
        meta["labels"] = {**(meta.get("labels") or {}), "ray.io/cluster": name, "ray.io/node-type": "head",
                          "ray.io/group": "headgroup"}
        spec = copy.deepcopy(template["spec"])
        params = " ".join(f"--{k}={v}" for k, v in sorted((head.get("rayStartParams") or {}).items()))
        env = [{"name": "KUBERAY_GEN_RAY_START_CMD",
                "value": f"echo fake-kuberay: would run ray start --head {params} --block"}]
        if ((rc["spec"].get("authOptions") or {}).get("mode")) == "token":
            env.append({"name": "RAY_AUTH_MODE", "value": "token"})
        for container in spec["containers"]:
            container["env"] = list(container.get("env") or []) + env
        self.kubelet.create_pod(rc, meta, spec, component="kuberay-operator",
                                retry=lambda: self.kubelet.requeue("rayclusters", rc))
