"""Seed-API code travels the way kubetorch users expect (issue 17): wherever a function is defined.

Scripts run as real subprocesses from another working directory, notebooks through a real
ipykernel; pod kernels are real local processes. Also: a JSON-only compute takes code only as
synced source files, dropped ``.remote()`` results free the pod's memory, Ctrl-C cancels calls
on the pod, and a blocking coroutine does not stall the pod's network loop.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import kt_jupyter as kt
from kt_jupyter import remote as remote_mod
from kt_jupyter.errors import KtError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cleanup(cleanup_connections):
    yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def make_projects(tmp_path: Path) -> dict[str, Path]:
    """A script with a helper package next to it, a sibling project, and a working directory with a module."""
    app, sibling, cwd = tmp_path / "app", tmp_path / "sibling", tmp_path / "elsewhere"
    write(app / "helpers" / "__init__.py", "")
    write(app / "helpers" / "mathx.py", """\
        import json

        FACTOR = 10


        def scale(x):
            return json.loads(json.dumps(x)) * FACTOR
    """)
    write(sibling / "pyproject.toml", "[project]\nname = 'sibling'\nversion = '0'\n")
    write(sibling / "sibmod.py", """\
        import string


        def _suffix():
            return "!"


        def shout(s):
            return s.upper() + _suffix() + string.digits[:1]


        class Greeter:
            def __init__(self, greeting):
                self.greeting = greeting

            def greet(self, name):
                return f"{self.greeting}, {name}{_suffix()}"
    """)
    write(cwd / "localmod.py", "import math\n\n\ndef double(x):\n    return math.floor(x) * 2\n")
    return {"app": app, "sibling": sibling, "cwd": cwd}


SCRIPT = """\
    import json, os, statistics, sys
    from pathlib import Path

    HERE = Path(__file__).resolve().parent
    sys.path.insert(0, str(HERE.parent / "sibling"))  # a module in another directory: its own project
    sys.path.insert(0, os.getcwd())  # as `python -m` and notebooks do: the working directory's modules import

    import kt_jupyter as kt
    import localmod
    import sibmod
    from helpers.mathx import scale  # a helper package next to the script

    CONSTANT = 7


    def helper(x):
        return x * CONSTANT


    def whoami(x):
        return os.getpid(), helper(x), scale(x)


    class Counter:
        def __init__(self, start):
            self.n = start

        def add(self, k):
            self.n += k
            return self.n


    out = {"pid": os.getpid()}
    out["whoami"] = kt.fn(whoami).to(kt.Compute(cpus="0.5"))(2)  # the issue's failing case, as written
    travel = kt.Compute(name="travel")
    out["whoami_pickle"] = kt.fn(whoami, name="travel").to(travel)(3, serialization="pickle")
    out["helper_pkg"] = kt.fn(scale, name="travel").to(travel)(4)
    out["sibling"] = kt.fn(sibmod.shout, name="travel").to(travel)("hi")
    out["cwd_module"] = kt.fn(localmod.double, name="travel").to(travel)(2.5)
    out["installed"] = kt.fn(statistics.median, name="travel").to(travel)([1, 5, 3])
    counter = kt.cls(Counter, name="travel").to(travel, init_args={"start": 10})
    out["main_class"] = [counter.add(1), counter.add(2)]
    sib_path = HERE.parent / "sibling" / "sibmod.py"
    sib_path.write_text(sib_path.read_text().replace('return "!"', 'return "?!"'))
    out["sibling_reloaded"] = kt.fn(sibmod.shout, name="travel").to(travel)("hi")

    strict = kt.Compute(name="strict", allowed_serialization=["json"])
    out["json_only"] = [kt.fn(scale, name="strict").to(strict)(5), kt.fn(sibmod.shout, name="strict").to(strict)("a"),
                        kt.fn(localmod.double, name="strict").to(strict)(1)]
    out["json_only_class"] = kt.cls(sibmod.Greeter, name="strict").to(strict, init_args={"greeting": "hey"}).greet("x")
    try:
        kt.fn(whoami, name="strict").to(strict)
    except kt.KtError as exc:
        out["json_only_main"] = str(exc)
    print("RESULT " + json.dumps(out))
"""


def test_script_code_travels_from_wherever_it_is_defined(tmp_path):
    """Functions of a script's __main__, a package next to it, a sibling project, the working directory and
    an installed module, run from another working directory; hot reload; a JSON-only compute."""
    dirs = make_projects(tmp_path)
    script = write(dirs["app"] / "script.py", SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], cwd=dirs["cwd"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    pid, val, scaled = out["whoami"]
    assert pid != out["pid"] and val == 14 and scaled == 20  # module imports, constants, helpers are there
    assert out["whoami_pickle"][1:] == [21, 30]
    assert out["helper_pkg"] == 40
    assert out["sibling"] == "HI!0"
    assert out["cwd_module"] == 4
    assert out["installed"] == 3
    assert out["main_class"] == [11, 13]  # one instance, by value, kept between calls
    assert out["sibling_reloaded"] == "HI?!0"  # the edit is in effect on the next call
    assert out["json_only"] == [50, "A?!0", 2]
    assert out["json_only_class"] == "hey, x?!"
    assert "JSON-only" in out["json_only_main"] and "Move it to module level" in out["json_only_main"]


def test_notebook_function_travels_with_the_globals_it_uses(tmp_path, kt_home):
    """A notebook cell's function, through a real ipykernel: notebook imports as imports, values and helper
    functions by value, a module from another project synced; a JSON-only compute says what to do."""
    from jupyter_client.manager import start_new_kernel

    dirs = make_projects(tmp_path)
    env = dict(os.environ, KT_HOME=str(kt_home), PYTHONPATH=str(ROOT))
    km, client = start_new_kernel(kernel_name="python3", env=env, cwd=str(dirs["cwd"]))

    def run(code: str) -> str:
        chunks: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                chunks.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                chunks.append("\n".join(msg["content"]["traceback"]))

        reply = client.execute_interactive(code, timeout=90, output_hook=hook)
        assert reply["content"]["status"] == "ok", "".join(chunks)
        return "".join(chunks)

    try:
        run(f"import sys\nsys.path.insert(0, {str(dirs['sibling'])!r})\n"
            "import numpy as np\nimport sibmod\nimport localmod\nimport kt_jupyter as kt\nSCALE = 3")
        run("def helper(v):\n    return v * SCALE\n\n"
            "def f(xs):\n    return float(np.sum(xs)) + helper(1) + len(sibmod.shout('ab')) + localmod.double(1)")
        assert run("print(kt.fn(f, name='nb').to(kt.Compute())([1, 2, 3]))").strip() == "15.0"
        run("SCALE = 4")  # a changed notebook global is what the next call sees, as a local call would
        assert run("print(kt.fn(f, name='nb').to(kt.Compute())([1, 2, 3]))").strip() == "16.0"
        said = run("try:\n    kt.fn(f, name='nbjson').to(kt.Compute(allowed_serialization=['json']))\n"
                   "except kt.KtError as e:\n    print(e)")
        assert "notebook cell" in said and "Move it to module level" in said
        assert run("print(kt.fn(sibmod.shout, name='nbjson').to(kt.Compute(allowed_serialization=['json']))"
                   "('ok'))").strip() == "OK!0"
    finally:  # the pod kernels are stopped by cleanup_connections (the same KT_HOME)
        client.stop_channels()
        km.shutdown_kernel(now=True)


# a module-level dict: the functions below carry their own copy to the pod (cloudpickle, by value), where
# the one function object defined there keeps it between calls
EVENTS: dict = {}


def probe(mode, phase, n):
    """run: count in, loop until cancelled, count out; wait: whether ``n`` calls of ``phase`` got to ``mode``."""
    import threading
    import time

    lock = EVENTS.setdefault("lock", threading.Lock())

    def event(name):
        with lock:
            return EVENTS.setdefault(name, threading.Event())

    def count(what):
        with lock:
            EVENTS[(phase, what)] = EVENTS.get((phase, what), 0) + 1
            done = EVENTS[(phase, what)] == n
        if done:
            event(f"{phase}-{what}").set()

    if mode == "run":
        count("started")
        try:
            while True:
                time.sleep(0.005)
        except KeyboardInterrupt:
            count("stopped")
            raise
    return event(f"{phase}-{mode}").wait(20)


def interrupt_main_when(remote, phase: str, n: int) -> threading.Thread:
    """Ctrl-C in this (main) thread once ``n`` calls of ``phase`` run on the pod."""
    main = threading.main_thread().ident

    def _go() -> None:
        if remote("started", phase, n):
            signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=_go, daemon=True)
    t.start()
    return t


def test_ctrl_c_cancels_a_call_and_a_map_on_the_pod():
    remote = kt.fn(probe, name="cancel").to(kt.Compute())
    t = interrupt_main_when(remote, "one", 1)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        remote("run", "one", 1)
    t.join(20)
    assert remote("stopped", "one", 1) is True  # the pod's worker got KeyboardInterrupt and left the loop
    t = interrupt_main_when(remote, "map", 4)
    with pytest.raises(KeyboardInterrupt):
        remote.starmap([("run", "map", 4)] * 4)
    t.join(20)
    assert remote("stopped", "map", 4) is True  # all four
    print(f"two Ctrl-C, each until cancelled on the pod: {time.perf_counter() - t0:.2f} s")



def nbytes_of(array):
    return array.nbytes


def test_ctrl_c_while_a_calls_big_argument_is_on_its_way_ends_its_transfer(monkeypatch):
    """A kt.fn call with a big argument, Ctrl-C: the call was cancelled, but the thread sending the argument went
    on to its last byte (through a port-forward: as long as the whole upload). A cancelled request now ends its
    bulk transfer."""
    import numpy as np

    from pod_kernel import bulk

    remote = kt.fn(nbytes_of, name="abort-arg").to(kt.Compute())
    remote.serialization = "pickle"
    assert remote(np.ones(8, np.uint8)) == 8
    reports: list[float] = []
    real = bulk.send_parts

    def paced_send(sock, parts, progress=None):
        def paced(_done: int, _total: int) -> None:  # 8 reports of 8 MiB, 0.3 s each: 2.4 s in all
            reports.append(time.monotonic())
            time.sleep(0.3)

        return real(sock, parts, paced)

    monkeypatch.setattr(bulk, "send_parts", paced_send)
    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        remote(np.ones(64 << 20, np.uint8))
    interrupted = time.monotonic()
    time.sleep(1.0)
    assert reports and [t for t in reports if t > interrupted + 0.5] == [], "the argument went on being sent"
    monkeypatch.undo()
    assert remote(np.ones(16, np.uint8)) == 16

async def blocking_coroutine(phase):
    import threading
    import time

    EVENTS.setdefault(f"{phase}-started", threading.Event()).set()
    time.sleep(1.5)  # noqa: ASYNC251 - it blocks its loop: the calls' own loop, never the network's
    return phase


def test_a_blocking_coroutine_does_not_stall_the_pod_network_loop():
    blocker = kt.fn(blocking_coroutine, name="coro").to(kt.Compute())
    waiter = kt.fn(probe, name="coro").to(kt.Compute())
    session = blocker._connection().session
    box: list = []
    call = threading.Thread(target=lambda: box.append(blocker("coro")))
    call.start()
    assert waiter("started", "coro", 1) is True  # the coroutine blocks its loop now, for 1.5 s
    pings = [session.ping(timeout=5) for _ in range(3)]
    call.join(30)
    assert box == ["coro"]
    assert max(pings) < 0.5, f"heartbeats waited {max(pings):.2f} s for a blocking coroutine"


def test_dropped_remote_ref_frees_the_pod_memory():
    def make(n):
        import numpy as np

        return np.ones(n)

    maker = kt.fn(make, name="release").to(kt.Compute())
    pod = psutil.Process(maker._connection().session.pod_pid)
    maker(1, serialization="pickle")
    before = pod.memory_info().rss
    ref = maker.remote(12_500_000)  # 100 MB kept on the pod
    held = pod.memory_info().rss
    assert held - before > 80e6
    del ref
    gc.collect()
    remote_mod.releases.drain(10)  # the release went out (batched) and the pod answered
    after = pod.memory_info().rss
    assert held - after > 80e6, f"pod RSS {before / 1e6:.0f} -> {held / 1e6:.0f} -> {after / 1e6:.0f} MB"


def test_json_only_compute_never_gets_code_by_value():
    def local_fn(x):
        return x

    with pytest.raises(KtError, match="Move it to module level"):
        kt.fn(local_fn, name="strict-local").to(kt.Compute(allowed_serialization=["json"]))
