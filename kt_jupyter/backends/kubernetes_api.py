"""The slice of the Kubernetes API the backend uses: plain HTTP over the official client's connection pool.

The ``kubernetes`` package loads the configuration (a kubeconfig with any of
its auth plugins, or the pod's service account inside a cluster) and owns the
connection pool (TLS, client certificates, proxy). Requests themselves are
made here, as the API documents them, through that pool: the generated typed
methods changed their keyword arguments from one client release to the next
(``_content_type`` exists only from 36 on, ``deserialize=False`` on watches
from 34, 37 rewrote them all), while the configuration, the pool and the
auth settings stayed put. So every client version ``pyproject`` allows sends
server-side apply as ``application/apply-patch+yaml`` and reads objects as
the JSON the API docs show. API failures become :mod:`kt_jupyter.errors`
with a sentence that says what to do. Watches live in
:mod:`~kt_jupyter.backends.kubernetes_watch`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

from ..errors import BackendUnavailable, KtError, KubernetesAPIError, NotFoundError

log = logging.getLogger("kt_jupyter.kubernetes")

#: Field manager of every server-side apply.
FIELD_MANAGER = "kt-jupyter"
#: Seconds one API request may take.
API_TIMEOUT_S = 30.0
#: Connections kept per API client (watches hold one each).
POOL_SIZE = 32
#: Bytes of an error reply kept for the message.
ERROR_BODY_BYTES = 4096

# kind -> (API path prefix, plural)
KINDS: dict[str, tuple[str, str]] = {
    "Secret": ("/api/v1", "secrets"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "ReplicaSet": ("/apis/apps/v1", "replicasets"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Job": ("/apis/batch/v1", "jobs"),
    "RayCluster": ("/apis/ray.io/v1", "rayclusters"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
}


def load_api_client(kubeconfig_path: str | None = None) -> Any:
    """An ``ApiClient`` for ``kubeconfig_path``, else ``$KUBECONFIG`` / ``~/.kube/config``, else in-cluster.

    Whether a cluster is configured at all is decided before ``kubernetes`` is
    imported (2-3 s): `%kt list` with no cluster answers at once.
    """
    path = kubeconfig_path or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    paths = [os.path.expanduser(p) for p in path.split(os.pathsep) if p]
    from_file = bool(kubeconfig_path) or any(os.path.exists(p) for p in paths)
    if not from_file and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise BackendUnavailable(
            f"no Kubernetes cluster is configured: no kubeconfig at {path} and this is not a pod in a "
            "cluster. Set KUBECONFIG or kubeconfig_path=, or use --backend local")
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise BackendUnavailable("the `kubernetes` package is missing: `pip install kubernetes`, "
                                 "or use --backend local") from None

    cfg = client.Configuration()
    try:
        if from_file:
            config.load_kube_config(config_file=os.pathsep.join(paths), client_configuration=cfg,
                                    persist_config=False)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except ConfigException as exc:
        raise BackendUnavailable(f"cannot load the Kubernetes configuration from {path}: {exc}. "
                                 "Fix the kubeconfig (or its current context), or use --backend local") from None
    cfg.connection_pool_maxsize = POOL_SIZE
    return client.ApiClient(cfg)


@contextmanager
def api_errors(action: str, host: str = "") -> Iterator[None]:
    """Turn what the transport raises into one clear kt error about ``action``."""
    from urllib3.exceptions import HTTPError

    try:
        yield
    except KtError:
        raise
    except (HTTPError, OSError) as exc:
        raise BackendUnavailable(f"cannot reach the Kubernetes API{' at ' + host if host else ''} while "
                                 f"{action}: {exc}. Check the cluster is up and your kubeconfig context "
                                 "points at it") from None


def api_message(body: bytes | str, reason: str = "") -> str:
    """The ``message`` of the API's Status reply, else the body (or the HTTP reason)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return message or text.strip()[:500] or reason


def translate(status: int, message: str, action: str, host: str = "") -> KtError:
    """An HTTP failure as NotFoundError / BackendUnavailable / KubernetesAPIError."""
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


class ApiStatusError(KubernetesAPIError):
    """A request the API answered with an error status; ``status`` and the API's ``message`` kept."""

    def __init__(self, text: str, status: int, message: str) -> None:
        super().__init__(text)
        self.status, self.message = status, message


def object_path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    """``/apis/apps/v1/namespaces/NS/deployments[/NAME[/SUB]]`` (names URL-quoted)."""
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if sub is not None:
        path += f"/{sub}"
    return path


class KubeApi:
    """JSON-in/JSON-out requests to the API server of one ``ApiClient`` (its configuration and pool)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self.configuration = api_client.configuration
        self.host = (getattr(self.configuration, "host", "") or "").rstrip("/")

    # ------------------------------------------------------------------ transport

    def _headers(self, content_type: str | None, accept: str) -> dict[str, str]:
        headers = dict(getattr(self.api_client, "default_headers", None) or {})
        headers["Accept"] = accept
        if content_type:
            headers["Content-Type"] = content_type
        for auth in (self.configuration.auth_settings() or {}).values():  # refreshes exec/OIDC tokens
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        return headers

    def open(self, method: str, path: str, *, action: str, query: dict[str, Any] | None = None,
             body: Any = None, content_type: str | None = None, accept: str = "application/json",
             timeout_s: float | tuple[float, float | None] = API_TIMEOUT_S) -> Any:
        """Send one request; the urllib3 response, unread (2xx only; errors raised as kt errors)."""
        import urllib3

        url = self.host + path
        params = {k: ("true" if v is True else "false" if v is False else v)
                  for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urlencode(params)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            content_type = content_type or "application/json"
        connect_s, read_s = timeout_s if isinstance(timeout_s, tuple) else (timeout_s, timeout_s)
        extra: dict[str, Any] = {}
        if getattr(self.configuration, "retries", None) is not None:
            extra["retries"] = self.configuration.retries
        with api_errors(action, self.host):
            response = self.api_client.rest_client.pool_manager.request(
                method, url, body=data, headers=self._headers(content_type, accept), preload_content=False,
                timeout=urllib3.Timeout(connect=connect_s, read=read_s), **extra)
            if response.status >= 400:
                try:
                    raw = response.read(ERROR_BODY_BYTES)
                finally:
                    response.release_conn()
                message = api_message(raw, response.reason or "")
                error = translate(response.status, message, action, self.host)
                raise ApiStatusError(str(error), response.status, message) if type(error) is KubernetesAPIError \
                    else error
        return response

    def request(self, method: str, path: str, *, action: str, **kwargs: Any) -> Any:
        """One request, its JSON reply parsed (``{}`` when empty)."""
        response = self.open(method, path, action=action, **kwargs)
        with api_errors(action, self.host):
            try:
                data = response.read()
            finally:
                response.release_conn()
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise KubernetesAPIError(f"the Kubernetes API answered {action} with something that is not "
                                     f"JSON: {data[:200]!r}") from None

    # ------------------------------------------------------------------ verbs

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of ``obj`` (field manager ``kt-jupyter``, force): creates or updates it."""
        meta = obj["metadata"]
        return self.request("PATCH", object_path(obj["kind"], meta["namespace"], meta["name"]),
                            action=f"applying {obj['kind']} {meta['namespace']}/{meta['name']}",
                            query={"fieldManager": FIELD_MANAGER, "force": True},
                            body=json.dumps(obj).encode(),  # JSON is YAML: the apply content type takes it
                            content_type="application/apply-patch+yaml")

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when an object of that name exists already (nothing changed)."""
        meta = obj["metadata"]
        try:
            self.request("POST", object_path(obj["kind"], meta["namespace"]),
                         action=f"creating {obj['kind']} {meta['namespace']}/{meta['name']}",
                         query={"fieldManager": FIELD_MANAGER}, body=obj)
        except ApiStatusError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", object_path(kind, namespace, name), action=f"reading {kind} {namespace}/{name}")
        except NotFoundError:
            return None

    def list(self, kind: str, namespace: str, **selectors: Any) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` matching ``label_selector`` / ``field_selector``."""
        return self.list_reply(kind, namespace, **selectors).get("items") or []

    def list_reply(self, kind: str, namespace: str, *, label_selector: str | None = None,
                   field_selector: str | None = None) -> dict[str, Any]:
        """The whole list reply: ``items`` and ``metadata.resourceVersion`` (to watch from)."""
        return self.request("GET", object_path(kind, namespace),
                            action=f"listing {KINDS[kind][1]} in namespace {namespace}",
                            query={"labelSelector": label_selector, "fieldSelector": field_selector})

    def delete(self, kind: str, name: str, namespace: str, grace_period_s: float | None = None, *,
               propagation: str = "Background") -> bool:
        """Delete one object (``propagation``: what happens to its dependents); False when it was already gone."""
        body: dict[str, Any] = {"propagationPolicy": propagation}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = max(0, round(grace_period_s))
        try:
            self.request("DELETE", object_path(kind, namespace, name), action=f"deleting {kind} {namespace}/{name}",
                         body=body)
            return True
        except NotFoundError:
            return False

    def scale(self, name: str, namespace: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource."""
        self.request("PATCH", object_path("Deployment", namespace, name, "scale"),
                     action=f"scaling Deployment {namespace}/{name} to {replicas}",
                     body={"spec": {"replicas": replicas}}, content_type="application/merge-patch+json")

    def pod_log(self, pod: str, namespace: str, container: str, tail: int | None = None,
                previous: bool = False) -> str:
        """The container's log (its previous run's with ``previous``), '' when there is none.

        Raises when the API refuses the log (403 without ``pods/log``, 500 when
        no kubelet answers); :meth:`pod_log_or_why` says why instead.
        """
        try:
            response = self.open("GET", object_path("Pod", namespace, pod, "log"),
                                 action=f"reading the log of pod {namespace}/{pod}", accept="*/*",
                                 query={"container": container, "previous": previous, "tailLines": tail or None})
        except NotFoundError:
            return ""
        except ApiStatusError as exc:
            if exc.status == 400:  # no previous run, or the container is not created yet
                return ""
            raise
        try:
            return response.read().decode(errors="replace")
        finally:
            response.release_conn()

    def pod_log_or_why(self, pod: str, namespace: str, container: str, tail: int | None = None,
                       previous: bool = False) -> tuple[str, str]:
        """``(log, "")``, or ``("", why)`` when the API cannot give the log (refused, kubelet unreachable)."""
        try:
            return self.pod_log(pod, namespace, container, tail, previous), ""
        except ApiStatusError as exc:
            return "", f"HTTP {exc.status}: {exc.message}"
        except KtError as exc:
            return "", str(exc)

    def follow_log(self, pod: str, namespace: str, container: str) -> Iterator[str]:
        """New log output of the container as it comes (until the container ends)."""
        response = self.open("GET", object_path("Pod", namespace, pod, "log"), accept="*/*",
                             action=f"following the log of pod {namespace}/{pod}",
                             query={"container": container, "follow": True, "tailLines": 0},
                             timeout_s=(API_TIMEOUT_S, None))  # no read timeout: it waits for output
        try:
            for chunk in response.stream(4096, decode_content=False):
                yield chunk.decode(errors="replace")
        finally:
            response.release_conn()
