"""A 1 GB push (and pull) on the Kubernetes backend through a port-forward, next to the local backend.

    .venv/bin/python benchmarks/k8s_portforward.py [--mib 1024] [--reps 3] [--client own|official]

There is no cluster here: the Kubernetes side is the fake cluster of the tests
(``tests/k8s_fake``). The backend is the production one with its production
:class:`~kt_jupyter.backends.portforward.PortForwardConnector`: our own
``v4.channel.k8s.io`` stream (``--client own``, the default) or the official
client's ``kubernetes.stream.portforward`` (``--client official``, its
fallback; slow: its buffers grow and shrink by copying), and the fake API server relays
each forwarded connection over loopback to the fake pod's process, in Python
(WebSocket frames unmasked and re-framed), as a real API server and kubelet
relay it over the network. So the figure is that relay's cost on this
machine, not a cluster's network. Both channels are forwarded: the WebSocket
(port 32300) and the bulk channel (32301); ``websocket only`` is the same
forward with the bulk channel turned off, as before it was forwarded.
Prints one JSON object of MB/s (medians).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _rates(session: Any, arr: np.ndarray, reps: int) -> dict[str, float]:
    push, pull = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.push({"a": arr})
        push.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = session.pull(["a"])["a"]
        pull.append(time.perf_counter() - t0)
        assert back.nbytes == arr.nbytes and back[-1] == arr[-1]
        del back
        session.delete(["a"])
        gc.collect()
    mb = arr.nbytes / 1e6
    rates = {"push_MBps": round(mb / statistics.median(push)), "pull_MBps": round(mb / statistics.median(pull))}
    print(f"{arr.nbytes >> 20} MiB: {rates}", file=sys.stderr, flush=True)
    return rates


def main() -> None:
    """Measure and print."""
    import os

    from k8s_fake import FakeKubeApiServer, FakeKubelet

    from kt_jupyter.backends import get_backend
    from kt_jupyter.backends.kubernetes import KubernetesBackend
    from kt_jupyter.compute import Compute

    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ws-mib", type=int, default=256, help="size for the WebSocket-only run (it is slow; 0: none)")
    p.add_argument("--client", choices=("own", "official"), default="own", help="which port-forward stream")
    args = p.parse_args()
    if args.client == "official":
        from kt_jupyter.backends import portforward

        portforward.unsupported_reason = lambda cfg: "benchmark --client official"
    arr = np.random.default_rng(0).integers(0, 255, size=args.mib << 20, dtype=np.uint8)
    results: dict[str, Any] = {"MiB": args.mib, "reps_median_of": args.reps, "client": args.client}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KT_HOME"] = str(Path(tmp) / "kt")
        local = get_backend("local").launch(Compute(name="bench-pf-local"))
        session = local.session()
        session.connect()
        try:
            results["local"] = _rates(session, arr, args.reps)
        finally:
            session.close()
            get_backend("local").delete("bench-pf-local")
        with FakeKubeApiServer() as api:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(api.kubeconfig("bench")))
            os.environ["KUBECONFIG"] = str(kubeconfig)
            os.environ.pop("KUBERNETES_SERVICE_HOST", None)
            kubelet = FakeKubelet(api, Path(tmp) / "node").start()
            backend = KubernetesBackend()  # the production port-forward connector
            try:
                handle = backend.launch(Compute(name="bench-pf", backend="kubernetes", namespace="bench"))
                session = handle.session()
                session.connect()
                results["kubernetes_port_forward"] = _rates(session, arr, args.reps)
                session.close()
                forwarded = sorted({r["query"].get("ports") for r in api.store.requests
                                    if r["path"].endswith("/portforward")})
                results["ports_forwarded"] = forwarded
                if args.ws_mib:
                    ws_only = handle.session(bulk_host=None)
                    ws_only.connect()
                    small = arr[: args.ws_mib << 20]
                    results["kubernetes_port_forward_websocket_only"] = dict(_rates(ws_only, small, 1),
                                                                             MiB=args.ws_mib)
                    ws_only.close()
                backend.delete("bench-pf")
            finally:
                for live in list(backend._live.values()):
                    live.close()
                kubelet.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
