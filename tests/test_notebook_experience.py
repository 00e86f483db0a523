"""Issue 20: what a notebook user sees, from the first command to the last panel (InteractiveShell, real pod kernels)."""

from __future__ import annotations

import re
import threading
import time

import psutil
import pytest
from IPython.core.error import UsageError

from ipshell import run
from kt_jupyter.backends import get_backend
from kt_jupyter.compute import Compute
from kt_jupyter.render import colour_traceback, drop_internal_frames, notice_level

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def wait_until(predicate, timeout_s: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until true or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---------------------------------------------------------------------- 2. help that works as written


def test_help_describes_the_cell_magic_with_grouped_options_and_plain_usage_lines(ip, capsys):
    run(ip, "%kt help")
    out = capsys.readouterr().out
    assert out.startswith("usage: %%kt [options]")
    assert "usage: %kt SUBCOMMAND" in out
    assert "::" not in out and "[-h]" not in out and "Examples" not in out and "%%kt list" not in out
    order = [out.index(f"\n{group}:\n") for group in ("compute", "transfer", "execution", "debugging")]
    assert order == sorted(order)
    # each option under its meaning, not every late one filed under "transfer"
    assert order[1] < out.index("--pull-limit") < order[2] < out.index("--timeout") < out.index("--retry-oom") \
        < order[3] < out.index("--debug")
    run(ip, "%kt --help")
    assert capsys.readouterr().out == out
    run(ip, "%kt help logs")
    sub = capsys.readouterr().out
    assert sub.startswith("usage: %kt logs [--tail N] [--follow] [name]") and "--follow" in sub


# ---------------------------------------------------------------------- 3. tracebacks like IPython's


def test_a_cell_that_does_not_parse_fails_like_a_local_one_and_starts_nothing(ip):
    result = ip.run_cell("%%kt\nx = 1\ny = (\n")
    err = result.error_in_exec
    from kt_jupyter.errors import CellSyntaxError

    # named as a local cell's error is (the notebook's ename), rendered without our frames
    assert isinstance(err, CellSyntaxError) and type(err).__name__ == "SyntaxError"
    shown = ANSI.sub("", "\n".join(err._render_traceback_()))
    assert re.search(r"Cell In\[\d+\], line 3", shown) and "SyntaxError" in shown and "y = (" in shown
    assert "kt.py" not in shown and "cells.py" not in shown and "Traceback" not in shown
    assert get_backend("local").find("default") is None  # nothing was launched for it


def test_remote_traceback_keeps_the_users_frames_coloured_like_local_ones(ip):
    result = ip.run_cell("%%kt\ndef f():\n    return 1 / 0\nf()\n")
    shown = "\n".join(result.error_in_exec._render_traceback_())
    plain = ANSI.sub("", shown)
    assert re.search(r"Cell In\[\d+\], line 4", plain) and "ZeroDivisionError: division by zero" in plain
    assert "pod_kernel" not in plain and "kt_jupyter" not in plain
    assert shown == plain  # the test shell is colourless: so is the traceback
    linux = colour_traceback(plain.split("\n"), "linux")
    assert ANSI.sub("", "\n".join(linux)) == plain and linux != plain.split("\n")
    assert any("\x1b[" in line and "ZeroDivisionError" in line for line in linux)


def test_internal_frames_are_dropped_from_a_remote_traceback():
    remote = ["-" * 75, "KeyboardInterrupt                         Traceback (most recent call last)",
              "Cell In[5], line 3", "      2 import time", "----> 3 time.sleep(60)", "",
              "File /srv/app/pod_kernel/executor.py:270, in Executor._on_sigint(self, signum, frame)",
              "    268 def _on_sigint(self, signum, frame):", "--> 270     raise KeyboardInterrupt", "",
              "KeyboardInterrupt: "]
    kept = drop_internal_frames(remote)
    assert "Cell In[5], line 3" in kept and kept[-1] == "KeyboardInterrupt: "
    assert not any("executor.py" in line or "_on_sigint" in line for line in kept)


# ---------------------------------------------------------------------- 4. good news is not an error


@pytest.mark.parametrize(("text", "level"), [
    ("reattached to pod kernel 'default' (pid 7), left running by a notebook kernel that exited: "
     "its variables are still there", "info"),
    ("starting pod kernel 'default' (local subprocess)", "info"),
    ("pod kernel 'default' ready in 0.4 s (pid 7)", "info"),
    ("pod kernel 'x' (pid 7) was killed; its variables are lost.", "warning"),
    ("compute 'x' is already running with cpus='1' (not '2'); `%kt restart x` applies the new settings", "warning"),
])
def test_notice_levels(text, level):
    assert notice_level(text) == level


# ---------------------------------------------------------------------- 5. where did this cell run?


def test_a_cell_on_another_compute_or_on_a_silently_replaced_kernel_says_so(ip, capsys):
    run(ip, "%%kt --name here\na = 1")
    capsys.readouterr()
    run(ip, "%%kt --name here\nb = 2")
    assert "this cell runs" not in capsys.readouterr().err  # same compute, same kernel: nothing to say
    run(ip, "%%kt --name there\nc = 3")
    err = capsys.readouterr().err
    assert "this cell runs on 'there' (local); the previous %%kt cell ran on 'here' (local)" in err
    # another process replaces 'there' behind this notebook's back: the next cell says the variables are gone
    backend = get_backend("local")
    backend.delete("there", grace_period_s=1)
    backend.launch(Compute(name="there"))
    run(ip, "%%kt --name there\nd = 4")
    err = capsys.readouterr().err
    assert "variables are lost" in err or "variables earlier cells left there are gone" in err


# ---------------------------------------------------------------------- 6. one truth: idle time


def test_status_polls_and_new_connections_do_not_reset_idle_time(local_backend):
    """A sidebar or panel polling metrics on fresh connections must not keep an idle kernel alive."""
    handle = local_backend.launch(Compute(name="idle", inactivity_ttl=2))
    proc = psutil.Process(handle.pid)
    t0 = time.monotonic()
    while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() - t0 < 20:
        session = handle.session()  # a new connection each time, as a poll without a kept session does
        try:
            session.metrics()
        except Exception:  # the kernel stopped between the check and the request
            break
        finally:
            session.close_quietly()
        time.sleep(0.2)  # the poll interval of this fake sidebar, not a wait for a condition
    proc.wait(timeout=10)
    assert time.monotonic() - t0 < 12  # stopped after its TTL despite the polls
    assert "inactive for" in local_backend.logs("idle")


def test_one_phase_word_in_list_status_and_the_panel_which_is_right_after_a_cell_and_after_down(ip, capsys):
    """`%kt list`, `%kt status` and a panel say the same words; a panel is right as soon as a cell or a
    `%kt down` ends (IPython's cell events poke it: its own polling here is slower than the test)."""
    from kt_jupyter.widgets.monitor import monitor_for, stop_all

    run(ip, "%%kt --name truth\nx = 1")
    capsys.readouterr()
    run(ip, "%kt list")
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("truth "))
    run(ip, "%kt status truth")
    head = capsys.readouterr().out.splitlines()[0]
    mon = monitor_for("truth", "local")
    mon.fast_s = mon.slow_s = 60.0  # only the cell events can make it refresh within the deadlines below
    mon.refresh()
    try:
        mon.acquire()
        assert row[2] == mon.status.phase == "ready" and head == "compute 'truth' (local): ready"
        assert mon.status.activity.startswith("idle ") and mon.status.cells_run == 1
        run(ip, "%%kt --name truth\ny = 2")
        wait_until(lambda: mon.status.cells_run == 2, 5, "the panel to count the cell that just ended")
        assert mon.status.activity.startswith("idle ")
        run(ip, "%kt down truth")
        wait_until(lambda: mon.status.phase == "stopped", 5, "the panel to show the compute stopped")
        assert mon.status.detail == "deleted" and mon.wait_stopped(5)
    finally:
        stop_all()


# ---------------------------------------------------------------------- 8. quiet logs


def test_cell_output_is_marked_in_the_kernel_log_and_hidden_in_the_panel_but_crash_lines_show(ip, capsys):
    """Every line a cell printed starts with the marker, also around other writers (a server event, the other
    stream, a write straight to the descriptor); those stay unmarked, and the panel's log shows only them."""
    from kt_jupyter.widgets.log_model import LogModel
    from pod_kernel.logfile import CELL_MARKER

    run(ip, "%%kt --name quiet\n"
            "import logging, os, sys\n"
            "print('partial', end='', flush=True)\n"
            "logging.getLogger('pod_kernel.test').warning('a server event')\n"
            "print(' rest', flush=True)\n"
            "print('open', end='', flush=True)\n"
            "sys.stderr.write('other stream\\n'); sys.stderr.flush()\n"
            "os.write(2, b'written straight to fd 2\\n')\n"
            "print('two\\nlines', flush=True)")
    log = get_backend("local").logs("quiet", tail=None).splitlines()
    start = next(i for i, line in enumerate(log) if line.endswith("partial"))
    event = next(line for line in log if line.endswith("WARNING pod_kernel.test: a server event"))
    assert log[start:start + 8] == [f"{CELL_MARKER}partial", event, f"{CELL_MARKER} rest", f"{CELL_MARKER}open",
                                    f"{CELL_MARKER}other stream", "written straight to fd 2", f"{CELL_MARKER}two",
                                    f"{CELL_MARKER}lines"]
    panel_log = LogModel(compute_name="quiet")
    panel_log.append_lines(log)
    shown = [text for _level, text, _cell in panel_log.visible]
    assert event in shown and "written straight to fd 2" in shown
    assert not [line for line in shown if "partial" in line or "rest" in line or "lines" == line]
    run(ip, "%kt logs quiet --tail 3")
    assert capsys.readouterr().out.splitlines()[-1] == f"{CELL_MARKER}lines"  # `%kt logs` shows it all


# ---------------------------------------------------------------------- 7. subcommands that do what they say


def test_logs_follow_works_on_the_local_backend(ip, capsys):
    run(ip, "%%kt --name tail\nx = 1")
    capsys.readouterr()
    seen: list[str] = []
    done = threading.Event()

    def follow():
        try:
            ip.run_line_magic("kt", "logs tail --follow")
        finally:
            done.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.3)  # let the follower open the log at its end before the cell prints
    run(ip, "%%kt --name tail\nprint('followed-marker')")
    wait_until(lambda: seen.append(capsys.readouterr().out) or "followed-marker" in "".join(seen),
               what="the cell's output in %kt logs --follow")
    get_backend("local").delete("tail", grace_period_s=1)
    assert done.wait(15), "--follow did not end when the kernel stopped"


def test_logs_says_the_real_number_of_lines(ip, capsys):
    run(ip, "%%kt --name few\nx = 1")
    capsys.readouterr()
    run(ip, "%kt logs few")
    out, err = capsys.readouterr()
    assert len(out.splitlines()) < 100 and "last 100 lines" not in err  # the whole (short) log: no false claim
    run(ip, "%kt logs few --tail 2")
    out, err = capsys.readouterr()
    assert "[kt] last 2 lines" in err


def test_pull_after_down_says_the_compute_is_gone_and_starts_nothing(ip):
    run(ip, "%%kt --name gone\nv = 1")
    run(ip, "%kt down gone")
    with pytest.raises(UsageError, match="'gone' is not running"):
        run(ip, "%kt pull v --name gone")
    assert get_backend("local").find("gone") is None


# ---------------------------------------------------------------------- 9. shared computes are visible


def test_status_says_who_is_attached_and_per_notebook_default(ip, capsys, monkeypatch):
    run(ip, "%%kt\nx = 1")
    capsys.readouterr()
    run(ip, "%kt status")
    assert "attached:  this kernel" in capsys.readouterr().out
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/My Analysis.ipynb")
    run(ip, "%kt config --per-notebook")
    assert "name='nb-my-analysis'" in capsys.readouterr().out
    run(ip, "%%kt\ny = 2")
    assert get_backend("local").find("nb-my-analysis") is not None


def test_first_kt_list_without_a_cluster_does_not_import_the_kubernetes_client(tmp_path):
    """With no kubeconfig and no in-cluster service, `%kt list` answers without the 2-3 s client import."""
    import subprocess
    import sys

    code = ("import sys\nfrom IPython.testing.globalipapp import start_ipython\nip = start_ipython()\n"
            "ip.run_line_magic('load_ext', 'kt_jupyter')\nip.run_line_magic('kt', 'list')\n"
            "print('KUBERNETES_IMPORTED' if 'kubernetes' in sys.modules else 'KUBERNETES_NOT_IMPORTED')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update(HOME=str(tmp_path), KT_HOME=str(tmp_path / ".kt"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "KUBERNETES_NOT_IMPORTED" in out.stdout, out.stdout + out.stderr
    assert "no computes running" in out.stdout  # the listing itself worked
