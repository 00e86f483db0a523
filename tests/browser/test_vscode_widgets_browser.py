"""The widgets under VS Code's own ipywidgets 8 widget manager, in headless chromium, on a live kernel.

VS Code itself cannot run here, but the widget manager its Jupyter extension renders ipywidgets with is
published on npm: ``@vscode/jupyter-ipywidgets8`` (``dist/ipywidgets.js``). ``vscode_host/`` is a page that
loads that bundle and drives it the way VS Code's notebook webview does
(microsoft/vscode-jupyter src/webviews/webview-side/ipywidgets/kernel/{index,manager}.ts).

VS Code's real code in this test:
  - the widget manager: the published ``dist/ipywidgets.js`` of @vscode/jupyter-ipywidgets8 1.0.9, served
    byte for byte, loaded as VS Code loads it (an ES module: ``activate()``, then ``vscIPyWidgets8.load()``,
    then ``new vscIPyWidgets.WidgetManager(kernel, el, scriptLoader, logger)``), with @jupyter-widgets/controls'
    labvariables.css, which VS Code's webview-side manager imports;
  - the kernel client class: @jupyterlab/services' ``KernelConnection`` (7.6.6, matching JupyterLab 4.6),
    the class VS Code hands the manager;
  - the render sequence, transcribed from VS Code's manager.ts and index.ts: each iopub display_data or
    execute_result with ``application/vnd.jupyter.widget-view+json`` primes the model (``get_model``), then the
    output is rendered into VS Code's ``cell-output-ipywidget-background`` node by ``get_model`` →
    ``create_view(model, {el})`` → ``display_view(data, view, {node})``.
What differs from VS Code:
  - the transport: in VS Code the manager's KernelConnection talks through a postMessage proxy socket to
    the extension host's connection. Here it has a real WebSocket to the jupyter server's kernel, and cells
    are sent (``requestExecute``) on a second connection standing in for the extension host; both receive
    the kernel's iopub stream, as in VS Code;
  - no VS Code shell: no notebook editor, no renderer CSS, no ``--vscode-*`` theme variables (VS Code maps
    the ``--jp-*`` variables onto its theme; here they keep labvariables.css' light values), and stream or
    text outputs are plain ``<pre>`` elements of the host page;
  - RequireJS is npm's requirejs 2.3.6; VS Code ships its own, lightly patched copy of the same version;
  - not reproduced, as these widgets do not need them: VS Code's script loader for third-party widget modules
    (any request for one is recorded and fails the test), its mime renderers for outputs nested in an Output
    widget, and its keyboard-accessibility pass over rendered widgets;
  - the test grants Chromium's "local-network-access" permission to the page (served by ``route.fulfill``, it
    would otherwise be refused WebSockets to 127.0.0.1).

The host is built on first use (``jlpm install --immutable``, then esbuild) into vscode_host/.build/<hash of
its sources and lockfile>, so later runs skip it; a failed build fails the test with the build's output.
The page is served from the jupyter server's origin (``page.route``) and authenticates with its token.
Screenshots go to test-artifacts/browser/vscode-*.png.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="browser tests need playwright (pip install playwright pytest-playwright)")

from playwright.sync_api import Error as PlaywrightError  # noqa: E402
from playwright.sync_api import Locator, Page, Route, expect  # noqa: E402
from test_widgets_browser import (  # noqa: E402
    KERNEL_TIMEOUT_MS, WIDGET_TIMEOUT_MS, expect_picker_form, expect_settled_status_panel)

HOST_DIR = Path(__file__).resolve().parent / "vscode_host"
BUILD_ROOT = HOST_DIR / ".build"
HOST_SOURCES = ("package.json", "yarn.lock", "host.ts", "host.html")
#: How the host is built; part of the cache key, so changing it rebuilds.
ESBUILD_ARGS = ["host.ts", "--bundle", "--format=esm", "--platform=browser", "--target=es2020",
                "--log-level=warning"]
#: Files copied unchanged into the build: VS Code's widget manager bundle and RequireJS.
COPIED = {"ipywidgets.js": "node_modules/@vscode/jupyter-ipywidgets8/dist/ipywidgets.js",
          "require.js": "node_modules/requirejs/require.js",
          "host.html": "host.html"}
#: The pins of package.json, checked in the installed tree.
PINNED = {"@vscode/jupyter-ipywidgets8": "1.0.9", "@jupyterlab/services": "7.6.6", "requirejs": "2.3.6"}
#: jlpm is yarn 3: install into node_modules (not Plug'n'Play), no telemetry or progress bars.
YARN_ENV = {"YARN_NODE_LINKER": "node-modules", "YARN_ENABLE_TELEMETRY": "0", "YARN_ENABLE_GLOBAL_CACHE": "1",
            "YARN_ENABLE_PROGRESS_BARS": "0", "YARN_ENABLE_COLORS": "0"}
BUILD_TIMEOUT_S = 600
HOST_ROUTE = "/kt-vscode-host/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json"}


def _build_key() -> str:
    digest = hashlib.sha256(json.dumps([ESBUILD_ARGS, COPIED, PINNED, YARN_ENV]).encode())
    for name in HOST_SOURCES:
        digest.update(name.encode() + b"\0" + (HOST_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _jlpm() -> str | None:
    """JupyterLab's yarn (``jlpm``): next to this Python (a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / ("jlpm.exe" if os.name == "nt" else "jlpm")
    return str(here) if here.exists() else shutil.which("jlpm")


@contextlib.contextmanager
def _build_lock():
    """One builder at a time (parallel pytest processes share node_modules)."""
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / ".lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; builds still land atomically
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_step(log: list[str], cmd: list[str], env: dict[str, str] | None = None) -> None:
    log.append(f"$ {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=HOST_DIR, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.append(str(exc))
        pytest.fail("building the VS Code widget host failed:\n" + "\n".join(log), pytrace=False)
    log.append((proc.stdout + proc.stderr).strip()[-6000:])
    if proc.returncode != 0:
        pytest.fail(f"building the VS Code widget host failed (exit {proc.returncode}):\n" + "\n".join(log),
                    pytrace=False)


def build_host() -> Path:
    """The built host page (cached by the hash of its sources); fails the test with the build's output."""
    key = _build_key()
    out = BUILD_ROOT / key
    if (out / "build.json").exists():
        return out
    with _build_lock():
        if (out / "build.json").exists():
            return out
        started = time.monotonic()
        log: list[str] = []
        jlpm = _jlpm()
        if jlpm is None:
            pytest.fail("building the VS Code widget host needs jlpm (pip install jupyterlab) and node", pytrace=False)
        _run_step(log, [jlpm, "install", "--immutable"], env={**os.environ, **YARN_ENV})
        installed = {}
        for pkg, version in PINNED.items():
            manifest = HOST_DIR / "node_modules" / pkg / "package.json"
            installed[pkg] = json.loads(manifest.read_text())["version"] if manifest.exists() else None
            if installed[pkg] != version:
                log.append(f"{pkg}: installed {installed[pkg]}, pinned {version}")
                pytest.fail("building the VS Code widget host failed:\n" + "\n".join(log), pytrace=False)
        tmp = BUILD_ROOT / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            esbuild = HOST_DIR / "node_modules" / ".bin" / ("esbuild.cmd" if os.name == "nt" else "esbuild")
            _run_step(log, [str(esbuild), *ESBUILD_ARGS, f"--outdir={tmp}"])
            for name, src in COPIED.items():
                shutil.copyfile(HOST_DIR / src, tmp / name)
            (tmp / "build.json").write_text(json.dumps({"key": key, "installed": installed,
                                                        "seconds": round(time.monotonic() - started, 1)}))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in BUILD_ROOT.iterdir():  # earlier builds of other sources
            if old.is_dir() and old.name != key:
                shutil.rmtree(old, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def vscode_host() -> Path:
    """The host page's build dir (built once per source hash)."""
    return build_host()


class VSCodeHost:
    """The host page on the server's origin: cells run on a live kernel, widgets drawn by VS Code's manager."""

    def __init__(self, page: Page, server, build: Path) -> None:
        self.page = page
        self.build = build
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        #: "STATUS METHOD URL" of every answer of 400 or more (a console error names no URL)
        self.failed_responses: list[str] = []
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("console", lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None)
        page.on("response", lambda resp: self.failed_responses.append(
            f"{resp.status} {resp.request.method} {resp.url.split('?')[0]}") if resp.status >= 400 else None)
        page.route(f"{server.url}{HOST_ROUTE}**", self._serve)
        # Chromium's Local Network Access checks block a page that did not come from the network (route.fulfill)
        # from opening WebSockets to 127.0.0.1; a person would be asked to allow it: grant it for this origin
        # (a Playwright or Chromium without these checks has no such permission: nothing to grant then)
        with contextlib.suppress(PlaywrightError):
            page.context.grant_permissions(["local-network-access"], origin=server.url)
        # VS Code's extension host starts the kernel and the webview connects to it: the test starts it
        kernel = server.api("POST", "/api/kernels", {"name": "python3"})
        page.goto(f"{server.url}{HOST_ROUTE}host.html?token={server.token}&kernel={kernel['id']}")
        try:
            expect(page.locator("body")).not_to_have_attribute("data-state", "starting", timeout=KERNEL_TIMEOUT_MS)
        except AssertionError as exc:
            raise AssertionError(f"host did not start: {exc}\nconsole errors: {self.console_errors[-10:]}\n"
                                 f"page errors: {self.page_errors}") from None
        state = self.state()
        assert state["state"] == "ready", f"host failed to start: {state['error']}\npage errors: {self.page_errors}"

    def _serve(self, route: Route) -> None:
        rel = urllib.parse.urlparse(route.request.url).path[len(HOST_ROUTE):]
        path = (self.build / rel).resolve()
        if self.build.resolve() not in path.parents or not path.is_file():
            route.fulfill(status=404, body=f"{rel} not found")
            return
        route.fulfill(status=200, body=path.read_bytes(), headers={"Cache-Control": "no-store"},
                      content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

    def state(self) -> dict:
        """What the page recorded: start state, the manager's load errors and script requests, render errors."""
        return self.page.evaluate("""() => { const h = window.ktHost; return {
            state: h.state, error: h.error, widgetLoadErrors: h.widgetLoadErrors, widgetLoads: h.widgetLoads,
            widgetScriptRequests: h.widgetScriptRequests, renderErrors: h.renderErrors, rendered: h.rendered,
            log: h.log.slice(-40) }; }""")

    def run(self, code: str) -> Locator:
        """Send ``code`` to the kernel (``requestExecute``) and wait for its reply; the cell's element."""
        index = self.page.evaluate("code => window.ktHost.run(code)", code)
        cell = self.page.locator(f'.cell[data-cell="{index}"]')
        expect(cell).not_to_have_attribute("data-status", "running", timeout=KERNEL_TIMEOUT_MS)
        assert cell.get_attribute("data-status") == "ok", f"cell {index} failed:\n{cell.inner_text()}"
        return cell


def test_status_panel_and_picker_under_vscode_widget_manager(page: Page, vscode_host: Path, clean_lab,
                                                             artifacts: Path):
    server = clean_lab
    host = VSCodeHost(page, server, vscode_host)
    host.run("%load_ext kt_jupyter")

    # a %%kt cell on the default compute prints its line
    cell = host.run("%%kt\nimport os\nprint('hello from vs code, pid', os.getpid())")
    expect(cell.locator(".outputs .output-stdout")).to_have_text(re.compile(r"^hello from vs code, pid \d+\s*$"),
                                                                 timeout=WIDGET_TIMEOUT_MS)

    # %kt status: the live panel, drawn by VS Code's manager into VS Code's widget output node
    cell = host.run("%kt status")
    panel = cell.locator(".cell-output-ipywidget-background .kt-panel")
    # includes updates pushed later from kt_jupyter's threads (cell count, log lines) reaching the rendered views
    expect_settled_status_panel(panel, "hello from vs code, pid")

    # %kt pick: the picker form, with the default compute current and its fields
    cell = host.run("%kt pick")
    picker = cell.locator(".cell-output-ipywidget-background .kt-picker")
    expect_picker_form(picker)

    # a round trip through VS Code's manager: typing syncs to the kernel, whose answer redraws the line
    picker.locator(".kt-pick-name input").fill("vsc")
    expect(picker.locator(".kt-line")).to_have_text("%%kt --name vsc", timeout=WIDGET_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-launch")).to_be_enabled()
    picker.locator(".kt-pick-launch").click()
    expect(picker.locator(".kt-pick-message")).to_contain_text("'vsc' is ready", timeout=KERNEL_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-current")).to_have_text("vsc (local)")
    row = picker.locator(".kt-pick-row", has_text="vsc")
    expect(row).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    expect(row.locator(".kt-phase")).to_have_attribute("data-kt-phase", "ready")
    expect(row).to_contain_text("local pid")
    expect(picker.locator(".kt-progress-text")).to_contain_text("ready in", timeout=WIDGET_TIMEOUT_MS)
    picker.screenshot(path=str(artifacts / "vscode-picker.png"))

    row.locator(".kt-pick-stop").click()
    expect(picker.locator(".kt-pick-row", has_text="vsc")).to_have_count(0, timeout=KERNEL_TIMEOUT_MS)
    expect(picker.locator(".kt-pick-message")).to_contain_text("'vsc' (local) stopped", timeout=WIDGET_TIMEOUT_MS)
    # by now the monitor has sampled again: the sparklines are lines (a later push reached the same views)
    expect(panel.locator(".kt-metric svg polyline").first).to_be_attached(timeout=WIDGET_TIMEOUT_MS)
    panel.screenshot(path=str(artifacts / "vscode-status.png"))
    page.screenshot(path=str(artifacts / "vscode-page.png"), full_page=True)

    # the views came from VS Code's manager (its loadClass found the controls through RequireJS), without errors
    state = host.state()
    assert host.page_errors == [], f"uncaught page errors: {host.page_errors}"
    assert host.console_errors == [], (f"errors logged in the page: {host.console_errors}\n"
                                       f"answers of 400 or more: {host.failed_responses}")
    assert state["widgetLoadErrors"] == [], f"VS Code's manager could not load widget classes: {state}"
    assert state["renderErrors"] == [], f"render sequence failed: {state}"
    assert state["widgetScriptRequests"] == [], f"manager asked for third-party widget scripts: {state}"
    assert any(load.startswith("@jupyter-widgets/controls@") and load.endswith(":VBoxModel")
               for load in state["widgetLoads"]), state
    assert state["rendered"] >= 2, state
