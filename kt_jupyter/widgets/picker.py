"""The compute picker (``%kt pick``): a form, Launch / Set as default, the equivalent line, running computes."""

from __future__ import annotations

import threading
import time
from html import escape
from typing import Any

import ipywidgets as W
from traitlets import link

from ..names import BACKENDS
from .frontend import ModelView, display_widget
from .models import ProgressModel, format_age, phase_word
from .picker_model import FIELDS, GPU_TYPES, PickerModel
from .progress import ProgressView
from .status import FG1, FG2, FONT, phase_badge, style_widget

_LABELS = {"name": "Name", "cpus": "CPUs", "memory": "Memory", "gpus": "GPUs", "gpu_type": "GPU type",
           "image": "Image", "namespace": "Namespace"}
_PLACEHOLDERS = {"name": "default", "cpus": "e.g. 2 or 500m", "memory": "e.g. 4Gi", "gpus": "0",
                 "gpu_type": "e.g. A100", "image": "e.g. python:3.11-slim", "namespace": "e.g. ml"}
_MESSAGE_COLORS = {"info": FG2, "success": "#137333", "error": "#c5221f"}
_FIELD_STYLE = {"description_width": "84px"}
#: How often an open picker lists the computes again.
PICKER_REFRESH_S = 3.0


def _field(key: str) -> W.ValueWidget:
    common = {"description": _LABELS[key], "placeholder": _PLACEHOLDERS[key], "style": _FIELD_STYLE,
              "layout": W.Layout(width="280px"), "continuous_update": True}
    if key == "gpu_type":
        box = W.Combobox(options=list(GPU_TYPES), ensure_option=False, **common)
    else:
        box = W.Text(**common)
    box.add_class(f"kt-pick-{key.replace('_', '-')}")
    return box


class PickerView(ModelView, W.VBox):
    """Draws a PickerModel and turns clicks into its actions (launch and stop run in threads)."""

    def __init__(self, model: PickerModel, **kw: Any) -> None:
        self.model = model
        title = W.HTML(f'<span style="{FONT} font-size:13.5px; font-weight:600; color:{FG1}">Pick a compute</span>')
        self.default = W.HTML()
        self.backend = W.ToggleButtons(options=list(BACKENDS), style={"button_width": "100px"},
                                       tooltips=["a subprocess on this machine", "a pod on a Kubernetes cluster"])
        self.backend.add_class("kt-pick-backend")
        backend_label = W.HTML(f'<div style="{FONT} color:{FG1}; text-align:right; padding-right:8px">Backend</div>',
                               layout=W.Layout(width="84px"))
        self.fields = {key: _field(key) for key in FIELDS}
        links = [link((model, "backend"), (self.backend, "value"))]
        links += [link((model, key), (box, "value")) for key, box in self.fields.items()]
        form = W.GridBox(list(self.fields.values()),
                         layout=W.Layout(grid_template_columns="repeat(2, 280px)", grid_gap="4px 18px"))
        self.error = W.HTML()
        self.error.add_class("kt-pick-error")
        self.line = W.HTML()
        self.line.add_class("kt-pick-line")
        self.launch = W.Button(description="Launch", button_style="primary", icon="rocket",
                               tooltip="start this compute (or reattach to it) and make it the default",
                               layout=W.Layout(width="110px", flex="0 0 auto"))
        self.launch.add_class("kt-pick-launch")
        self.set_default = W.Button(description="Set as default", icon="check",
                                    tooltip="use these settings for %%kt cells without options, without launching",
                                    layout=W.Layout(width="140px", flex="0 0 auto"))
        self.set_default.add_class("kt-pick-default")
        # the launch's progress takes the room the buttons leave (its text grows with what the launch says):
        # the buttons never shrink, so their labels are never cut
        self.progress_box = W.Box(layout=W.Layout(margin="0 0 0 8px", flex="1 1 auto", min_width="0",
                                                  overflow="hidden"))
        self.message = W.HTML()
        self.message.add_class("kt-pick-message")
        self.refresh = W.Button(description="Refresh", icon="refresh", tooltip="list the computes again",
                                layout=W.Layout(width="90px", margin="0 0 0 10px"))
        self.rows = W.VBox()
        self.rows.add_class("kt-pick-running")
        self.launch.on_click(lambda _b: self._start_launch())
        self.set_default.on_click(self._make_default)
        self.refresh.on_click(lambda _b: model.refresh_running())
        running_title = W.HTML(f'<span style="{FONT} font-weight:600; color:{FG1}">Computes</span>')
        refresh_bar = W.HBox([running_title, self.refresh], layout=W.Layout(align_items="center", margin="8px 0 2px 0"))
        refresh_bar.add_class("kt-compact")
        super().__init__([
            style_widget(),
            W.HBox([title, self.default], layout=W.Layout(justify_content="space-between", align_items="center",
                                                          margin="0 0 4px 0")),
            W.HBox([backend_label, self.backend], layout=W.Layout(align_items="center", margin="0 0 4px 0")),
            form, self.error, self.line,
            W.HBox([self.launch, self.set_default, self.progress_box], layout=W.Layout(align_items="center")),
            self.message,
            refresh_bar,
            self.rows,
        ], layout=W.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="8px 12px",
                           max_width="660px"), **kw)
        self.add_class("kt-picker")
        self.watch(model, links)
        self._closed = threading.Event()
        threading.Thread(target=self._refresh_live, name="kt-pick-refresh", daemon=True).start()

    def _refresh_live(self) -> None:
        """Keep the list of computes current (others start and stop them too) while the picker is open."""
        while not self._closed.wait(PICKER_REFRESH_S):
            if not self.model.busy:
                self.model.refresh_running()

    def close(self) -> None:
        """Stop refreshing, then close."""
        self._closed.set()
        super().close()

    def _make_default(self, _button: Any) -> None:
        self._clear_progress()
        self.model.make_default()

    def _clear_progress(self) -> None:
        """Drop the last launch's progress line: it is not news any more."""
        old = self.progress_box.children
        self.progress_box.children = []
        for widget in old:
            widget.close()

    # ------------------------------------------------------------------ drawing

    def _redraw(self, change: Any = None) -> None:
        m = self.model
        name = change["name"] if change else None
        if name in (None, "default_label"):
            current = f'<b class="kt-pick-current" style="color:{FG1}">{escape(m.default_label)}</b>'
            self.default.value = f'<span style="{FONT} color:{FG2}">default: {current}</span>'
        if name in (None, "error", "error_field", "line", "compute"):
            self.error.value = (f'<div style="{FONT} color:#c5221f">⚠ {escape(m.error)}</div>' if m.error else "")
            for key, box in self.fields.items():
                if key == m.error_field:
                    box.add_class("kt-invalid")
                else:
                    box.remove_class("kt-invalid")
            self.line.value = (f'<div style="{FONT} color:{FG2}">equivalent: <code class="kt-line" '
                               f'style="user-select:all; color:{FG1}; background:var(--jp-layout-color2, #f3f3f3); '
                               f'padding:1px 6px; border-radius:3px">{escape(m.line)}</code></div>')
        if name in (None, "disabled_fields"):
            for key, box in self.fields.items():
                box.disabled = key in m.disabled_fields
                box.placeholder = "kubernetes only" if box.disabled else _PLACEHOLDERS[key]
        if name in (None, "busy", "compute"):
            self.launch.disabled = m.busy or m.compute is None
            self.set_default.disabled = m.busy or m.compute is None
        if name in (None, "message", "message_kind"):
            color = _MESSAGE_COLORS[m.message_kind]
            self.message.value = (f'<div style="{FONT} color:{color}; white-space:pre-wrap">{escape(m.message)}</div>'
                                  if m.message else "")
        if name in (None, "running", "list_errors", "busy"):
            self._draw_rows()

    def _draw_rows(self) -> None:
        m = self.model
        now = time.time()
        rows = []
        for info in m.running:
            age = format_age(now - info.started) if info.started else "-"
            phase = phase_word(info.phase)
            alive = phase in ("launching", "ready")
            text = (f'<span style="{FONT} color:{FG1}; white-space:nowrap">{phase_badge(phase, phase)} '
                    f'<b>{escape(info.name)}</b> <span style="color:{FG2}">{escape(info.backend)} · '
                    f'{escape(info.where or "-")} · age {age}</span></span>')
            use = W.Button(description="Use", tooltip="fill the form from it and make it the default",
                           layout=W.Layout(width="60px"), disabled=m.busy)
            stop = W.Button(description="Stop" if alive else "Remove", button_style="danger" if alive else "",
                            tooltip="stop it and delete everything of it", layout=W.Layout(width="76px"),
                            disabled=m.busy)
            stop.add_class("kt-pick-stop")
            use.on_click(lambda _b, info=info: m.use(info))
            stop.on_click(lambda _b, info=info: self._start_stop(info.backend, info.name))
            row = W.HBox([W.HTML(text, layout=W.Layout(flex="1 1 auto")), use, stop],
                         layout=W.Layout(align_items="center"))
            row.add_class("kt-pick-row")
            rows.append(row)
        if not rows:
            rows.append(W.HTML(f'<span style="{FONT} color:{FG2}">none yet</span>'))
        for err in m.list_errors:
            rows.append(W.HTML(f'<div style="{FONT} font-size:11.5px; line-height:1.35; color:{FG2}">'
                               f'{escape(err)}</div>', layout=W.Layout(margin="4px 2px")))
        old = self.rows.children
        self.rows.children = rows
        for widget in old:
            widget.close()

    # ------------------------------------------------------------------ actions (in threads)

    def _start_launch(self) -> None:
        compute = self.model.compute
        if compute is None or self.model.busy:
            return
        progress = ProgressModel(kind="launch", label=f"launching '{compute.name}'")
        view = ProgressView(progress)
        old = self.progress_box.children
        self.progress_box.children = [view]
        for widget in old:
            widget.close()

        def run() -> None:
            conn = self.model.launch(on_event=progress.event)
            progress.finish("" if conn is not None else (self.model.message or "failed"))

        threading.Thread(target=run, name="kt-pick-launch", daemon=True).start()

    def _start_stop(self, backend: str, name: str) -> None:
        self._clear_progress()
        threading.Thread(target=self.model.stop, args=(backend, name), name="kt-pick-stop", daemon=True).start()



def show_picker_widget(model: PickerModel, text: str) -> PickerView:
    """Display a picker on ``model`` (with ``text`` for frontends without widgets)."""
    view = PickerView(model)
    display_widget(view, text)
    return view
