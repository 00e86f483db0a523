"""Terminals that open a shell on a compute: a jupyter_server terminal (terminado) running
``python -m kt_jupyter.shell --backend B NAME`` (:mod:`kt_jupyter.shell`).

What ``Compute.ssh()`` asks for from a notebook kernel, which has no
terminal of its own; the terminal page (``terminals/<terminal name>`` under
the server's base URL) relays it to the browser like any Jupyter terminal.
"""

from __future__ import annotations

from typing import Any

from ..shell import shell_argv


class TerminalsDisabled(Exception):
    """This server runs without terminals (``ServerApp.terminals_enabled = False`` or no terminado)."""


def open_terminal(settings: dict[str, Any], backend: str, name: str) -> dict[str, str]:
    """Create a terminal running the shell of compute ``name`` (already checked); its name and page path."""
    manager = settings.get("terminal_manager")
    if manager is None:
        raise TerminalsDisabled("this Jupyter server has terminals disabled, so ssh() cannot open one; "
                                f"run `python -m kt_jupyter.shell --backend {backend} {name}` in a terminal")
    model = manager.create(shell_command=shell_argv(backend, name))
    return {"name": model["name"], "path": f"terminals/{model['name']}"}
