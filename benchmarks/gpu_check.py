"""The GPU checks, as a notebook user holds them: one real notebook kernel (ipykernel) with kt loaded, a local
pod kernel started by ``%%kt --gpus 1``, and torch on both sides.

    python benchmarks/gpu_check.py                  # on a machine with an NVIDIA GPU (prints, exit 1 on a failure)
    python benchmarks/gpu_check.py --device cpu     # a dry run of the same steps on the CPU (the suite's smoke run)

What it checks and measures (``--size-mib``, default 1024; median of ``--reps``):

1. a CUDA result comes back as a CPU tensor (``%%kt --gpus 1``: ``y = torch.arange(6., device="cuda") * 2``);
2. NVML metrics reach the panel's model (the monitor ``%kt status`` shows) while a cell keeps the GPU busy,
   sampled from the notebook while that cell runs (``%%kt --async``);
3. a tensor of ``--size-mib``: push (a cell reading it), push and copy to the GPU (``t.to("cuda")`` in the cell),
   pull of a CUDA tensor (``%kt pull``), against torch's own host-to-device and device-to-host copy speed (pageable
   and pinned) measured in the same pod kernel; then a cell that mentions the pulled tensor, unchanged (the pod
   checks its GPU original for changes: fingerprints of a GPU tensor go by torch's own pickle, a copy to the host).

Prints each result as it comes and writes them to ``--out`` (default ``$OUT/gpu_check.json`` when ``OUT`` is set).
On the device machine, the packages it lacks travel as wheels: ``./dev gpu-wheels`` (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Seconds one notebook request may take (the first %%kt cell starts the pod kernel and imports torch).
REQUEST_TIMEOUT_S = 300


class Notebook:
    """A real notebook kernel with kt loaded; runs cells and returns what they printed."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env)
        self.run("%load_ext kt_jupyter")

    def run(self, code: str, timeout: float = REQUEST_TIMEOUT_S) -> str:
        """Run one cell; its stdout (and text results); RuntimeError with its traceback when it failed."""
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                out.append(str(content["data"].get("text/plain", "")) + "\n")

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)["content"]
        if reply["status"] != "ok":
            raise RuntimeError(f"cell failed:\n{code}\n" + "\n".join(reply.get("traceback") or [])
                               + "".join(out))
        return "".join(out)

    def value(self, expr: str) -> Any:
        """A JSON value computed in the notebook."""
        text = self.run(f"import json as _j\nprint('VALUE ' + _j.dumps({expr}))")
        line = next(x for x in text.splitlines() if x.startswith("VALUE "))
        return json.loads(line[len("VALUE "):])

    def timed(self, code: str) -> float:
        """Seconds the notebook took to run ``code`` (timed inside the notebook: the user's wait for the cell)."""
        src = (f"import time as _t\n_t0 = _t.perf_counter()\nget_ipython().run_cell({code!r})\n"
               f"print('VALUE', _t.perf_counter() - _t0)")
        text = self.run(src)
        return float(next(x for x in text.splitlines() if x.startswith("VALUE "))[len("VALUE "):])

    def close(self) -> None:
        try:
            self.run("%kt down --all", timeout=60)
        finally:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)


def mbps(nbytes: int, seconds: list[float]) -> dict[str, float]:
    """Median MB/s of the samples, with the slowest and the fastest."""
    rates = sorted(nbytes / s / 1e6 for s in seconds)
    return {"MBps": round(statistics.median(rates), 1), "min": round(rates[0], 1), "max": round(rates[-1], 1),
            "n": len(rates)}


def check(results: dict[str, Any], name: str, ok: bool, detail: Any) -> None:
    results["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"[{'ok' if ok else 'FAILED'}] {name}: {detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the GPU checks; cpu: the same steps without a GPU (a dry run: checks nothing of GPUs)")
    p.add_argument("--size-mib", type=int, default=1024, help="tensor size of the transfer rows (default 1024)")
    p.add_argument("--reps", type=int, default=3, help="samples per transfer row (default 3)")
    p.add_argument("--busy-s", type=float, default=4.0, help="how long the metrics cell keeps the GPU busy")
    p.add_argument("--out", default=None, help="JSON file to write (default $OUT/gpu_check.json if OUT is set)")
    args = p.parse_args(argv)
    dev, gpus = args.device, 1 if args.device == "cuda" else 0
    kt = f"%%kt --name gpu --gpus {gpus}"
    size = args.size_mib << 20
    numel = size // 4  # float32
    env = dict(os.environ, KT_HOME=os.environ.get("KT_HOME") or tempfile.mkdtemp(prefix="kt-gpu-home-"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if x]))
    results: dict[str, Any] = {"device": dev, "size_bytes": size, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "checks": {}, "rows": {}}
    t_start = time.perf_counter()
    nb = Notebook(env)
    try:
        # 1. a CUDA result comes back as a CPU tensor
        t0 = time.perf_counter()
        nb.run(f"{kt}\nimport torch\n"
               f"gpu_name = torch.cuda.get_device_name(0) if {dev!r} == 'cuda' else 'cpu'\n"
               f"y = torch.arange(6., device={dev!r}).reshape(2, 3) * 2\n"
               f"made_on = str(y.device)")
        results["first_cell_s"] = round(time.perf_counter() - t0, 2)
        got = nb.value("{'type': type(y).__module__ + '.' + type(y).__name__, 'device': str(y.device), "
                       "'values': y.tolist(), 'made_on': made_on, 'gpu': gpu_name}")
        results["gpu"] = got["gpu"]
        check(results, "result comes back as a CPU tensor",
              got["type"] == "torch.Tensor" and got["device"] == "cpu"
              and got["values"] == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]] and got["made_on"].startswith(dev), got)

        # 2. NVML metrics in the panel's model while a cell keeps the GPU busy
        nb.run("from kt_jupyter.widgets.monitor import monitor_for\n_mon = monitor_for('gpu')")
        nb.run(f"{kt} --async\nimport time, torch\n_a = torch.randn(4096, 4096, device={dev!r})\n"
               f"_end = time.time() + {args.busy_s}\nwhile time.time() < _end:\n    _a = (_a @ _a).tanh()\n"
               f"    torch.cuda.synchronize() if {dev!r} == 'cuda' else None\n")
        n_samples = max(2, int(args.busy_s * 2))  # one every 0.5 s while the cell runs
        samples = nb.value("[(_mon.sample_metrics(), __import__('time').sleep(0.5), {r['key']: r['current'] "
                           f"for r in _mon.metrics.rows}})[2] for _ in range({n_samples})]")
        nb.run(f"{kt}\n_ = 0")  # waits behind the busy cell
        gpu_rows = [s for s in samples if "gpu0_util" in s]
        busy = [s["gpu0_util"] for s in gpu_rows if s["gpu0_util"].split("%")[0].strip() not in ("-", "0")]
        detail = {"samples": len(samples), "with_gpu_rows": len(gpu_rows), "cpu": [s.get("cpu") for s in samples],
                  "util": [s.get("gpu0_util") for s in samples], "mem": [s.get("gpu0_mem") for s in samples][-1:]}
        if dev == "cuda":
            check(results, "NVML metrics in the panel (GPU rows, busy while the cell runs)",
                  len(gpu_rows) == len(samples) and bool(busy), detail)
        else:
            results["checks"]["metrics (dry run: no GPU rows expected)"] = {"ok": not gpu_rows, "detail": detail}
            print(f"[dry run] metrics samples: {detail}", flush=True)

        # 3. transfers of a tensor, against torch's own copy speed
        nb.run(f"import torch, gc\n_base = torch.randn({numel})")
        sync = "torch.cuda.synchronize()" if dev == "cuda" else "pass"
        rows: dict[str, list[float]] = {"push": [], "push_to_gpu": [], "pull_from_gpu": []}
        for i in range(args.reps):
            nb.run(f"t = _base + {i + 1}\ngc.collect()")  # a fresh tensor each time: what the pod holds is stale
            rows["push"].append(nb.timed(f"{kt}\nn = t.numel()"))
            nb.run(f"t = _base - {i + 1}")
            rows["push_to_gpu"].append(nb.timed(f"{kt}\ng = t.to({dev!r})\n{sync}\ndel g"))
            nb.run(f"{kt} --no-pull\nr = torch.randn({numel}, device={dev!r})\n{sync}")
            rows["pull_from_gpu"].append(nb.timed("%kt pull r --name gpu"))
            ok = nb.value("[str(r.device), r.numel()]")
            if ok != ["cpu", numel]:
                check(results, "pulled tensor is a CPU tensor of the size sent", False, ok)
        for name, samples_s in rows.items():
            results["rows"][name] = mbps(size, samples_s)
        # the notebook holds r (pulled), the pod its GPU original: a cell that mentions it checks it for changes
        reruns = [nb.timed(f"{kt}\nshape = tuple(r.shape)") for _ in range(max(3, args.reps))]
        rerun_ms = results["rerun_mentioning_pulled_gpu_tensor_ms"] = [round(x * 1e3, 1) for x in reruns]
        print(f"cell mentioning the pulled GPU tensor, unchanged, ms: {rerun_ms}", flush=True)
        copies = nb.run(
            f"{kt}\nimport time, statistics\n"
            "def _copy_mbps(src, to, reps):\n"
            "    out = []\n"
            "    for _ in range(reps):\n"
            f"        {sync}\n"
            "        t0 = time.perf_counter()\n"
            "        d = src.to(to)\n"
            f"        {sync}\n"
            "        out.append(src.numel() * 4 / (time.perf_counter() - t0) / 1e6)\n"
            "        del d\n"
            "    return round(statistics.median(out), 1)\n"
            f"_h = torch.randn({numel})\n"
            f"_d = torch.randn({numel}, device={dev!r})\n"
            f"_c = {{'h2d_pageable': _copy_mbps(_h, {dev!r}, {args.reps}),\n"
            f"      'h2d_pinned': _copy_mbps(_h.pin_memory(), {dev!r}, {args.reps}) if {dev!r} == 'cuda' else None,\n"
            f"      'd2h_pageable': _copy_mbps(_d, 'cpu', {args.reps})}}\n"
            "del _h, _d\nprint('VALUE', __import__('json').dumps(_c))")
        results["torch_copies_MBps"] = json.loads(
            next(x for x in copies.splitlines() if x.startswith("VALUE "))[len("VALUE "):])
        for name, row in results["rows"].items():
            print(f"{name}: {row['MBps']} MB/s ({row['min']}-{row['max']}, {row['n']})", flush=True)
        print(f"torch copies in the pod kernel, MB/s: {results['torch_copies_MBps']}", flush=True)
        h2d = results["torch_copies_MBps"]["h2d_pageable"]
        results["push_to_gpu_vs_h2d_pageable"] = round(results["rows"]["push_to_gpu"]["MBps"] / h2d, 3)
        d2h = results["torch_copies_MBps"]["d2h_pageable"]
        results["pull_from_gpu_vs_d2h_pageable"] = round(results["rows"]["pull_from_gpu"]["MBps"] / d2h, 3)
    finally:
        nb.close()
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
