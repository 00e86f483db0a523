"""FakeKubeApiServer: a fake of the Kubernetes API server, over real HTTP on 127.0.0.1 (a test double).

It implements what the kt_jupyter backend (through the official client) and
the pod kernel call, with the API's URL layout, verbs and JSON shapes:

* server-side apply (``PATCH`` ``application/apply-patch+yaml``, ``fieldManager``
  required, ``force`` recorded) — simplified: one applier owns the whole object;
* create (409 when it exists), get, list with ``labelSelector`` / ``fieldSelector``;
* watch streams (chunked JSON lines, ``resourceVersion``, ``timeoutSeconds``), from a bounded
  history: a version older than it is answered, as by a real API server, with HTTP 200 and one
  in-stream ``ERROR`` event (Status 410 ``Expired``); ``allowWatchBookmarks`` gets ``BOOKMARK``
  events every :attr:`FakeKubeApiServer.bookmark_interval_s` and when the server ends the watch;
  :meth:`FakeKubeApiServer.end_watches` ends every open watch at once (an API server restart);
* merge patches, the Deployment ``scale`` subresource;
* delete (pods get a ``deletionTimestamp`` and go when :class:`FakeKubelet` has stopped them, at once with
  grace 0 while the container still stops; ``propagationPolicy: Foreground`` keeps the owner, finalized,
  until its dependents are gone);
* pod logs (``tailLines``, ``previous``, ``follow``), from files the fake kubelet writes; a 500
  "no preferred addresses found" when :attr:`FakeStore.kubelet_unreachable`;
* port-forward over the WebSocket protocol the client speaks (``v4.channel.k8s.io``:
  a data and an error channel per port), relayed to the fake pod's local port;
* exec (``pods/exec``, :mod:`k8s_fake.exec`): ``v5``/``v4.channel.k8s.io``, the command run beside
  the fake container (its directory and environment), on a pty with ``tty=true``, its exit code as
  the real error-channel Status;
* validating admission webhooks (:attr:`FakeStore.validating_webhooks`) on create and apply;
* resources by (API group, plural): Knative's ``services.serving.knative.dev`` is not the core
  ``services``; CRD groups (:data:`~k8s_fake.store.CRD_GROUPS`) are served only once installed
  (:attr:`FakeStore.installed_groups`), else 404 as on a cluster without them;
* bearer-token auth: an admin token for the kubeconfig, and service-account
  tokens checked against the Roles and RoleBindings stored here (minimal RBAC).

State lives in :class:`FakeStore`, which the fake kubelet also uses directly
(in-process, as the controllers and kubelet of a real cluster would through
the API). Every request is recorded in :attr:`FakeStore.requests` so tests can
assert how the backend talked to the API.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from .exec import ServerWebSocket, serve_exec
from .store import (ADMIN_TOKEN, CRD_GROUPS, RESOURCES, SA_TOKEN_PREFIX, FakeApiError, FakeStore, _Watcher,
                    api_version, resource_name)

#: Longest a watch stays open when the client asks for no timeout.
MAX_WATCH_S = 300.0


#: Bytes the port-forward relay reads from the fake pod per WebSocket frame.
RELAY_CHUNK_BYTES = 1 << 20


# ---------------------------------------------------------------------- HTTP

_PATH_RE = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                      r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY on every connection, as a real API server's: Go's TCP connections have Nagle off by default.
    #: With it on, a frame written in two pieces (head, then payload) waited out the client's delayed ACK: a
    #: 1 MiB pull through a port-forward took 47 ms here.
    disable_nagle_algorithm = True
    server: "FakeKubeApiServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    # -- plumbing

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_bytes(self, data: bytes, content_type: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._raw_body = self.rfile.read(length) if length else b""

    def _body(self) -> Any:
        raw = self._raw_body
        if not raw:
            return None
        ctype = self.headers.get("Content-Type", "")
        return yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _user(self) -> tuple[str, str]:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token == ADMIN_TOKEN:
            return "admin", ""
        if token.startswith(SA_TOKEN_PREFIX):
            return "serviceaccount", token[len(SA_TOKEN_PREFIX):]
        raise FakeApiError(401, "Unauthorized", "Unauthorized")

    def _dispatch(self, method: str) -> None:
        store = self.server.store
        self._read_body()  # always, so an error reply leaves the keep-alive connection usable
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        record = {"method": method, "path": url.path, "query": query,
                  "content_type": self.headers.get("Content-Type", "")}
        with store.lock:
            store.requests.append(record)
        try:
            kind, subject = self._user()
            record["user"] = subject or kind
            m = _PATH_RE.match(url.path)
            group = (m.group("group") or "") if m else ""
            if not m or (group, m.group("plural")) not in RESOURCES or \
                    (group in CRD_GROUPS and group not in store.installed_groups):
                # what a real API server answers for a resource it does not have (e.g. a CRD not installed)
                raise FakeApiError(404, "NotFound", "the server could not find the requested resource")
            ns, plural, name, sub = m.group("ns"), m.group("plural"), m.group("name"), m.group("sub")
            if sub in ("portforward", "exec") and method == "GET":
                method = "POST"  # RBAC: port-forward and exec are "create" on pods/portforward, pods/exec
            verb = {"GET": "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list"),
                    "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}[method]
            resource = f"{plural}/{sub}" if sub else plural
            if kind == "serviceaccount" and not store.allowed(subject, verb, group, resource, ns, name):
                sa_ns, _, sa_name = subject.partition(":")
                raise FakeApiError(403, "Forbidden", (
                    f'{plural}{"." + group if group else ""} "{name}" is forbidden: User '
                    f'"system:serviceaccount:{sa_ns}:{sa_name}" cannot {verb} resource "{resource}" in API group '
                    f'"{group}" in the namespace "{ns}"'))
            if kind == "admin" and ((verb, plural) in store.denied or (verb, resource) in store.denied):
                named = f' "{name}"' if name else ""
                raise FakeApiError(403, "Forbidden", (
                    f'{plural}{"." + group if group else ""}{named} is forbidden: User "fake-user" cannot {verb} '
                    f'resource "{resource}" in API group "{group}" in the namespace "{ns}"'))
            self._serve(method, verb, query, ns, (group, plural), name, sub, record)
        except FakeApiError as exc:
            self._send_json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _serve(self, method: str, verb: str, query: dict[str, str], ns: str, resource: tuple[str, str],
               name: str | None, sub: str | None, record: dict[str, Any]) -> None:
        store = self.server.store
        plural = resource_name(*resource)  # the store's name: services.serving.knative.dev is not the core one
        if sub == "log" and plural == "pods" and method in ("GET",):
            return self._log(ns, name or "", query)
        if sub == "portforward" and plural == "pods":
            return self._portforward(ns, name or "", query)
        if sub == "exec" and plural == "pods":
            return serve_exec(self, ns, name or "", urlsplit(self.path).query)
        if sub == "scale" and plural == "deployments":
            return self._scale(method, ns, name or "")
        if sub is not None:
            raise FakeApiError(404, "NotFound", f"the fake API server has no {plural}/{sub}")
        if verb == "watch":
            return self._watch(resource, ns, query, record)
        if verb == "list":
            items = store.list(plural, ns, query.get("labelSelector"), query.get("fieldSelector"))
            version, kind = RESOURCES[resource]
            return self._send_json(200, {"apiVersion": api_version(resource[0], version),
                                         "kind": f"{kind}List", "items": items,
                                         "metadata": {"resourceVersion": str(store.version)}})
        if verb == "get":
            obj = store.get(plural, ns, name or "")
            if obj is None:
                raise FakeApiError(404, "NotFound", f'{plural} "{name}" not found')
            return self._send_json(200, obj)
        webhook = store.validating_webhooks.get(plural)
        if verb == "create":
            if webhook is not None:
                webhook(self._body() or {})
            return self._send_json(201, store.create(plural, ns, self._body() or {}))
        if verb == "patch":
            ctype = self.headers.get("Content-Type", "")
            body = self._body() or {}
            if ctype.startswith("application/apply-patch"):
                if webhook is not None:
                    webhook(body)
                if not query.get("fieldManager"):
                    raise FakeApiError(422, "Invalid", "PatchOptions.meta.k8s.io is invalid: fieldManager: "
                                                       "Required value: is required for apply patch")
                record["field_manager"], record["force"] = query["fieldManager"], query.get("force")
                return self._send_json(200, store.apply(plural, ns, name or "", body, query["fieldManager"]))
            if ctype.startswith(("application/merge-patch", "application/strategic-merge-patch")):
                return self._send_json(200, store.merge_patch(plural, ns, name or "", body))
            raise FakeApiError(415, "UnsupportedMediaType", f"the fake API server does not take {ctype} patches")
        if verb == "delete":
            body = record["body"] = self._body() or {}
            grace = query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            propagation = query.get("propagationPolicy", body.get("propagationPolicy"))
            with store.lock:
                store.deletions.append((plural, name or "", None if grace is None else int(grace), propagation))
            return self._send_json(200, store.delete(plural, ns, name or "", None if grace is None else int(grace),
                                                     propagation))
        raise FakeApiError(405, "MethodNotAllowed", f"{method} is not supported on {plural}")

    def _scale(self, method: str, ns: str, name: str) -> None:
        store = self.server.store
        if method in ("PATCH", "PUT"):
            body = self._body() or {}
            replicas = (body.get("spec") or {}).get("replicas")
            if replicas is not None:
                store.merge_patch("deployments", ns, name, {"spec": {"replicas": int(replicas)}})
        dep = store.get("deployments", ns, name)
        if dep is None:
            raise FakeApiError(404, "NotFound", f'deployments.apps "{name}" not found')
        self._send_json(200, {"apiVersion": "autoscaling/v1", "kind": "Scale",
                              "metadata": {"name": name, "namespace": ns},
                              "spec": {"replicas": dep["spec"].get("replicas", 1)},
                              "status": {"replicas": (dep.get("status") or {}).get("replicas", 0)}})

    def _log(self, ns: str, name: str, query: dict[str, str]) -> None:
        store = self.server.store
        pod = store.get("pods", ns, name)
        if pod is None:
            raise FakeApiError(404, "NotFound", f'pods "{name}" not found')
        container = query.get("container") or pod["spec"]["containers"][0]["name"]
        previous = query.get("previous") in ("true", "True", "1")
        if store.kubelet_unreachable:  # what the API server answers when it cannot reach the node's kubelet
            raise FakeApiError(500, "InternalError", (
                f'Get "https://10.0.0.5:10250/containerLogs/{ns}/{name}/{container}": no preferred addresses '
                'found; known addresses: []'))
        if query.get("follow") in ("true", "True", "1") and store.log_follower is not None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in store.log_follower(ns, name, container):
                self._chunk(data)
            self._chunk(b"")
            return
        data = store.log_source(ns, name, container, previous) if store.log_source else None
        if data is None:
            what = "previous terminated container" if previous else "container"
            raise FakeApiError(400, "BadRequest", f'{what} "{container}" in pod "{name}" not found')
        tail = query.get("tailLines")
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail):]) if int(tail) > 0 else b""
        self._send_bytes(data)

    # -- port-forward: the API's WebSocket protocol (v4.channel.k8s.io), relayed to the fake pod's local port

    def _portforward(self, ns: str, name: str, query: dict[str, str]) -> None:
        store = self.server.store
        if store.get("pods", ns, name) is None:
            raise FakeApiError(404, "NotFound", f'pods "{name}" not found')
        if self.headers.get("Upgrade", "").lower() != "websocket":
            raise FakeApiError(400, "BadRequest", "port-forward needs a WebSocket upgrade")
        port = int(query.get("ports", "0").split(",")[0])
        protocols = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "v4.channel.k8s.io" not in protocols:
            raise FakeApiError(400, "BadRequest", f"unsupported WebSocket subprotocols {protocols}")
        try:
            local = store.port_resolver(ns, name, port) if store.port_resolver else None
            upstream = socket.create_connection(("127.0.0.1", local), timeout=5) if local else None
            if upstream is not None:  # no read timeout once connected: the kubelet keeps an idle stream for hours
                upstream.settimeout(None)  # (--streaming-connection-idle-timeout, 4 h by default)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Go's default, as above
        except OSError:
            upstream = None
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ServerWebSocket.accept_key(self.headers["Sec-WebSocket-Key"]))
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        self.close_connection = True
        ws = ServerWebSocket(self.rfile, self.wfile)
        send = ws.send
        port_bytes = struct.pack("<H", port)

        send(0x2, b"\x00" + port_bytes)  # data channel: which port
        send(0x2, b"\x01" + port_bytes)  # error channel: which port
        if upstream is None:
            send(0x2, b"\x01" + f"error forwarding port {port} to pod {name}: nothing listens".encode())
            send(0x8, b"")
            return
        stream = (ws, upstream, name, port)
        with self.server.pf_lock:
            self.server.portforwards.add(stream)

        def from_pod() -> None:
            buf = bytearray(RELAY_CHUNK_BYTES)
            view = memoryview(buf)
            try:
                while True:
                    n = upstream.recv_into(buf)
                    if not n:
                        break
                    send(0x2, b"\x00", view[:n])  # one frame, written without joining the bytes
            except OSError:
                pass
            try:
                send(0x8, b"")
            except OSError:
                pass

        pump = threading.Thread(target=from_pod, name=f"fake-pf-{name}", daemon=True)
        pump.start()
        try:
            while True:
                frame = ws.recv()
                if frame is None:
                    break
                opcode, data = frame
                if opcode == 0x8:
                    break
                if opcode == 0x9:
                    send(0xA, data)
                elif opcode == 0x2 and data[:1] == b"\x00" and len(data) > 1:
                    upstream.sendall(memoryview(data)[1:])
        except OSError:
            pass
        finally:
            with self.server.pf_lock:
                self.server.portforwards.discard(stream)
            try:
                upstream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            upstream.close()
            pump.join(timeout=5)

    def _watch(self, resource: tuple[str, str], ns: str, query: dict[str, str], record: dict[str, Any]) -> None:
        store, server = self.server.store, self.server
        watcher = store.watch(resource_name(*resource), ns, query.get("labelSelector"), query.get("fieldSelector"),
                              query.get("resourceVersion"))
        timeout_s = min(float(query.get("timeoutSeconds") or MAX_WATCH_S), MAX_WATCH_S)
        deadline = time.monotonic() + timeout_s
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        with store.changed:  # tests wait for watches to be open
            server.open_watches.add(watcher)
            store.changed.notify_all()
        version, kind = RESOURCES[resource]

        def bookmark() -> None:
            self._chunk(json.dumps({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api_version(resource[0], version),
                "metadata": {"resourceVersion": str(store.version)}}}).encode() + b"\n")

        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            if watcher.expired is not None:  # the real API server: 200, then the error in the stream
                with store.changed:
                    record["expired"] = True
                    store.changed.notify_all()
                self._chunk(json.dumps({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": watcher.expired, "reason": "Expired", "code": 410}}).encode() + b"\n")
            while watcher.expired is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if bookmarks:
                        bookmark()  # as the real server does before it ends a watch on time
                    break
                try:
                    event = watcher.events.get(timeout=min(remaining, server.bookmark_interval_s))
                except queue.Empty:
                    if bookmarks and time.monotonic() < deadline:
                        bookmark()
                    continue
                if event is None:  # the server is shutting down, or ends every watch (end_watches)
                    break
                if event == "bookmark-and-end":
                    if bookmarks:
                        bookmark()
                    break
                self._chunk(json.dumps(event).encode() + b"\n")
            self._chunk(b"")
        finally:
            with store.changed:
                server.open_watches.discard(watcher)
                store.changed.notify_all()
            store.unwatch(watcher)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")


class FakeKubeApiServer(ThreadingHTTPServer):
    """The fake API server: ``with FakeKubeApiServer() as api: api.url``; state in ``api.store``."""

    daemon_threads = True

    def __init__(self, store: FakeStore | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store or FakeStore()
        self.open_watches: set[_Watcher] = set()
        #: Open port-forward streams: (server WebSocket, connection to the pod, pod name, port).
        self.portforwards: set[tuple[ServerWebSocket, socket.socket, str, int]] = set()
        self.pf_lock = threading.Lock()
        #: Seconds between BOOKMARK events on a quiet watch that asked for them (a real server: about 60).
        self.bookmark_interval_s = 60.0
        self._thread = threading.Thread(target=self.serve_forever, name="fake-kube-api", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig pointing at this server with the admin token."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake-user",
                                                      "namespace": namespace}}],
        }

    def __enter__(self) -> "FakeKubeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closes a kept-alive connection (as watches do when stopped) is no error."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def end_watches(self, bookmark: bool = False) -> set[_Watcher]:
        """End every open watch now, as an API server restart or a load balancer's idle cut does.

        With ``bookmark``, each watch that allows bookmarks gets one first (a
        graceful end). Returns the watches ended (they leave :attr:`open_watches`).
        """
        watchers = set(self.open_watches)
        for watcher in watchers:
            watcher.events.put("bookmark-and-end" if bookmark else None)
        return watchers

    def break_portforwards(self) -> int:
        """Cut every open port-forward as the kubelet does when its pod goes: the error channel says why, then close.

        Returns how many streams were cut.
        """
        with self.pf_lock:
            streams = list(self.portforwards)
        for ws, upstream, name, port in streams:
            with contextlib.suppress(OSError):
                ws.send(0x2, b"\x01" + (f"error forwarding port {port} to pod {name}, uid : failed to find sandbox "
                                        f"in store: not found").encode())
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)  # the relay's reader then ends the stream with a close frame
        return len(streams)

    def close(self) -> None:
        """End open watches, stop serving."""
        for watcher in list(self.open_watches):
            watcher.events.put(None)
        self.shutdown()
        self.server_close()
