"""FakeStore: the state of the fake cluster behind FakeKubeApiServer (a test double).

Objects by (API group, plural, namespace, name) — the core ``services`` and
Knative's ``services.serving.knative.dev`` are two resources — a resourceVersion counter and a
bounded history of changes, as the real API server's watch cache: a watch can
start from any version still in the window, and from an older one it gets the
in-stream 410 ``Expired`` error. The watchers of open watch streams, and
listeners (the fake kubelet) told of every change. Also the API's label and
field selectors, Pod Security admission (:mod:`k8s_fake.admission`, for
namespaces labelled ``pod-security.kubernetes.io/enforce``) with the real
message shape, and a minimal RBAC check for service-account tokens against
the Roles and RoleBindings stored here.
"""

from __future__ import annotations

import copy
import queue
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from .admission import forbidden_message, pod_security_violations

ADMIN_TOKEN = "fake-admin-token"
#: Changes the watch cache keeps by default (the real one keeps a time window; tests shrink it).
HISTORY_WINDOW = 100_000
#: The namespace label Pod Security admission enforces.
POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"
SA_TOKEN_PREFIX = "fake-sa:"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: The scheduling gate Kueue's pod webhook adds until the workload is admitted.
KUEUE_GATE = "kueue.x-k8s.io/admission"
#: (API group, plural) -> (version, kind): what the fake API server serves ("" is the core group).
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("", "pods"): ("v1", "Pod"),
    ("", "services"): ("v1", "Service"),
    ("", "secrets"): ("v1", "Secret"),
    ("", "configmaps"): ("v1", "ConfigMap"),
    ("", "persistentvolumeclaims"): ("v1", "PersistentVolumeClaim"),
    ("", "serviceaccounts"): ("v1", "ServiceAccount"),
    ("", "events"): ("v1", "Event"),
    ("apps", "deployments"): ("v1", "Deployment"),
    ("apps", "replicasets"): ("v1", "ReplicaSet"),
    ("apps", "statefulsets"): ("v1", "StatefulSet"),
    ("batch", "jobs"): ("v1", "Job"),
    ("ray.io", "rayclusters"): ("v1", "RayCluster"),
    ("rbac.authorization.k8s.io", "roles"): ("v1", "Role"),
    ("rbac.authorization.k8s.io", "rolebindings"): ("v1", "RoleBinding"),
    ("networking.k8s.io", "networkpolicies"): ("v1", "NetworkPolicy"),
    ("serving.knative.dev", "services"): ("v1", "Service"),
    ("serving.knative.dev", "configurations"): ("v1", "Configuration"),
    ("serving.knative.dev", "revisions"): ("v1", "Revision"),
    ("serving.knative.dev", "routes"): ("v1", "Route"),
}
#: API groups a real cluster has only once their CRDs are installed (the fake Knative Serving installs its own):
#: until then the API server answers 404 "the server could not find the requested resource".
CRD_GROUPS = frozenset({"serving.knative.dev", "ray.io"})


def resource_name(group: str, plural: str) -> str:
    """The store's name of a resource: its plural, or ``plural.group`` where the core group has the plural too
    (``services`` is the core Service, ``services.serving.knative.dev`` Knative's), as kubectl spells them."""
    return f"{plural}.{group}" if group and ("", plural) in RESOURCES else plural


def resolve(name: str) -> tuple[str, str]:
    """(group, plural) of a store name (``pods``, ``deployments``, ``services.serving.knative.dev``)."""
    plural, _, group = name.partition(".")
    if group:
        key = (group, plural)
    else:
        matches = sorted(k for k in RESOURCES if k[1] == plural)  # the core group ("") sorts first
        key = matches[0] if matches else ("", plural)
    if key not in RESOURCES:
        raise KeyError(f"fake store: no resource {name!r}")
    return key


def api_version(group: str, version: str) -> str:
    """``v1`` for the core group, else ``group/version``."""
    return f"{group}/{version}" if group else version


def now_rfc3339() -> str:
    """The current time as the API writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiError(Exception):
    """An API failure: HTTP status, reason and message, sent as a Status object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        """The ``Status`` object the API answers with."""
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


# ---------------------------------------------------------------------- selectors

def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Whether ``labels`` satisfy a label selector (=, ==, !=, in, notin, exists, !exists)."""
    for term in _split_selector(selector or ""):
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            inside = labels.get(m.group(1)) in values
            if inside != (m.group(2) == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    """Whether ``obj`` satisfies an equality field selector (``metadata.name=x,involvedObject.kind!=Pod``)."""
    for term in _split_selector(selector or ""):
        negate = "!=" in term
        path, value = term.split("!=" if negate else "=", 1)
        cur: Any = obj
        for part in path.strip().lstrip("=").split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if (str(cur if cur is not None else "") == value.strip().lstrip("=")) == negate:
            return False
    return True


# ---------------------------------------------------------------------- the store

@dataclass(eq=False)
class _Watcher:
    resource: tuple[str, str]
    namespace: str
    labels: str | None
    fields: str | None
    events: "queue.Queue[dict[str, Any] | str | None]" = field(default_factory=queue.Queue)
    #: Set when the watch asked for a version older than the history window: the 410 message.
    expired: str | None = None

    def wants(self, resource: tuple[str, str], obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (resource == self.resource and meta.get("namespace") == self.namespace
                and label_matches(self.labels, meta.get("labels") or {}) and field_matches(self.fields, obj))


class FakeStore:
    """The fake cluster's objects, their history (for watches from a resourceVersion) and listeners."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        #: Objects by (API group, plural, namespace, name).
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.version = 0
        self.history: deque[tuple[int, str, tuple[str, str], dict[str, Any]]] = deque()
        #: How many changes the history (watch cache) keeps; older versions are answered 410 Expired.
        self.history_window = HISTORY_WINDOW
        #: The newest version no longer in the history.
        self.compacted_to = 0
        #: Namespace labels (the fake serves no Namespace objects): Pod Security admission reads them.
        self.namespace_labels: dict[str, dict[str, str]] = {}
        #: Kueue stand-in: pods labelled ``kueue.x-k8s.io/queue-name`` with one of these queues are created
        #: with Kueue's scheduling gate (its webhook's doing) until :meth:`admit` lifts it.
        self.kueue_queues: set[str] = set()
        #: Whether no kubelet answers the API server (``pods/log`` then fails with 500, as for real).
        self.kubelet_unreachable = False
        #: CRD groups (:data:`CRD_GROUPS`) installed on this cluster; the API server serves no others.
        self.installed_groups: set[str] = set()
        self.watchers: list[_Watcher] = []
        #: Told of every change as (event type, store name of the resource, object): see :func:`resource_name`.
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.requests: list[dict[str, Any]] = []
        #: Every delete a client sent the API: (plural, name, gracePeriodSeconds, propagationPolicy).
        self.deletions: list[tuple[str, str, int | None, str | None]] = []
        #: (verb, resource) pairs the admin user is refused (403), to test how the backend copes;
        #: the resource is a plural or plural/subresource: ("get", "pods/log") is an edit-less user.
        self.denied: set[tuple[str, str]] = set()
        #: pod logs: (namespace, pod, container, previous) -> bytes, provided by the fake kubelet
        self.log_source: Callable[[str, str, str, bool], bytes | None] | None = None
        self.log_follower: Callable[[str, str, str], Iterator[bytes]] | None = None
        #: (namespace, pod, port) -> the 127.0.0.1 port the fake pod listens on, provided by the fake kubelet
        self.port_resolver: Callable[[str, str, int], int] | None = None
        #: Validating admission webhooks by store name: called with the body of a create or apply through the
        #: API, they raise :class:`FakeApiError` to deny it (Knative's webhook, :mod:`k8s_fake.knative`).
        self.validating_webhooks: dict[str, Callable[[dict[str, Any]], None]] = {}
        #: (namespace, pod, container) -> (working directory, environment) of the running container, for
        #: ``pods/exec``; None when it is not running (:func:`k8s_fake.exec.install_exec`)
        self.exec_resolver: Callable[[str, str, str], tuple[str, dict[str, str]] | None] | None = None

    # -- changes

    def _commit(self, kind: str, resource: tuple[str, str], obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.version)
        key = (*resource, meta["namespace"], meta["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        snapshot = copy.deepcopy(obj)
        self.history.append((self.version, kind, resource, snapshot))
        while len(self.history) > self.history_window:
            self.compacted_to = self.history.popleft()[0]
        for watcher in list(self.watchers):
            if watcher.wants(resource, snapshot):
                watcher.events.put({"type": kind, "object": copy.deepcopy(snapshot)})
        for listener in list(self.listeners):
            listener(kind, resource_name(*resource), copy.deepcopy(snapshot))
        self.changed.notify_all()
        return copy.deepcopy(obj)

    def create(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object (409 AlreadyExists when its name is taken)."""
        resource = resolve(plural)
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta["namespace"] = namespace
            if (*resource, namespace, meta.get("name")) in self.objects:
                raise FakeApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            version, kind = RESOURCES[resource]
            obj.setdefault("apiVersion", api_version(resource[0], version))
            obj.setdefault("kind", kind)
            if resource == ("", "pods"):
                self._admit_pod(namespace, meta.get("generateName") or meta["name"], obj)
                if (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL) in self.kueue_queues:
                    obj.setdefault("spec", {}).setdefault("schedulingGates", []).append({"name": KUEUE_GATE})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
            return self._commit("ADDED", resource, obj)

    def apply(self, plural: str, namespace: str, name: str, body: dict[str, Any], manager: str) -> dict[str, Any]:
        """Server-side apply, simplified: the applied object replaces all but status and server-set metadata."""
        resource = resolve(plural)
        version, kind = RESOURCES[resource]
        want_api = api_version(resource[0], version)
        if body.get("apiVersion") != want_api or body.get("kind") != kind:
            raise FakeApiError(400, "BadRequest", f"apply body is {body.get('apiVersion')}/{body.get('kind')}, "
                                                  f"the URL names {want_api}/{kind}")
        meta = body.get("metadata") or {}
        if meta.get("name") != name or meta.get("namespace", namespace) != namespace:
            raise FakeApiError(400, "BadRequest", "the name or namespace of the body does not match the URL")
        with self.lock:
            cur = self.objects.get((*resource, namespace, name))
            if cur is None:
                self.create(plural, namespace, body)
                return self._set_manager(plural, namespace, name, manager)
            new = copy.deepcopy(body)
            new_meta = new["metadata"]
            for key in ("uid", "creationTimestamp", "generation", "resourceVersion", "managedFields"):
                if key in cur["metadata"]:
                    new_meta[key] = cur["metadata"][key]
            if "status" in cur:
                new["status"] = cur["status"]
            new_meta["namespace"] = namespace
            if new == cur:
                return copy.deepcopy(cur)  # nothing changed: no new resourceVersion, no watch event
            if new.get("spec") != cur.get("spec"):
                new_meta["generation"] = int(cur["metadata"].get("generation", 1)) + 1
            self._commit("MODIFIED", resource, new)
            return self._set_manager(plural, namespace, name, manager)

    def _set_manager(self, plural: str, namespace: str, name: str, manager: str) -> dict[str, Any]:
        obj = self.objects[(*resolve(plural), namespace, name)]
        obj["metadata"]["managedFields"] = [{"manager": manager, "operation": "Apply"}]
        return copy.deepcopy(obj)

    def update(self, plural: str, namespace: str, name: str,
               mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Change a stored object in place (status updates of the fake kubelet); None if it is gone."""
        resource = resolve(plural)
        with self.lock:
            cur = self.objects.get((*resource, namespace, name))
            if cur is None:
                return None
            new = copy.deepcopy(cur)
            mutate(new)
            if new == cur:
                return copy.deepcopy(cur)
            return self._commit("MODIFIED", resource, new)

    def merge_patch(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386); 404 when the object does not exist."""
        def merge(target: dict[str, Any], change: dict[str, Any]) -> None:
            for key, value in change.items():
                if value is None:
                    target.pop(key, None)
                elif isinstance(value, dict) and isinstance(target.get(key), dict):
                    merge(target[key], value)
                else:
                    target[key] = copy.deepcopy(value)

        result = self.update(plural, namespace, name, lambda obj: merge(obj, patch))
        if result is None:
            raise FakeApiError(404, "NotFound", f'{plural} "{name}" not found')
        return result

    def delete(self, plural: str, namespace: str, name: str, grace_period_s: int | None = None,
               propagation: str | None = None) -> dict[str, Any]:
        """Delete, as the API server does.

        A pod gets a deletionTimestamp and goes once the fake kubelet has stopped
        it, except with grace 0 (a force delete): then it leaves the API at once
        and its container is stopped afterwards. With ``propagation`` Foreground
        an owner (Deployment, ReplicaSet) stays, with a deletionTimestamp and the
        ``foregroundDeletion`` finalizer, until the garbage collector (the fake
        kubelet) has removed its dependents.
        """
        resource = resolve(plural)
        with self.lock:
            cur = self.objects.get((*resource, namespace, name))
            if cur is None:
                raise FakeApiError(404, "NotFound", f'{plural} "{name}" not found')
            owners = (("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets"), ("batch", "jobs"),
                      ("ray.io", "rayclusters"), ("serving.knative.dev", "services"))
            if propagation == "Foreground" and resource in owners and self.listeners:
                def finalize(obj: dict[str, Any]) -> None:
                    meta = obj["metadata"]
                    meta.setdefault("deletionTimestamp", now_rfc3339())
                    if "foregroundDeletion" not in meta.setdefault("finalizers", []):
                        meta["finalizers"].append("foregroundDeletion")
                return self.update(plural, namespace, name, finalize) or cur
            if resource == ("", "pods") and self.listeners and grace_period_s != 0:
                def mark(pod: dict[str, Any]) -> None:
                    meta = pod["metadata"]
                    meta.setdefault("deletionTimestamp", now_rfc3339())
                    grace = grace_period_s if grace_period_s is not None else \
                        (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                    meta["deletionGracePeriodSeconds"] = min(int(grace), meta.get("deletionGracePeriodSeconds", 10**9))
                return self.update(plural, namespace, name, mark) or cur
            return self._commit("DELETED", resource, copy.deepcopy(cur))

    def admit(self, namespace: str, pod: str) -> None:
        """Kueue admits the pod's workload: its scheduling gate is lifted (the scheduler may place it now)."""
        def lift(obj: dict[str, Any]) -> None:
            gates = [g for g in obj["spec"].get("schedulingGates") or [] if g.get("name") != KUEUE_GATE]
            obj["spec"].pop("schedulingGates", None)
            if gates:
                obj["spec"]["schedulingGates"] = gates
        if self.update("pods", namespace, pod, lift) is None:
            raise FakeApiError(404, "NotFound", f'pods "{pod}" not found')

    def remove(self, plural: str, namespace: str, name: str) -> None:
        """Drop an object for good (the fake kubelet, once a pod's process has ended)."""
        resource = resolve(plural)
        with self.lock:
            cur = self.objects.get((*resource, namespace, name))
            if cur is not None:
                self._commit("DELETED", resource, copy.deepcopy(cur))

    # -- reads

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of the object, or None."""
        with self.lock:
            obj = self.objects.get((*resolve(plural), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str, labels: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:
        """Copies of the matching objects, oldest first."""
        with self.lock:
            probe = _Watcher(resolve(plural), namespace, labels, fields)
            return [copy.deepcopy(o) for (g, p, _ns, _n), o in self.objects.items() if probe.wants((g, p), o)]

    def watch(self, plural: str, namespace: str, labels: str | None, fields: str | None,
              since: str | None) -> _Watcher:
        """Register a watcher primed with the current objects (no ``since``) or the changes after ``since``.

        A ``since`` older than the history window gives a watcher whose
        ``expired`` says why (the API server answers with the in-stream 410).
        """
        with self.lock:
            watcher = _Watcher(resolve(plural), namespace, labels, fields)
            if since not in (None, "", "0") and int(since) < self.compacted_to:
                watcher.expired = f"too old resource version: {since} ({self.compacted_to + 1})"
                return watcher
            if since in (None, "", "0"):
                for obj in self.list(plural, namespace, labels, fields):
                    watcher.events.put({"type": "ADDED", "object": obj})
            else:
                for version, kind, resource, obj in self.history:
                    if version > int(since) and watcher.wants(resource, obj):
                        watcher.events.put({"type": kind, "object": copy.deepcopy(obj)})
            self.watchers.append(watcher)
            return watcher

    def unwatch(self, watcher: _Watcher) -> None:
        """Forget a watcher."""
        with self.lock:
            if watcher in self.watchers:
                self.watchers.remove(watcher)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float) -> Any:
        """Block until ``predicate()`` is truthy (checked on every change); raise after ``timeout_s``."""
        with self.changed:
            result = self.changed.wait_for(predicate, timeout=timeout_s)
        if not result:
            raise TimeoutError(f"fake cluster: condition not met within {timeout_s:g} s")
        return result

    # -- Pod Security admission

    def _admit_pod(self, namespace: str, name: str, pod: dict[str, Any]) -> None:
        """Reject a pod that violates the namespace's enforced Pod Security level, as the API server does."""
        level = self.namespace_labels.get(namespace, {}).get(POD_SECURITY_LABEL)
        if level in (None, "privileged"):
            return
        violations = pod_security_violations(pod, level)
        if violations:
            raise FakeApiError(403, "Forbidden", forbidden_message(name, violations, level))

    # -- minimal RBAC for service-account tokens

    def allowed(self, subject: str, verb: str, group: str, resource: str, namespace: str, name: str | None) -> bool:
        """Whether a service account (``ns:name``) may do ``verb`` on ``resource`` per the stored RBAC."""
        sa_ns, _, sa_name = subject.partition(":")
        if sa_ns != namespace:
            return False
        with self.lock:
            for binding in self.list("rolebindings", namespace):
                if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
                           and s.get("namespace", namespace) == sa_ns for s in binding.get("subjects") or []):
                    continue
                role = self.get("roles", namespace, (binding.get("roleRef") or {}).get("name", ""))
                for rule in (role or {}).get("rules") or []:
                    if group in rule.get("apiGroups", []) and resource in rule.get("resources", []) \
                            and verb in rule.get("verbs", []) \
                            and (not rule.get("resourceNames") or name in rule["resourceNames"]):
                        return True
        return False

