"""The kt magics, and what ``%load_ext kt_jupyter`` adds to a shell and ``%unload_ext`` takes away again.

Loading adds: the :class:`~kt_jupyter.magics.kt.KtMagics` (``%%kt``, ``%kt``),
their ``pre_run_cell`` callback (the raw text of the running cell), the
``%debug`` hook that reaches a failed ``%%kt`` cell's pod kernel, a local pod
kernel process started ahead, IPython's input transformations kept per
cell source (:func:`pod_kernel.transforms.install`), and, in a notebook kernel,
JupyterLab's debugger extended to pod kernels. Unloading
removes each of them; computes and their pod kernels are left running (they
outlive the notebook kernel by design: ``%kt down`` stops them). Reloading is
unload, then load: never two callbacks.
"""

from __future__ import annotations

from typing import Any

from pod_kernel import transforms

#: The name IPython's magics manager registers our Magics class under.
MAGICS_NAME = "KtMagics"


def load(shell: Any) -> None:
    """Register the kt magics and hooks on ``shell`` (once: a second load replaces the first)."""
    from .. import debug_panel
    from .kt import KtMagics

    if MAGICS_NAME in shell.magics_manager.registry:
        unload(shell)
    shell.register_magics(KtMagics(shell))  # its __init__ registers the pre_run_cell callback and the %debug hook
    debug_panel.install(shell)  # JupyterLab's debugger panel reaches %%kt cells' pod kernels too
    transforms.install(shell)  # a cell run again (a %%kt cell is one long line to IPython) is not tokenized again


def unload(shell: Any) -> None:
    """Remove what :func:`load` added to ``shell``."""
    from .. import debug_panel
    from ..backends import get_backend
    from ..backends.local import LocalBackend
    from ..widgets import monitor

    magics = shell.magics_manager.registry.pop(MAGICS_NAME, None)
    if magics is not None:
        for table in shell.magics_manager.magics.values():
            for name, func in list(table.items()):
                if getattr(func, "__self__", None) is magics:
                    del table[name]
        callbacks = shell.events.callbacks.get("pre_run_cell", [])
        for callback in list(callbacks):
            if getattr(callback, "__self__", None) is magics:
                shell.events.unregister("pre_run_cell", callback)
    hook = vars(shell).get("debugger")
    if getattr(hook, "kt_post_mortem", False):
        del shell.debugger  # IPython's own post-mortem again
    debug_panel.uninstall(shell)
    transforms.uninstall(shell)
    monitor.unhook(shell)  # the monitors' pre/post_run_cell callback
    local = get_backend("local")
    if isinstance(local, LocalBackend):
        local.stop_prestart()  # the pod kernel process KtMagics started ahead goes
