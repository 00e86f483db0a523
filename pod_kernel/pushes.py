"""Pushes an execute follows: the pod's side of push pipelining.

A cell that sends values does not wait for its push's reply: its execute
names the push in ``after`` and follows it at once (see the protocol
docstring). :class:`Pushes` keeps each recent push's outcome (the names it
set, or its failure, never the values) and gets the cell queued right behind
the change that sets the values it reads:

- a cell that arrives before its push's values (the usual case) is handed to
  :meth:`Pushes.apply`, which queues it in the main thread right behind that
  change, gated on it: a failed change fails the cell unrun;
- a cell that arrives after them waits here for the push's outcome
  (:meth:`Pushes.execute_after`), at most :data:`PUSH_WAIT_S`; a push cut off
  with its connection is waited for until its client sends it again.

Either way the pushed values join the cell's check as the objects just set
(the notebook sent them without knowing their ids here).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from . import coherence
from . import protocol as P
from .executor import CellJob, Executor, push_failed_reply

#: Push requests whose outcome an execute may still wait for (``after``), newest kept.
PUSHES_TRACKED = 256
#: Longest an execute waits for the push it follows to arrive, or to be sent again after a dropped connection.
PUSH_WAIT_S = 120.0
#: Pushed values up to this many bytes in all are fingerprinted on the loop for the cell's check, more in a thread.
INLINE_FINGERPRINT_BYTES = 8 << 20


def held_entries(values: dict[str, Any]) -> dict[str, list[Any]]:
    """``[pod id, fingerprint, stable]`` of values just pushed, for the check of the cell that reads them."""
    return {n: [id(v), P.fingerprint(v), True] for n, v in values.items()}


class PushInterrupted(Exception):
    """A push that failed with its connection: its client sends it again once reconnected."""


class Pushes:
    """The recent pushes' outcomes, and the cells that arrived before their push's values (loop thread only)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        #: push request id -> its outcome (the names it set, or its failure): an execute ``after`` it waits
        self.outcomes: dict[str, asyncio.Future[list[str]]] = {}
        #: push request id -> the cell that arrived before that push's values did: queued right behind them
        self.followers: dict[str, CellJob] = {}

    def started(self, req_id: str) -> None:
        """A push's header arrived (again, after a reconnect: a failed attempt's outcome is replaced)."""
        fut = self.outcomes.get(req_id)
        if fut is None or fut.done():
            self.outcomes.pop(req_id, None)
            self.outcomes[req_id] = asyncio.get_running_loop().create_future()
            while len(self.outcomes) > PUSHES_TRACKED:
                self.outcomes.pop(next(iter(self.outcomes)))

    def ended(self, req_id: str, names: list[str] | None = None, error: BaseException | None = None,
              final: bool = True) -> None:
        """A push set ``names``, or failed with ``error``: for good (``final``: refused, or failed while its
        connection stays open), or with its connection (its client sends it again once reconnected). Only the
        names are kept, never the values (a tracked push must not keep its arrays alive)."""
        fut = self.outcomes.get(req_id)
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(list(names or []))
            return
        fut.set_exception(error if final else PushInterrupted(str(error)))
        fut.exception()  # retrieved: nobody may be waiting for it

    def apply(self, req_id: str, values: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        """Set push ``req_id``'s values in the namespace, in the main thread between cells (notebook functions
        are adopted into it, as they ran in the notebook's); the cell sent right behind it runs next, holding
        them as set. The future gives the values set."""
        ns = self.executor.namespace
        follower = self.followers.pop(req_id, None)

        def change() -> dict[str, Any]:
            adopted = coherence.adopt_functions(values, ns)
            ns.update(adopted)
            if follower is not None and follower.check is not None:  # as the notebook holds them now
                follower.check.held.update(held_entries(adopted))
            return adopted

        done = self.executor.change(change)
        if follower is not None:
            follower.gate = done  # runs next in the same thread, unless the change failed
            self.executor.submit(follower)
        return done

    async def names_set_by(self, push_id: str) -> list[str]:
        """The names push ``push_id`` set, once it has (waiting for it to arrive, or to be sent again when its
        connection dropped); its refusal or failure is raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUSH_WAIT_S
        while True:
            fut = self.outcomes.get(push_id)
            if fut is not None and fut.done():
                error = fut.exception()
                if error is None:
                    return fut.result()
                if not isinstance(error, PushInterrupted):
                    raise error  # refused or failed for good; a dropped connection: its client sends it again
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"the values this cell reads (push {push_id}) did not arrive within "
                                   f"{PUSH_WAIT_S:g} s")
            if fut is not None and not fut.done():
                await asyncio.wait({fut}, timeout=min(remaining, 1.0))
            else:
                await asyncio.sleep(min(remaining, 0.05))

    async def execute_after(self, push_id: str, job: CellJob) -> None:
        """Queue ``job`` once the push it follows has set its values, which join the cell's check as held; a
        failed push fails the cell, which does not run.

        A cell that arrives before its push's values (the usual case) is left for :meth:`apply`, which queues
        it right behind the change that sets them, in the same thread: no wait for that change here first."""
        fut = self.outcomes.get(push_id)
        if fut is not None and not fut.done():
            self.followers.setdefault(push_id, job)
        try:
            names = await self.names_set_by(push_id)
        except Exception as exc:
            if self.followers.get(push_id) is job:
                del self.followers[push_id]
            if job.gate is None:  # not queued: say why it does not run
                job.outbox.append(dict(push_failed_reply(exc), type="execute_reply", id=job.req_id,
                                       execution_count=self.executor.shell.execution_count))
            return
        if job.gate is not None:  # queued behind the values by apply
            return
        if self.followers.get(push_id) is job:
            del self.followers[push_id]
        ns = self.executor.namespace
        values = {n: ns[n] for n in names if n in ns}  # as that push set them (between cells: nothing ran since)
        if job.check is not None and values:
            def held() -> dict[str, list[Any]]:
                return held_entries(values)

            # a few MiB hash in well under a millisecond: here; more (a big value the write tracker may not
            # vouch for) in a thread, off the loop
            small = sum(P.approx_size(v) for v in values.values()) <= INLINE_FINGERPRINT_BYTES
            job.check.held.update(held() if small else await asyncio.to_thread(held))
        self.executor.submit(job)
