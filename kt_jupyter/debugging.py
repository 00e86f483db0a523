"""Debugging remote code from the notebook: pdb through the notebook's input box, and debugpy attach.

``breakpoint()`` in a ``%%kt`` cell (or in what it calls) stops on the pod
kernel; pdb's prompt arrives here as an ``input_request`` and
:class:`NotebookInput` answers it with the notebook's own ``input()``.
``%%kt --debug`` starts debugpy in the pod kernel; :class:`DebugEndpoint`
says how an IDE attaches. After a ``%%kt`` cell failed, ``%debug`` (and
``%pdb on``) open pdb on the pod's frames of that error, through the same
relay (:func:`install_post_mortem`).
"""

from __future__ import annotations

import builtins
import getpass
import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from pod_kernel.debugging import deep_breakpoint

from .client import PDB_PROMPT, fallback_answer

__all__ = ["DebugEndpoint", "NotebookInput", "deep_breakpoint", "fallback_answer", "install_post_mortem"]

#: Said once per cell when the frontend has no input box (nbclient without allow_stdin, a --async cell).
NO_STDIN_PDB = "[kt] this frontend cannot answer the remote debugger; continuing"
NO_STDIN_INPUT = "[kt] this frontend cannot answer input() in the remote cell; it gets EOFError"


class NotebookInput:
    """``on_input`` for a cell: the notebook's input box (terminal IPython: the terminal).

    Where the frontend allows no input (ipykernel raises
    ``StdinNotImplementedError``) it says so once and answers for the user:
    ``c`` at a pdb prompt, EOFError for ``input()``.
    """

    def __init__(self, allowed: bool = True, stream: Any = None) -> None:
        self.allowed = allowed
        self.stream = stream
        self._said: set[str] = set()

    def __call__(self, prompt: str, password: bool) -> str:
        if self.allowed:
            from IPython.core.error import StdinNotImplementedError

            try:
                return getpass.getpass(prompt) if password else builtins.input(prompt)
            except StdinNotImplementedError:
                self.allowed = False
        line = NO_STDIN_PDB if PDB_PROMPT in prompt else NO_STDIN_INPUT
        if line not in self._said:
            self._said.add(line)
            print(line, file=self.stream or sys.stderr, flush=True)
        answer = fallback_answer(prompt)
        if answer is None:
            raise EOFError
        return answer


def install_post_mortem(shell: Any) -> None:
    """Make ``%debug`` and ``%pdb on`` debug a failed ``%%kt`` cell on its pod kernel.

    IPython's post-mortem (``shell.debugger``, called by ``%debug`` and, with
    ``%pdb on``, right after a traceback is shown) debugs the frames of
    ``sys.last_traceback``; for a ``%%kt`` cell those are our own. When the
    last exception is a ``%%kt`` cell's (it carries ``kt_post_mortem``), the
    pod runs pdb on the cell's frames instead, its prompt answered here;
    anything else goes to IPython's own debugger. Installed once per shell.
    """
    original = shell.debugger
    if getattr(original, "kt_post_mortem", False):
        return

    def debugger(force: bool = False) -> None:
        if not (force or shell.call_pdb):
            return
        exc = getattr(sys, "last_value", None)
        req_id, where = getattr(exc, "kt_post_mortem", None), getattr(exc, "kt_compute", None)
        if not isinstance(req_id, str) or not isinstance(where, tuple):
            original(force)
            return
        if threading.current_thread() is not threading.main_thread():  # a --async cell's error, shown from its thread
            print("[kt] a background cell failed; `%debug` in a cell of its own debugs it", file=sys.stderr)
            return
        _remote_post_mortem(shell, req_id, where)

    debugger.kt_post_mortem = True  # type: ignore[attr-defined]
    shell.debugger = debugger


def _remote_post_mortem(shell: Any, req_id: str, where: tuple[str, str]) -> None:
    """pdb on the pod's frames of failed cell ``req_id``, on compute ``where`` (backend, name)."""
    from . import connection
    from .errors import KtError
    from .render import show_output

    conn = next((c for c in connection.connections() if (c.compute.backend, c.name) == tuple(where)), None)
    if conn is None:
        print(f"[kt] compute {where[1]!r} is no longer connected, so the frames of that error are gone; "
              "run the failing cell again, then %debug", file=sys.stderr)
        return
    try:
        conn.run_cell("", shell.user_ns, on_output=show_output, on_input=NotebookInput(), post_mortem=req_id)
    except KtError as exc:  # the pod kernel died or cannot be reached: say so, as one line
        print(f"[kt] cannot debug the pod's frames of that error: {exc}", file=sys.stderr)


@dataclass
class DebugEndpoint:
    """Where debugpy listens for a compute, as reachable from here, and how paths map."""

    compute: str
    host: str
    port: int
    remote_port: int
    pid: int
    cells_dir: str
    local_cells_dir: str
    code_dir: str = ""
    local_code_dir: str = ""
    attached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def path_mappings(self) -> list[dict[str, str]]:
        """VS Code ``pathMappings``: the pod's cell dir (and synced code) to their local copies."""
        maps = [{"localRoot": self.local_cells_dir, "remoteRoot": self.cells_dir}]
        if self.code_dir and self.local_code_dir:
            maps.append({"localRoot": self.local_code_dir, "remoteRoot": self.code_dir})
        return maps

    def launch_config(self) -> dict[str, Any]:
        """A VS Code ``launch.json`` configuration that attaches to this pod kernel."""
        return {
            "name": f"kt: attach to {self.compute}",
            "type": "debugpy",
            "request": "attach",
            "connect": {"host": self.host, "port": self.port},
            "pathMappings": self.path_mappings(),
            "justMyCode": True,
        }

    def describe(self, cell_file: str | None = None, local_cell_file: str | None = None,
                 waiting: bool = False) -> str:
        """What the notebook prints: host, port, the launch.json entry, the cell's file."""
        lines = [f"[kt] debugpy listens in pod kernel {self.compute!r} (pid {self.pid}): "
                 f"attach to {self.host}:{self.port}"
                 + (" (an IDE is attached now)" if self.attached else "")]
        if cell_file:
            lines.append(f"[kt] this cell runs from {cell_file}"
                         + (f" (local copy: {local_cell_file})" if local_cell_file and local_cell_file != cell_file
                            else "")
                         + "; set breakpoints there")
        if waiting:
            lines.append("[kt] the cell waits for a debugger to attach before it runs (interrupt to give up)")
        lines.append("[kt] VS Code launch.json configuration:")
        lines.append(json.dumps(self.launch_config(), indent=2))
        return "\n".join(lines)
