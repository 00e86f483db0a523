"""FakeKnativeServing: Knative Serving's controllers for the fake cluster (a test double).

What Knative does with a ``serving.knative.dev/v1`` Service, at the API:

* its CRDs are installed (until then the API answers 404 for ``services.serving.knative.dev``);
* the Service gets a Configuration and a Route of its name (owned by it); each new template makes a
  Revision ``{service}-{generation:05d}`` (owned by the Configuration) labelled
  ``serving.knative.dev/{service,configuration,configurationGeneration}``;
* the image is resolved to a digest first: an image the registry does not have (the kubelet's
  ``missing_images``) fails the Revision with ``ContainerMissing`` and no pod is made;
* the Revision's Deployment ``{revision}-deployment`` (owned by the Revision) runs the template's pod
  with Knative's labels (``serving.knative.dev/revision``, ``revisionUID``, ``app``), its env
  (``PORT``, ``K_SERVICE``, ``K_CONFIGURATION``, ``K_REVISION``) and a ``queue-proxy`` sidecar (the
  fake kubelet runs the first container only); it starts at ``max(min-scale, initial-scale)``
  (initial-scale defaults to 1, as Knative's ``allow-zero-initial-scale: false``); older revisions
  scale to 0 once the latest is ready;
* the Service's ``status.conditions`` ``ConfigurationsReady``, ``RoutesReady`` and ``Ready``, with
  Knative's reasons and messages (``RevisionMissing`` while the first Revision comes up,
  ``RevisionFailed`` when it fails), ``latestCreatedRevisionName``/``latestReadyRevisionName``,
  ``url`` and ``address`` (cluster-local);
* deletion: Foreground keeps the Service (finalizer) until its Deployments' pods are gone; any
  deletion takes the Configuration, Route, Revisions and Deployments with it.

Its validating webhook refuses a pod that uses what ``config-features`` has not enabled, with the
real message (``admission webhook "validation.webhook.serving.knative.dev" denied the request:
validation failed: must not set the field(s): spec.template.spec.nodeSelector``); the flags are
Knative's defaults (:data:`DEFAULT_FEATURES`) unless the test enables more, as an admin would.

The autoscaler's decision to scale to zero is :meth:`FakeKnativeServing.scale_to_zero`, called by the
test (the real one acts after the stable window without requests); it honours ``min-scale``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from .store import FakeApiError, now_rfc3339

if TYPE_CHECKING:
    from .kubelet import FakeKubelet

GROUP = "serving.knative.dev"
SERVICES = f"services.{GROUP}"
CONFIGURATIONS, REVISIONS, ROUTES = "configurations", "revisions", "routes"
SERVICE_LABEL, REVISION_LABEL = f"{GROUP}/service", f"{GROUP}/revision"
MIN_SCALE, INITIAL_SCALE = "autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/initial-scale"
#: ``config-features`` as Knative ships it: the pod fields (and volume kinds) that need a flag, and the
#: flags on by default (emptyDir since it went beta); a pod-level securityContext needs its flag for any field.
GATED_POD_FIELDS = {"affinity": "kubernetes.podspec-affinity", "nodeSelector": "kubernetes.podspec-nodeselector",
                    "tolerations": "kubernetes.podspec-tolerations",
                    "priorityClassName": "kubernetes.podspec-priorityclassname",
                    "schedulerName": "kubernetes.podspec-schedulername",
                    "securityContext": "kubernetes.podspec-securitycontext"}
GATED_VOLUMES = {"emptyDir": "kubernetes.podspec-emptydir",
                 "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim"}
DEFAULT_FEATURES = {"kubernetes.podspec-emptydir": "enabled"}
QUEUE_PROXY_IMAGE = "gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:" + "0" * 64


def _owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _condition(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    cond = {"type": kind, "status": status, "lastTransitionTime": now_rfc3339()}
    if reason:
        cond.update(reason=reason, message=message)
    return cond


def _ready(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (pod.get("status") or {}).get("conditions") or [])


class FakeKnativeServing:
    """Knative Serving (its CRDs, service/configuration/revision controllers, a scale-to-zero switch) on a
    :class:`~k8s_fake.FakeKubelet`, registered as its controller for ``services.serving.knative.dev``."""

    def __init__(self, kubelet: "FakeKubelet", features: dict[str, str] | None = None) -> None:
        self.kubelet, self.store = kubelet, kubelet.store
        #: The ``config-features`` ConfigMap: Knative's defaults, with ``features`` on top.
        self.features = {**DEFAULT_FEATURES, **(features or {})}

    def start(self) -> "FakeKnativeServing":
        """Install the CRDs and the webhook, and start reconciling."""
        self.store.installed_groups.add(GROUP)
        self.store.validating_webhooks[SERVICES] = self.validate
        self.kubelet.controllers[SERVICES] = self
        return self

    def validate(self, service: dict[str, Any]) -> None:
        """Knative's validating webhook on a Service: fields behind a disabled feature flag are refused."""
        pod = ((service.get("spec") or {}).get("template") or {}).get("spec") or {}
        path = "spec.template.spec"
        refused = []
        for field, flag in GATED_POD_FIELDS.items():
            if pod.get(field) and self.features.get(flag) not in ("enabled", "allowed"):
                value = pod[field]
                refused += [f"{path}.{field}.{k}" for k in sorted(value)] if field == "securityContext" \
                    else [f"{path}.{field}"]
        for i, volume in enumerate(pod.get("volumes") or []):
            refused += [f"{path}.volumes[{i}].{kind}" for kind, flag in GATED_VOLUMES.items()
                        if kind in volume and self.features.get(flag) not in ("enabled", "allowed")]
        if refused:
            raise FakeApiError(400, "BadRequest", 'admission webhook "validation.webhook.serving.knative.dev" denied '
                                                  f"the request: validation failed: must not set the field(s): "
                                                  f"{', '.join(refused)}")

    # -- the FakeController interface

    def owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The Knative Service whose revision runs ``pod``."""
        name = (pod["metadata"].get("labels") or {}).get(SERVICE_LABEL)
        return self.store.get(SERVICES, pod["metadata"]["namespace"], name) if name else None

    def deleted(self, service: dict[str, Any]) -> None:
        """The garbage collector: everything the Service owned goes (Deployments in the background)."""
        self._collect(service, foreground=False)

    def reconcile(self, service: dict[str, Any]) -> None:
        """Bring the Configuration, Revisions, Route and Deployments in line with the Service; set its status."""
        ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
        service = self.store.get(SERVICES, ns, name)
        if service is None:
            return
        if service["metadata"].get("deletionTimestamp"):
            if self._collect(service, foreground=True):
                self.store.remove(SERVICES, ns, name)
            return
        config = self._child(CONFIGURATIONS, service, {"template": service["spec"]["template"]})
        self._child(ROUTES, service, {"traffic": [{"configurationName": name, "latestRevision": True,
                                                   "percent": 100}]})
        revision = self._revision(service, config)
        failure = self._resolve_image(revision)
        deployment = None if failure else self._deployment(revision)
        self._status(service, revision, failure, deployment)

    # -- the children

    def _child(self, plural: str, owner: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """The owner's Configuration or Route of its name, created or brought up to date."""
        ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
        kind = {CONFIGURATIONS: "Configuration", ROUTES: "Route", REVISIONS: "Revision"}[plural]
        cur = self.store.get(plural, ns, name)
        if cur is None:
            return self.store.create(plural, ns, {
                "apiVersion": f"{GROUP}/v1", "kind": kind,
                "metadata": {"name": name, "labels": {SERVICE_LABEL: owner["metadata"]["name"]},
                             "ownerReferences": [_owner_ref(owner)]}, "spec": copy.deepcopy(spec)})
        if cur["spec"] != spec:
            def change(obj: dict[str, Any]) -> None:
                obj["spec"] = copy.deepcopy(spec)
                obj["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
            cur = self.store.update(plural, ns, name, change) or cur
        return cur

    def _revision(self, service: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """The Revision of the Configuration's current generation (created the first time)."""
        ns, svc = service["metadata"]["namespace"], service["metadata"]["name"]
        generation = int(config["metadata"].get("generation", 1))
        name = f"{svc}-{generation:05d}"
        revision = self.store.get(REVISIONS, ns, name)
        if revision is not None:
            return revision
        template = config["spec"]["template"]
        meta = template.get("metadata") or {}
        labels = {**(meta.get("labels") or {}), SERVICE_LABEL: svc, f"{GROUP}/configuration": svc,
                  f"{GROUP}/configurationGeneration": str(generation)}
        return self.store.create(REVISIONS, ns, {
            "apiVersion": f"{GROUP}/v1", "kind": "Revision",
            "metadata": {"name": name, "labels": labels, "annotations": dict(meta.get("annotations") or {}),
                         "ownerReferences": [_owner_ref(config)]},
            "spec": copy.deepcopy(template["spec"])})

    def _resolve_image(self, revision: dict[str, Any]) -> dict[str, Any] | None:
        """Knative's tag-to-digest resolution: the failed Revision condition for an image the registry lacks."""
        for container in revision["spec"]["containers"]:
            image = container["image"]
            if image in self.kubelet.missing_images:
                repo, _, tag = image.rpartition(":")
                host, _, path = repo.partition("/")
                return _condition("Ready", "False", "ContainerMissing", (
                    f'Unable to fetch image "{image}": failed to resolve image to digest: GET '
                    f"https://{host}/v2/{path}/manifests/{tag}: MANIFEST_UNKNOWN: manifest unknown; "
                    f"map[Tag:{tag}]"))
        return None

    def _deployment(self, revision: dict[str, Any]) -> dict[str, Any]:
        """The Revision's Deployment, created the first time (its replicas are the autoscaler's from then on)."""
        ns, rev = revision["metadata"]["namespace"], revision["metadata"]["name"]
        name = f"{rev}-deployment"
        current = self.store.get("deployments", ns, name)
        if current is not None:
            return current
        annotations = revision["metadata"].get("annotations") or {}
        replicas = max(int(annotations.get(MIN_SCALE, 0)), int(annotations.get(INITIAL_SCALE, 1)))
        labels = {**revision["metadata"]["labels"], REVISION_LABEL: rev,
                  f"{GROUP}/revisionUID": revision["metadata"]["uid"], "app": rev}
        spec = copy.deepcopy(revision["spec"])
        user, port = spec["containers"][0], (spec["containers"][0].get("ports") or [{}])[0].get("containerPort", 8080)
        user.setdefault("env", []).extend([
            {"name": "PORT", "value": str(port)},
            {"name": "K_REVISION", "value": rev},
            {"name": "K_CONFIGURATION", "value": labels[f"{GROUP}/configuration"]},
            {"name": "K_SERVICE", "value": labels[SERVICE_LABEL]}])
        spec["containers"].append({"name": "queue-proxy", "image": QUEUE_PROXY_IMAGE, "ports": [
            {"name": "http-queueadm", "containerPort": 8022}, {"name": "queue-port", "containerPort": 8012}],
            "env": [{"name": "USER_PORT", "value": str(port)}, {"name": "SERVING_REVISION", "value": rev}]})
        for key in ("containerConcurrency", "timeoutSeconds"):
            spec.pop(key, None)  # Revision fields, not pod fields
        return self.store.create("deployments", ns, {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [_owner_ref(revision)]},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {f"{GROUP}/revisionUID":
                                                                        labels[f"{GROUP}/revisionUID"]}},
                     "template": {"metadata": {"labels": labels, "annotations": dict(annotations)},
                                  "spec": spec}}})

    def _status(self, service: dict[str, Any], revision: dict[str, Any], failure: dict[str, Any] | None,
                deployment: dict[str, Any] | None) -> None:
        ns, svc, rev = service["metadata"]["namespace"], service["metadata"]["name"], revision["metadata"]["name"]
        pods = [p for p in self.store.list("pods", ns, f"{REVISION_LABEL}={rev}")]
        ready_before = (service.get("status") or {}).get("latestReadyRevisionName")
        ready = ready_before == rev or any(_ready(p) for p in pods)
        if failure is not None:
            message = f'Revision "{rev}" failed with message: {failure["message"]}.'
            conds = [_condition("ConfigurationsReady", "False", "RevisionFailed", message),
                     _condition("Ready", "False", "RevisionFailed", message),
                     _condition("RoutesReady", "False" if ready_before is None else "True",
                                "RevisionMissing" if ready_before is None else "",
                                f'Configuration "{svc}" does not have any ready Revision.')]
        elif not ready:
            waiting = f'Configuration "{svc}" is waiting for a Revision to become ready.'
            conds = [_condition(t, "Unknown", "RevisionMissing", waiting)
                     for t in ("ConfigurationsReady", "Ready", "RoutesReady")]
        else:
            conds = [_condition(t, "True") for t in ("ConfigurationsReady", "Ready", "RoutesReady")]
            self._retire_older(service, rev)
        url = f"http://{svc}.{ns}.svc.cluster.local"
        latest_ready = rev if ready and failure is None else ready_before

        def status(obj: dict[str, Any]) -> None:
            old = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
            for cond in conds:  # a condition's transition time changes only when its status does
                prev = old.get(cond["type"])
                if prev is not None and prev["status"] == cond["status"]:
                    cond["lastTransitionTime"] = prev["lastTransitionTime"]
            obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1), "conditions": conds,
                             "latestCreatedRevisionName": rev, "url": url, "address": {"url": url}}
            if latest_ready:
                obj["status"].update(latestReadyRevisionName=latest_ready, traffic=[
                    {"revisionName": latest_ready, "latestRevision": True, "percent": 100}])
        self.store.update(SERVICES, ns, svc, status)

    def _retire_older(self, service: dict[str, Any], latest: str) -> None:
        """Older revisions get no traffic once the latest is ready: the autoscaler takes them to zero."""
        ns, svc = service["metadata"]["namespace"], service["metadata"]["name"]
        for dep in self.store.list("deployments", ns, f"{SERVICE_LABEL}={svc}"):
            if dep["metadata"]["labels"].get(REVISION_LABEL) != latest and dep["spec"].get("replicas"):
                self.store.merge_patch("deployments", ns, dep["metadata"]["name"], {"spec": {"replicas": 0}})

    def _collect(self, service: dict[str, Any], *, foreground: bool) -> bool:
        """Delete what the Service owns; True once nothing of it is left (its pods included)."""
        ns, svc = service["metadata"]["namespace"], service["metadata"]["name"]
        selector = f"{SERVICE_LABEL}={svc}"
        deployments = self.store.list("deployments", ns, selector)
        for dep in deployments:
            if not dep["metadata"].get("deletionTimestamp"):
                self.store.delete("deployments", ns, dep["metadata"]["name"],
                                  propagation="Foreground" if foreground else None)
        if foreground and self.store.list("pods", ns, selector):
            return False  # each pod's removal reconciles the Service again (Deployments go with their last pod)
        for plural in (REVISIONS, CONFIGURATIONS, ROUTES):
            for obj in self.store.list(plural, ns, selector):
                self.store.remove(plural, ns, obj["metadata"]["name"])
        return True

    # -- the autoscaler

    def scale_to_zero(self, namespace: str, service: str) -> bool:
        """The autoscaler saw no requests for its stable window: the latest revision goes to 0 pods, unless its
        ``min-scale`` keeps some (then False and nothing changes)."""
        svc = self.store.get(SERVICES, namespace, service)
        rev = ((svc or {}).get("status") or {}).get("latestReadyRevisionName")
        revision = self.store.get(REVISIONS, namespace, rev) if rev else None
        if revision is None:
            raise LookupError(f"fake Knative: no ready revision of service {namespace}/{service}")
        if int((revision["metadata"].get("annotations") or {}).get(MIN_SCALE, 0)) > 0:
            return False
        self.store.merge_patch("deployments", namespace, f"{rev}-deployment", {"spec": {"replicas": 0}})
        return True
