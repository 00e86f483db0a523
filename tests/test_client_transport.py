"""The client's frame dispatch (kt_jupyter.client.transport): one handler per message type the pod sends.

Pure: frames are handed to the router directly, no socket (the end-to-end paths are in test_pod_kernel.py).
"""

from __future__ import annotations

from kt_jupyter.client import Session
from pod_kernel import protocol as P


def _session() -> Session:
    return Session("ws://127.0.0.1:9", "token", name="t")


def test_every_message_type_the_pod_sends_has_a_handler():
    """``welcome`` is the handshake's; every other type of SERVER_TYPES is routed (a new one must be too)."""
    assert set(_session().handlers) == P.SERVER_TYPES - {"welcome"}


def test_a_replayed_frame_is_routed_once_and_an_unknown_type_is_ignored():
    session = _session()
    seen: list[dict] = []
    session.on_unsolicited = seen.append
    frame = {"type": "stream", "id": "other-1", "seq": 1, "name": "stdout", "text": "hi\n"}
    session._route(dict(frame), memoryview(b""))
    session._route(dict(frame), memoryview(b""))  # replayed after a reconnect: already seen
    session._route({"type": "from-a-newer-pod", "seq": 2}, memoryview(b""))
    session._route(dict(frame, seq=3, text="again\n"), memoryview(b""))
    assert [m["text"] for m in seen] == ["hi\n", "again\n"] and session.last_seq == 3
