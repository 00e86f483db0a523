"""%%kt and %kt driven through IPython's InteractiveShell; pod kernels are real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from barriers import WAIT_FOR_GO, wait_for_file
from ipshell import run
from IPython.core.error import UsageError

from kt_jupyter import connection as conn_mod
from kt_jupyter.errors import ComputeSpecError, TransferError


def magics(ip):
    return ip.magics_manager.registry["KtMagics"]


def test_cell_runs_in_another_process_and_returns_last_value(ip):
    out = run(ip, "%%kt\nimport os\npid = os.getpid()\npid")
    assert ip.user_ns["pid"] != os.getpid()
    assert psutil.Process(ip.user_ns["pid"]).name().startswith("python")
    assert repr(out) == str(ip.user_ns["pid"])


def test_globals_in_functions_lambdas_closures_classes_and_modules(ip):
    run(ip, "import numpy as np\n"
            "data = [1, 2, 3]\n"
            "scale = 10\n"
            "def times(x): return x * scale\n"
            "class Box:\n    def __init__(self, v): self.v = v\n"
            "def make_adder(n):\n    return lambda x: x + n\n"
            "add5 = make_adder(5)\n"
            "sq = lambda x: x * x\n")
    run(ip, "%%kt\n"
            "result = [add5(times(sq(x))) for x in data]\n"
            "box = Box(np.asarray(result).sum())\n"
            "mod = np.__name__\n")
    assert ip.user_ns["result"] == [15, 45, 95]
    assert ip.user_ns["box"].v == 155
    assert ip.user_ns["mod"] == "numpy"
    outcome = magics(ip).last_outcome
    assert set(outcome.pushed) >= {"add5", "times", "sq", "data", "Box", "np"}


def test_unchanged_values_are_not_sent_again(ip):
    ip.user_ns["big"] = np.ones(8 * 2**20 // 8)
    run(ip, "%%kt\ns = float(big.sum())")
    first = magics(ip).last_outcome
    assert "big" in first.pushed and first.bytes_pushed >= 8 * 2**20
    run(ip, "%%kt\ns = float(big.sum())")
    second = magics(ip).last_outcome
    assert "big" in second.skipped_unchanged and second.bytes_pushed == 0
    ip.user_ns["big"][0] = 5  # changed locally: sent again
    run(ip, "%%kt\ns = float(big.sum())")
    assert "big" in magics(ip).last_outcome.pushed and ip.user_ns["s"] == 8 * 2**20 // 8 + 4
    run(ip, "%%kt --push big\ns = float(big.sum())")  # forced
    assert "big" in magics(ip).last_outcome.pushed


def test_unpicklable_global_is_clear_error_and_nothing_runs(ip):
    ip.user_ns["lock"] = threading.Lock()
    run(ip, "%%kt\nran = 0")
    with pytest.raises(TransferError) as info:
        run(ip, "%%kt\nran = 1\nprint(lock)")
    assert "`lock`" in str(info.value) and "_thread.lock" in str(info.value) and "nothing ran" in str(info.value)
    assert run(ip, "%%kt\nran").data == {"text/plain": "0"}


def test_assignment_forms_come_back(ip):
    run(ip, "%%kt\n"
            "a = 1\n"
            "b, (c, *d) = 2, (3, 4, 5)\n"
            "a += 10\n"
            "for i in range(3): pass\n"
            "import json as js\n"
            "from math import pi\n"
            "def fn(): return 'fn'\n"
            "class K: pass\n"
            "if (w := 7): pass\n"
            "with open(__file__) if False else __import__('contextlib').nullcontext(9) as ctx: pass\n")
    ns = ip.user_ns
    assert (ns["a"], ns["b"], ns["c"], ns["d"], ns["i"], ns["w"], ns["ctx"]) == (11, 2, 3, [4, 5], 2, 7, 9)
    assert ns["js"].__name__ == "json" and abs(ns["pi"] - 3.14159) < 1e-5
    assert ns["fn"]() == "fn" and ns["K"].__name__ == "K"


def test_del_removes_locally_and_remotely(ip):
    ip.user_ns["gone"] = 1
    run(ip, "%%kt\nkeep = gone\ndel gone")
    assert "gone" not in ip.user_ns and ip.user_ns["keep"] == 1


def test_big_values_stay_remote_as_remoteref_and_pull_fetches(ip):
    run(ip, "%%kt --pull-limit 1MB\nimport numpy as np\nhuge = np.arange(1_000_000)\nsmall = 3")
    ref = ip.user_ns["huge"]
    assert isinstance(ref, conn_mod.RemoteRef)
    assert "huge" in repr(ref) and "7.6 MiB" in repr(ref) and "'default'" in repr(ref) and "%kt pull huge" in repr(ref)
    assert ip.user_ns["small"] == 3
    # a later cell uses the real remote value, with no transfer
    run(ip, "%%kt\ntotal = int(huge.sum())")
    assert ip.user_ns["total"] == sum(range(1_000_000))
    assert magics(ip).last_outcome.bytes_pushed == 0
    run(ip, "%kt pull huge")
    assert isinstance(ip.user_ns["huge"], np.ndarray) and ip.user_ns["huge"][-1] == 999_999


def test_pull_and_no_pull_options(ip):
    run(ip, "%%kt --pull x\nx = 1\ny = 2")
    assert ip.user_ns["x"] == 1 and "y" not in ip.user_ns
    run(ip, "%%kt --no-pull\nz = 3")
    assert "z" not in ip.user_ns
    assert run(ip, "%%kt\ny + z").data == {"text/plain": "5"}
    with pytest.raises(UsageError, match="contradict"):
        run(ip, "%%kt --pull x --no-pull\nx = 1")


def test_remote_exception_real_type_with_cell_lines(ip, capsys):
    with pytest.raises(ZeroDivisionError) as info:
        run(ip, "%%kt\nx = 1\n\ndef f():\n    return 1 / 0\nf()")
    rendered = "".join(info.value._render_traceback_())
    # lines counted as in the notebook cell, whose line 1 is the %%kt line
    assert "line 6" in rendered and "line 5" in rendered and "return 1 / 0" in rendered
    assert "kt_jupyter" not in rendered  # no frames of our own code


def test_timeout_interrupts_and_state_survives(ip):
    from kt_jupyter.errors import RemoteTimeoutError

    run(ip, "%%kt\nalive = 'yes'")
    t0 = time.perf_counter()
    with pytest.raises(RemoteTimeoutError, match="did not finish within 1 s"):
        run(ip, "%%kt --timeout 1\nimport time\ntime.sleep(30)")
    assert time.perf_counter() - t0 < 10
    assert run(ip, "%%kt\nalive").data == {"text/plain": "'yes'"}


def test_async_cell_and_wait(ip, tmp_path):
    ip.user_ns["go"] = str(tmp_path / "go")
    run(ip, f"%%kt --async\n{WAIT_FOR_GO}late = 42")
    assert "late" not in ip.user_ns  # the notebook was free at once: the cell cannot end before the go file
    (tmp_path / "go").touch()
    run(ip, "%kt wait --timeout 30")
    assert ip.user_ns["late"] == 42


def test_async_cell_sees_a_stable_world_while_a_normal_cell_pushes(ip, tmp_path):
    """Issue 19.1: an --async cell doing ``start = x; <wait>; seen = x`` while a normal ``%%kt y = x`` cell
    with a new x runs gave start=1, seen=2 (the push landed at once, mid-cell). The normal cell waits its
    turn: the async cell sees x=1 twice, then the normal cell sees the new x."""
    started, go = tmp_path / "started", tmp_path / "go"
    ip.user_ns.update(x=1, go=str(go), started=str(started))
    run(ip, f"%%kt --async\nstart = x\nopen(started, 'w').close()\n{WAIT_FOR_GO}seen = x")
    wait_for_file(started)  # x=1 reached the pod and the cell read it
    conn = next(c for c in conn_mod.connections() if c.name == "default")
    probe = conn.handle.session()  # what the pod holds, seen from another session
    probe.connect()

    def release() -> None:  # the go file once the new x landed on the pod, or once the normal cell waits its turn
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline and not conn.waiting
               and probe.pull(["x"])["x"] != 2):
            time.sleep(0.01)
        go.touch()

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    try:
        ip.user_ns["x"] = 2
        run(ip, "%%kt\ny = x")
        run(ip, "%kt wait --timeout 60")
    finally:
        go.touch()
        releaser.join(10)
        probe.close()
    assert (ip.user_ns["start"], ip.user_ns["seen"], ip.user_ns["y"]) == (1, 1, 2)
    assert not releaser.is_alive()


def test_env_and_name_options(ip):
    run(ip, "%%kt --name other --env A=1 --env B=x=y\nimport os\nenv = (os.environ['A'], os.environ['B'])")
    assert ip.user_ns["env"] == ("1", "x=y")
    names = {c.name for c in conn_mod.connections()}
    assert "other" in names


@pytest.mark.parametrize(
    "line, message",
    [
        ("%%kt --bogus", "unrecognized arguments"),
        ("%%kt --env NOEQUALS", "KEY=VALUE"),
        ("%%kt --timeout soon", "--timeout expects seconds"),
        ("%%kt --timeout -1", "must be positive"),
        ("%%kt --pull-limit lots", "--pull-limit"),
        ("%%kt --backend moon", "invalid choice"),
        ("%%kt --gpus 999", "asks for 999 GPU"),
    ],
)
def test_bad_options_are_usage_errors(ip, line, message):
    with pytest.raises(UsageError, match=message):
        run(ip, f"{line}\nx = 1")


def test_help(ip, capsys):
    run(ip, "%%kt --help\npass")
    out = capsys.readouterr().out
    for option in ("--name", "--gpus", "--push", "--pull-limit", "--async", "--timeout"):
        assert option in out
    run(ip, "%kt help")
    out = capsys.readouterr().out
    for sub in ("list", "status", "logs", "down", "restart", "pull", "config", "wait"):
        assert sub in out
    run(ip, "%kt logs --help")
    assert "--tail" in capsys.readouterr().out


def test_line_magic_list_status_logs_restart_down(ip, capsys):
    run(ip, "%%kt\nprint('to the log')\nkept = 1")
    capsys.readouterr()
    run(ip, "%kt list")
    out = capsys.readouterr().out
    assert "default" in out and "ready" in out and "local pid" in out
    run(ip, "%kt status")
    out = capsys.readouterr().out
    assert "(local): ready" in out and "activity:  idle" in out and "local pid" in out and "memory:" in out
    run(ip, "%kt logs --tail 50")
    assert "to the log" in capsys.readouterr().out
    run(ip, "%kt restart")
    assert run(ip, "%%kt\n'kept' in globals()").data == {"text/plain": "False"}
    run(ip, "%kt down default")
    assert "stopped and deleted" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no local compute named 'nothing'"):
        run(ip, "%kt status nothing")
    with pytest.raises(UsageError, match="unknown subcommand"):
        run(ip, "%kt frobnicate")


def test_explicit_options_that_differ_from_the_running_kernel_are_an_error(ip):
    run(ip, "%%kt --name sized --cpus 1\nx = 1")
    with pytest.raises(UsageError, match=r"already running with cpus='1' \(not '2'\).*%kt down sized"):
        run(ip, "%%kt --name sized --cpus 2\nx = 2")
    run(ip, "%%kt --name sized --cpus 1\nx = 3")  # the same options reuse the warm kernel
    assert ip.user_ns["x"] == 3
    run(ip, "%%kt --name sized\nx = 4")  # naming it alone asks for no particular resources
    assert ip.user_ns["x"] == 4


def test_config_sets_default_compute(ip, capsys):
    run(ip, "%kt config name=cfg")
    assert conn_mod.default_compute().name == "cfg"
    run(ip, "%%kt\nwhere = 'cfg'")
    assert {c.name for c in conn_mod.connections()} >= {"cfg"}
    with pytest.raises(UsageError):
        run(ip, "%kt config nonsense")
    run(ip, "%kt config --reset")
    assert conn_mod.default_compute().name == "default"


def test_dead_kernel_is_relaunched_saying_state_was_lost(ip, capsys):
    from kt_jupyter.errors import KernelDiedError

    run(ip, "%%kt\nstate = 1")
    with pytest.raises(KernelDiedError, match="SIGKILL"):
        run(ip, "%%kt\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    capsys.readouterr()
    assert run(ip, "%%kt\n'state' in globals()").data == {"text/plain": "False"}
    assert "variables are lost" in capsys.readouterr().err


def _kt_callbacks(ip) -> list:
    return [cb for cb in ip.events.callbacks["pre_run_cell"]
            if type(getattr(cb, "__self__", None)).__name__ == "KtMagics"]


def _spares() -> list:
    """This process's live spare pod kernels (an exited child not reaped yet, e.g. an earlier test's kernel, is
    none: its command line cannot be read)."""
    spares = []
    for p in psutil.Process().children():
        try:
            if "pod_kernel.spare" in " ".join(p.cmdline()):
                spares.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return spares


def test_reload_registers_once_and_unload_removes_what_load_added(ip):
    assert len(_kt_callbacks(ip)) == 1
    ip.run_line_magic("reload_ext", "kt_jupyter")
    assert len(_kt_callbacks(ip)) == 1  # not one more per reload
    assert getattr(ip.debugger, "kt_post_mortem", False)
    from kt_jupyter.widgets import monitor

    monitor._refresh_after_cells()  # what the first status panel does: the monitors refresh as cells run
    assert monitor._poke in ip.events.callbacks["post_run_cell"]
    from pod_kernel.transforms import CachingTransformerManager

    assert isinstance(ip.input_transformer_manager, CachingTransformerManager) and "should_run_async" in vars(ip)
    ip.run_line_magic("unload_ext", "kt_jupyter")
    try:
        assert not isinstance(ip.input_transformer_manager, CachingTransformerManager)  # IPython's own again
        assert "should_run_async" not in vars(ip)
        assert _kt_callbacks(ip) == []
        assert monitor._poke not in ip.events.callbacks["post_run_cell"] + ip.events.callbacks["pre_run_cell"]
        assert _spares() == []  # the process started ahead for the first cell is gone too
        assert "KtMagics" not in ip.magics_manager.registry
        assert "kt" not in ip.magics_manager.magics["cell"] and "kt" not in ip.magics_manager.magics["line"]
        assert not getattr(ip.debugger, "kt_post_mortem", False)  # IPython's own %debug again
        assert ip.run_cell("%%kt\nx = 1").error_in_exec is not None  # no such magic now
    finally:
        ip.run_line_magic("load_ext", "kt_jupyter")
    assert len(_kt_callbacks(ip)) == 1
    assert run(ip, "%%kt\n21 * 2").data == {"text/plain": "42"}


def test_a_bad_kt_variable_fails_the_cell_that_needs_it_not_the_import(ip, monkeypatch):
    env = dict(os.environ, KT_LAUNCH_TIMEOUT="soon")
    code = ("import kt_jupyter, kt_jupyter.connection as c, kt_jupyter.magics.kt\n"
            "from IPython.testing.globalipapp import get_ipython\n"
            "get_ipython().run_line_magic('load_ext', 'kt_jupyter')\n"
            "assert c._default is None\nprint('loaded')")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    monkeypatch.setenv("KT_LAUNCH_TIMEOUT", "soon")
    monkeypatch.setattr(conn_mod, "_default", None)
    try:
        with pytest.raises(ComputeSpecError, match="KT_LAUNCH_TIMEOUT.*'soon'.*write seconds"):
            run(ip, "%%kt\nx = 1")
    finally:
        monkeypatch.delenv("KT_LAUNCH_TIMEOUT")  # before the fixture's `%kt config --reset` builds a default


def test_the_kt_line_expands_names_as_ipython_expands_a_magics_line(ip, monkeypatch):
    """`{expr}` and `$name` in the %%kt line are expanded as IPython expands any magic's line (the magic does it
    itself, only for a line that has them: IPython copies the whole namespace for every cell)."""
    run(ip, "where = 'exp'\nsuffix = 2")
    run(ip, "%%kt --name {where}-$suffix\nhere = 1")
    assert [c.name for c in conn_mod.connections()] == ["exp-2"]
    # what IPython itself makes of such a line, through a magic that lets it expand
    seen: list[str] = []
    ip.register_magic_function(lambda line, cell: seen.append(line), "cell", "kt_echo")
    line = "--name {where}-$suffix {suffix * 3} $$x"
    run(ip, f"%%kt_echo {line}\npass")
    parsed: list[str] = []
    real = magics(ip)._parse_line
    monkeypatch.setattr(magics(ip), "_parse_line",
                        lambda line: parsed.append(line) or real(f"--name {seen[0].split()[1]}"))
    run(ip, f"%%kt {line}\npass")
    assert parsed == seen == ["--name exp-2 6 $x"]
