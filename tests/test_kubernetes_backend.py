"""The Kubernetes backend, unchanged, against a fake cluster over real HTTP on 127.0.0.1.

:class:`~k8s_fake.FakeKubeApiServer` answers the official client;
:class:`~k8s_fake.FakeKubelet` turns Deployments into Pods whose
container command (the real startup script, the real ``python -m pod_kernel``
from the ConfigMap) runs as a local process; the only part swapped in the
backend is the connector (:class:`~k8s_fake.FakePortForwardConnector`),
because the fake API server has no port-forward. Failures come from the fake
cluster itself: a GPU the node lacks, an image its registry lacks, a memory
limit its cgroup enforces, a setup step that fails.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from barriers import wait_until
from ipshell import run
from IPython.core.error import UsageError
from k8s_fake import FakeKubeApiServer, FakePortForwardConnector
from k8s_fake.cluster import MISSING_IMAGE, NS, SLOW_IMAGE, fake_cluster

from kt_jupyter import connection as conn_mod
from kt_jupyter.backends import kubernetes_events as ev
from kt_jupyter.backends.kubernetes import KubernetesBackend
from kt_jupyter.backends.kubernetes_objects import TEMPLATE_HASH_ANNOTATION
from kt_jupyter.backends.portforward import PodTarget, PortForwardConnector, ServiceDNSConnector, default_connector
from kt_jupyter.compute import POD_KERNEL_PORT, Compute, Image, Volume
from kt_jupyter.errors import (
    BackendUnavailable,
    CrashLoopError,
    ImagePullError,
    KernelDiedError,
    KubernetesAPIError,
    LaunchTimeoutError,
    NotFoundError,
    OOMKilledError,
    UnschedulableError,
)
from kt_jupyter.manifests import label_selector

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster; the `kubernetes` backend of this process (get_backend) uses it."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


def k8s(name: str = "k", **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **kw)


def events_of(messages: list[str]):
    return lambda m: messages.append(m)


# ---------------------------------------------------------------------- launch, cells, reuse


def test_launch_applies_everything_server_side_and_runs_a_cell(cluster):
    messages: list[str] = []
    compute = k8s(env_vars={"GREETING": "hi"})
    handle = cluster.backend.launch(compute, on_event=events_of(messages))

    # every object went through server-side apply as kt-jupyter, forced
    applies = [r for r in cluster.store.requests if r["method"] == "PATCH" and r["path"].startswith(
        ("/api/v1/namespaces/kt-test/", "/apis/apps/v1/namespaces/kt-test/"))]
    assert {r["path"].rsplit("/", 2)[-2] for r in applies} == {"secrets", "configmaps", "services", "deployments"}
    assert all(r["content_type"] == "application/apply-patch+yaml" and r["field_manager"] == "kt-jupyter"
               and r["force"] == "true" for r in applies)
    # readiness came from a watch, and the watch's progress reached on_event
    assert any(r["query"].get("watch") == "true" and r["path"].endswith("/pods") for r in cluster.store.requests)
    text = "\n".join(messages)
    assert "scheduled on node fake-node-1" in text and 'pulling image "python:3.11-slim"' in text
    assert "pod kernel 'k' ready in" in messages[-1]
    assert handle.where.startswith(f"pod {compute.service_name}-") and "namespace kt-test" in handle.where

    # a real cell round trip to the pod kernel, which runs from the ConfigMap's copy of pod_kernel
    session = handle.session()
    session.connect()
    out: list[dict] = []
    result = session.execute("import os, pod_kernel\nprint(os.environ['GREETING'], pod_kernel.__file__)\n6 * 7",
                             out.append)
    session.close()
    assert result.data == {"text/plain": "42"}
    printed = "".join(o.get("text", "") for o in out)
    assert printed.startswith("hi ") and "/volumes/kt-src/pod_kernel/__init__.py" in printed

    # the token reached the pod through the Secret only: not in argv, not in any other object
    secret = cluster.store.get("secrets", NS, f"{compute.service_name}-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert token == handle.token
    proc = cluster.process(compute)
    assert all(token not in " ".join(p.cmdline()) for p in [proc] + proc.children(recursive=True))
    for plural in ("deployments", "configmaps", "services"):
        assert token not in json.dumps(cluster.objects(plural))
    assert token not in text


def test_launch_again_reuses_the_running_kernel_and_another_process_finds_it(cluster):
    compute = k8s("shared")
    first = cluster.backend.launch(compute)
    conn = conn_mod.connect(compute)
    ns: dict = {}
    conn.run_cell("state = 41", ns)
    pod = cluster.pods(compute)[0]["metadata"]["name"]
    version = cluster.store.version

    messages: list[str] = []
    again = cluster.backend.launch(compute, on_event=events_of(messages))
    assert again.url == first.url and "reusing the running pod kernel 'shared'" in messages[0]
    assert cluster.store.version == version  # nothing applied, nothing changed

    # "another notebook": a new backend object finds the kernel by name and reads the token back
    other = KubernetesBackend(connector=FakePortForwardConnector(cluster.kubelet))
    found = other.find("shared")
    assert found is not None and found.token == first.token and pod in found.where
    session = found.session()
    session.connect()
    assert session.execute("state + 1").data == {"text/plain": "42"}
    session.close()
    assert other.find("nothing-here") is None
    assert other.get_if_exists(k8s("shared")).url == found.url


def test_a_kernel_another_notebook_restarted_is_used_not_replaced(cluster):
    """Another notebook restarts the compute (`%kt restart`: delete, launch; here a backend object of its own on the
    same fake cluster). This process's next cell finds its pod gone and a new one under the name: it uses that pod,
    rather than deleting it and launching yet another (which the other notebook's next cell would answer in turn)."""
    compute = k8s("restarted")
    conn = conn_mod.connect(compute)
    conn.run_cell("x = 1", {})
    old_pod = cluster.pods(compute)[0]["metadata"]["name"]
    other = KubernetesBackend(connector=FakePortForwardConnector(cluster.kubelet))
    assert other.delete("restarted")
    other.launch(compute)
    [new_pod] = [p["metadata"]["name"] for p in cluster.pods(compute)]
    assert new_pod != old_pod
    wait_until(lambda: conn.handle.liveness() is not None, 30, "the old kernel seen gone")
    messages: list[str] = []
    again = conn_mod.connect(compute, on_event=events_of(messages))
    assert again is not conn and new_pod in again.handle.where
    assert any("runs already (another notebook restarted it" in m for m in messages), messages
    assert [p["metadata"]["name"] for p in cluster.pods(compute)] == [new_pod]  # not replaced
    assert again.run_cell("1 + 1", {}).result.data == {"text/plain": "2"}


def test_reapplying_the_same_objects_changes_nothing(cluster):
    compute = k8s("idem", inactivity_ttl="1h")
    handle = cluster.backend.launch(compute)
    kube = cluster.backend._kube(compute)
    def versions() -> dict:
        # the Job's status is written by the (fake) Job controller at any time, which bumps its
        # resourceVersion as in a real cluster: for it, the spec's generation is what apply may change
        return {(o["kind"], o["metadata"]["name"]):
                (o["metadata"]["generation"], o["spec"]) if o["kind"] == "Job" else o["metadata"]["resourceVersion"]
                for plural in ("jobs", "services", "secrets", "configmaps") for o in cluster.objects(plural)}

    before = versions()
    for obj in cluster.backend.manifests(compute, handle.token):
        kube.apply(obj)
    after = versions()
    assert after == before and len(before) == 4
    assert len(cluster.pods(compute)) == 1


def test_magic_runs_cells_on_the_kubernetes_backend(cluster, ip, capsys):
    run(ip, "%%kt --backend kubernetes --name nb\nimport os\nhost = os.uname().nodename\nvalues = [1, 2, 3]")
    assert ip.user_ns["values"] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "[kt] scheduled on node fake-node-1" in err and "ready in" in err
    ip.user_ns["factor"] = 10
    out = run(ip, "%%kt --backend kubernetes --name nb\nscaled = [v * factor for v in values]\nsum(scaled)")
    assert ip.user_ns["scaled"] == [10, 20, 30] and repr(out) == "60"

    run(ip, "%kt list --backend kubernetes")
    listing = capsys.readouterr().out
    assert "nb" in listing and "kubernetes" in listing and "ready" in listing and "fake-node-1" in listing
    run(ip, "%kt logs nb --tail 50")
    assert "serving on 127.0.0.1" in capsys.readouterr().out
    run(ip, "%kt status nb")
    status = capsys.readouterr().out
    assert "compute 'nb' (kubernetes)" in status and "on node fake-node-1" in status and "cells:     2" in status


def test_magic_down_deletes_the_compute(cluster, ip, capsys):
    run(ip, "%kt config backend=kubernetes")
    run(ip, "%%kt --name gone\nx = 1")
    compute = k8s("gone")
    assert cluster.deployment(compute) is not None
    run(ip, "%kt logs gone --tail 1")  # the pod kernel logs two lines at start: one is cut, and the notice says so
    assert "last 1 lines; `%kt logs gone --tail 0` shows all" in capsys.readouterr().err
    run(ip, "%kt down gone")
    assert "gone (kubernetes): stopped and deleted" in capsys.readouterr().out
    assert cluster.deployment(compute) is None and not cluster.pods(compute, live_only=False)
    with pytest.raises(UsageError, match="no Kubernetes compute named 'gone'"):
        run(ip, "%kt status gone")


# ---------------------------------------------------------------------- failures, one clear error each


def test_unschedulable_gpu_names_the_missing_resource(cluster):
    compute = k8s("gpu", gpus=1)
    with pytest.raises(UnschedulableError) as info:
        cluster.backend.launch(compute)
    text = str(info.value)
    assert "cannot be scheduled: no node has enough nvidia.com/gpu (asked for 1)" in text
    assert "NVIDIA device plugin" in text and "Insufficient nvidia.com/gpu" in text
    assert "scaled to 0" in text and cluster.deployment(compute)["spec"]["replicas"] == 0


def test_unschedulable_through_the_magic_is_one_line(cluster, ip):
    result = ip.run_cell("%%kt --backend kubernetes --name gpu2 --gpus 1\nx = 1")
    assert isinstance(result.error_in_exec, UnschedulableError)
    rendered = result.error_in_exec._render_traceback_()
    assert len(rendered) == 1 and "nvidia.com/gpu" in rendered[0]


def test_node_selector_mismatch_names_the_selector(cluster):
    with pytest.raises(UnschedulableError, match=r"no node matches its node selector \(nvidia.com/gpu.product in "
                                                 r"\(NVIDIA-A100-SXM4-40GB, .*cloud.google.com/gke-accelerator"):
        cluster.backend.launch(k8s("a100", gpu_type="A100", gpus=1, launch_timeout=30))


def test_image_pull_failure_names_the_image(cluster):
    with pytest.raises(ImagePullError) as info:
        cluster.backend.launch(k8s("img", image=MISSING_IMAGE))
    text = str(info.value)
    assert f"cannot pull the image {MISSING_IMAGE!r}" in text
    assert "ErrImagePull" in text or "ImagePullBackOff" in text
    assert "not found" in text and "imagePullSecrets" in text


def test_crash_loop_shows_the_container_last_log_lines(cluster):
    image = Image().run_bash("echo 'cannot reach the dataset bucket' >&2; exit 3")
    with pytest.raises(CrashLoopError) as info:
        cluster.backend.launch(k8s("crash", image=image))
    text = str(info.value)
    assert "CrashLoopBackOff" in text and "exit code 3" in text
    assert "Last log lines of the container:\n" in text and "cannot reach the dataset bucket" in text


def test_oom_at_start_names_the_memory_limit(cluster):
    with pytest.raises(OOMKilledError) as info:
        cluster.backend.launch(k8s("tiny", memory="24Mi"))
    text = str(info.value)
    assert "killed while starting for using more memory than its limit (24Mi) (OOMKilled)" in text
    assert "memory='48Mi'" in text


def test_launch_timeout_lists_the_last_events(cluster):
    compute = k8s("slow", image=SLOW_IMAGE, launch_timeout=1.5)
    with pytest.raises(LaunchTimeoutError) as info:
        cluster.backend.launch(compute)
    text = str(info.value)
    assert "was not ready within 1.5 s (launch_timeout" in text and "KT_LAUNCH_TIMEOUT" in text
    assert "on node fake-node-1, container waiting (ContainerCreating)" in text
    assert f'Normal Pulling pod/{compute.service_name}-' in text and f'Pulling image "{SLOW_IMAGE}"' in text
    assert cluster.deployment(compute)["spec"]["replicas"] == 0


def test_missing_secret_is_a_clear_config_error(cluster):
    with pytest.raises(CrashLoopError, match=r'CreateContainerConfigError: secret "db-creds" not found.*secrets='):
        cluster.backend.launch(k8s("sec", secrets=["db-creds"]))


def test_forbidden_request_is_one_clear_error(cluster):
    cluster.store.denied.add(("patch", "deployments"))
    with pytest.raises(KubernetesAPIError) as info:
        cluster.backend.launch(k8s("denied"))
    text = str(info.value)
    assert text.startswith("Kubernetes forbids applying Deployment kt-test/tester-denied")
    assert 'cannot patch resource "deployments"' in text and "Ask your cluster admin" in text


def test_no_cluster_configured_is_backend_unavailable(tmp_path, monkeypatch, kt_home):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    backend = KubernetesBackend()
    with pytest.raises(BackendUnavailable, match="no Kubernetes cluster is configured.*--backend local"):
        backend.list()


def test_unreachable_api_server_is_backend_unavailable(tmp_path, monkeypatch, kt_home):
    with FakeKubeApiServer() as api:
        config = api.kubeconfig(NS)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))  # the server is gone: connection refused
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    backend = KubernetesBackend()
    backend._kube(k8s()).api_client.configuration.retries = 0
    with pytest.raises(BackendUnavailable, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        backend.status("k")


# ---------------------------------------------------------------------- a pod kernel that dies


def test_oom_during_a_cell_is_reported_and_the_next_cell_starts_fresh(cluster, ip, capsys):
    run(ip, "%kt config backend=kubernetes")
    run(ip, "%%kt --name big --memory 300Mi\nstate = 1")
    with pytest.raises(KernelDiedError) as info:
        run(ip, "%%kt --name big --memory 300Mi\nblob = b'x' * (600 << 20)")
    text = str(info.value)
    assert "was killed for exceeding its memory limit (300Mi) and was restarted by Kubernetes" in text
    assert "its variables are lost" in text
    capsys.readouterr()
    assert run(ip, "%%kt --name big --memory 300Mi\n'state' in globals()").data == {"text/plain": "False"}
    assert "variables are lost" in capsys.readouterr().err


def test_deleted_pod_is_reported_by_liveness(cluster):
    compute = k8s("vanish")
    handle = cluster.backend.launch(compute)
    assert handle.liveness() is None
    pod = cluster.pods(compute)[0]["metadata"]["name"]
    cluster.store.delete("pods", NS, pod, grace_period_s=0)
    cluster.store.wait_for(lambda: not cluster.store.get("pods", NS, pod), 10)
    why = cluster.backend.wait_gone("vanish", 10)
    assert why == handle.liveness() and f"pod kernel 'vanish' (pod {pod}) was deleted or evicted" in why


# ---------------------------------------------------------------------- suspend, resume, delete, TTL


def test_suspend_scales_to_zero_and_resume_brings_it_back(cluster):
    compute = k8s("nap")
    handle = cluster.backend.launch(compute)
    cluster.backend.suspend("nap")
    assert cluster.deployment(compute)["spec"]["replicas"] == 0
    cluster.store.wait_for(lambda: not cluster.pods(compute, live_only=False), 15)
    assert "was stopped: suspended (its Deployment was scaled to 0)" in handle.liveness()
    info = cluster.backend.status("nap")
    assert info.phase == "stopped" and "suspended" in info.detail
    assert cluster.backend.find("nap") is None

    resumed = cluster.backend.resume("nap")
    assert cluster.deployment(compute)["spec"]["replicas"] == 1 and resumed.token == handle.token
    session = resumed.session()
    session.connect()
    assert session.execute("'fresh'").data == {"text/plain": "'fresh'"}
    session.close()


def test_delete_removes_everything_labelled_and_keeps_volumes_unless_asked(cluster):
    compute = k8s("bye", volumes=[Volume("data", size="1Gi")], inactivity_ttl="1h")
    cluster.backend.launch(compute)
    selector = label_selector(compute)
    kinds = ("jobs", "pods", "services", "secrets", "configmaps")
    assert all(cluster.objects(k, selector) for k in kinds + ("persistentvolumeclaims",))
    assert cluster.backend.delete("bye", grace_period_s=1) is True
    assert not any(cluster.objects(k, selector) for k in kinds)  # pods included: delete waited for them
    assert [c["metadata"]["name"] for c in cluster.objects("persistentvolumeclaims", selector)] == ["data"]
    deletes = [r for r in cluster.store.requests if r["method"] == "DELETE" and "/pods/" in r["path"]]
    assert deletes and all(r["body"]["gracePeriodSeconds"] == 1 for r in deletes)
    cluster.backend.delete("bye", volumes=True)
    assert not cluster.objects("persistentvolumeclaims", selector)
    assert cluster.backend.delete("bye") is False
    with pytest.raises(NotFoundError):
        cluster.backend.status("bye")


# ---------------------------------------------------------------------- list, status, ownership


def test_list_shows_only_this_users_computes(cluster, monkeypatch):
    cluster.backend.launch(k8s("mine"))
    monkeypatch.setenv("KT_USERNAME", "someone-else")
    theirs = KubernetesBackend(connector=FakePortForwardConnector(cluster.kubelet))
    assert [i.name for i in theirs.list()] == []
    monkeypatch.setenv("KT_USERNAME", "tester")
    [info] = cluster.backend.list()
    assert (info.name, info.phase, info.backend) == ("mine", "ready", "kubernetes")
    assert info.spec["name"] == "mine" and info.started > 0


def test_status_of_a_failing_compute_says_why(cluster):
    compute = k8s("fails", image=MISSING_IMAGE, launch_timeout=30)
    kube = cluster.backend._kube(compute)
    token = cluster.backend._token(kube, compute)
    for obj in cluster.backend.manifests(compute, token):
        kube.apply(obj)  # applied but not waited for, as after a notebook restart
    cluster.store.wait_for(lambda: "ImagePullBackOff" in json.dumps(cluster.pods(compute)), 15)
    info = cluster.backend.status("fails")
    assert info.phase == "failed" and MISSING_IMAGE in info.detail


# ---------------------------------------------------------------------- connectors and pure parts


def test_production_port_forward_connector_through_the_fake_api_server(cluster):
    """The real PortForwardConnector and kubernetes.stream.portforward, against the fake API's WebSocket relay."""
    backend = KubernetesBackend()  # outside a cluster: the default connector is the port-forward
    compute = k8s("pf")
    handle = backend.launch(compute)
    assert handle.url.startswith("ws://127.0.0.1:") and "port-forward 127.0.0.1:" in \
        backend._live[(NS, compute.service_name)].forward.description
    conn = conn_mod.ComputeConnection(compute, handle)
    ns = {"blob": bytes(range(256)) * (32 << 10)}  # 8 MiB each way through the forward
    conn.run_cell("echo = blob[::-1]\nn = len(blob)", ns)
    assert ns["n"] == 8 << 20 and ns["echo"] == ns["blob"][::-1]
    # cells take the lane through the forwarded bulk port too: executes out, their last outputs and replies back
    session = conn.session
    session.execute("pass")  # asks for the lane (the cell above followed a push: it went on the WebSocket)
    deadline = time.monotonic() + 10
    while (session._conn is None or session._conn.lane is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    sent, replies = session._conn.lane.sent, session.lane_replies
    for i in range(3):
        seen: list[dict] = []
        result = session.execute(f"print('line {i}')\n{i} * 7", on_output=seen.append)
        assert result.data == {"text/plain": str(i * 7)}
        assert [(m["type"], m.get("text")) for m in seen] == [("stream", f"line {i}\n"), ("execute_result", None)]
    assert (session._conn.lane.sent, session.lane_replies) == (sent + 3, replies + 3)
    conn.session.close()
    again = handle.session()  # a second connection through the same local listener
    again.connect()
    assert again.execute("n").data == {"text/plain": str(8 << 20)}
    again.close()
    forwards = [r["query"]["ports"] for r in cluster.store.requests if r["path"].endswith("/portforward")]
    pod = cluster.pods(compute)[0]["metadata"]["name"]
    bulk = str(cluster.kubelet.pods[(NS, pod)].runs[-1].bulk_port)  # what the fake pod's bulk channel binds
    assert forwards.count("32300") >= 2 and bulk in forwards  # the 8 MiB went over the forwarded bulk channel
    assert set(forwards) == {"32300", bulk}
    backend.delete("pf", grace_period_s=0)
    assert "was deleted" in handle.liveness()



def test_connector_choice_in_and_out_of_the_cluster(monkeypatch):
    target = PodTarget("ns1", "pod-1", "alice-train", 32300)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.delenv("KT_K8S_CONNECT", raising=False)
    connector = default_connector(lambda: None)
    assert isinstance(connector, ServiceDNSConnector)
    assert connector.open(target).url == "ws://alice-train.ns1.svc.cluster.local:32300"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert isinstance(default_connector(lambda: None), PortForwardConnector)
    monkeypatch.setenv("KT_K8S_CONNECT", "service")
    assert isinstance(default_connector(lambda: None), ServiceDNSConnector)


def test_the_configmap_ships_pod_kernel_and_a_ttl_compute_is_a_job_its_kernel_ends(cluster):
    compute = k8s("src", inactivity_ttl="30m")
    objects = cluster.backend.manifests(compute, "t0ken")
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    assert "pod_kernel____main__.py" in cm["data"] and all(k.startswith("pod_kernel__") for k in cm["data"])
    job = objects[-1]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert script.rstrip().endswith("--inactivity-ttl 1800") and "exec \"$KT_PY\" -m pod_kernel " in script
    assert TEMPLATE_HASH_ANNOTATION in job["spec"]["template"]["metadata"]["annotations"]
    assert [o["kind"] for o in objects] == ["Secret", "ConfigMap", "Service", "NetworkPolicy", "Job"]


@pytest.mark.parametrize("params", [{}, {"inactivity_ttl": "30m"}, {"inactivity_ttl": 60, "gpus": 1, "freeze": True},
                                    {"inactivity_ttl": 60, "service_account_name": "mine"}],
                         ids=["plain", "ttl", "ttl-gpu-frozen", "ttl-own-sa"])
def test_what_the_backend_applies_validates_against_the_kubernetes_schema(params, kt_home):
    from kubernetes_validate.utils import latest_version, validate

    version = latest_version()
    objects = KubernetesBackend().manifests(k8s("v", namespace=NS, **params), "t0ken")
    for obj in objects:
        assert validate(obj, version, strict=True), obj["kind"]
    kinds = [o["kind"] for o in objects]
    assert kinds[-1] == ("Job" if params.get("inactivity_ttl") else "Deployment") and "Role" not in kinds


def test_frozen_compute_runs_the_image_s_pod_kernel(cluster):
    """freeze=True: no source ConfigMap; the "image" (here: this interpreter) holds pod_kernel."""
    compute = k8s("frozen", freeze=True)
    handle = cluster.backend.launch(compute)
    assert not cluster.objects("configmaps", label_selector(compute))
    session = handle.session()
    session.connect()
    where = session.execute("import pod_kernel\npod_kernel.__file__").data["text/plain"]
    session.close()
    assert "/volumes/" not in where and where.strip("'").endswith("pod_kernel/__init__.py")


def test_dockerfile_bakes_in_what_the_startup_script_checks(tmp_path):
    from kt_jupyter.manifests import POD_KERNEL_DEPS

    text = (ROOT / "pod_kernel" / "Dockerfile").read_text()
    install = next(line for line in text.splitlines() if "pip install" in line)
    install += next(line for line in text.splitlines()[text.splitlines().index(install) + 1:])
    for dep in POD_KERNEL_DEPS:  # as the startup script asks, or pinned to the notebook's version by a build arg
        name = re.split(r"[<>=!~]", dep, maxsplit=1)[0]
        pinned = f'"{name}==${{{name.upper()}_VERSION}}"'
        assert f'"{dep}"' in install or (pinned in install and f"ARG {name.upper()}_VERSION=" in text), dep
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies == [["pod_kernel/*.py", "/opt/kt/lib/pod_kernel/"]]
    assert "ENV PYTHONPATH=/opt/kt/lib" in text
    # the layout the COPY lines make imports on its own (what the RUN check does in the build)
    lib = tmp_path / "lib"
    (lib / "pod_kernel").mkdir(parents=True)
    for src in (ROOT / "pod_kernel").glob("*.py"):
        (lib / "pod_kernel" / src.name).write_text(src.read_text())
    check = subprocess.run([sys.executable, "-c", "import pod_kernel.__main__, pod_kernel.server, "
                            "pod_kernel.executor; print(pod_kernel.__file__)"],
                           env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == str(lib / "pod_kernel" / "__init__.py")


def _pod(waiting=None, last=None, terminated=None, conditions=None, memory=None, node="n1") -> dict:
    state = {"waiting": waiting} if waiting else ({"terminated": terminated} if terminated else {"running": {}})
    container = {"name": "pod-kernel", "image": "img:1"}
    if memory:
        container["resources"] = {"limits": {"memory": memory}}
    return {"metadata": {"name": "p-1"}, "spec": {"containers": [container], "nodeName": node},
            "status": {"conditions": conditions or [],
                       "containerStatuses": [{"name": "pod-kernel", "state": state, "restartCount": 1,
                                              "lastState": {"terminated": last} if last else {}}]}}


def test_diagnosis_of_pod_states():
    unsched = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory."}]
    # Unschedulable is a state (autoscalers add nodes), not a failure; the error, when the wait ends, quotes it
    assert ev.diagnose_pod("c", _pod(conditions=unsched, node="")) is None
    assert ev.unschedulable_message(_pod(conditions=unsched, node="")) == unsched[0]["message"]
    gave_up = ev.unschedulable_failure("c", _pod(conditions=unsched, node=""), unsched[0]["message"], "waited")
    assert gave_up.error is UnschedulableError and "no node has enough memory" in gave_up.message
    taint = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
              "message": "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: ml}."}]
    assert "add tolerations" in ev.unschedulable_failure("c", _pod(conditions=taint, node=""),
                                                         taint[0]["message"]).message
    assert ev.scale_up_hopeless("pod didn't trigger scale-up: 1 node(s) didn't match Pod's node affinity/selector")
    assert not ev.scale_up_hopeless("pod didn't trigger scale-up: 1 max node group size reached")
    oom = ev.diagnose_pod("c", _pod(waiting={"reason": "CrashLoopBackOff"}, memory="1Gi",
                                    last={"reason": "OOMKilled", "exitCode": 137}))
    assert oom.error is OOMKilledError and "(1Gi)" in oom.message and "memory='2Gi'" in oom.message
    crash = ev.diagnose_pod("c", _pod(waiting={"reason": "CrashLoopBackOff"}, last={"reason": "Error", "exitCode": 1}))
    assert crash.error is CrashLoopError and crash.wants_logs and crash.previous_logs
    assert ev.diagnose_pod("c", _pod()) is None  # running, not ready yet: keep waiting
    refused = ev.refused_failure("c", {"type": "Warning", "reason": "FailedCreate", "involvedObject": {"name": "rs"},
                                       "message": 'pods "x" is forbidden: exceeded quota: gpu-quota'})
    assert refused.error is UnschedulableError and "ResourceQuota" in refused.message
    assert ev.restart_reason(_pod(last={"reason": "Error", "exitCode": 139})) == \
        "exited (Error, exit code 139 (signal 11))"


# ---------------------------------------------------------------------- IPython


@pytest.fixture
def ip(cluster, ip):
    """conftest's IPython shell, on the fake cluster (which outlives the shell's `%kt down --all`)."""
    yield ip



# ---------------------------------------------------------------------- debugger (%%kt --debug)


def _stdout_until(capsys, pattern: str, seen: list[str], timeout_s: float = 60.0):
    """Poll the captured stdout (the cell prints from another thread) until ``pattern`` matches it."""
    import re
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(capsys.readouterr().out)
        found = re.search(pattern, "".join(seen), re.DOTALL)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the cell's output within {timeout_s} s:\n{''.join(seen)}")


def test_debug_wait_cell_attaches_an_ide_through_the_forwarded_port(cluster, ip, capsys):
    """`%%kt --debug wait` on Kubernetes: debugpy on the pod's loopback, reached through the connector."""
    import threading

    from dap import DapClient

    cell = ("%%kt --backend kubernetes --name kdbg --debug wait\n"
            "x = 41\n"                 # line 2
            "y = x + 1\n"              # 3  <- breakpoint
            "print('y is', y)\n")
    outcome: dict = {}

    def run_cell() -> None:
        try:
            run(ip, cell)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["done"] = True

    cell_thread = threading.Thread(target=run_cell, daemon=True)
    cell_thread.start()
    seen: list[str] = []
    found = _stdout_until(capsys, r"attach to ([\d.]+):(\d+).*?this cell runs from (\S+?\.py).*"
                                  r"waiting for a debugger to attach", seen)
    host, port, cell_file = found.group(1), int(found.group(2)), found.group(3)
    remote_port = next(t.port for t in cluster.backend._connector.opened if t.port != POD_KERNEL_PORT)
    assert host == "127.0.0.1" and remote_port == port  # the fake pod's loopback is this machine's
    assert not outcome  # the cell waits for the debugger

    dap = DapClient(host, port)
    try:
        verified = dap.attach({cell_file: [3]})[cell_file]
        assert [b["verified"] for b in verified] == [True]
        stop = dap.stopped()
        assert stop["reason"] == "breakpoint"
        frame = dap.top_frame(stop["threadId"])
        assert frame["line"] == 3 and frame["source"]["path"] == cell_file
        assert dap.locals(frame["id"])["x"] == "41"
        dap.request("continue", threadId=stop["threadId"])
        cell_thread.join(60)
    finally:
        dap.disconnect()
    assert outcome.get("done") and "error" not in outcome, outcome
    assert ip.user_ns["y"] == 42
    assert cluster.backend.forward_port("kdbg", remote_port) == port  # one forward per pod and port


def test_jupyterlab_debugger_panel_stops_a_kubernetes_cell_in_its_pod(cluster, ip, monkeypatch, tmp_path):
    """The debugger panel's path on Kubernetes: port-forwarded debugpy, the cell's file written in the pod.

    The notebook kernel's debugger is ipykernel's real Debugger class turned KtDebugger, standing alone
    (no local debugpy: only %%kt cells are debugged here); requests are what JupyterLab sends.
    """
    import asyncio
    import logging
    import os
    import threading
    from types import SimpleNamespace

    from ipykernel.compiler import get_tmp_directory

    from kt_jupyter import debug_panel

    events: list[dict] = []
    dbg = debug_panel._debugger_class()(logging.getLogger("test"), None, events.append, None, None, [])
    dbg._kt_init()
    dbg.is_started = True  # as after JupyterLab's initialize/attach
    monkeypatch.setattr(ip, "kernel", SimpleNamespace(debugger=dbg), raising=False)
    os.makedirs(get_tmp_directory(), exist_ok=True)

    def ask(command: str, **arguments):
        return asyncio.run(dbg.process_request({"type": "request", "seq": 1, "command": command,
                                                "arguments": arguments}))

    cell = ("%%kt --backend kubernetes --name kpanel\n"
            "x = 41\n"
            "y = x + 1\n"              # line 3 <- breakpoint
            "print('y is', y)\n")
    path = ask("dumpCell", code=cell)["body"]["sourcePath"]
    assert ask("setBreakpoints", source={"path": path}, breakpoints=[{"line": 3}])["success"]
    os.remove(path)  # as on a real cluster, the pod has no copy: the panel must write it there first
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(ip, cell)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "stopped" for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = next(e for e in events if e.get("event") == "stopped")
    thread_id = stopped["body"]["threadId"]
    assert thread_id >= debug_panel.ID_SPAN
    with open(path) as f:
        assert f.read() == "# " + cell  # written by the pod kernel (cell_file), line for line
    frame = ask("stackTrace", threadId=thread_id)["body"]["stackFrames"][0]
    assert (frame["source"]["path"], frame["line"]) == (path, 3)
    scopes = ask("scopes", frameId=frame["id"])["body"]["scopes"]
    ref = next(s["variablesReference"] for s in scopes if s["name"].lower().startswith(("local", "global")))
    assert {v["name"]: v["value"] for v in ask("variables", variablesReference=ref)["body"]["variables"]}["x"] == "41"
    assert ask("continue", threadId=thread_id)["success"]
    thread.join(60)
    assert not thread.is_alive() and ip.user_ns["y"] == 42
    remote_port = next(t.port for t in cluster.backend._connector.opened if t.port != POD_KERNEL_PORT)
    assert remote_port  # debugpy was reached through the backend's forward
    link = dbg.kt_links[0]
    dbg.detach_pods()  # what the panel's disconnect does for the pods (tests/test_debug_panel.py sends it)
    assert not dbg.kt_links and link.closed


def test_forward_port_from_inside_the_cluster_says_what_to_do():
    from kt_jupyter.errors import KtError

    backend = KubernetesBackend(connector=ServiceDNSConnector())
    with pytest.raises(KtError, match=r"loopback.*kubectl port-forward .*:5678"):
        backend.forward_port("k", 5678)
