"""Can widgets render here, and how to show one with a readable text fallback.

Widgets need ipywidgets and a kernel with a comm channel to a frontend
(ipykernel: JupyterLab, Notebook 7, VS Code). Terminal IPython, plain
Python and a missing ipywidgets get text. ``KT_WIDGETS=0`` forces text,
``KT_WIDGETS=1`` forces widgets.
"""

from __future__ import annotations

import os
from typing import Any

#: Environment variable that forces the choice: "0" (text) or "1" (widgets).
FORCE_ENV = "KT_WIDGETS"

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def widgets_available(shell: Any = None) -> bool:
    """Whether widgets can be shown: ipywidgets imports and IPython runs inside a kernel with comms."""
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off", "text"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except Exception:
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    if shell is None:
        try:
            from IPython.core.getipython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None:
        return False
    kernel = getattr(shell, "kernel", None)
    if kernel is None:  # terminal IPython, or IPython embedded without a kernel
        return False
    try:
        from comm import get_comm_manager

        return get_comm_manager() is not None
    except Exception:
        return getattr(kernel, "comm_manager", None) is not None


def widget_bundle(widget: Any, text: str) -> dict[str, Any]:
    """The mime bundle of ``widget`` with ``text`` as its plain-text form.

    Frontends without the widget manager (nbconvert, nbval, some viewers)
    show the text instead of ``VBox(children=...)``.
    """
    bundle = widget._repr_mimebundle_() or {}
    data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
    data["text/plain"] = text
    return data


def display_widget(widget: Any, text: str, *, parent: dict[str, Any] | None = None) -> None:
    """Display ``widget`` with a text fallback; from another thread, into the cell of ``parent``."""
    from IPython.display import display

    shell = _shell()
    token = None
    if parent and shell is not None and hasattr(shell, "set_thread_parent"):
        token = shell.set_thread_parent(parent)
    try:
        display(widget_bundle(widget, text), raw=True)
    finally:
        if token is not None:
            shell.reset_thread_parent(token)


#: A reporter's ``parent`` default: the parent header of the cell running when it is made.
CURRENT: Any = object()


def current_parent() -> dict[str, Any] | None:
    """The parent header of the cell running now (to display into it later from a thread)."""
    shell = _shell()
    parent = getattr(shell, "parent_header", None) if shell is not None else None
    return dict(parent) if parent else None


def _shell() -> Any:
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:
        return None
    return get_ipython()


class ModelView:
    """Mixin of a widget drawn from a model: it redraws on the model's changes and, closed, lets go of it.

    A subclass sets :attr:`redraw_on` (the model traits that redraw it; empty: all)
    and calls :meth:`watch` once built, which draws it again: the model may have changed
    after the first draw and before the subscription (the monitor's thread appends
    lines and samples while a panel is built). ``close()`` (once) stops observing,
    undoes the trait links, then closes the widget.
    """

    redraw_on: tuple[str, ...] = ()

    def watch(self, model: Any, links: list[Any] | None = None) -> None:
        """Redraw on ``model``'s changes, and once now; ``links`` (traitlets links) are undone on close."""
        from traitlets import All

        self.model = model
        self._kt_links = list(links or [])
        self._kt_names = list(self.redraw_on) or All
        model.observe(self._redraw, names=self._kt_names)
        self._redraw()  # what changed between the first draw and the subscription (an unchanged value sends nothing)

    def _redraw(self, _change: Any = None) -> None:  # pragma: no cover - every view defines it
        raise NotImplementedError

    def close(self) -> None:
        """Stop observing the model and undo the links, then close (a second call does nothing)."""
        if getattr(self, "_kt_closed", False):
            return
        self._kt_closed = True
        try:
            self.model.unobserve(self._redraw, names=self._kt_names)
        except (AttributeError, ValueError):  # never watched, or already unobserved
            pass
        for lk in getattr(self, "_kt_links", ()):
            lk.unlink()
        super().close()  # type: ignore[misc]
