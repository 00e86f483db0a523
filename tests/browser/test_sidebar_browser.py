"""The computes sidebar in a real JupyterLab under headless chromium.

A ``%%kt`` cell run from the notebook UI launches a compute; the sidebar
lists it live (status badge, resources, idle time), shows its log, launches
another from the "New compute" form, reports a bad spec, and stops both.
Every wait is on a selector or text with a deadline; screenshots go to
test-artifacts/browser/sidebar-*.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="browser tests need playwright (pip install playwright pytest-playwright)")

from playwright.sync_api import Locator, Page, expect  # noqa: E402

#: Deadline for anything a kernel does (start, launch a pod kernel, run a cell).
KERNEL_TIMEOUT_MS = 60_000
#: Deadline for the sidebar to show a change (it polls every 3 s).
SIDEBAR_TIMEOUT_MS = 20_000


def run_cell(page: Page, panel: Locator, index: int) -> None:
    """Run a cell like a person (click it, Shift+Enter) and wait for its execution count."""
    cell = panel.locator(".jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for attempt in range(2):  # the first key press can land before the editor has focus
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text(re.compile(r"^\[ \]:$"), timeout=5_000)
            break
        except AssertionError:
            if attempt:
                raise
    expect(prompt).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)


def open_sidebar(page: Page) -> Locator:
    """Click the computes tab in the left sidebar (the layout restorer ignores activateById at start)."""
    tab = page.locator('.jp-SideBar.jp-mod-left [data-id="kt-computes"]')
    sidebar = page.locator("#kt-computes")
    expect(tab).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
    if not sidebar.is_visible():  # clicking the tab of an open panel would close it
        tab.click()
    expect(sidebar).to_be_visible()
    expect(tab).to_have_class(re.compile(r"\blm-mod-current\b"))
    return sidebar


def test_sidebar_lists_a_kt_cell_compute_shows_logs_launches_and_stops(page: Page, clean_lab, artifacts: Path):
    lab, backend = clean_lab, clean_lab.backend
    go = lab.root / "go-sidebar"
    go.unlink(missing_ok=True)
    name = lab.write_notebook("sidebar.ipynb", [
        "%load_ext kt_jupyter",
        "%%kt --name nb-compute --memory 1Gi\nimport os\nprint('hello from pod', os.getpid())",
        "%kt list",
        "%%kt --name nb-compute --memory 1Gi\nimport os, time\n"
        f"while not os.path.exists({str(go)!r}):  # until the test has seen the sidebar say so\n"
        "    time.sleep(0.05)",
    ])
    page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    expect(panel.locator(".jp-Cell").first).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
    expect(page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\|\s*Idle"))).to_be_visible(
        timeout=KERNEL_TIMEOUT_MS)

    # the sidebar is open before the compute exists: it must appear there by itself (live refresh)
    sidebar = open_sidebar(page)
    expect(sidebar.locator(".kt-ComputesPanel-empty")).to_contain_text("No computes yet", timeout=SIDEBAR_TIMEOUT_MS)
    run_cell(page, panel, 0)
    run_cell(page, panel, 1)
    expect(panel.locator(".jp-Cell").nth(1).locator(".jp-OutputArea")).to_contain_text("hello from pod")
    pod_pid = backend.find("nb-compute").pid

    item = sidebar.locator('.kt-Compute[data-name="nb-compute"]')
    expect(item).to_be_visible(timeout=SIDEBAR_TIMEOUT_MS)
    expect(item.locator(".kt-Badge")).to_have_text("ready")
    expect(item.locator(".kt-Compute-resources")).to_have_text("local · 1Gi")
    expect(item).to_contain_text(re.compile(r"idle \d+s · age \d+s"), timeout=SIDEBAR_TIMEOUT_MS)
    expect(item).to_contain_text(re.compile(r"CPU \d+% · RAM \d"))
    page.screenshot(path=str(artifacts / "sidebar-listed.png"))

    # one truth: `%kt list` in the notebook says the sidebar's phase word; a running cell reads the same
    # "running a cell" as in the status panel
    run_cell(page, panel, 2)
    listing = panel.locator(".jp-Cell").nth(2).locator(".jp-OutputArea")
    expect(listing).to_contain_text("nb-compute")
    row = next(line for line in listing.inner_text().splitlines() if line.startswith("nb-compute "))
    assert row.split()[2] == item.locator(".kt-Badge").inner_text() == "ready", row
    prompt = panel.locator(".jp-Cell").nth(3).locator(".jp-InputPrompt")
    panel.locator(".jp-Cell").nth(3).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    activity = item.locator(".kt-Compute-activity")
    expect(activity).to_have_text("running a cell", timeout=SIDEBAR_TIMEOUT_MS)
    expect(activity).to_have_class(re.compile(r"\bkt-mod-running\b"))
    expect(item.locator(".kt-Badge")).to_have_text("ready")
    page.screenshot(path=str(artifacts / "sidebar-running-a-cell.png"))
    go.touch()
    expect(prompt).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=KERNEL_TIMEOUT_MS)
    expect(activity).to_have_text(re.compile(r"^idle \d+s$"), timeout=SIDEBAR_TIMEOUT_MS)

    # logs: a main-area view with the tail, which holds the cell's output
    item.get_by_role("button", name="Show the log of nb-compute").click()
    logs = page.locator(".kt-LogsView")
    expect(logs).to_contain_text("hello from pod", timeout=SIDEBAR_TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "sidebar-logs.png"))

    # the picker: a bad spec is refused with the server's message, a good one launches
    sidebar.get_by_role("button", name="New compute").click()
    form = page.locator(".jp-Dialog .kt-NewComputeForm")
    expect(form).to_be_visible()
    form.locator('input[name="name"]').fill("from-sidebar")
    form.locator('input[name="memory"]').fill("lots")
    page.locator(".jp-Dialog").get_by_role("button", name="Launch").click()
    error = page.locator(".jp-Dialog", has_text="Cannot launch from-sidebar")
    expect(error).to_be_visible(timeout=SIDEBAR_TIMEOUT_MS)
    expect(error).to_contain_text("memory")
    page.screenshot(path=str(artifacts / "sidebar-bad-spec.png"))
    error.get_by_role("button", name="Close").click()
    expect(page.locator(".jp-Dialog")).to_have_count(0)

    sidebar.get_by_role("button", name="New compute").click()
    expect(form).to_be_visible()
    form.locator('input[name="name"]').fill("from-sidebar")
    form.locator('input[name="cpus"]').fill("1")
    form.locator('input[name="memory"]').fill("512Mi")
    page.screenshot(path=str(artifacts / "sidebar-new-compute-form.png"))
    page.locator(".jp-Dialog").get_by_role("button", name="Launch").click()
    launched = sidebar.locator('.kt-Compute[data-name="from-sidebar"]')
    expect(launched.locator(".kt-Badge")).to_have_text("ready", timeout=KERNEL_TIMEOUT_MS)
    expect(launched.locator(".kt-Compute-resources")).to_have_text("local · 1 CPU · 512Mi")
    expect(launched).to_contain_text(re.compile(r"idle \d+s"), timeout=SIDEBAR_TIMEOUT_MS)
    page.screenshot(path=str(artifacts / "sidebar-two-computes.png"))

    # stop the notebook's compute from the sidebar: confirm, then it is gone from the list and the machine
    item.get_by_role("button", name="Stop nb-compute").click()
    confirm = page.locator(".jp-Dialog", has_text="Stop nb-compute?")
    expect(confirm).to_be_visible()
    page.screenshot(path=str(artifacts / "sidebar-confirm-stop.png"))
    confirm.get_by_role("button", name="Stop").click()
    expect(item).to_have_count(0, timeout=SIDEBAR_TIMEOUT_MS)
    assert backend.find("nb-compute") is None
    assert not _alive(pod_pid)
    expect(launched).to_be_visible()
    page.screenshot(path=str(artifacts / "sidebar-stopped.png"))

    launched.get_by_role("button", name="Stop from-sidebar").click()
    page.locator(".jp-Dialog").get_by_role("button", name="Stop").click()
    expect(sidebar.locator(".kt-ComputesPanel-empty")).to_be_visible(timeout=SIDEBAR_TIMEOUT_MS)
    sidebar.screenshot(path=str(artifacts / "sidebar-empty.png"))


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
