"""The client's frame dispatch (kt_jupyter.client.transport): one handler per message type the pod sends.

Pure: frames are handed to the router directly, no socket (the end-to-end paths are in test_pod_kernel.py).
"""

from __future__ import annotations

import pytest

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


def test_messages_routed_out_of_order_by_two_threads_are_each_routed_once():
    """The loop routes the WebSocket's messages; a cell's caller routes what its lane carried (its last outputs),
    which the loop may overtake with later ones: those the loop skipped are routed when they come, once; a
    reconnect asks for a replay from before the first one missing; a replay's `lost` forgets what never comes."""
    session = _session()
    seen: list[str] = []
    session.on_unsolicited = lambda m: seen.append(m["text"])

    def stream(seq: int) -> dict:
        return {"type": "stream", "id": "other-1", "seq": seq, "name": "stdout", "text": f"{seq}\n"}

    for seq in (1, 2, 5):  # the loop: 3 and 4 came on a lane, not routed yet
        session._route(stream(seq), memoryview(b""))
    assert session._replay_from() == 2  # a connection that drops now asks for 3 on
    for seq in (3, 5, 2):  # the lane's 3; 5 and 2 again (a replay): seen already
        session._route(stream(seq), memoryview(b""))
    assert session._replay_from() == 3
    session._route({"type": "notice", "lost": 1, "text": "1 dropped"}, memoryview(b""))  # 4 never comes
    assert session._replay_from() == 5
    session._route(stream(4), memoryview(b""))
    session._route(stream(6), memoryview(b""))
    assert seen == ["1\n", "2\n", "5\n", "3\n", "6\n"] and session.last_seq == 6


def test_a_connection_closed_before_the_pods_answer_is_retried_then_reported(monkeypatch):
    """websockets 14 raises a bare EOFError when the pod's end closes before it answers the handshake (a kernel
    dying meanwhile; later versions wrap it in InvalidMessage): it is retried like any failed attempt, and the
    caller learns that the kernel died, not "connection closed while reading HTTP status line"."""
    from kt_jupyter.client import transport
    from kt_jupyter.errors import ConnectionLostError, KernelDiedError

    attempts: list[int] = []

    async def closed_before_the_answer(*args, **kwargs):
        attempts.append(1)
        raise EOFError("connection closed while reading HTTP status line")

    monkeypatch.setattr(transport, "handshake", closed_before_the_answer)
    answers = iter([None, None])
    session = Session("ws://127.0.0.1:9", "token", name="t",
                      liveness=lambda: next(answers, "pod kernel 't' was killed by SIGKILL"))
    with pytest.raises(KernelDiedError, match="SIGKILL"):
        session.connect(timeout=5)
    assert len(attempts) == 2
    monkeypatch.setattr(transport, "OPEN_TIMEOUT_S", 0.2)
    with pytest.raises(ConnectionLostError, match="HTTP status line"):  # no liveness to ask: said at the deadline
        Session("ws://127.0.0.1:9", "token", name="t").connect(timeout=5)
