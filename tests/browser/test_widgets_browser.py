"""The widgets in a real JupyterLab under headless chromium: status panel, logs, metrics, picker.

Every wait is on a selector or text with a deadline; screenshots go to
test-artifacts/browser/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="browser tests need playwright (pip install playwright pytest-playwright)")

from playwright.sync_api import Locator, Page, expect  # noqa: E402

#: Deadline for anything a kernel does (start, launch a pod kernel, run a cell).
KERNEL_TIMEOUT_MS = 60_000
#: Deadline for a widget to show a change.
WIDGET_TIMEOUT_MS = 20_000


def expect_settled_status_panel(panel: Locator, printed: str) -> None:
    """``%kt status`` on the default local compute after one cell that printed ``printed``: every part there.

    The panel's first paint can predate the kernel's reply, so the last checks wait for the settled
    state (the cell counted, its print in the log), which background threads push after the first render.
    """
    expect(panel).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    badge = panel.locator(".kt-phase")
    expect(badge).to_have_attribute("data-kt-phase", "ready", timeout=WIDGET_TIMEOUT_MS)
    expect(badge).to_have_text("● ready")
    expect(panel.locator('[data-kt-field="activity"]')).to_have_text(re.compile(r"^idle \d+"), timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-name")).to_have_text("default")
    expect(panel.locator('[data-kt-field="where"]')).to_contain_text("local pid")
    expect(panel.locator('.kt-metric[data-kt-key="rss"] .kt-metric-value')).to_contain_text(
        "MiB", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator('[data-kt-field="cells"]')).to_contain_text("1", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-log-hint")).to_contain_text("of cell output hidden", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-log")).not_to_contain_text(printed)  # the cell shows it already
    panel.locator(".kt-log-cell-output").click()
    expect(panel.locator(".kt-log")).to_contain_text(printed, timeout=WIDGET_TIMEOUT_MS)


def expect_no_clipped_labels(root: Locator) -> None:
    """No label, button or toggle of ``root`` cuts its text (wider than its box)."""
    clipped = root.evaluate("""el => [...el.querySelectorAll('.widget-label, button, .widget-toggle-button')]
        .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
        .map(e => `${e.textContent.trim()} (${e.scrollWidth} > ${e.clientWidth})`)""")
    assert clipped == [], f"clipped labels: {clipped}"


def expect_picker_form(picker: Locator) -> None:
    """``%kt pick`` with the default local compute current: the form, its fields, Launch, and the compute's row."""
    expect(picker).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-current")).to_have_text("default (local)")
    for field in ("name", "cpus", "memory"):
        expect(picker.locator(f".kt-pick-{field} input")).to_be_visible()
    expect(picker.locator(".kt-pick-launch")).to_be_visible()
    expect(picker.locator(".kt-pick-row", has_text="default")).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-row", has_text="default").locator(".kt-phase")).to_have_text("● ready")
    expect_no_clipped_labels(picker)


class Notebook:
    """One open notebook in JupyterLab, driven like a person would (click a cell, Shift+Enter)."""

    def __init__(self, page: Page, lab, name: str) -> None:
        self.page = page
        self.lab = lab
        page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")
        self.panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        expect(self.panel.locator(".jp-Cell").first).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
        expect(page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\|\s*Idle"))).to_be_visible(
            timeout=KERNEL_TIMEOUT_MS)

    def cell(self, index: int) -> Locator:
        """The cell at ``index``."""
        return self.panel.locator(".jp-Cell").nth(index)

    def output(self, index: int) -> Locator:
        """The output area of cell ``index``."""
        return self.cell(index).locator(".jp-OutputArea")

    def run(self, index: int, *, wait: bool = True) -> None:
        """Run cell ``index``; with ``wait``, until its prompt shows an execution count."""
        prompt = self.cell(index).locator(".jp-InputPrompt")
        for attempt in range(2):  # the first key press can land before the editor has focus
            self.cell(index).locator(".jp-InputArea-editor").click()
            self.page.keyboard.press("Shift+Enter")
            try:
                expect(prompt).not_to_have_text(re.compile(r"^\[ \]:$"), timeout=5_000)
                break
            except AssertionError:
                if attempt:
                    raise
        if wait:
            expect(prompt).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)


def test_status_panel_logs_and_metrics_follow_a_running_cell(page: Page, clean_lab, artifacts: Path):
    lab = clean_lab
    lab.write_notebook("status.ipynb", [
        "%load_ext kt_jupyter",
        "from kt_jupyter import Compute, connection\n"
        "from kt_jupyter.widgets import launch_reporter\n"
        "connection.connect(Compute(name='demo'), on_event=launch_reporter('demo'));",
        "%%kt --name demo\n"
        "import os, time\n"
        "print('hello from the pod kernel, pid', os.getpid())\n"
        "for step in range(6):\n"
        "    print(f'training step {step}', flush=True)\n"
        "    total = sum(i * i for i in range(300_000))  # some CPU to see\n"
        "    time.sleep(0.5)\n"
        "result = step",
        "%kt status demo",
        "%kt down demo",
    ])
    nb = Notebook(page, lab, "status.ipynb")
    nb.run(0)

    # the launch shows a live panel that reaches "ready"
    nb.run(1)
    panel = nb.output(1).locator(".kt-panel")
    expect(panel).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    badge = panel.locator(".kt-phase")
    expect(badge).to_have_attribute("data-kt-phase", "ready", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-name")).to_have_text("demo")
    expect(panel.locator('[data-kt-field="where"]')).to_contain_text("local pid")
    expect(panel.locator('.kt-metric[data-kt-key="cpu"] .kt-metric-value')).to_have_text(re.compile(r"^\d+%$"),
                                                                                       timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-log")).to_contain_text("serving on", timeout=WIDGET_TIMEOUT_MS)
    panel.screenshot(path=str(artifacts / "status-ready.png"))

    # a %%kt cell that prints and sleeps: the panel says "running a cell"; its prints stay in the cell
    # until "Cell output" is switched on
    activity = panel.locator('[data-kt-field="activity"]')
    nb.run(2, wait=False)
    expect(activity).to_have_text("running a cell", timeout=WIDGET_TIMEOUT_MS)
    expect(badge).to_have_text("● ready")
    expect(panel.locator(".kt-log-hint")).to_contain_text("of cell output hidden", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-log")).not_to_contain_text("training step")
    panel.locator(".kt-log-cell-output").click()
    expect(panel.locator(".kt-log")).to_contain_text("training step 2", timeout=WIDGET_TIMEOUT_MS)
    expect(panel.locator(".kt-log-cell").first).to_be_visible()
    panel.screenshot(path=str(artifacts / "status-running.png"))
    expect(nb.output(2)).to_contain_text("training step 5", timeout=KERNEL_TIMEOUT_MS)
    expect(nb.output(2)).to_contain_text("hello from the pod kernel, pid")
    expect(nb.cell(2).locator(".jp-InputPrompt")).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)
    # right after the cell: idle, the cell counted (the cell's end refreshes the panel)
    expect(activity).to_have_text(re.compile(r"^idle \d+s$"), timeout=5_000)
    expect(panel.locator('[data-kt-field="cells"]')).to_contain_text("1", timeout=5_000)
    panel.screenshot(path=str(artifacts / "status-after-cell.png"))
    expect(panel.locator(".kt-log")).to_contain_text("training step 5")
    expect(panel.locator(".kt-metric")).to_have_count(2)  # CPU and memory (no GPU here)
    expect(panel.locator('.kt-metric[data-kt-key="rss"] .kt-metric-value')).to_contain_text("MiB")
    expect(panel.locator(".kt-metric svg polyline").first).to_be_attached()  # a line: more than one sample

    # the level filter and clear act on the log view
    log_view = panel.locator(".kt-log")
    panel.locator(".kt-log-level button", has_text="WARNING").click()
    expect(log_view).not_to_contain_text("training step", timeout=WIDGET_TIMEOUT_MS)
    panel.locator(".kt-log-level button", has_text="INFO").click()
    expect(log_view).to_contain_text("training step", timeout=WIDGET_TIMEOUT_MS)

    # %kt status shows the same live panel
    nb.run(3)
    status = nb.output(3).locator(".kt-panel")
    expect(status.locator(".kt-phase")).to_have_attribute("data-kt-phase", "ready", timeout=WIDGET_TIMEOUT_MS)
    expect(status.locator('[data-kt-field="activity"]')).to_have_text(re.compile(r"^idle \d+s$"))
    expect(status.locator(".kt-log")).to_contain_text("training step 5", timeout=WIDGET_TIMEOUT_MS)
    expect(status.locator('[data-kt-field="cells"]')).to_contain_text("1")
    status.screenshot(path=str(artifacts / "status-idle.png"))
    page.screenshot(path=str(artifacts / "status-notebook.png"), full_page=True)

    panel.locator(".kt-log-clear").click()
    expect(log_view).to_contain_text("no log lines yet", timeout=WIDGET_TIMEOUT_MS)

    # %kt down: both panels say "stopped" as soon as that cell ends
    nb.run(4)
    for view in (panel, status):
        expect(view.locator(".kt-phase")).to_have_attribute("data-kt-phase", "stopped", timeout=5_000)
        expect(view.locator(".kt-detail")).to_have_text("deleted")
        expect(view.locator('[data-kt-field="activity"]')).to_have_count(0)
    status.screenshot(path=str(artifacts / "status-after-down.png"))


def test_picker_launches_a_compute_that_cells_then_use(page: Page, clean_lab, artifacts: Path):
    lab = clean_lab
    lab.write_notebook("pick.ipynb", [
        "%load_ext kt_jupyter",
        "%kt pick",
        "%%kt\nimport os\nprint('ran on pid', os.getpid())",
    ])
    nb = Notebook(page, lab, "pick.ipynb")
    nb.run(0)
    nb.run(1)
    picker = nb.output(1).locator(".kt-picker")
    expect(picker).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-current")).to_have_text("default (local)")

    # an invalid value: an inline error, Launch disabled; a good one clears it
    expect_no_clipped_labels(picker)
    picker.locator(".kt-pick-backend button", has_text="kubernetes").click()  # every field enabled, each label shown
    expect_no_clipped_labels(picker)
    picker.screenshot(path=str(artifacts / "picker-kubernetes-fields.png"))
    picker.locator(".kt-pick-backend button", has_text="local").click()
    picker.locator(".kt-pick-name input").fill("picked")
    picker.locator(".kt-pick-memory input").fill("lots")
    expect(picker.locator(".kt-pick-error")).to_contain_text("memory", timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-launch")).to_be_disabled()
    picker.screenshot(path=str(artifacts / "picker-invalid.png"))
    picker.locator(".kt-pick-memory input").fill("2Gi")
    picker.locator(".kt-pick-cpus input").fill("1")
    expect(picker.locator(".kt-pick-error")).to_have_text("", timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-line")).to_have_text("%%kt --name picked --cpus 1 --memory 2Gi")

    # launch: ready, listed with a Stop button, and the default for %%kt cells
    picker.locator(".kt-pick-launch").click()
    expect(picker.locator(".kt-pick-message")).to_contain_text("'picked' is ready", timeout=KERNEL_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-current")).to_have_text("picked (local)")
    row = picker.locator(".kt-pick-row", has_text="picked")
    expect(row.locator(".kt-phase")).to_have_attribute("data-kt-phase", "ready")
    expect(row).to_contain_text(re.compile(r"local pid \d+ · age \d+s"))
    expect_no_clipped_labels(picker)
    # the launch's progress beside the buttons may say a lot (what the launch said, how long it took): it
    # takes the room they leave, never theirs (CI once caught "Set as default" cut to 121 of 127 px)
    picker.locator(".kt-pick-default").evaluate(
        "b => { const s = document.createElement('span'); s.className = 'kt-test-wide';"
        " s.style.whiteSpace = 'nowrap'; s.textContent = 'x'.repeat(400); b.nextElementSibling.appendChild(s); }")
    expect_no_clipped_labels(picker)
    picker.locator(".kt-test-wide").evaluate("s => s.remove()")
    expect(picker.locator(".kt-progress-text")).to_contain_text("ready in", timeout=WIDGET_TIMEOUT_MS)
    pid = re.search(r"local pid (\d+)", row.inner_text()).group(1)
    picker.screenshot(path=str(artifacts / "picker-launched.png"))

    nb.run(2)
    expect(nb.output(2)).to_contain_text(f"ran on pid {pid}", timeout=KERNEL_TIMEOUT_MS)

    row.locator(".kt-pick-stop").click()
    expect(picker.locator(".kt-pick-row", has_text="picked")).to_have_count(0, timeout=KERNEL_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-message")).to_contain_text("'picked' (local) stopped")
    picker.screenshot(path=str(artifacts / "picker-stopped.png"))


def test_transfer_progress_bars_land_in_the_cell(page: Page, clean_lab, artifacts: Path):
    lab = clean_lab
    lab.write_notebook("transfer.ipynb", [
        "%load_ext kt_jupyter",
        "import numpy as np\n"
        "from kt_jupyter import Compute, connection\n"
        "from kt_jupyter.widgets import transfer_reporter\n"
        "big = np.ones((64 << 20) // 8)\n"
        "conn = connection.connect(Compute(name='xfer'))\n"
        "conn.run_cell('back = big + 1', globals(), on_progress=transfer_reporter(min_bytes=1 << 20))\n"
        "print('sum', back.sum())",
    ])
    nb = Notebook(page, lab, "transfer.ipynb")
    nb.run(0)
    nb.run(1)
    out = nb.output(1)
    expect(out).to_contain_text(f"sum {float(2 * (64 << 20) // 8)}", timeout=KERNEL_TIMEOUT_MS)
    bars = out.locator(".kt-progress")
    expect(bars).to_have_count(2, timeout=WIDGET_TIMEOUT_MS)
    expect(bars.nth(0)).to_contain_text(re.compile(r"push 64 MiB / 64 MiB · .*/s · done in"), timeout=WIDGET_TIMEOUT_MS)
    expect(bars.nth(1)).to_contain_text(re.compile(r"pull 64 MiB / 64 MiB · .*/s · done in"), timeout=WIDGET_TIMEOUT_MS)
    out.screenshot(path=str(artifacts / "transfer-progress.png"))


FAKE_STATES_CELL = '''\
# FAKE data: states that need a cluster or a GPU, which this machine lacks, drawn by the real views
import time, ipywidgets as W
from kt_jupyter.backends import KernelInfo
from kt_jupyter.widgets.models import StatusModel, MetricsModel
from kt_jupyter.widgets.log_model import LogModel
from kt_jupyter.widgets.status import StatusView, style_widget
from kt_jupyter.widgets.metrics import MetricsView
from kt_jupyter.widgets.logs import LogView

def fake_panel(status, metrics, logs):
    return W.VBox([style_widget(), StatusView(status), MetricsView(metrics), LogView(logs)],
                  layout=W.Layout(border="1px solid #ddd", padding="6px 12px 8px 12px", max_width="900px",
                                  margin="0 0 8px 0"))

pulling = StatusModel(name="train", backend="kubernetes")
for e in ("applying Deployment, Service, Secret for 'me-train' in namespace 'ml'", "scheduled on node gpu-node-3",
          'pulling image "ghcr.io/acme/train:2.1"'):
    pulling.add_event(e)
pulling.resources = {"cpus": "8", "memory": "32Gi", "gpus": 2, "gpu_type": "H100",
                     "image": "ghcr.io/acme/train:2.1", "namespace": "ml"}

busy = StatusModel(name="train", backend="kubernetes")
busy.apply_info(KernelInfo("train", "kubernetes", "ready", where="pod me-train-7d9f/gpu-node-3",
                           started=time.time() - 754, spec=pulling.resources))
gpus = MetricsModel()
for i in range(40):
    u = 50 + 45 * ((i % 10) / 10)
    sample = {"cpu_percent": 80 + i % 7 * 10, "rss_bytes": (6 + i / 20) * 2**30, "host_memory_total_bytes": 64 * 2**30,
              "running": "r-1", "cells_run": 3, "uptime_s": 754,
              "gpus": [{"index": g, "name": "NVIDIA H100 80GB HBM3", "utilization_percent": u - 10 * g,
                        "memory_used_bytes": (30 + g * 9 + i / 4) * 2**30, "memory_total_bytes": 80 * 2**30,
                        "temperature_c": 60 + g, "power_w": 380 + 5 * g} for g in range(2)]}
    gpus.add_sample(sample)
busy.apply_metrics(sample)
busy_logs = LogModel(compute_name="train")
busy_logs.append_lines([f"epoch 1 step {s} loss {2.5 - s / 100:.3f}" for s in range(0, 400, 50)]
                       + ["2026-01-01 12:00:00,000 WARNING torch: TF32 is disabled"])

failed = StatusModel(name="big", backend="kubernetes")
failed.add_event("applying Deployment, Service, Secret for 'me-big' in namespace 'ml'")
failed.add_event("FailedScheduling: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu")
failed.fail("no node has 8 free GPUs (0/4 nodes are available: 4 Insufficient nvidia.com/gpu); "
            "ask for fewer GPUs or another gpu_type")
failed_logs = LogModel(compute_name="big")
failed_logs.append_lines(["2026-01-01 12:00:00,000 ERROR pod_kernel: network loop failed",
                          "Traceback (most recent call last):", '  File "server.py", line 10, in serve',
                          "OSError: [Errno 98] Address already in use"])
display(fake_panel(pulling, MetricsModel(), LogModel(compute_name="train")), fake_panel(busy, gpus, busy_logs),
        fake_panel(failed, MetricsModel(error="no pod"), failed_logs))
'''


def test_cluster_and_gpu_states_render_cleanly(page: Page, clean_lab, artifacts: Path):
    """Pulling an image, two busy GPUs and a failed launch, drawn from FAKE model data (no cluster or GPU here)."""
    lab = clean_lab
    lab.write_notebook("states.ipynb", [FAKE_STATES_CELL])
    nb = Notebook(page, lab, "states.ipynb")
    nb.run(0)
    out = nb.output(0)
    badges = out.locator(".kt-phase")
    expect(badges).to_have_count(3, timeout=WIDGET_TIMEOUT_MS)
    expect(badges.nth(0)).to_have_text("◌ launching")
    expect(badges.nth(1)).to_have_text("● ready")
    expect(out.locator('[data-kt-field="activity"]')).to_have_text("running a cell")
    expect(badges.nth(2)).to_have_text("● failed")
    expect(out.locator(".kt-metric")).to_have_count(6)  # CPU, memory, 2 x (GPU util, GPU memory)
    expect(out.locator('.kt-metric[data-kt-key="gpu1_mem"] .kt-metric-value')).to_contain_text("of 80 GiB")
    expect(out.locator(".kt-events").first).to_contain_text("pulling image")
    expect(out.locator('[data-kt-level="ERROR"]')).to_have_count(4)
    out.screenshot(path=str(artifacts / "states-cluster-gpu-failed.png"))
