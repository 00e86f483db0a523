"""Watches that survive a real API server: list, then watch from the list's resourceVersion, re-list on 410.

A real API server keeps a bounded window of changes (its watch cache). A
watch re-opened from a resourceVersion that has left that window is answered
with HTTP 200 and then one in-stream event ``{"type": "ERROR", "object":
{"kind": "Status", "code": 410, "reason": "Expired"}}``. :class:`WatchThread`
therefore lists first, watches from the list's resourceVersion with
``allowWatchBookmarks`` (so quiet watches still learn newer versions), and on
410 lists again: what changed meanwhile is delivered as ``MODIFIED``, what
vanished as ``DELETED``, and the watch goes on from the new list.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from typing import Any

from ..errors import BackendUnavailable, KtError, KubernetesAPIError
from .kubernetes_api import API_TIMEOUT_S, ApiStatusError, KubeApi, object_path

#: Seconds one watch request stays open (server side); watches are re-opened until their owner stops them.
WATCH_CHUNK_S = 60
#: Failures in a row after which a watch gives up and reports the error.
WATCH_ATTEMPTS = 3
#: Seconds between retries, times the failures so far.
WATCH_BACKOFF_S = 0.5


class _Expired(Exception):
    """The API server no longer has the changes after our resourceVersion (410)."""


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return meta.get("uid") or meta.get("name") or ""


class WatchThread:
    """Changes of one kind in one namespace, in a daemon thread, as ``(tag, type, object)`` on a queue.

    Without ``resource_version`` it lists first (before the constructor
    returns, so nothing the caller does afterwards is missed) and delivers every listed
    object as ``ADDED`` (``replay=False``: only what changes from now on);
    with one, it watches from there, ``known`` being the objects the caller
    already has at that version (so a re-list can tell which vanished). An error that persists is put on the
    queue as ``(tag, "ERROR", exception)`` and ends the watch. :meth:`stop` ends it.
    """

    def __init__(self, kube: KubeApi, kind: str, namespace: str, out: queue.Queue[tuple[str, str, Any]],
                 tag: str, resource_version: str | None = None, *, replay: bool = True,
                 known: list[dict[str, Any]] | None = None,
                 label_selector: str | None = None, field_selector: str | None = None) -> None:
        self.kube, self.kind, self.namespace, self.out, self.tag = kube, kind, namespace, out, tag
        self.selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
        self._version = resource_version
        self._replay = replay
        self._known: dict[str, dict[str, Any]] = {_key(o): o for o in known or ()}
        self._listed = resource_version is not None
        self._stopped = threading.Event()
        self._response: Any = None
        #: How often the watch had to re-list after a 410 (for tests and diagnostics).
        self.relists = 0
        self.thread = threading.Thread(target=self._run, name=f"kt-watch-{kind.lower()}-{tag}", daemon=True)
        if not self._listed:  # the first list here, so what the caller does next is seen by the watch
            try:
                self._list()
            except Exception as exc:
                self._stopped.set()
                self.out.put((self.tag, "ERROR", self._error(exc)))
                return
        self.thread.start()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                if self._version is None:
                    self._list()
                self._watch_once()
                failures = 0
            except _Expired:
                self._version = None
                self.relists += 1
            except Exception as exc:
                if self._stopped.is_set():
                    return
                failures += 1
                retryable = not isinstance(exc, KtError) or isinstance(exc, BackendUnavailable) or \
                    (isinstance(exc, ApiStatusError) and exc.status >= 500)
                if not retryable or failures >= WATCH_ATTEMPTS:
                    self.out.put((self.tag, "ERROR", self._error(exc)))
                    return
                self._stopped.wait(WATCH_BACKOFF_S * failures)  # stop() ends the wait

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, KtError):
            return exc
        return BackendUnavailable(f"lost the watch on {self.kind}s in namespace {self.namespace} at "
                                  f"{self.kube.host}: {type(exc).__name__}: {exc}")

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._known.pop(_key(obj), None)
        else:
            self._known[_key(obj)] = obj
        if not self._stopped.is_set():
            self.out.put((self.tag, kind, obj))

    def _list(self) -> None:
        """List; deliver what is new or changed (all of it the first time, with ``replay``) and what vanished."""
        first, self._listed = not self._listed, True
        reply = self.kube.list_reply(self.kind, self.namespace, label_selector=self.selectors["labelSelector"],
                                     field_selector=self.selectors["fieldSelector"])
        items = reply.get("items") or []
        if first and not self._replay:
            self._known = {_key(o): o for o in items}
        else:
            seen = set()
            for obj in items:
                key = _key(obj)
                seen.add(key)
                old = self._known.get(key)
                if old is None or (old.get("metadata") or {}).get("resourceVersion") != \
                        (obj.get("metadata") or {}).get("resourceVersion"):
                    self._emit("ADDED" if first else "MODIFIED", obj)
            for key in [k for k in self._known if k not in seen]:
                self._emit("DELETED", self._known[key])
        self._version = (reply.get("metadata") or {}).get("resourceVersion") or ""

    def _watch_once(self) -> None:
        """One watch request from ``self._version`` until the server ends it; raises _Expired on 410."""
        query = dict(self.selectors, watch=True, allowWatchBookmarks=True, timeoutSeconds=WATCH_CHUNK_S,
                     resourceVersion=self._version or None)
        try:
            response = self.kube.open("GET", object_path(self.kind, self.namespace),
                                      action=f"watching {self.kind}s in namespace {self.namespace}", query=query,
                                      timeout_s=(API_TIMEOUT_S, WATCH_CHUNK_S + API_TIMEOUT_S))
        except ApiStatusError as exc:
            if exc.status == 410:
                raise _Expired() from None
            raise
        self._response = response
        try:
            buffer = b""
            for chunk in response.stream(64 << 10, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._take(json.loads(line))
                    if self._stopped.is_set():
                        return
        finally:
            self._response = None
            response.close()  # a watch left early has unread bytes: never hand that connection back
            response.release_conn()

    def _take(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410 or obj.get("reason") in ("Expired", "Gone"):
                raise _Expired()
            raise KubernetesAPIError(f"watching {self.kind}s in namespace {self.namespace} failed: "
                                     f"{obj.get('message') or obj}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self._version = version
        if kind == "BOOKMARK":
            return
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._emit(kind, obj)

    def stop(self) -> None:
        """End the watch (unblocks a read in progress)."""
        self._stopped.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # already closed or broken: the watch ends either way
                shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3: unblocks the read
                (shutdown or response.close)()
