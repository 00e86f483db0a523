"""The widgets in a real Notebook 7 (``jupyter notebook``) under headless chromium: status panel and picker.

Notebook 7 runs on the same jupyter_server and JupyterLab components as JupyterLab, but with its own
single-document shell (/notebooks/NAME.ipynb, a toolbar kernel indicator, no status bar). Every wait is on
a selector or text with a deadline; screenshots go to test-artifacts/browser/notebook7-*.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="browser tests need playwright (pip install playwright pytest-playwright)")
pytest.importorskip("notebook", minversion="7", reason="Notebook 7 tests need notebook>=7 (pip install notebook)")

from playwright.sync_api import Page, expect  # noqa: E402
from test_widgets_browser import (  # noqa: E402
    KERNEL_TIMEOUT_MS, Notebook, expect_picker_form, expect_settled_status_panel)


class Notebook7(Notebook):
    """One notebook open in Notebook 7; cells and outputs are the same JupyterLab widgets as in ``Notebook``."""

    def __init__(self, page: Page, server, name: str) -> None:
        self.page = page
        self.lab = server
        page.goto(f"{server.url}/notebooks/{name}?token={server.token}")
        self.panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        expect(self.panel.locator(".jp-Cell").first).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
        # Notebook 7 has no status bar: the toolbar's execution indicator says when the kernel is idle
        expect(page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first).to_be_attached(
            timeout=KERNEL_TIMEOUT_MS)


@pytest.fixture
def clean_notebook7(notebook7):
    """The Notebook 7 server with no kernels left from other tests, and no pod kernels after this one."""
    notebook7.reset()
    yield notebook7
    notebook7.reset()


def test_status_panel_and_picker_render_in_notebook7(page: Page, clean_notebook7, artifacts: Path):
    server = clean_notebook7
    server.write_notebook("nb7.ipynb", [
        "%load_ext kt_jupyter",
        "%%kt\nimport os\nprint('hello from notebook 7, pid', os.getpid())",
        "%kt status",
        "%kt pick",
    ])
    nb = Notebook7(page, server, "nb7.ipynb")
    expect(page).to_have_url(re.compile(r"/notebooks/nb7\.ipynb"))
    nb.run(0)

    # a %%kt cell on the default compute prints its line
    nb.run(1)
    expect(nb.output(1)).to_contain_text(re.compile(r"hello from notebook 7, pid \d+"), timeout=KERNEL_TIMEOUT_MS)

    # %kt status: the live panel, with phase pill, compute name and memory
    nb.run(2)
    panel = nb.output(2).locator(".kt-panel")
    expect_settled_status_panel(panel, "hello from notebook 7, pid")
    panel.screenshot(path=str(artifacts / "notebook7-status.png"))

    # %kt pick: the picker form, with the default compute current and its fields
    nb.run(3)
    picker = nb.output(3).locator(".kt-picker")
    expect_picker_form(picker)
    picker.screenshot(path=str(artifacts / "notebook7-picker.png"))
    page.screenshot(path=str(artifacts / "notebook7-page.png"), full_page=True)
