"""%%kt through a real ipykernel (jupyter_client): the iopub messages a notebook would get."""

from __future__ import annotations

import queue
import re
import threading
import time

import pytest
from barriers import WAIT_FOR_GO


@pytest.fixture(scope="module")
def kc(notebook_kernel):
    """The module's real notebook kernel with kt loaded (tests/conftest.py): (manager, client)."""
    return notebook_kernel


def run_cell(client, code: str, timeout: float = 60, stdin_replies: list[str] | None = None):
    """Execute; return (reply content, list of iopub messages for it)."""
    msgs = []
    reply = client.execute_interactive(code, timeout=timeout, output_hook=msgs.append,
                                       allow_stdin=stdin_replies is not None)
    return reply["content"], [m for m in msgs if m["msg_type"] != "status"]


def outputs(msgs, kind):
    return [m["content"] for m in msgs if m["msg_type"] == kind]


def test_stream_display_result_and_namespace(kc):
    _, client = kc
    reply, msgs = run_cell(
        client,
        "%%kt\nimport os\nfrom IPython.display import HTML, display\n"
        "print('hello from', os.getpid())\ndisplay(HTML('<i>rich</i>'))\nanswer = 6 * 7\nanswer",
    )
    assert reply["status"] == "ok"
    streams = "".join(c["text"] for c in outputs(msgs, "stream") if c["name"] == "stdout")
    remote_pid = int(streams.split("hello from")[1].split()[0])
    _, kmsgs = run_cell(client, "import os; os.getpid()")
    kernel_pid = int(outputs(kmsgs, "execute_result")[0]["data"]["text/plain"])
    assert remote_pid != kernel_pid  # the cell ran in another process
    htmls = [c["data"].get("text/html") for c in outputs(msgs, "display_data")]
    assert "<i>rich</i>" in htmls  # (the launch panel widget is displayed too, in this first cell)
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "42"
    _, msgs = run_cell(client, "answer + 1")
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "43"


def test_remote_error_is_an_error_reply_with_real_type(kc):
    _, client = kc
    reply, msgs = run_cell(client, "%%kt\nx = 1\nraise ValueError('bad value')")
    assert reply["status"] == "error" and reply["ename"] == "ValueError"
    err = outputs(msgs, "error")[0]
    tb = "\n".join(err["traceback"])
    assert "bad value" in tb and "line 3" in tb
    assert "kt_jupyter" not in tb


def test_matplotlib_figure_arrives_as_png(kc):
    pytest.importorskip("matplotlib")
    _, client = kc
    reply, msgs = run_cell(client, "%%kt\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert reply["status"] == "ok", reply
    pngs = [c for c in outputs(msgs, "display_data") if "image/png" in c["data"]]
    assert pngs, msgs


def test_pandas_table_arrives_as_html(kc):
    pytest.importorskip("pandas")
    _, client = kc
    _, msgs = run_cell(client, "%%kt\nimport pandas as pd\npd.DataFrame({'a': [1, 2]})")
    assert "<table" in outputs(msgs, "execute_result")[0]["data"]["text/html"]


def test_interrupt_kernel_interrupts_remote_cell_and_state_survives(kc):
    km, client = kc
    run_cell(client, "%%kt\nsurvivor = 'alive'")
    started = threading.Event()
    result = {}

    errors = []

    def hook(msg):
        if msg["msg_type"] == "stream" and "start" in msg["content"]["text"]:
            started.set()
        if msg["msg_type"] == "error":
            errors.append("\n".join(msg["content"]["traceback"]))

    def execute():
        result["reply"] = client.execute_interactive(
            "%%kt\nimport time\nprint('start', flush=True)\ntime.sleep(60)", timeout=60, output_hook=hook
        )["content"]

    t = threading.Thread(target=execute)
    t0 = time.perf_counter()
    t.start()
    assert started.wait(30), "the remote cell never started"
    km.interrupt_kernel()  # the notebook's "interrupt kernel" button
    t.join(timeout=30)
    assert not t.is_alive()
    assert time.perf_counter() - t0 < 20
    assert result["reply"]["status"] == "error" and result["reply"]["ename"] == "KeyboardInterrupt"
    shown = re.sub(r"\x1b\[[0-9;]*m", "", errors[0]) if errors else ""
    assert "time.sleep(60)" in shown and "\x1b[" in errors[0]  # the user's line, coloured like a local one
    assert "_on_sigint" not in shown and "pod_kernel" not in shown  # not the pod's signal handler
    _, msgs = run_cell(client, "%%kt\nsurvivor")
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "'alive'"


def _next_iopub(client, matches, what: str, timeout_s: float = 60):
    """The first iopub message that ``matches`` within the deadline (others are dropped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if matches(msg):
            return msg
        assert not (msg["msg_type"] == "stream" and "late line" in msg["content"]["text"]), f"late line before {what}"
    raise AssertionError(f"no {what} within {timeout_s} s")


def test_async_cell_output_lands_in_its_own_cell(kc, tmp_path):
    _, client = kc
    go = tmp_path / "go"  # the remote cell prints only once the test saw the notebook free
    msg_id = client.execute(f"%%kt --async\ngo = {str(go)!r}\n{WAIT_FOR_GO}print('late line')\nlate = 1")
    try:
        _next_iopub(client, lambda m: m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle", "the notebook free (idle) after starting it")
    finally:
        go.touch()
    late = _next_iopub(client, lambda m: m["msg_type"] == "stream" and "late line" in m["content"]["text"]
                       and m["parent_header"].get("msg_id") == msg_id, "the late line in its own cell")
    assert late["parent_header"]["msg_id"] == msg_id
    reply, _ = run_cell(client, "%kt wait --timeout 30")
    assert reply["status"] == "ok"
    _, msgs = run_cell(client, "late")
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "1"


def test_notebook_sees_good_news_muted_warnings_on_stderr_and_coloured_short_syntax_errors(kc):
    """Issue 20: info notices are a muted display (not red stderr); a cell that does not parse fails as a
    local one does: 'Cell In[N], line L', coloured in the kernel's theme, no frames of kt_jupyter."""
    _, client = kc
    code = ("from kt_jupyter.render import show_notice\n"
            "show_notice(\"reattached to pod kernel 'default' (pid 1): its variables are still there\")\n"
            "show_notice(\"pod kernel 'x' died; its variables are lost\")")
    reply, msgs = run_cell(client, code)
    assert reply["status"] == "ok"
    stderr = "".join(c["text"] for c in outputs(msgs, "stream") if c["name"] == "stderr")
    assert "still there" not in stderr and "variables are lost" in stderr
    muted = [c["data"] for c in outputs(msgs, "display_data") if "kt-notice" in c["data"].get("text/html", "")]
    assert len(muted) == 1 and "still there" in muted[0]["text/plain"]
    reply, msgs = run_cell(client, "%%kt\nx = 1\ny = (\n")
    assert reply["status"] == "error"
    tb = "\n".join(outputs(msgs, "error")[0]["traceback"])
    assert "\x1b[" in tb  # coloured, as ipykernel colours a local traceback
    plain = re.sub(r"\x1b\[[0-9;]*m", "", tb)
    assert re.search(r"Cell In\[\d+\], line 3", plain) and "SyntaxError" in plain
    assert "kt_jupyter" not in plain and "Traceback" not in plain


def test_unload_gives_ipykernel_its_debugger_back_and_reload_restores_ours(kc):
    _, client = kc
    debugger_class = "type(get_ipython().kernel.debugger).__name__"
    _, msgs = run_cell(client, debugger_class)
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "'KtDebugger'"
    reply, _ = run_cell(client, "%unload_ext kt_jupyter")
    assert reply["status"] == "ok"
    try:
        _, msgs = run_cell(client, debugger_class)
        assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "'Debugger'"
        reply, _ = run_cell(client, "%%kt\n1")
        assert reply["status"] == "error"  # no %%kt now
    finally:
        reply, _ = run_cell(client, "%load_ext kt_jupyter")
    assert reply["status"] == "ok"
    reply, _ = run_cell(client, "%reload_ext kt_jupyter")
    assert reply["status"] == "ok"
    _, msgs = run_cell(client, f"{debugger_class}, len([c for c in get_ipython().events.callbacks['pre_run_cell'] "
                               "if type(getattr(c, '__self__', None)).__name__ == 'KtMagics'])")
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "('KtDebugger', 1)"
    _, msgs = run_cell(client, "%%kt\n6 * 7")
    assert outputs(msgs, "execute_result")[0]["data"]["text/plain"] == "42"
