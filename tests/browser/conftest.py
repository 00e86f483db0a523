"""Real-browser fixtures: JupyterLab on 127.0.0.1 with a temp root and KT_HOME, headless Debian chromium.

Needs ``apt-get install chromium`` and ``pip install playwright pytest-playwright
jupyterlab`` (no ``playwright install``: we drive the system chromium).
Without them every browser test is skipped, saying which part is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("KT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
#: How long JupyterLab may take to answer /api/status.
SERVER_START_TIMEOUT_S = 60.0

# Lab settings that keep popups out of screenshots and render every cell (no windowing).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/themes.jupyterlab-settings": {"theme": "JupyterLab Light"},
}


def missing_parts() -> list[str]:
    """What the browser tests need and this machine lacks."""
    missing = []
    if CHROMIUM is None or not os.path.exists(CHROMIUM):
        missing.append(f"chromium (apt-get install -y chromium{'' if CHROMIUM is None else '; not at ' + CHROMIUM})")
    for module, pkg in (("playwright", "playwright"), ("pytest_playwright", "pytest-playwright"),
                        ("jupyterlab", "jupyterlab")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{pkg} (pip install {pkg})")
    return missing


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    """Skip the browser tests, with the reason, when a part is missing."""
    missing = missing_parts()
    if not missing:
        return
    skip = pytest.mark.skip(reason="browser tests need " + ", ".join(missing))
    for item in items:
        if "tests/browser" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """The system chromium, headless, with the flags that work on these machines."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    """A laptop-sized viewport for readable screenshots."""
    return {**browser_context_args, "viewport": {"width": 1280, "height": 1000}, "device_scale_factor": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A running ``jupyter lab`` process (or ``app``: ``notebook`` for Notebook 7): its URL, token, root dir and KT_HOME."""

    def __init__(self, base: Path, app: str = "jupyterlab") -> None:
        self.app = app
        self.root = base / "root"
        self.kt_home = base / "kt_home"
        self.settings = base / "settings"
        for d in (self.root, self.kt_home, self.settings, base / "runtime", base / "workspaces"):
            d.mkdir(parents=True, exist_ok=True)
        for rel, values in LAB_SETTINGS.items():
            path = self.settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KT_HOME=str(self.kt_home), KT_USERNAME="browser",
                   JUPYTERLAB_SETTINGS_DIR=str(self.settings), JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
                   JUPYTER_RUNTIME_DIR=str(base / "runtime"), PYTHONUNBUFFERED="1")
        env.pop("KT_WIDGETS", None)
        self.log_path = base / "jupyter.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", app, "--allow-root", "--no-browser", f"--port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--ServerApp.port_retries=0"],
            cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.app} exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)  # polling a server that is starting: no event to wait on
        raise RuntimeError(f"{self.app} not ready in {SERVER_START_TIMEOUT_S} s: {self.log_path.read_text()[-2000:]}")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the server's REST API."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def write_notebook(self, name: str, cells: list[str]) -> str:
        """A notebook of code cells in the root dir; returns its name."""
        nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
                         "outputs": [], "source": src} for i, src in enumerate(cells)],
              "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                          "name": "python3"}},
              "nbformat": 4, "nbformat_minor": 5}
        (self.root / name).write_text(json.dumps(nb))
        return name

    def shutdown_sessions(self) -> None:
        """Stop every kernel (its pod kernels exit with it)."""
        for session in self.api("GET", "/api/sessions") or []:
            try:
                self.api("DELETE", f"/api/sessions/{session['id']}")
            except urllib.error.URLError:
                pass

    @property
    def backend(self) -> Any:
        """The local backend on this server's KT_HOME: its notebooks' pod kernels."""
        from kt_jupyter.backends.local import LocalBackend

        return LocalBackend(root=self.kt_home / "local")

    def reset(self) -> None:
        """No notebook kernels (with a session or without) and no pod kernels left."""
        self.shutdown_sessions()
        for kernel in self.api("GET", "/api/kernels") or []:
            with contextlib.suppress(urllib.error.URLError):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        backend = self.backend
        for info in backend.list():
            backend.delete(info.name, grace_period_s=1)

    def stop(self) -> None:
        """Stop the server and everything it started."""
        try:
            self.shutdown_sessions()
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> LabServer:
    """JupyterLab for the whole browser session."""
    if missing_parts():
        pytest.skip("browser tests need " + ", ".join(missing_parts()))
    server = LabServer(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def notebook7(tmp_path_factory) -> LabServer:
    """Notebook 7 (``jupyter notebook``) for the whole browser session, set up like ``lab``."""
    if missing_parts():
        pytest.skip("browser tests need " + ", ".join(missing_parts()))
    pytest.importorskip("notebook", minversion="7", reason="Notebook 7 tests need notebook>=7 (pip install notebook)")
    server = LabServer(tmp_path_factory.mktemp("notebook7"), app="notebook")
    yield server
    server.stop()


@pytest.fixture
def clean_lab(lab: LabServer):
    """The lab server with no kernels or pod kernels left from other tests, and none after this one."""
    lab.reset()
    yield lab
    lab.reset()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (test-artifacts/browser, gitignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
