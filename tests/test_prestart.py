"""A local pod kernel started ahead (local_spare.py): a launch takes it, it serves as the kernel asked for, and no
spare ever outlives the notebook process that keeps it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import psutil

from kt_jupyter.backends import get_backend
from kt_jupyter.backends.local import LocalBackend
from kt_jupyter.compute import Compute

ROOT = Path(__file__).resolve().parents[1]


def test_a_launch_takes_the_spare_which_serves_as_the_compute_asked(kt_home, cleanup_connections, tmp_path):
    backend = LocalBackend()
    backend.prestart()
    try:
        spare = backend._spares.ready_pid()
        assert spare is not None
        handle = backend.launch(Compute(name="pre-one", env_vars={"KT_PRE_VAR": "seen"}, working_dir=str(tmp_path)))
        assert handle.pid == spare  # the process started ahead became this kernel
        session = handle.session()
        try:
            result = session.execute("import os, sys; (os.environ['KT_PRE_VAR'], os.getcwd(), os.getcwd() in sys.path, "
                                     "sys.modules['__main__'].__name__)")
        finally:
            session.close()
        assert ast.literal_eval(result.data["text/plain"]) == ("seen", str(tmp_path), True, "__main__")
        assert "KT_TOKEN" not in result.data["text/plain"]
        nxt = backend._spares.ready_pid()  # the next one was started at once
        assert nxt is not None and nxt != spare
        # a setting Python reads at startup cannot be taken on: a fresh process, the spare kept
        other = backend.launch(Compute(name="pre-two", env_vars={"PYTHONHASHSEED": "7"}))
        assert other.pid != nxt and backend._spares.ready_pid() == nxt
    finally:
        backend.stop_prestart()
        for name in ("pre-one", "pre-two"):
            backend.delete(name, grace_period_s=1)
    assert not psutil.pid_exists(nxt) or psutil.Process(nxt).status() == psutil.STATUS_ZOMBIE


def test_the_spare_goes_when_the_notebook_process_exits(kt_home):
    code = ("from kt_jupyter.backends import get_backend; b = get_backend('local'); b.prestart();"
            "print(b._spares.ready_pid(), flush=True)")
    notebook = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                              cwd=ROOT, env=dict(os.environ, KT_HOME=str(kt_home)))
    assert notebook.returncode == 0, notebook.stderr
    spare = psutil.Process(int(notebook.stdout.split()[-1]))  # its stdin closed with the notebook: it exits
    _gone, alive = psutil.wait_procs([spare], timeout=30)
    assert not alive
    assert get_backend("local").list() == []  # it never registered anything
