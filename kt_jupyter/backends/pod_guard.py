"""Runs in the pod, as the pod kernel's parent, when a compute has an ``inactivity_ttl`` (stdlib only).

On Kubernetes a pod kernel that exits after ``--inactivity-ttl`` would just be
restarted by its Deployment: an idle compute would keep its node (and GPU)
forever, with its state wiped at every TTL. So the container runs::

    python -m kt_pod_guard --namespace NS --deployment NAME -- python -m pod_kernel ... --inactivity-ttl S

The guard starts the pod kernel, passes SIGTERM/SIGINT on to it, and when the
pod kernel exits *by itself* with status 0 (its inactivity TTL, or a client
asking it to shut down) it scales its own Deployment to 0 through the
Kubernetes API, with the pod's service-account token, then waits for the
SIGTERM that follows. Any other exit status is passed on, so crashes still
show as crashes. The service account needs ``get`` and ``patch`` on
``deployments/scale`` for that one Deployment; the backend creates such a
Role and RoleBinding (see the README). Without that permission the guard
says so in the log and the Deployment restarts the kernel.

This file is shipped into the pod as the top-level module ``kt_pod_guard``
(ConfigMap, or the prebuilt image), so it imports nothing but the standard
library. ``KT_KUBE_API``, ``KT_KUBE_TOKEN_FILE`` and ``KT_KUBE_CA_FILE``
override the in-cluster API address, token and CA (for tests and proxies).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: How long to wait, after scaling to 0, for the SIGTERM of the pod's deletion.
AWAIT_DELETION_S = 120.0
#: One API request.
API_TIMEOUT_S = 30.0


def _say(message: str) -> None:
    print(f"[kt guard] {message}", file=sys.stderr, flush=True)


def api_base() -> str:
    """The API server's URL: ``KT_KUBE_API``, else the in-cluster service address."""
    if os.environ.get("KT_KUBE_API"):
        return os.environ["KT_KUBE_API"].rstrip("/")
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


def scale_to_zero(namespace: str, deployment: str) -> None:
    """PATCH the Deployment's scale subresource to 0 replicas; raises with the API's answer on failure."""
    token_file = os.environ.get("KT_KUBE_TOKEN_FILE") or f"{SERVICE_ACCOUNT_DIR}/token"
    with open(token_file) as f:
        token = f.read().strip()
    url = f"{api_base()}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"
    request = urllib.request.Request(
        url, method="PATCH", data=json.dumps({"spec": {"replicas": 0}}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json",
                 "Accept": "application/json"})
    context = None
    if url.startswith("https:"):
        ca = os.environ.get("KT_KUBE_CA_FILE") or f"{SERVICE_ACCOUNT_DIR}/ca.crt"
        context = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_S, context=context) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            body = json.loads(body).get("message", body)
        except ValueError:
            pass
        raise RuntimeError(f"HTTP {exc.code}: {body}") from None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Guard options, and the pod kernel's command after ``--``."""
    if "--" not in argv:
        raise SystemExit("kt_pod_guard: usage: --namespace NS --deployment NAME -- COMMAND...")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m kt_pod_guard")
    p.add_argument("--namespace", required=True)
    p.add_argument("--deployment", required=True)
    return p.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    """Run the pod kernel; scale the Deployment to 0 when it stops itself; return the exit status."""
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    if not command:
        raise SystemExit("kt_pod_guard: no command after --")
    ready_fd = os.environ.get("KT_READY_FD")  # the pod kernel's readiness channel passes through
    child = subprocess.Popen(command, pass_fds=(int(ready_fd),) if ready_fd else ())
    terminating = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        terminating.set()
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code != 0 or terminating.is_set():
        return code if code >= 0 else 128 - code  # killed by signal N -> 128 + N, like a shell
    _say(f"the pod kernel stopped itself; scaling deployment {args.namespace}/{args.deployment} to 0")
    try:
        scale_to_zero(args.namespace, args.deployment)
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        _say(f"could not scale deployment {args.namespace}/{args.deployment} to 0 ({exc}); the Deployment "
             "will restart the pod kernel. Its service account needs get+patch on deployments/scale "
             "(see the kt_jupyter README, 'Kubernetes backend').")
        return 0
    terminating.wait(AWAIT_DELETION_S)  # the ReplicaSet deletes this pod; exit on its SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
