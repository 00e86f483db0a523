"""The process-wide asyncio loop every client session runs on.

The notebook's main thread already runs ipykernel's event loop, so sessions
run on their own loop in a daemon thread, started on first use.
"""

from __future__ import annotations

import asyncio
import threading

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def client_loop() -> asyncio.AbstractEventLoop:
    """The process-wide asyncio loop all sessions run on (a daemon thread, started once)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def _run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=_run, name="kt-client-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop
