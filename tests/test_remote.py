"""The seed API (fn, cls, async Compute client, code sync and hot reload) on real local pod kernels.

The seed examples of ../shared/seeds/000 and 002 that need no cluster run here as written
(with kt = kt_jupyter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time

import numpy as np
import pytest

import kt_jupyter as kt
from kt_jupyter import connection as conn_mod
from kt_jupyter.backends import get_backend
from kt_jupyter.errors import KtError, RemoteError
from pod_kernel.calls import CallError


@pytest.fixture(autouse=True)
def cleanup(cleanup_connections):
    yield


def my_function(x, y):
    return x + y


def test_seed_basic_fn_and_json_default():
    compute = kt.Compute(cpus="0.5")
    remote_fn = kt.fn(my_function).to(compute)
    assert remote_fn(1, 2) == 3
    assert remote_fn([1], [2]) == [1, 2]
    assert remote_fn.serialization == "json"
    with pytest.raises(KtError, match="serialize"):
        remote_fn(np.array([1, 2]), 1)  # numpy is not JSON: a clear hint to use pickle


def test_seed_properties_and_shared_services():
    compute = kt.Compute(cpus="1")

    def function1():
        import os
        return os.getpid()

    def function2():
        import os
        return os.getpid()

    fn1 = kt.fn(function1, name="shared").to(compute)
    fn2 = kt.fn(function2, name="shared").to(compute)
    assert fn1() == fn2()  # both run in one pod kernel
    assert fn1.name == "shared" and fn1.service_name == "tester-shared"
    assert fn1.compute.name == "shared" and fn1.namespace
    assert fn1.pointers[2] == "shared" and fn1.pointers[1] == __name__
    assert fn1.stream_logs is True and fn1.async_ is False
    fn1.teardown()
    assert get_backend("local").find("shared") is None


def test_seed_pickle_serialization_numpy():
    def process_array(arr):
        return arr * 2

    remote = kt.fn(process_array).to(kt.Compute())
    assert np.array_equal(remote(np.array([1, 2, 3]), serialization="pickle"), [2, 4, 6])
    remote.serialization = "pickle"
    assert np.array_equal(remote(np.array([1, 2, 3])), [2, 4, 6])


def test_allowed_serialization_is_enforced_by_the_pod():
    remote = kt.fn(my_function).to(kt.Compute(allowed_serialization=["json"]))
    assert remote(2, 3) == 5
    with pytest.raises(RemoteError, match="does not accept 'pickle'"):
        remote(2, 3, serialization="pickle")


def test_seed_cls_instance_created_once_and_persists():
    class MyModel:
        def __init__(self, size: int):
            self.size = size
            self.data = list(range(size))
            self.calls = 0

        def get_sum(self):
            self.calls += 1
            return sum(self.data)

        def multiply(self, factor: int):
            self.calls += 1
            return [x * factor for x in self.data]

        def count(self):
            return self.calls

    compute = kt.Compute(cpus="0.5")
    remote_model = kt.cls(MyModel, name="my-model").to(compute, init_args={"size": 10})
    assert remote_model.get_sum() == 45
    assert remote_model.multiply(2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert remote_model.count() == 2  # the same instance served both calls
    again = kt.cls(MyModel, name="my-model").to(compute, init_args={"size": 3})  # get_if_exists: reused
    assert again.get_sum() == 45
    fresh = kt.cls(MyModel, name="my-model", get_if_exists=False).to(compute, init_args={"size": 3})
    assert fresh.get_sum() == 3


def test_seed_concurrent_calls_run_in_parallel_threads():
    def slow_task(task_id: int):
        import time
        time.sleep(1)
        return f"Task {task_id} done"

    remote = kt.fn(slow_task).to(kt.Compute(cpus="1"))
    remote(0)  # warm up
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as executor:
        futures = [executor.submit(remote, i) for i in range(5)]
        results = sorted(f.result() for f in concurrent.futures.as_completed(futures))
    elapsed = time.perf_counter() - t0
    assert results == [f"Task {i} done" for i in range(5)]
    assert elapsed < 3.0, f"5 one-second calls took {elapsed:.2f} s: not concurrent"


def test_seed_async_pattern_and_async_property():
    def sleepy(i):
        import time
        time.sleep(0.5)
        return i * 10

    remote = kt.fn(sleepy).to(kt.Compute(cpus="0.5"))

    async def main():
        tasks = [remote(i, async_=True) for i in range(10)]
        return await asyncio.gather(*tasks)

    t0 = time.perf_counter()
    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert time.perf_counter() - t0 < 4.0
    remote.async_ = True

    async def one():
        return await remote(7)

    assert asyncio.run(one()) == 70


def test_async_function_runs_on_the_pod_loop():
    async def coro(x):
        import asyncio
        await asyncio.sleep(0.3)
        return x + 1

    remote = kt.fn(coro).to(kt.Compute())
    t0 = time.perf_counter()
    assert remote.map(range(8)) == list(range(1, 9))
    assert time.perf_counter() - t0 < 3.0


def test_map_and_starmap():
    remote = kt.fn(my_function).to(kt.Compute())
    assert remote.map([1, 2, 3], [10, 20, 30]) == [11, 22, 33]
    assert remote.starmap([(1, 1), (2, 2)]) == [2, 4]


def test_remote_refs_stay_on_the_pod():
    def make(n):
        import numpy as np
        return np.ones(n)

    def total(a):
        return float(a.sum())

    compute = kt.Compute()
    maker = kt.fn(make, name="refs").to(compute)
    summer = kt.fn(total, name="refs").to(compute)
    ref = maker.remote(1_000_000, serialization="pickle")
    assert "numpy.ndarray" in repr(ref)
    assert summer(ref) == 1_000_000.0  # dereferenced on the pod; only the float came back
    assert np.array_equal(ref.fetch(), np.ones(1_000_000))


def test_typed_exceptions_with_remote_traceback():
    def bad():
        raise ValueError("typed on the pod")

    with pytest.raises(ValueError, match="typed on the pod") as info:
        kt.fn(bad).to(kt.Compute())()
    assert "bad" in info.value.remote_traceback


def test_stream_logs(capsys):
    def chatty():
        print("hello from the pod")
        return 1

    remote = kt.fn(chatty).to(kt.Compute())
    assert remote() == 1
    assert "hello from the pod" in capsys.readouterr().out
    assert remote(stream_logs=False) == 1
    assert "hello from the pod" not in capsys.readouterr().out


def test_call_options_are_popped_and_debug_says_how_to_attach(capsys):
    remote = kt.fn(my_function).to(kt.Compute())
    assert remote(1, 2, stream_metrics=True, stream_logs=False) == 3
    assert remote(1, 2, debug=True) == 3  # debugpy listens in the pod kernel; no IDE attached: it just runs
    out = capsys.readouterr().out
    assert "attach to 127.0.0.1:" in out and '"request": "attach"' in out  # (tests/test_debugging.py attaches)


def test_reload_by_name_without_function_object():
    compute = kt.Compute()
    kt.cls(dict, name="store").to(compute, init_args={"a": 1})
    reloaded = kt.cls(name="store").to(compute)
    assert reloaded.get("a") == 1


def test_reload_prefixes_find_the_running_service_by_name():
    def version():
        return "prod build"

    kt.fn(version, name="prod-svc").to(kt.Compute())
    reloaded = kt.fn(name="svc", reload_prefixes=["qa", "prod"]).to(kt.Compute())
    assert reloaded.name == "prod-svc" and reloaded() == "prod build"  # the first prefix that runs: prod
    assert get_backend("local").find("qa-svc") is None
    with pytest.raises(CallError, match="nothing named .nosvc. was deployed"):
        kt.fn(name="nosvc", reload_prefixes=["qa"]).to(kt.Compute())()


def test_hot_reload_of_local_module_for_calls_and_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = tmp_path / "ktmod_reload.py"
    mod.write_text("def f():\n    return 'v1'\n")
    import importlib

    ktmod = importlib.import_module("ktmod_reload")
    remote = kt.fn(ktmod.f, name="reload").to(kt.Compute())
    assert remote() == "v1"
    mod.write_text("def f():\n    return 'v2'\n")
    t0 = time.perf_counter()
    assert remote() == "v2"  # the edit is in effect on the next call, no restart
    edit_to_effect = time.perf_counter() - t0
    assert edit_to_effect < 2.0
    print(f"edit -> effect {edit_to_effect * 1e3:.1f} ms")
    conn = conn_mod.connect(kt.Compute(name="reload"))
    mod.write_text("def f():\n    return 'v3'\n")
    from kt_jupyter.cells import analyze_cell  # noqa: F401 - a %%kt cell path goes through run_cell

    ns = {}
    conn.run_cell("import ktmod_reload\nval = ktmod_reload.f()", ns)
    assert ns["val"] == "v3"
    sys.modules.pop("ktmod_reload", None)


def test_seed_async_compute_client_and_tensors():
    torch = pytest.importorskip("torch")

    async def main():
        async with kt.Compute(name="my-compute") as compute:
            response = await compute.send_tensors(torch.randn(100, 100), torch.randn(50, 50))
            assert response.count == 2 and response.shapes == [[100, 100], [50, 50]]
            tensors = await compute.receive_tensors(count=2, parameters={"shape": "20,20"})
            assert [tuple(t.shape) for t in tensors] == [(20, 20), (20, 20)]
            assert compute.is_ready()
            await compute.suspend()
            assert not compute.is_ready()
            await compute.resume()
            assert compute.is_ready()
            conn = conn_mod.connect(compute)
            conn.session.execute("kt_stream_handler = lambda t: t * 2")
            doubled = await compute.stream_tensors(torch.ones(3))
            assert torch.equal(doubled[0], torch.full((3,), 2.0))
        assert not kt.Compute(name="my-compute").is_ready()  # deleted on exit

    asyncio.run(main())


def test_async_compute_ready_with_timeout_and_delete_grace():
    async def main():
        compute = kt.Compute(name="lifecycle")
        await compute.ready(timeout=60)
        assert compute.is_ready()
        await compute.delete(grace_period_seconds=1)
        assert not compute.is_ready()

    asyncio.run(main())


def test_mixing_cells_and_fn_on_one_kernel():
    remote = kt.fn(my_function, name="mixed").to(kt.Compute())
    conn = conn_mod.connect(kt.Compute(name="mixed"))
    ns = {}
    conn.run_cell("import os\npid = os.getpid()", ns)

    def getpid():
        import os
        return os.getpid()

    assert kt.fn(getpid, name="mixed").to(kt.Compute())() == ns["pid"]
    assert remote(1, 1) == 2


def test_dryrun_does_not_launch():
    remote = kt.fn(my_function, name="dry").to(kt.Compute(), dryrun=True)
    assert remote.dryrun and get_backend("local").find("dry") is None


def test_lambda_travels_by_value_with_pickle():
    sq = kt.fn(lambda x: x * x, name="lam").to(kt.Compute())
    assert sq(4, serialization="pickle") == 16
