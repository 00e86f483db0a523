"""Shared fixtures: an isolated KT_HOME and pod kernels as real local processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from kernels import notebook_kernel_process

ROOT = Path(__file__).resolve().parents[1]
# The suite's notebook kernels (ipykernel, nbval, browser tests) come and go by the dozen: their pod kernels
# stop as soon as they exit, instead of waiting out the restart grace period. Tests of that grace period
# (test_pod_kernel.py, test_reliability.py) set their own value for the processes they start.
os.environ.setdefault("KT_OWNER_GRACE_S", "0")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(autouse=True)
def kt_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own ~/.kt, so registries never collide."""
    home = tmp_path_factory.mktemp("kt_home")
    monkeypatch.setenv("KT_HOME", str(home))
    monkeypatch.setenv("KT_USERNAME", "tester")
    return home


@pytest.fixture
def local_backend(kt_home):
    """A LocalBackend on the test's KT_HOME; deletes whatever the test left running."""
    from kt_jupyter.backends.local import LocalBackend

    backend = LocalBackend()
    yield backend
    for info in backend.list():
        backend.delete(info.name, grace_period_s=1)


@pytest.fixture
def kernel(local_backend):
    """A running pod kernel (real process) and a connected session to it."""
    from kt_jupyter.compute import Compute

    handle = local_backend.launch(Compute(name="t"))
    session = handle.session()
    session.connect()
    yield handle, session
    session.close()


def python_exe() -> str:
    """The interpreter running the tests (pod kernels run on it too)."""
    return sys.executable


def env_without_token() -> dict[str, str]:
    """The environment minus any KT_TOKEN."""
    env = dict(os.environ)
    env.pop("KT_TOKEN", None)
    return env


def pytest_terminal_summary(terminalreporter):
    """Print the reliability figures this run measured (also in test-artifacts/reliability.json)."""
    try:
        from figures import REPORT, summary_lines
    except ImportError:  # tests/ not on sys.path (another import mode): nothing was recorded either
        return

    lines = summary_lines()
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(written to {REPORT})")


def pytest_collection_modifyitems(session, config, items):
    """Run the real-browser tests last: playwright's sync API leaves an event loop in the main thread,
    which breaks later tests that call asyncio.run() (and jupyter_server's fixtures)."""
    items.sort(key=lambda item: "/browser/" in str(item.path).replace("\\", "/"))


def _forget_and_stop_local_computes() -> None:
    from kt_jupyter import connection as conn_mod
    from kt_jupyter.backends import get_backend

    for conn in conn_mod.connections():
        conn_mod.disconnect(conn.name)
    backend = get_backend("local")
    for info in backend.list():
        backend.delete(info.name, grace_period_s=1)


@pytest.fixture
def cleanup_connections(kt_home):
    """Forget this process's connections and stop every local compute afterwards."""
    yield
    _forget_and_stop_local_computes()


@pytest.fixture(scope="module")
def notebook_kernel(tmp_path_factory):
    """One real notebook kernel with kt loaded (:func:`notebook_kernel_process`), shared by a module's tests."""
    with notebook_kernel_process(tmp_path_factory.mktemp("kt_home_nb")) as pair:
        yield pair


@pytest.fixture
def ip(kt_home):
    """IPython's test shell with kt loaded and the default compute reset; every compute it started
    is stopped afterwards and the namespace restored."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "kt_jupyter")
    shell.run_line_magic("kt", "config --reset")
    saved = dict(shell.user_ns)
    yield shell
    shell.run_line_magic("kt", "config --reset")
    shell.run_line_magic("kt", "down --all")
    _forget_and_stop_local_computes()
    shell.user_ns.clear()
    shell.user_ns.update(saved)
