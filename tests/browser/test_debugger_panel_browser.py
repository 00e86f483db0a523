"""JupyterLab's own debugger panel on a ``%%kt`` cell, in a real JupyterLab under headless chromium.

After ``%load_ext kt_jupyter`` a person switches the debugger on (the bug icon in the
notebook toolbar), clicks the gutter of a ``%%kt`` cell to set a breakpoint, and runs
the cell: it stops in the pod kernel, and the debugger sidebar shows the pod's frame
(``scale``, the cell's line), its locals, and the cell's current line highlighted;
Next steps in the pod, and the cell finishes once the debugger lets go.

Continue (whose button asks for thread 1, see KtDebuggerMixin.process_request) resumes the
pod, and the Breakpoints panel lists a ``%%kt`` cell's breakpoints.

Every wait is on a selector or text with a deadline; screenshots go to
test-artifacts/browser/debugger-panel-*.png.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="browser tests need playwright (pip install playwright pytest-playwright)")

from playwright.sync_api import Locator, Page, expect  # noqa: E402
from test_debug_panel import CELL  # noqa: E402  (the cell tests/test_debug_panel.py debugs over the wire)
from test_widgets_browser import KERNEL_TIMEOUT_MS, Notebook  # noqa: E402

#: Deadline for the debugger panel to show a change (a DAP round trip through the notebook kernel to the pod).
PANEL_TIMEOUT_MS = 20_000

#: ``doubled = v * 2``, counting the ``%%kt`` line as line 1 (as the editor's gutter does).
BREAKPOINT_LINE = 4


def _kernel_message(payload: str | bytes) -> dict | None:
    """A kernel message from a frame of JupyterLab's kernel websocket (v1 binary protocol, or legacy JSON)."""
    try:
        if isinstance(payload, str):
            return json.loads(payload)
        count = struct.unpack_from("<Q", payload, 0)[0]
        offsets = [struct.unpack_from("<Q", payload, 8 * (i + 1))[0] for i in range(count)] + [len(payload)]
        parts = [payload[offsets[i]:offsets[i + 1]] for i in range(count)]
        return {"channel": parts[0].decode(), "header": json.loads(parts[1]), "content": json.loads(parts[4])}
    except (ValueError, IndexError, struct.error):
        return None


@pytest.fixture
def dap_log(page: Page, artifacts: Path, request):
    """Every debug_request / debug_reply / debug_event JupyterLab exchanges with the kernel, written to
    test-artifacts/browser/debugger-panel-dap-<test>.log after the test (what to read when the panel misbehaves)."""
    lines: list[str] = []

    def record(direction: str, payload: str | bytes) -> None:
        msg = _kernel_message(payload)
        kind = (msg or {}).get("header", {}).get("msg_type", "")
        if kind.startswith("debug_") and msg["content"].get("command") not in ("inspectVariables", "modules"):
            lines.append(f"{direction} {kind} {json.dumps(msg['content'])[:2000]}")

    def on_websocket(ws) -> None:
        ws.on("framesent", lambda payload: record("->", payload))
        ws.on("framereceived", lambda payload: record("<-", payload))

    page.on("websocket", on_websocket)
    yield lines
    name = request.node.originalname.removeprefix("test_")
    (artifacts / f"debugger-panel-dap-{name}.log").write_text("\n".join(lines) + "\n")


class DebuggerNotebook(Notebook):
    """The notebook with the ``%%kt`` cell (cell 1), and JupyterLab's debugger sidebar."""

    def __init__(self, page: Page, lab, name: str) -> None:
        super().__init__(page, lab, name)
        self.sidebar = page.locator("#jp-debugger-sidebar")
        self.bug = self.panel.locator('[data-jp-item-name="debugger-icon"] .jp-DebuggerBugButton')

    def switch_debugger(self, on: bool) -> None:
        """Click the toolbar's bug icon; when switching on, wait until the debugger session has started."""
        expect(self.bug).to_have_attribute("aria-disabled", "false", timeout=KERNEL_TIMEOUT_MS)
        expect(self.bug).to_have_attribute("aria-pressed", "false" if on else "true")
        self.bug.click()
        expect(self.bug).to_have_attribute("aria-pressed", "true" if on else "false", timeout=PANEL_TIMEOUT_MS)
        if not on:
            return
        if not self.sidebar.is_visible():  # it opens by itself; clicking the tab of an open panel would close it
            self.page.locator('.jp-SideBar.jp-mod-right [data-id="jp-debugger-sidebar"]').click()
        expect(self.sidebar).to_be_visible(timeout=PANEL_TIMEOUT_MS)
        # the kernel's modules are listed once initialize / attach are done: breakpoints are sent from then on
        expect(self.sidebar.locator(".jp-DebuggerKernelSource-source").first).to_be_visible(timeout=PANEL_TIMEOUT_MS)

    def widen_sidebar(self) -> None:
        """Fold the file browser away and drag the right sidebar wider, for legible screenshots."""
        open_left = self.page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if open_left.count():
            open_left.click()
            expect(open_left).to_have_count(0)
        handle = self.page.locator("#jp-main-split-panel > .lm-SplitPanel-handle:not(.lm-mod-hidden)").last
        box = handle.bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        self.page.mouse.move(x, y)
        self.page.mouse.down()
        self.page.mouse.move(x - 230, y, steps=5)
        self.page.mouse.up()

    # ------------------------------------------------------------------ the %%kt cell's editor

    def editor(self) -> Locator:
        return self.cell(1).locator(".jp-InputArea-editor")

    def line_number(self, line: int) -> Locator:
        """The gutter's number of ``line`` (CodeMirror keeps a hidden one, the widest, to measure the gutter)."""
        return self.editor().locator(".cm-lineNumbers .cm-gutterElement:visible").filter(
            has_text=re.compile(rf"^{line}$"))

    def toggle_breakpoint(self, line: int) -> None:
        """Click the breakpoint gutter of the ``%%kt`` cell's editor beside ``line`` (as a person does)."""
        number = self.line_number(line)
        gutter = self.editor().locator(".cm-gutter.cm-breakpoint-gutter")
        expect(number).to_be_visible(timeout=PANEL_TIMEOUT_MS)
        expect(gutter).to_be_visible()
        line_box, gutter_box = number.bounding_box(), gutter.bounding_box()
        assert line_box is not None and gutter_box is not None
        self.page.mouse.click(gutter_box["x"] + gutter_box["width"] / 2, line_box["y"] + line_box["height"] / 2)

    def breakpoint_markers(self) -> Locator:
        """The red dots in the ``%%kt`` cell's gutter (CodeMirror keeps one hidden to measure the gutter)."""
        return self.editor().locator(".cm-breakpoint-gutter .cm-gutterElement .cm-breakpoint-icon:visible")

    def expect_marker_on(self, line: int) -> None:
        markers = self.breakpoint_markers()
        expect(markers).to_have_count(1, timeout=PANEL_TIMEOUT_MS)
        number = self.line_number(line)
        marker_box, line_box = markers.bounding_box(), number.bounding_box()
        assert marker_box is not None and line_box is not None
        assert line_box["y"] <= marker_box["y"] + marker_box["height"] / 2 <= line_box["y"] + line_box["height"]

    def highlighted_line(self) -> Locator:
        """The editor line the debugger marks as the current one."""
        return self.editor().locator(".cm-line.jp-DebuggerEditor-highlight")

    # ------------------------------------------------------------------ the sidebar

    def top_frame(self) -> Locator:
        return self.sidebar.locator(".jp-DebuggerCallstackFrame.selected")

    def expect_stopped_at(self, name: str, line: int) -> None:
        """The callstack's selected frame is ``name`` at the cell's ``line``, and the editor marks that line."""
        frame = self.top_frame()
        expect(frame.locator(".jp-DebuggerCallstackFrame-name")).to_have_text(name, timeout=PANEL_TIMEOUT_MS)
        expect(frame.locator(".jp-DebuggerCallstackFrame-location")).to_have_text(
            re.compile(rf"^Cell \[\*\]:{line}$"), timeout=PANEL_TIMEOUT_MS)
        expect(self.highlighted_line()).to_have_count(1, timeout=PANEL_TIMEOUT_MS)
        expect(self.highlighted_line()).to_have_text(CELL.split("\n")[line - 1].strip(), timeout=PANEL_TIMEOUT_MS)

    def variable(self, name: str) -> Locator:
        """The value shown for local ``name`` in the Variables panel (tree view)."""
        item = self.sidebar.locator(".jp-DebuggerVariables-body jp-tree-item").filter(
            has=self.page.locator("xpath=./span[contains(@class, 'jp-DebuggerVariables-name')]").filter(
                has_text=re.compile(rf"^{re.escape(name)}$")))
        return item.locator("xpath=./span[contains(@class, 'jp-DebuggerVariables-detail')]")

    def toolbar_button(self, command: str) -> Locator:
        """A button of the Callstack toolbar (``debugger:continue``, ``debugger:next``, …)."""
        return self.sidebar.locator(f'jp-button[data-command="{command}"]')

    def stdout(self) -> Locator:
        """What the ``%%kt`` cell printed (its stdout output, not the launch panel's log)."""
        return self.output(1).locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]')


def open_and_stop_at_breakpoint(page: Page, lab, backend, name: str) -> tuple[DebuggerNotebook, object]:
    """Debugger on, a breakpoint clicked on line 4 of the %%kt cell, the cell run: it stops in ``scale(0)``."""
    lab.write_notebook(name, ["%load_ext kt_jupyter", CELL])
    nb = DebuggerNotebook(page, lab, name)
    nb.run(0)
    nb.switch_debugger(on=True)
    nb.widen_sidebar()

    nb.toggle_breakpoint(BREAKPOINT_LINE)
    nb.expect_marker_on(BREAKPOINT_LINE)

    nb.run(1, wait=False)
    expect(nb.cell(1).locator(".jp-InputPrompt")).to_have_text("[*]:")
    nb.expect_stopped_at("scale", BREAKPOINT_LINE)
    expect(nb.variable("v")).to_have_text("0", timeout=PANEL_TIMEOUT_MS)
    pod = backend.find("panel")
    assert pod is not None
    return nb, pod


def test_breakpoint_in_a_kt_cell_stops_in_the_pod_and_the_panel_shows_its_frame(page: Page, clean_lab, dap_log,
                                                                                  artifacts: Path):
    nb, pod = open_and_stop_at_breakpoint(page, clean_lab, clean_lab.backend, "debug_panel.ipynb")

    # the pod's frames are the cell's own (justMyCode: not IPython's or the pod kernel's machinery)
    frames = nb.sidebar.locator(".jp-DebuggerCallstackFrame")
    expect(frames).to_have_count(2, timeout=PANEL_TIMEOUT_MS)
    expect(frames.nth(1).locator(".jp-DebuggerCallstackFrame-name")).to_have_text("<module>")
    expect(frames.nth(1).locator(".jp-DebuggerCallstackFrame-location")).to_have_text("Cell [*]:8")
    # and they name the notebook cell's file, as JupyterLab hashes it (so the editor can mark the line)
    expect(nb.top_frame().locator(".jp-DebuggerCallstackFrame-location")).to_have_attribute(
        "title", re.compile(r"/ipykernel_\d+/\d+\.py$"))
    expect(nb.sidebar.locator('.jp-DebuggerVariables-toolbar select[aria-label="Scope"]')).to_have_value("Locals")
    expect(nb.variable("doubled")).to_have_count(0)
    expect(page.get_by_text("Paused in Debugger")).to_be_visible()
    page.screenshot(path=str(artifacts / "debugger-panel-stopped.png"))
    nb.sidebar.screenshot(path=str(artifacts / "debugger-panel-stopped-sidebar.png"))

    # Next: one line on, in the pod; the new local shows up
    nb.toolbar_button("debugger:next").click()
    nb.expect_stopped_at("scale", BREAKPOINT_LINE + 1)
    expect(nb.variable("doubled")).to_have_text("0", timeout=PANEL_TIMEOUT_MS)
    expect(nb.variable("v")).to_have_text("0")
    nb.sidebar.screenshot(path=str(artifacts / "debugger-panel-next-sidebar.png"))

    # switching the debugger off lets the pod go: the cell runs to its end there, the pod kernel stays
    nb.switch_debugger(on=False)
    expect(nb.stdout()).to_have_text(f"total 9 pid {pod.pid}", timeout=KERNEL_TIMEOUT_MS)
    expect(nb.cell(1).locator(".jp-InputPrompt")).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)
    expect(nb.highlighted_line()).to_have_count(0)
    assert clean_lab.backend.find("panel").pid == pod.pid  # the pod kernel stays
    page.screenshot(path=str(artifacts / "debugger-panel-finished.png"))


def test_breakpoints_panel_lists_the_kt_cells_breakpoint(page: Page, clean_lab, dap_log, artifacts: Path):
    lab = clean_lab
    lab.write_notebook("debug_bps.ipynb", ["%load_ext kt_jupyter", CELL])
    nb = DebuggerNotebook(page, lab, "debug_bps.ipynb")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    nb.run(0)
    nb.switch_debugger(on=True)
    nb.widen_sidebar()
    nb.toggle_breakpoint(BREAKPOINT_LINE)
    nb.expect_marker_on(BREAKPOINT_LINE)
    listed = nb.sidebar.locator(".jp-DebuggerBreakpoints .jp-DebuggerBreakpoint")
    try:
        expect(listed).to_have_count(1, timeout=PANEL_TIMEOUT_MS)
        expect(listed.locator(".jp-DebuggerBreakpoint-line")).to_have_text(str(BREAKPOINT_LINE))
        expect(listed.locator(".jp-DebuggerBreakpoint-source")).to_have_text("Cell [ ]")
    finally:
        nb.sidebar.screenshot(path=str(artifacts / "debugger-panel-breakpoints-sidebar.png"))
    assert not errors, errors


def test_continue_stops_again_on_the_next_call_and_runs_to_the_end(page: Page, clean_lab, dap_log,
                                                                   artifacts: Path):
    nb, pod = open_and_stop_at_breakpoint(page, clean_lab, clean_lab.backend, "debug_continue.ipynb")

    # Continue: the loop calls scale(1), which stops on the breakpoint again
    nb.toolbar_button("debugger:continue").click()
    expect(nb.variable("v")).to_have_text("1", timeout=PANEL_TIMEOUT_MS)
    nb.expect_stopped_at("scale", BREAKPOINT_LINE)
    nb.sidebar.screenshot(path=str(artifacts / "debugger-panel-continued-sidebar.png"))

    # remove the breakpoint (click its dot) and Continue: the cell runs to its end in the pod
    nb.toggle_breakpoint(BREAKPOINT_LINE)
    expect(nb.breakpoint_markers()).to_have_count(0, timeout=PANEL_TIMEOUT_MS)
    nb.toolbar_button("debugger:continue").click()
    expect(nb.stdout()).to_have_text(f"total 9 pid {pod.pid}", timeout=KERNEL_TIMEOUT_MS)
    expect(nb.cell(1).locator(".jp-InputPrompt")).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)
    expect(nb.highlighted_line()).to_have_count(0)
    page.screenshot(path=str(artifacts / "debugger-panel-continued-finished.png"))
