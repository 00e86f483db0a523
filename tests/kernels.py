"""A real notebook kernel (ipykernel in its own process) with kt loaded, for the tests that need one.

A module of its own, not conftest.py: a test module importing ``conftest`` gets whichever
conftest.py is first on sys.path (tests/browser has one), so helpers live here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Seconds a notebook kernel gets for one request of the fixture's own (loading kt, stopping computes).
NOTEBOOK_REQUEST_TIMEOUT_S = 120


@contextmanager
def notebook_kernel_process(home: Path, **env: str) -> Iterator[tuple[Any, Any]]:
    """A real notebook kernel (ipykernel, its own process, ``KT_HOME=home``) with kt loaded:
    (kernel manager, blocking client). Afterwards its computes are stopped and the kernel shut down."""
    from jupyter_client.manager import start_new_kernel

    km, client = start_new_kernel(kernel_name="python3",
                                  env=dict(os.environ, KT_HOME=str(home), KT_USERNAME="tester", **env))
    try:
        reply = client.execute_interactive("%load_ext kt_jupyter", timeout=NOTEBOOK_REQUEST_TIMEOUT_S)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield km, client
        if client.is_alive():  # a test may have shut it down or restarted it; its computes stop with it then
            reply = client.execute_interactive("%kt down --all", timeout=NOTEBOOK_REQUEST_TIMEOUT_S)
            assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
