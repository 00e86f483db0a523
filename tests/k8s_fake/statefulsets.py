"""FakeStatefulSetController: the StatefulSet controller of the fake cluster, and its cluster DNS (test doubles).

As the real controller does, it names pods ``<sts>-<ordinal>``, sets their
``hostname`` and ``subdomain`` (the StatefulSet's ``serviceName``), labels them
with the template's labels plus ``apps.kubernetes.io/pod-index``,
``statefulset.kubernetes.io/pod-name`` and ``controller-revision-hash``, and
makes itself their controller (ownerReferences ``controller: true``). With
``podManagementPolicy: Parallel`` every missing pod is created at once; with
``OrderedReady`` (the default) ordinal N only once 0..N-1 are Ready. A pod that
is deleted comes back with the same name once the old one has left the API.
A new template rolls one pod at a time from the highest ordinal, each once the
others are Ready. Status: ``replicas``, ``readyReplicas``,
``availableReplicas``, ``currentReplicas``, ``updatedReplicas``,
``currentRevision``/``updateRevision``. Deleted in the foreground (a
``deletionTimestamp``) it stops making pods, deletes them and goes once none is
left; deleted outright, its pods are collected (the garbage collector's part).

Cluster DNS stands in through :class:`FakeDNSPodRuntime`: there is no CoreDNS
here, and every fake pod's address is 127.0.0.1, so each container of a
StatefulSet pod runs in its own mount namespace (``unshare``, as the kubelet's
sandbox would) with an ``/etc/hosts`` that resolves the StatefulSet's pod names
under its headless Service — ``<pod>.<svc>.<ns>.svc`` and
``….svc.cluster.local``, what CoreDNS answers for a Service with ``clusterIP:
None`` — to 127.0.0.1. A real cluster answers for not-ready pods only when the
Service has ``publishNotReadyAddresses``; the fake writes the names once, at
container start, so it writes them only for such a Service (and none for any
other). Without ``unshare`` (no user namespaces) the pods run as before and the
names do not resolve: :func:`cluster_dns_available` says which.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .kubelet import FakeKubelet, owned_by
from .pod_runtime import FakePodRuntime
from .store import now_rfc3339

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
REVISION_LABEL = "controller-revision-hash"


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _ordinal(sts: dict[str, Any], pod: dict[str, Any]) -> int | None:
    prefix, name = f"{sts['metadata']['name']}-", pod["metadata"]["name"]
    suffix = name[len(prefix):] if name.startswith(prefix) else ""
    return int(suffix) if suffix.isdigit() else None


def revision(sts: dict[str, Any]) -> str:
    """The controller revision of the StatefulSet's current template: ``<sts>-<hash>``."""
    digest = hashlib.sha256(json.dumps(sts["spec"]["template"], sort_keys=True).encode()).hexdigest()[:10]
    return f"{sts['metadata']['name']}-{digest}"


class FakeStatefulSetController:
    """The StatefulSet controller (a test double); register it with :meth:`install`."""

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet, self.store = kubelet, kubelet.store

    @classmethod
    def install(cls, kubelet: FakeKubelet) -> FakeStatefulSetController:
        """Register a controller for ``statefulsets`` in the kubelet (StatefulSets applied from now on)."""
        controller = kubelet.controllers["statefulsets"] = cls(kubelet)
        return controller

    # -- FakeController

    def owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The StatefulSet controlling ``pod`` (as stored now), or None."""
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "StatefulSet" and ref.get("controller"):
                sts = self.store.get("statefulsets", pod["metadata"]["namespace"], ref["name"])
                if sts is not None and sts["metadata"]["uid"] == ref.get("uid"):
                    return sts
        return None

    def deleted(self, sts: dict[str, Any]) -> None:
        """The StatefulSet left the API: its pods go (the garbage collector)."""
        for pod in self._pods(sts):
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete("pods", sts["metadata"]["namespace"], pod["metadata"]["name"])

    def reconcile(self, sts: dict[str, Any]) -> None:
        """Make the pods match the StatefulSet, then write its status."""
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        sts = self.store.get("statefulsets", ns, name)
        if sts is None:
            return
        pods = self._pods(sts)
        if sts["metadata"].get("deletionTimestamp"):  # foreground deletion: pods first, then the StatefulSet
            self.deleted(sts)
            if not pods:
                self.store.remove("statefulsets", ns, name)
            return
        rev = revision(sts)
        replicas = int(sts["spec"].get("replicas", 1))
        parallel = sts["spec"].get("podManagementPolicy") == "Parallel"
        by_ordinal = {o: p for p in pods if (o := _ordinal(sts, p)) is not None}
        for ordinal in range(replicas):
            if ordinal in by_ordinal:
                continue  # a terminating pod of that name must leave first: its removal reconciles again
            if not parallel and not all(o in by_ordinal and _ready(by_ordinal[o]) for o in range(ordinal)):
                break
            pod = self._create(sts, ordinal, rev)
            if pod is None:
                break
            by_ordinal[ordinal] = pod
        live = {o: p for o, p in by_ordinal.items() if not p["metadata"].get("deletionTimestamp")}
        for ordinal in sorted((o for o in live if o >= replicas), reverse=True):  # scale down, highest first
            self.store.delete("pods", ns, live.pop(ordinal)["metadata"]["name"])
        outdated = [o for o, p in live.items() if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) != rev]
        if outdated and len(live) == replicas and all(_ready(p) for p in live.values()):
            self.store.delete("pods", ns, live[max(outdated)]["metadata"]["name"])  # roll one, highest first
        self._status(sts, live, rev)

    # -- parts

    def _pods(self, sts: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in self.store.list("pods", sts["metadata"]["namespace"])
                if owned_by(p, sts["metadata"]["uid"])]

    def _create(self, sts: dict[str, Any], ordinal: int, rev: str) -> dict[str, Any] | None:
        name = f"{sts['metadata']['name']}-{ordinal}"
        template = sts["spec"]["template"]
        meta = copy.deepcopy(template.get("metadata") or {})
        meta["name"] = name
        meta["labels"] = {**(meta.get("labels") or {}), POD_INDEX_LABEL: str(ordinal), POD_NAME_LABEL: name,
                          REVISION_LABEL: rev}
        spec = copy.deepcopy(template["spec"])
        spec.update(hostname=name, subdomain=sts["spec"].get("serviceName", ""))
        return self.kubelet.create_pod(sts, meta, spec, component="statefulset-controller",
                                       retry=lambda: self.kubelet.requeue("statefulsets", sts),
                                       runtime=FakeDNSPodRuntime)

    def _status(self, sts: dict[str, Any], live: dict[int, dict[str, Any]], rev: str) -> None:
        ready = sum(1 for p in live.values() if _ready(p))
        updated = sum(1 for p in live.values() if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == rev)
        current = rev if updated == len(live) else (sts.get("status") or {}).get("currentRevision", rev)

        def write(obj: dict[str, Any]) -> None:
            obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": len(live),
                             "readyReplicas": ready, "availableReplicas": ready, "currentReplicas": updated,
                             "updatedReplicas": updated, "currentRevision": current, "updateRevision": rev,
                             "collisionCount": 0}
        self.store.update("statefulsets", sts["metadata"]["namespace"], sts["metadata"]["name"], write)


# ---------------------------------------------------------------------- the fake cluster DNS

@functools.lru_cache(maxsize=1)
def cluster_dns_available() -> bool:
    """Whether this machine lets a process have its own mount namespace and bind-mount over ``/etc/hosts`` there
    (``unshare -rm``), so the fake cluster DNS works."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "--bind", "/etc/hosts", "/etc/hosts"], check=False,
                           capture_output=True, timeout=10)
    return probe.returncode == 0


def dns_names(store: Any, pod: dict[str, Any]) -> list[str]:
    """What cluster DNS answers with the pod's address for its StatefulSet's pods: ``<pod>.<svc>.<ns>.svc`` (and
    ``.cluster.local``) for every ordinal, when ``subdomain`` names a headless Service publishing not-ready
    addresses; else none."""
    ns, subdomain = pod["metadata"]["namespace"], (pod.get("spec") or {}).get("subdomain")
    service = store.get("services", ns, subdomain) if subdomain else None
    spec = (service or {}).get("spec") or {}
    if spec.get("clusterIP") != "None" or not spec.get("publishNotReadyAddresses"):
        return []
    owner = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "StatefulSet"), None)
    sts = store.get("statefulsets", ns, owner["name"]) if owner else None
    if sts is None:
        return []
    names = []
    for ordinal in range(int(sts["spec"].get("replicas", 1))):
        host = f"{sts['metadata']['name']}-{ordinal}.{subdomain}.{ns}.svc"
        names += [host, f"{host}.cluster.local"]
    return names


class FakeDNSPodRuntime(FakePodRuntime):
    """A pod whose container resolves cluster DNS names of its StatefulSet (see the module docstring), with a
    temporary directory of its own (``TMPDIR``): a real container's ``/tmp`` is its own, and the ranks of one
    StatefulSet share this machine's (the pod kernel keeps synced code next to its temporary cells)."""

    def _env(self) -> dict[str, str] | None:
        env = super()._env()
        if env is not None:
            tmp = Path(self.dir) / "tmp"
            tmp.mkdir(exist_ok=True)
            env["TMPDIR"] = str(tmp)
        return env

    def _command(self) -> list[str]:
        argv = super()._command()
        names = dns_names(self.kubelet.store, self.kubelet.store.get("pods", self.ns, self.name) or
                          {"metadata": {"namespace": self.ns}})
        if not names or not cluster_dns_available():
            return argv
        hosts = Path(self.dir) / "etc-hosts"
        original = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        hosts.write_text(original.rstrip("\n") + f"\n# fake cluster DNS ({now_rfc3339()})\n127.0.0.1 "
                         + " ".join(names) + "\n")
        # its own mount namespace, /etc/hosts bound over, then the container's command (same pid: exec)
        return ["unshare", "-rm", "/bin/sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)] + argv
