"""Distributed computes on the local backend (issue 22): N real pod kernels that torch.distributed connects
over gloo (CPU), through the seed API and through ``%%kt --workers N``.

One two-worker group is launched per module and shared by its tests (launching costs seconds on a 2-core
box); every test leaves the group able to run collectives again.
"""

from __future__ import annotations

import time

import pytest

import kt_jupyter as kt
from kt_jupyter import distributed_group as dg
from kt_jupyter.backends import get_backend
from kt_jupyter.distributed import DistributedConfig, fold_workers, split_gpus, torch_env
from kt_jupyter.errors import ComputeSpecError

torch = pytest.importorskip("torch")

#: The collective the tests run: every rank adds rank+1, so the sum over two ranks is 3.
ALL_REDUCE = """
import os, torch, torch.distributed as dist
if not dist.is_initialized():
    dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
"""


def all_reduce_rank():
    """On every rank: join the world (env://, no arguments) and all_reduce rank+1."""
    import os

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR")}
    return {"rank": dist.get_rank(), "sum": t.item(), "env": env}


def fail_on_rank_one():
    """Rank 1 raises after joining the world; rank 0 waits in a collective it can never finish alone."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank 1")
    dist.all_reduce(torch.ones(1))
    return "unreachable"


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kt_home_distributed")
    return home


@pytest.fixture
def kt_home(module_home, monkeypatch):  # one registry for the module: the group outlives a test
    monkeypatch.setenv("KT_HOME", str(module_home))
    monkeypatch.setenv("KT_USERNAME", "tester")
    return module_home


@pytest.fixture(scope="module")
def torch_group(module_home):
    """A two-worker pytorch compute, launched once for the module (and stopped after it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KT_HOME", str(module_home))
    mp.setenv("KT_USERNAME", "tester")
    compute = kt.Compute(name="ddp").distribute("pytorch", workers=2)
    t0 = time.monotonic()
    group = dg.connect_group(compute)
    ready_s = time.monotonic() - t0
    yield compute, group, ready_s
    dg.delete_group("local", "ddp", dg.forget("local", "ddp"), grace_period_s=1)
    mp.undo()


def test_distribute_validates_and_chains():
    c = kt.Compute(name="train")
    assert c.distribute("pytorch", workers=4, distribution_args={"master_port": 29555}) is c
    assert c.distributed_config == DistributedConfig("pytorch", 4, {"master_port": 29555})
    assert c.deployment_mode == "statefulset" and kt.Compute.from_dict(c.to_dict()) == c
    assert c.with_overrides(cpus=1).distributed_config.workers == 4
    assert kt.Compute(name="r").distribute("ray", workers=2).deployment_mode == "raycluster"
    for kwargs, words in [({"framework": "mpi", "workers": 2}, "framework must be one of 'pytorch', 'ray'"),
                          ({"workers": 0}, "workers must be a whole number from 1 to"),
                          ({"workers": True}, "workers must be a whole number"),
                          ({"workers": 2, "distribution_args": {"master_prt": 1}}, "did you mean 'master_port'"),
                          ({"workers": 2, "distribution_args": {"master_port": 80}}, "port number from 1024"),
                          ({"framework": "ray", "workers": 2, "distribution_args": {"num_cpus": -1}}, "num_cpus")]:
        with pytest.raises(ComputeSpecError, match=words):
            kt.Compute().distribute(**kwargs)
    with pytest.raises(ComputeSpecError, match="RANK is set for each worker"):
        kt.Compute(env_vars={"RANK": "3"}).distribute("pytorch", workers=2)
    with pytest.raises(ComputeSpecError, match="replicas"):
        kt.Compute(replicas=2).distribute("pytorch", workers=2)
    with pytest.raises(ComputeSpecError, match="longer than 63"):
        kt.Compute(name="x" * 62).distribute("pytorch", workers=2)


def test_rank_environment_and_gpu_split():
    assert torch_env(1, 4, "h", 29500) == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "1",
        "GROUP_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert split_gpus(2, 2, 4, "t") == ["0,1", "2,3"]
    assert split_gpus(0, 3, 0, "t") == [None, None, None]
    with pytest.raises(ComputeSpecError, match=r"1 GPU\(s\) on each of 3 workers \(3 in all\) but this machine has 2"):
        split_gpus(1, 3, 2, "t")
    with pytest.raises(ComputeSpecError, match="this machine has 0"):  # no GPU here: the launch refuses, clearly
        dg.connect_group(kt.Compute(name="g", gpus=1).distribute("pytorch", workers=2))


def test_list_folds_a_groups_workers_into_one_row():
    from kt_jupyter.backends import KernelInfo

    spec = {"distributed": {"framework": "pytorch", "workers": 3}}
    rows = [KernelInfo("solo", "local", "ready", "local pid 1"),
            KernelInfo("ddp-r1", "local", "stopped", "local pid 3", spec=spec, detail="process is gone"),
            KernelInfo("ddp-r0", "local", "ready", "local pid 2", pid=2, spec=spec),
            KernelInfo("not-r0", "local", "ready", "local pid 4")]  # no distributed spec: a plain name
    folded = fold_workers(rows)
    assert [r.name for r in folded] == ["solo", "ddp", "not-r0"]
    ddp = folded[1]
    assert (ddp.phase, ddp.where, ddp.pid) == ("stopped", "3 pytorch workers (rank 0: local pid 2)", 2)
    assert ddp.detail == "rank 1: stopped - process is gone; rank 2: gone"
    ready = fold_workers([KernelInfo(f"g-r{r}", "local", "ready", f"local pid {r}", spec=spec) for r in range(3)])
    assert [(r.name, r.phase, r.detail) for r in ready] == [("g", "ready", "")]


def test_seed_api_all_reduce_on_every_rank(torch_group):
    compute, group, ready_s = torch_group
    print(f"two workers ready in {ready_s:.2f} s")
    results = kt.fn(all_reduce_rank, name="ddp").to(compute)()
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert results[1]["env"] == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "NODE_RANK": "1",
                                 "MASTER_ADDR": "127.0.0.1"}
    assert [c.name for c in group.ranks] == ["ddp-r0", "ddp-r1"]
    assert len({c.handle.pid for c in group.ranks}) == 2


def test_seed_api_error_on_one_rank_names_it_and_frees_the_others(torch_group):
    compute, _group, _ = torch_group
    remote = kt.fn(fail_on_rank_one, name="ddp").to(compute)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bad shard on rank 1") as info:
        remote()
    assert info.value.rank == 1
    assert any("rank 1 of 2 workers of 'ddp' failed" in note for note in info.value.__notes__)
    assert not any("still run" in note for note in info.value.__notes__)  # rank 0 was freed, not left stuck
    assert time.monotonic() - t0 < 20
    assert [r["sum"] for r in kt.fn(all_reduce_rank, name="ddp").to(compute)()] == [3.0, 3.0]  # the world forms again


def test_status_panel_shows_every_worker_with_its_own_sparklines(torch_group):
    pytest.importorskip("ipywidgets")
    from test_widgets import GPU_SAMPLE

    from kt_jupyter.widgets.panel import GroupPanel, group_monitors

    _compute, group, _ = torch_group
    monitors = group_monitors(["ddp-r0", "ddp-r1"], "local")
    panel = GroupPanel("ddp", "2 pytorch workers", monitors)
    try:
        assert "<b>ddp</b>: 2 pytorch workers" in panel.children[1].value
        assert [v.model.name for v in panel.status_views] == ["ddp-r0", "ddp-r1"]
        assert [m.status.phase for m in monitors] == ["ready", "ready"]
        assert [m.status.where for m in monitors] == [f"local pid {c.handle.pid}" for c in group.ranks]
        for monitor, view in zip(monitors, panel.metrics_views):  # each rank's own CPU sample and sparkline
            assert view.model is monitor.metrics and monitor.metrics.current("cpu").endswith("%")
            assert 'data-kt-key="cpu"' in view.value and "<svg" in view.value
        monitors[1].metrics.add_sample(GPU_SAMPLE)  # a rank with a GPU gets its GPU sparklines; the other none
        assert 'data-kt-key="gpu0_util"' in panel.metrics_views[1].value
        assert "gpu0" not in panel.metrics_views[0].value
        assert all(m.alive for m in monitors)  # followed while the panel is open
    finally:
        panel.close()
    assert all(m.wait_stopped(10) for m in monitors)


# ---------------------------------------------------------------------- %%kt --workers N


def test_cell_on_every_rank_labelled_names_from_rank_zero(ip, capsys):
    from ipshell import run

    ip.user_ns["scale"] = 10.0  # a notebook global the cell reads: pushed to each rank
    run(ip, "%%kt --workers 2 --name ddpm\n" + ALL_REDUCE
        + "me = dist.get_rank()\nprint(f'rank {me} sum {t.item() * scale}')")
    out = capsys.readouterr().out
    assert "[stdout:0] rank 0 sum 30.0" in out and "[stdout:1] rank 1 sum 30.0" in out
    assert ip.user_ns["me"] == 0 and ip.user_ns["t"].tolist() == [3.0]  # names come back from rank 0
    ip.run_line_magic("kt", "pull me --all-ranks --name ddpm")
    assert (ip.user_ns["me_r0"], ip.user_ns["me_r1"]) == (0, 1)
    # each rank keeps its own `me`; a name the notebook rebinds reaches every rank
    run(ip, "%%kt --workers 2 --name ddpm\nprint(f'still {me}')")
    out = capsys.readouterr().out
    assert "[stdout:0] still 0" in out and "[stdout:1] still 1" in out
    ip.user_ns["me"] = 7
    run(ip, "%%kt --workers 2 --name ddpm\nprint(f'now {me}')")
    out = capsys.readouterr().out
    assert "[stdout:0] now 7" in out and "[stdout:1] now 7" in out
    # the same name without --workers, or with another count, never mixes
    with pytest.raises(Exception, match="runs as 2 pytorch workers; add --workers 2"):
        run(ip, "%%kt --name ddpm\n1")
    with pytest.raises(Exception, match="runs 2 pytorch workers, not 3 pytorch"):
        run(ip, "%%kt --workers 3 --name ddpm\n1")
    ip.run_line_magic("kt", "status ddpm")
    assert "ddpm: 2 pytorch workers (ddpm-r0, ddpm-r1)" in capsys.readouterr().out
    ip.run_line_magic("kt", "down ddpm")
    assert get_backend("local").find("ddpm-r0") is None and get_backend("local").find("ddpm-r1") is None



# ---------------------------------------------------------------------- Ray


def _ray_processes(name: str) -> list:
    import psutil

    from kt_jupyter.distributed_ray import temp_dir

    where = temp_dir(name)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(where in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_local_ray_cluster_spreads_tasks_over_both_nodes(ip):
    pytest.importorskip("ray")
    from ipshell import run

    run(ip, "%%kt --workers 2 --framework ray --name rayc\n"
            "import os, ray\n"
            "ray.init()\n"
            "@ray.remote(num_cpus=1)\n"
            "def where():\n"
            "    import time; time.sleep(0.5); return ray.get_runtime_context().get_node_id()\n"
            "nodes = sorted(set(ray.get([where.remote() for _ in range(6)])))\n"
            "auth = (os.environ['RAY_AUTH_MODE'], 'RAY_AUTH_TOKEN' in os.environ, os.environ['RAY_ADDRESS'][:10])\n")
    assert len(ip.user_ns["nodes"]) == 2  # tasks ran on the head and on the worker
    assert ip.user_ns["auth"] == ("token", False, "127.0.0.1:")  # token auth on, the token itself in a file
    assert _ray_processes("rayc")  # Ray's node processes, under this compute's own session directory
    import psutil

    nodes = _ray_processes("rayc")
    ip.run_line_magic("kt", "down rayc")
    _gone, alive = psutil.wait_procs(nodes, timeout=30)
    assert not alive and not _ray_processes("rayc")  # %kt down stopped every Ray node with its pod kernel
