"""Debugging remote code from the notebook: pdb through the notebook's input box, and debugpy attach.

``breakpoint()`` in a ``%%kt`` cell (or in what it calls) stops on the pod
kernel; pdb's prompt arrives here as an ``input_request`` and
:class:`NotebookInput` answers it with the notebook's own ``input()``.
``%%kt --debug`` starts debugpy in the pod kernel; :class:`DebugEndpoint`
says how an IDE attaches.
"""

from __future__ import annotations

import builtins
import getpass
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from pod_kernel.debugging import deep_breakpoint

from .client import PDB_PROMPT, fallback_answer

__all__ = ["DebugEndpoint", "NotebookInput", "deep_breakpoint", "fallback_answer"]

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
