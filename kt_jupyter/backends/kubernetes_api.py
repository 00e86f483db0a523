"""The slice of the Kubernetes API the backend uses, on the official ``kubernetes`` client.

Loads a configuration (a kubeconfig, or the pod's service account inside a
cluster), applies manifests with server-side apply, reads objects as plain
JSON dicts (``_preload_content=False``: the same shapes as the manifests and
the API docs), runs watches in background threads feeding a queue, and turns
API failures into :mod:`kt_jupyter.errors` with a sentence that says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import BackendUnavailable, KubernetesAPIError, NotFoundError

log = logging.getLogger("kt_jupyter.kubernetes")

#: Field manager of every server-side apply.
FIELD_MANAGER = "kt-jupyter"
#: Seconds one API request may take.
API_TIMEOUT_S = 30.0
#: Seconds one watch request stays open (server side); watches are re-opened until their owner stops them.
WATCH_CHUNK_S = 60
#: Connections kept per API client (watches hold one each).
POOL_SIZE = 32

# kind -> (API group attribute, snake-case resource name for the generated methods, plural)
KINDS: dict[str, tuple[str, str, str]] = {
    "Secret": ("core", "secret", "secrets"),
    "ConfigMap": ("core", "config_map", "configmaps"),
    "PersistentVolumeClaim": ("core", "persistent_volume_claim", "persistentvolumeclaims"),
    "Service": ("core", "service", "services"),
    "ServiceAccount": ("core", "service_account", "serviceaccounts"),
    "Pod": ("core", "pod", "pods"),
    "Event": ("core", "event", "events"),
    "Deployment": ("apps", "deployment", "deployments"),
    "Role": ("rbac", "role", "roles"),
    "RoleBinding": ("rbac", "role_binding", "rolebindings"),
}


def load_api_client(kubeconfig_path: str | None = None) -> Any:
    """An ``ApiClient`` for ``kubeconfig_path``, else ``$KUBECONFIG`` / ``~/.kube/config``, else in-cluster."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise BackendUnavailable("the `kubernetes` package is missing: `pip install kubernetes`, "
                                 "or use --backend local") from None

    cfg = client.Configuration()
    path = kubeconfig_path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    paths = [os.path.expanduser(p) for p in path.split(os.pathsep) if p]
    try:
        if kubeconfig_path or any(os.path.exists(p) for p in paths):
            config.load_kube_config(config_file=os.pathsep.join(paths), client_configuration=cfg,
                                    persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            raise BackendUnavailable(
                f"no Kubernetes cluster is configured: no kubeconfig at {path} and this is not a pod in a "
                "cluster. Set KUBECONFIG or kubeconfig_path=, or use --backend local")
    except ConfigException as exc:
        raise BackendUnavailable(f"cannot load the Kubernetes configuration from {path}: {exc}. "
                                 "Fix the kubeconfig (or its current context), or use --backend local") from None
    cfg.connection_pool_maxsize = POOL_SIZE
    return client.ApiClient(cfg)


@contextmanager
def api_errors(action: str, host: str = "") -> Iterator[None]:
    """Turn what the client raises into one clear kt error about ``action``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise translate(exc, action, host) from None
    except (HTTPError, OSError) as exc:
        raise BackendUnavailable(f"cannot reach the Kubernetes API{' at ' + host if host else ''} while "
                                 f"{action}: {exc}. Check the cluster is up and your kubeconfig context "
                                 "points at it") from None


def api_message(exc: Any) -> str:
    """The ``message`` of the API's Status reply, else the HTTP reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            return json.loads(body).get("message") or str(body)
        except (ValueError, AttributeError):
            return str(body)[:500]
    return str(getattr(exc, "reason", "") or exc)


def translate(exc: Any, action: str, host: str = "") -> Exception:
    """An ApiException as NotFoundError / BackendUnavailable / KubernetesAPIError."""
    status, message = getattr(exc, "status", 0), api_message(exc)
    if status == 404:
        return NotFoundError(f"not found while {action}: {message}")
    if status == 401:
        return BackendUnavailable(
            f"the Kubernetes API rejected our credentials while {action} (401 Unauthorized). Log in again "
            "(refresh your kubeconfig: e.g. `gcloud container clusters get-credentials`, "
            "`aws eks update-kubeconfig`, `az aks get-credentials`)")
    if status == 403:
        return KubernetesAPIError(f"Kubernetes forbids {action}: {message}. Ask your cluster admin for that "
                                  "permission in this namespace, or use another namespace")
    if status == 0:
        return BackendUnavailable(f"cannot reach the Kubernetes API{' at ' + host if host else ''} while "
                                  f"{action}: {message}")
    return KubernetesAPIError(f"Kubernetes refused {action} ({status}): {message}")


class KubeApi:
    """The typed APIs of one ApiClient, with JSON-in/JSON-out helpers."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.host = getattr(api_client.configuration, "host", "")
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    def _method(self, kind: str, verb: str) -> Callable[..., Any]:
        group, resource, _plural = KINDS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{resource}")

    @staticmethod
    def _json(response: Any) -> Any:
        data = response.data
        return json.loads(data) if data else {}

    def call(self, kind: str, verb: str, *args: Any, action: str, **kwargs: Any) -> Any:
        """``{verb}_namespaced_{kind}(*args)``, the reply as JSON; errors translated for ``action``."""
        with api_errors(action, self.host):
            return self._json(self._method(kind, verb)(*args, _preload_content=False,
                                                     _request_timeout=API_TIMEOUT_S, **kwargs))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of ``obj`` (field manager ``kt-jupyter``, force): creates or updates it."""
        meta = obj["metadata"]
        return self.call(obj["kind"], "patch", meta["name"], meta["namespace"], obj,
                         action=f"applying {obj['kind']} {meta['namespace']}/{meta['name']}",
                         field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml")

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when an object of that name exists already (nothing changed)."""
        from kubernetes.client.exceptions import ApiException

        meta = obj["metadata"]
        action = f"creating {obj['kind']} {meta['namespace']}/{meta['name']}"
        with api_errors(action, self.host):
            try:
                self._method(obj["kind"], "create")(meta["namespace"], obj, field_manager=FIELD_MANAGER,
                                                    _preload_content=False, _request_timeout=API_TIMEOUT_S).data
            except ApiException as exc:
                if exc.status == 409:
                    return False
                raise
        return True

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.call(kind, "read", name, namespace, action=f"reading {kind} {namespace}/{name}")
        except NotFoundError:
            return None

    def list(self, kind: str, namespace: str, **selectors: Any) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` matching ``label_selector`` / ``field_selector``."""
        return self.list_reply(kind, namespace, **selectors).get("items") or []

    def list_reply(self, kind: str, namespace: str, **selectors: Any) -> dict[str, Any]:
        """The whole list reply: ``items`` and ``metadata.resourceVersion`` (to watch from)."""
        return self.call(kind, "list", namespace, action=f"listing {KINDS[kind][2]} in namespace {namespace}",
                         **selectors)

    def delete(self, kind: str, name: str, namespace: str, grace_period_s: float | None = None) -> bool:
        """Delete one object; False when it was already gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = max(0, int(round(grace_period_s)))
        try:
            self.call(kind, "delete", name, namespace, action=f"deleting {kind} {namespace}/{name}", body=body)
            return True
        except NotFoundError:
            return False

    def scale(self, name: str, namespace: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource."""
        with api_errors(f"scaling Deployment {namespace}/{name} to {replicas}", self.host):
            self.apps.patch_namespaced_deployment_scale(
                name, namespace, {"spec": {"replicas": replicas}}, _preload_content=False,
                _request_timeout=API_TIMEOUT_S, _content_type="application/merge-patch+json").data

    def pod_log(self, pod: str, namespace: str, container: str, tail: int | None = None,
                previous: bool = False) -> str:
        """The container's log (its previous run's with ``previous``), '' when there is none."""
        from kubernetes.client.exceptions import ApiException

        kwargs: dict[str, Any] = {"container": container, "previous": previous}
        if tail:
            kwargs["tail_lines"] = tail
        try:
            with api_errors(f"reading the log of pod {namespace}/{pod}", self.host):
                try:
                    response = self.core.read_namespaced_pod_log(pod, namespace, _preload_content=False,
                                                                 _request_timeout=API_TIMEOUT_S, **kwargs)
                except ApiException as exc:
                    if exc.status == 400:  # no previous run, or the container is not created yet
                        return ""
                    raise
                return response.data.decode(errors="replace")
        except NotFoundError:
            return ""

    def follow_log(self, pod: str, namespace: str, container: str) -> Iterator[str]:
        """New log output of the container as it comes (until the container ends)."""
        with api_errors(f"following the log of pod {namespace}/{pod}", self.host):
            response = self.core.read_namespaced_pod_log(pod, namespace, container=container, follow=True,
                                                         tail_lines=0, _preload_content=False)
        try:
            for chunk in response.stream(4096, decode_content=False):
                yield chunk.decode(errors="replace")
        finally:
            response.release_conn()


class WatchThread:
    """A watch on one kind in one namespace, in a daemon thread, feeding ``(tag, type, object)`` to a queue.

    Re-opened when the server ends it, from the last resourceVersion seen
    (from scratch after a 410 Gone); an error that persists is put on the
    queue as ``(tag, "ERROR", exception)``. :meth:`stop` ends it.
    """

    def __init__(self, kube: KubeApi, kind: str, namespace: str, out: "queue.Queue[tuple[str, str, Any]]",
                 tag: str, resource_version: str | None = None, **selectors: Any) -> None:
        self.kube, self.kind, self.namespace, self.out, self.tag = kube, kind, namespace, out, tag
        self.selectors = selectors
        self._start_version = resource_version
        self._stopped = threading.Event()
        self._watch: Any = None
        self.thread = threading.Thread(target=self._run, name=f"kt-watch-{kind.lower()}-{tag}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        list_fn = getattr(getattr(self.kube, KINDS[self.kind][0]), f"list_namespaced_{KINDS[self.kind][1]}")
        version: str | None = self._start_version
        failures = 0
        while not self._stopped.is_set():
            self._watch = watch.Watch()
            kwargs = dict(self.selectors, timeout_seconds=WATCH_CHUNK_S,
                          _request_timeout=(API_TIMEOUT_S, WATCH_CHUNK_S + API_TIMEOUT_S), deserialize=False)
            if version:
                kwargs["resource_version"] = version
            try:
                for event in self._watch.stream(list_fn, self.namespace, **kwargs):
                    if self._stopped.is_set():
                        return
                    obj = event.get("raw_object") or event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            version = None
                            break
                        raise KubernetesAPIError(f"watching {self.kind}s failed: {obj.get('message', obj)}")
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    failures = 0
                    self.out.put((self.tag, event["type"], obj))
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                failures += 1
                if self._stopped.is_set():
                    return
                if failures >= 3:
                    self.out.put((self.tag, "ERROR", translate(exc, f"watching {self.kind}s", self.kube.host)))
                    return
                self._stopped.wait(0.5 * failures)  # back off before retrying; stop() ends the wait
            except (HTTPError, OSError, ValueError) as exc:
                if self._stopped.is_set():
                    return
                failures += 1
                if failures >= 3:
                    self.out.put((self.tag, "ERROR", BackendUnavailable(
                        f"lost the watch on {self.kind}s at {self.kube.host}: {exc}")))
                    return
                self._stopped.wait(0.5 * failures)
            except Exception as exc:  # noqa: BLE001 - reported to the waiting thread, not lost
                if not self._stopped.is_set():
                    self.out.put((self.tag, "ERROR", exc))
                return

    def stop(self) -> None:
        """End the watch (unblocks a read in progress)."""
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()
