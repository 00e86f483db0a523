"""Debugging remote cells: pdb through a real ipykernel's input box, and an IDE attached over DAP.

The pdb relay is driven through a real IPython kernel (jupyter_client,
``allow_stdin``) whose ``input_request`` messages a scripted ``stdin_hook``
answers, as a notebook user would type. The debugpy tests attach a small DAP
client of our own (``tests/dap.py``) to ``%%kt --debug`` cells. All on the
local backend, 127.0.0.1 only; every wait is on a message with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from dap import DapClient
from kt_jupyter.debugging import NO_STDIN_INPUT, NO_STDIN_PDB
from pod_kernel.debugging import QUIT_MESSAGE

CELL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def kc(notebook_kernel):
    """The module's real notebook kernel with kt loaded (tests/conftest.py): (manager, its blocking client)."""
    return notebook_kernel


class Typist:
    """Answers the kernel's input requests with scripted lines, recording each prompt."""

    def __init__(self, client, replies: list[str], on_prompt=None) -> None:
        self.client = client
        self.replies = list(replies)
        self.prompts: list[str] = []
        self.passwords: list[bool] = []
        self.overrun = False
        self.on_prompt = on_prompt

    def __call__(self, msg) -> None:
        self.prompts.append(msg["content"]["prompt"])
        self.passwords.append(bool(msg["content"].get("password")))
        if self.on_prompt is not None and self.on_prompt(self, msg):
            return
        if not self.replies:
            self.overrun = True
            self.client.input("c" if "(Pdb)" in msg["content"]["prompt"] else "")
            return
        self.client.input(self.replies.pop(0))


def _run(client, code: str, typist: Typist | None = None, allow_stdin: bool | None = None):
    """Execute; return (reply content, iopub messages of it except status)."""
    msgs: list = []
    kwargs = {}
    if typist is not None:
        kwargs["stdin_hook"] = typist
    reply = client.execute_interactive(
        code, timeout=CELL_TIMEOUT_S, output_hook=msgs.append,
        allow_stdin=typist is not None if allow_stdin is None else allow_stdin, **kwargs)
    return reply["content"], [m for m in msgs if m["msg_type"] != "status"]


def _text(msgs, name: str | None = None) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name))


def _value(client, expr: str) -> str:
    _, msgs = _run(client, expr)
    return [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"][0]


# --------------------------------------------------------------------------- pdb through the notebook


def test_pdb_commands_against_remote_frames(kc):
    _, client = kc
    typist = Typist(client, ["p x", "n", "n", "s", "n", "p v", "w", "l", "c"])
    reply, msgs = _run(client, "%%kt\n"
                               "x = 41\n"                 # line 2
                               "breakpoint()\n"           # 3
                               "y = x + 1\n"              # 4  <- first stop
                               "def helper(v):\n"         # 5
                               "    w = v * 2\n"          # 6
                               "    return w\n"           # 7
                               "z = helper(y)\n"          # 8
                               "print('done', z)\n", typist)
    assert reply["status"] == "ok", reply
    assert not typist.overrun and typist.replies == []
    assert all("(Pdb)" in p for p in typist.prompts) and len(typist.prompts) == 9
    out = _text(msgs, "stdout")
    stops = re.findall(r"> (\S+)\((\d+)\)(\S+)\(\)", out)
    cell_file = stops[0][0]
    assert os.path.basename(cell_file).startswith("kt-cell-") and os.path.exists(cell_file)
    # first stop at the line after breakpoint(); `n` walks the cell's lines, `s` enters helper
    assert [(int(line), fn) for _f, line, fn in stops[:4]] == [
        (4, "<module>"), (5, "<module>"), (8, "<module>"), (5, "helper")]
    assert "\n41\n" in out and "\n42\n" in out  # p x; p v
    assert "--Call--" in out
    where = out.split("\n42\n", 1)[1].split("->\t", 1)[0]  # what `w` printed
    assert "helper()" in where and "<module>()" in where
    assert "interactiveshell.py" not in where and "pod_kernel" not in where  # only the user's frames
    assert "    w = v * 2" in out and "->\t" in out  # `l` lists the cell's source around the arrow
    assert "done 84" in out
    assert _value(client, "z") == "84"  # the cell finished normally and its names came back


def test_several_breakpoints_and_a_breakpoint_in_a_loop(kc):
    _, client = kc
    typist = Typist(client, ["p i", "c", "p i", "c", "p i", "c", "p total", "c"])
    reply, msgs = _run(client, "%%kt\n"
                               "total = 0\n"
                               "for i in range(3):\n"
                               "    total += i\n"
                               "    breakpoint()\n"
                               "print('loop done', total)\n"
                               "breakpoint()\n"
                               "after = total * 10\n", typist)
    assert reply["status"] == "ok", reply
    assert len(typist.prompts) == 8 and not typist.overrun
    out = _text(msgs, "stdout")
    printed = [ln for ln in out.splitlines() if re.fullmatch(r"\d+", ln)]
    assert printed == ["0", "1", "2", "3"]
    assert out.index("loop done 3") < out.rindex("\n3\n")
    assert _value(client, "after") == "30"


def test_deep_breakpoint_in_nested_code_defined_in_the_notebook(kc):
    _, client = kc
    _run(client, "import kt_jupyter as kt\n"
                 "def nested():\n"
                 "    for k in range(10):\n"
                 "        if k == 5:\n"
                 "            kt.deep_breakpoint()\n"
                 "    return k\n")
    typist = Typist(client, ["p k", "w", "c"])
    reply, msgs = _run(client, "%%kt\nr = nested()\n", typist)
    assert reply["status"] == "ok", reply
    out = _text(msgs, "stdout")
    assert "\n5\n" in out and "nested()" in out
    assert _value(client, "r") == "9"


def test_input_and_getpass_are_answered_in_the_notebook(kc):
    _, client = kc
    typist = Typist(client, ["Ada", "s3cret"])
    reply, msgs = _run(client, "%%kt\nimport getpass\nname = input('who? ')\nsecret = getpass.getpass('pw: ')\n"
                               "print('hello', name, len(secret))\n", typist)
    assert reply["status"] == "ok", reply
    assert typist.prompts == ["who? ", "pw: "] and typist.passwords == [False, True]
    assert "hello Ada 6" in _text(msgs, "stdout")
    assert _value(client, "name") == "'Ada'"


def test_quit_ends_the_cell_cleanly_and_the_kernel_survives(kc):
    _, client = kc
    _run(client, "%%kt\nsurvivor = 'alive'")
    pod_pid = _value(client, "%%kt\nimport os\nos.getpid()")
    reply, msgs = _run(client, "%%kt\nbreakpoint()\nnever = 1\n", Typist(client, ["q"]))
    assert reply["status"] == "error" and reply["ename"] == "BdbQuit"
    # one short line, no traceback through pdb (IPython itself shows nothing for a BdbQuit)
    assert not [m for m in msgs if m["msg_type"] == "error"]
    assert _text(msgs, "stderr").strip() == QUIT_MESSAGE
    assert _value(client, "%%kt\nimport os\nos.getpid()") == pod_pid  # same pod kernel
    assert _value(client, "%%kt\n(survivor, 'never' in dir())") == "('alive', False)"


def test_interrupt_at_the_pdb_prompt_ends_the_cell(kc):
    km, client = kc

    def interrupt(typist, msg) -> bool:
        km.interrupt_kernel()  # the notebook's "interrupt kernel" while the input box waits
        return True

    t0 = time.monotonic()
    reply, msgs = _run(client, "%%kt\nbreakpoint()\nnever2 = 1\n", Typist(client, [], on_prompt=interrupt))
    assert reply["status"] == "error" and reply["ename"] == "BdbQuit", reply  # pdb quit, cell stopped
    assert time.monotonic() - t0 < CELL_TIMEOUT_S
    assert _value(client, "%%kt\n'never2' in dir()") == "False"
    assert _value(client, "%%kt\n1 + 1") == "2"


def test_frontend_without_stdin_says_so_and_continues(kc):
    _, client = kc
    reply, msgs = _run(client, "%%kt\n"
                               "breakpoint()\n"
                               "print('continued')\n"
                               "breakpoint()\n"
                               "try:\n"
                               "    input('name? ')\n"
                               "except EOFError:\n"
                               "    print('got EOF')\n", allow_stdin=False)
    assert reply["status"] == "ok", reply
    err = _text(msgs, "stderr")
    assert err.count(NO_STDIN_PDB) == 1 and err.count(NO_STDIN_INPUT) == 1  # said once each, clearly
    out = _text(msgs, "stdout")
    assert "continued" in out and "got EOF" in out


def test_session_without_an_input_callback_continues_pdb_and_gives_eof(kernel):
    _, session = kernel
    seen = []
    session.execute("breakpoint()\nx = 1\ntry:\n    input('?')\nexcept EOFError:\n    print('eof')\n",
                    seen.append)
    assert "eof" in "".join(m.get("text", "") for m in seen if m["type"] == "stream")


# --------------------------------------------------------------------------- %debug, %pdb on: post-mortem


def _plain_error(msgs) -> str:
    return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", line)
                     for m in msgs if m["msg_type"] == "error" for line in m["content"]["traceback"])


def test_remote_traceback_cites_the_cells_own_in_number_as_a_local_one_does(kc):
    _, client = kc
    local, local_msgs = _run(client, "x = 1\n1/0")
    remote, remote_msgs = _run(client, "%%kt\nx = 1\n1/0")
    cited = [re.findall(r"Cell In\[(\d+)\], line (\d+)", _plain_error(m)) for m in (local_msgs, remote_msgs)]
    assert cited == [[(str(local["execution_count"]), "2")], [(str(remote["execution_count"]), "3")]]


def test_debug_after_a_failed_cell_opens_pdb_on_the_remote_frames(kc):
    _, client = kc
    reply, _ = _run(client, "%%kt\n"
                            "def inner(v):\n"                  # 2
                            "    doubled = v * 2\n"            # 3
                            "    raise ValueError(doubled)\n"  # 4
                            "outer_var = 7\n"                  # 5
                            "inner(outer_var)\n")              # 6
    assert reply["status"] == "error" and reply["ename"] == "ValueError"
    typist = Typist(client, ["p doubled", "w", "up", "p outer_var", "q"])
    reply, msgs = _run(client, "%debug", typist)
    assert reply["status"] == "ok", reply
    assert not typist.overrun and typist.replies == [] and all("(Pdb)" in p for p in typist.prompts)
    out = _text(msgs, "stdout")
    stops = re.findall(r"> (\S+)\((\d+)\)(\S+)\(\)", out)
    assert os.path.basename(stops[0][0]).startswith("kt-cell-")
    assert (int(stops[0][1]), stops[0][2]) == (4, "inner")  # the frame that raised, on the pod
    assert (int(stops[-1][1]), stops[-1][2]) == (6, "<module>")  # `up`: the cell itself
    assert "\n14\n" in out and "\n7\n" in out  # p doubled; p outer_var
    where = out.split("\n14\n", 1)[1]
    assert "interactiveshell.py" not in where and "executor.py" not in where  # only the user's frames
    assert _value(client, "outer_var") == "7"  # the failed cell's names came back; %debug changed nothing


def test_pdb_on_debugs_a_failing_kt_cell_at_once(kc):
    _, client = kc
    _run(client, "%pdb on")
    try:
        typist = Typist(client, ["p a", "q"])
        reply, msgs = _run(client, "%%kt\na = 'remote'\nb = a + 1\n", typist)
    finally:
        _run(client, "%pdb off")
    assert reply["status"] == "error" and reply["ename"] == "TypeError"
    assert len(typist.prompts) == 2 and not typist.overrun
    out = _text(msgs, "stdout")
    assert re.search(r"kt-cell-\d+\.py\(3\)<module>\(\)", out) and "'remote'" in out
    kinds = [m["msg_type"] for m in msgs]
    assert kinds.index("error") < max(i for i, k in enumerate(kinds) if k == "stream")  # traceback first
    # the compute is gone: %debug says so in one line (the next test starts a new pod kernel)
    _run(client, "%kt down --all")
    reply, msgs = _run(client, "%debug")
    assert reply["status"] == "ok" and _text(msgs, "stderr").startswith("[kt] compute 'default' is no longer")


# --------------------------------------------------------------------------- an IDE over DAP (debugpy)


def _iopub_until(client, msg_id: str, pattern: str, timeout_s: float = CELL_TIMEOUT_S) -> tuple[re.Match, str]:
    """Read the cell's iopub stream text until ``pattern`` matches it; return the match and the text."""
    text = ""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in the cell's output within {timeout_s} s:\n{text}"
        msg = client.get_iopub_msg(timeout=left)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            text += msg["content"]["text"]
            found = re.search(pattern, text, re.S)
            if found:
                return found, text


def _shell_reply(client, msg_id: str, timeout_s: float = CELL_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no execute_reply in time"
        msg = client.get_shell_msg(timeout=left)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg["content"]


def _attach_info(text: str) -> tuple[str, int, str, dict]:
    host, port = re.search(r"attach to ([\d.]+):(\d+)", text).groups()
    cell_file = re.search(r"this cell runs from (\S+?\.py)", text).group(1)
    config = json.loads(text.split("launch.json configuration:\n", 1)[1].split("\n}\n", 1)[0] + "\n}")
    return host, int(port), cell_file, config


def test_ide_attaches_to_debug_wait_cell_hits_breakpoint_steps_and_continues(kc):
    _, client = kc
    msg_id = client.execute("%%kt --debug wait --name dbg\n"
                            "x = 41\n"                 # line 2
                            "y = x + 1\n"              # 3  <- breakpoint
                            "def g(v):\n"              # 4
                            "    w = v * 2\n"          # 5  <- breakpoint
                            "    return w\n"           # 6
                            "z = g(y)\n"               # 7
                            "print('z is', z)\n")
    _, text = _iopub_until(client, msg_id, r"waiting for a debugger to attach.*\n")
    host, port, cell_file, config = _attach_info(text)
    assert host == "127.0.0.1" and os.path.exists(cell_file)  # written before the pod waits
    assert config["request"] == "attach" and config["connect"] == {"host": host, "port": port}
    assert config["pathMappings"][0]["remoteRoot"] == os.path.dirname(cell_file)

    dap = DapClient(host, port)
    try:
        verified = dap.attach({cell_file: [3, 5]})[cell_file]
        assert [b["verified"] for b in verified] == [True, True]
        stop = dap.stopped()
        assert stop["reason"] == "breakpoint"
        tid = stop["threadId"]
        frame = dap.top_frame(tid)
        assert frame["line"] == 3 and frame["source"]["path"] == cell_file
        assert dap.locals(frame["id"])["x"] == "41"
        assert dap.evaluate("x * 100 + 1", frame["id"]) == "4101"
        assert dap.step_and_wait("next", tid)["line"] == 4  # the cell's next line, not IPython's
        mark = len(dap.events)
        dap.request("continue", threadId=tid)
        dap.stopped(after=mark)
        frame = dap.top_frame(tid)
        assert (frame["line"], frame["name"]) == (5, "g") and dap.locals(frame["id"])["v"] == "42"
        dap.request("continue", threadId=tid)
        reply = _shell_reply(client, msg_id)
        assert reply["status"] == "ok", reply
    finally:
        dap.disconnect()
    assert _value(client, "z") == "84"


def test_detach_and_reattach(kc):
    _, client = kc
    reply, msgs = _run(client, "%%kt --debug --name dbg2\ndef h(v):\n    u = v + 1\n    return u\n")
    assert reply["status"] == "ok", reply
    host, port, cell_file, _ = _attach_info(_text(msgs, "stdout"))

    first = DapClient(host, port)
    first.attach({cell_file: [3]})
    first.disconnect()  # detach: the pod kernel keeps running, untraced by anyone
    assert _value(client, "%%kt --name dbg2\nh(1)") == "2"

    again = DapClient(host, port)
    try:
        assert [b["verified"] for b in again.attach({cell_file: [3]})[cell_file]] == [True]
        msg_id = client.execute("%%kt --name dbg2\nq = h(10)\n")
        stop = again.stopped()
        frame = again.top_frame(stop["threadId"])
        assert (frame["line"], frame["name"]) == (3, "h") and again.locals(frame["id"])["v"] == "10"
        again.request("continue", threadId=stop["threadId"])
        assert _shell_reply(client, msg_id)["status"] == "ok"
    finally:
        again.disconnect()
    assert _value(client, "q") == "11"


def test_breakpoint_call_stops_in_the_attached_ide_else_in_pdb(kc):
    _, client = kc
    reply, msgs = _run(client, "%%kt --debug --name dbg3\nk = 1\n")
    host, port, _, _ = _attach_info(_text(msgs, "stdout"))
    dap = DapClient(host, port)
    try:
        dap.attach({})
        msg_id = client.execute("%%kt --name dbg3\n"
                                "def inner():\n    m = 7\n    breakpoint()\n    return m\nn = inner()\n")
        stop = dap.stopped()
        frame = dap.top_frame(stop["threadId"])
        assert frame["name"] == "inner" and dap.locals(frame["id"])["m"] == "7"
        dap.request("continue", threadId=stop["threadId"])
        assert _shell_reply(client, msg_id)["status"] == "ok"
    finally:
        dap.disconnect()
    # no IDE attached any more: breakpoint() is pdb in the notebook again
    typist = Typist(client, ["p m", "c"])
    reply, msgs = _run(client, "%%kt --name dbg3\nn2 = inner()\n", typist)
    assert reply["status"] == "ok" and "\n7\n" in _text(msgs, "stdout") and len(typist.prompts) == 2


def test_seed_api_debug_true_attaches_like_the_magic(local_backend, capsys):
    import kt_jupyter as kt
    from kt_jupyter import connection as conn_mod

    def scaled(a):
        b = a * 3
        breakpoint()
        return b + 1

    remote = kt.fn(scaled, name="dbgfn").to(kt.Compute(cpus="0.1"))
    try:
        endpoint = conn_mod.connect(remote.compute).debug()
        dap = DapClient(endpoint.host, endpoint.port)
        dap.attach({})
        result: dict = {}
        caller = threading.Thread(target=lambda: result.setdefault("value", remote(4, debug=True,
                                                                                  serialization="pickle")))
        caller.start()
        try:
            stop = dap.stopped()
            frame = dap.top_frame(stop["threadId"])
            assert frame["name"] == "scaled" and dap.locals(frame["id"])["b"] == "12"
            dap.request("continue", threadId=stop["threadId"])
            caller.join(CELL_TIMEOUT_S)
        finally:
            dap.disconnect()
        assert result["value"] == 13
        out = capsys.readouterr().out
        assert f"attach to 127.0.0.1:{endpoint.port}" in out and '"request": "attach"' in out
    finally:
        conn_mod.disconnect("dbgfn")
