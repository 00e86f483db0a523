"""Distributed computes on Kubernetes (issue 22): a headless Service + StatefulSet per pytorch compute, a KubeRay
RayCluster per ray compute; manifests checked against the Kubernetes and KubeRay schemas, and two ranks brought up
on the fake cluster (:class:`~k8s_fake.statefulsets.FakeStatefulSetController`, whose fake cluster DNS resolves
rank 0's name), where a cell runs torch.distributed's all_reduce over gloo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator
from k8s_fake.cluster import FLAKY_IMAGE, MISSING_IMAGE, NS, fake_cluster
from k8s_fake.kuberay import FakeKubeRayOperator
from k8s_fake.statefulsets import cluster_dns_available
from test_compute_api import _strict, schema_errors

import kt_jupyter as kt
from kt_jupyter.backends import kubernetes_distributed as kd
from kt_jupyter.compute import Compute, Image
from kt_jupyter.distributed_group import connect_group, forget, free_port
from kt_jupyter.errors import (
    BackendUnavailable,
    ComputeSpecError,
    CrashLoopError,
    ImagePullError,
    KubernetesAPIError,
    UnschedulableError,
)
from kt_jupyter.manifests import (
    CONTAINER_NAME,
    SPEC_ANNOTATION,
    build_deployment,
    label_selector,
)
from kt_jupyter.manifests_distributed import (
    RAY_OVERWRITE_CMD_ANNOTATION,
    build_headless_service,
    build_raycluster,
    build_statefulset,
    rank_dns_name,
)

RAY_CRD = Path(__file__).resolve().parent / "schemas" / "ray.io_rayclusters.yaml"
INSTALL_ENV = {"PIP_INDEX_URL": "https://pypi.example/simple"}
#: Every rank adds rank+1 over gloo; two ranks sum to 3. The env is read back as each rank sees it.
ALL_REDUCE = """
import os, socket, torch, torch.distributed as dist
env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
print("env", sorted(env.items()))
try:
    socket.getaddrinfo(env["MASTER_ADDR"], None)
    resolves = True
except OSError:
    resolves = False
if resolves:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print("sum", t.item())
"""


def kt_backend():
    """The Kubernetes backend of this process (the fake cluster's)."""
    from kt_jupyter.backends import get_backend

    return get_backend("kubernetes")


def deleting(obj: dict | None) -> bool:
    """Gone, or being deleted in the foreground (a deletionTimestamp while its pods go)."""
    return obj is None or bool(obj["metadata"].get("deletionTimestamp"))


def torch_compute(name: str = "ddp", workers: int = 2, distribution_args: dict | None = None, **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **{"namespace": "ml", **kw}).distribute(
        "pytorch", workers=workers, distribution_args=distribution_args)


# ---------------------------------------------------------------------- pytorch: manifests

def test_statefulset_reuses_the_deployment_pod_and_adds_the_rank_environment():
    compute = torch_compute(workers=4, gpus=1, memory="8Gi")
    sts = build_statefulset(compute, install_env=INSTALL_ENV)
    single = build_deployment(compute.with_overrides(distributed=None), install_env=INSTALL_ENV)
    spec = sts["spec"]
    assert (spec["replicas"], spec["podManagementPolicy"], spec["serviceName"]) == (4, "Parallel", "tester-ddp")
    pod, single_pod = spec["template"]["spec"], single["spec"]["template"]["spec"]
    container = pod["containers"][0]
    single_container = single_pod["containers"][0]
    for key in ("securityContext", "startupProbe", "readinessProbe", "resources", "volumeMounts", "image"):
        assert container[key] == single_container[key], key  # the same pod kernel container
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # GPUs per worker
    assert pod["securityContext"] == single_pod["securityContext"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MASTER_ADDR"] == "tester-ddp-0.tester-ddp.ml.svc" == rank_dns_name(compute, 0)
    assert (env["WORLD_SIZE"], env["MASTER_PORT"], env["LOCAL_RANK"]) == ("4", "29500", "0")
    assert "RANK" not in env  # from the pod's ordinal, in the container's shell
    assert container["command"][-1].startswith('RANK="${HOSTNAME##*-}"')
    assert any(p["name"] == "rendezvous" and p["containerPort"] == 29500 for p in container["ports"])
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert json.loads(sts["metadata"]["annotations"][SPEC_ANNOTATION])["distributed"]["workers"] == 4
    svc = build_headless_service(compute)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_what_a_pytorch_group_applies_validates_against_the_kubernetes_schema(kt_home):
    from kubernetes_validate.utils import latest_version, validate

    version = latest_version()
    objects = kd.group_objects(torch_compute(gpus=1, distribution_args={"master_port": 29600}), "t0ken")
    kinds = [o["kind"] for o in objects]
    assert kinds[:2] == ["Secret", "ConfigMap"] and kinds[-1] == "StatefulSet" and "Service" in kinds
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):  # the ranks reach each other
        assert {"from": [{"podSelector": {"matchLabels": {"kt.dev/compute": "tester-ddp"}}}]} in \
            policy["spec"]["ingress"]
    for obj in objects:
        assert validate(obj, version, strict=True), obj["kind"]


def test_a_sized_volume_is_one_claim_every_rank_mounts(kt_home):
    shared = kt.Volume("data", size="10Gi", access_mode="ReadWriteMany")
    objects = kd.group_objects(torch_compute(workers=3, volumes=[shared]), "t0ken")
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert [(c["metadata"]["name"], c["spec"]["accessModes"]) for c in claims] == [("data", ["ReadWriteMany"])]
    sts = objects[-1]
    assert "volumeClaimTemplates" not in sts["spec"]  # not a disk per rank: the one claim, in the pod template
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "data"}} in \
        sts["spec"]["template"]["spec"]["volumes"]
    with pytest.raises(ComputeSpecError, match="'data' is ReadWriteOncePod, but all 2 workers of 'ddp' mount it"):
        build_statefulset(torch_compute(volumes=[kt.Volume("data", size="1Gi", access_mode="ReadWriteOncePod")]))
    build_statefulset(torch_compute(workers=1, volumes=[kt.Volume("data", size="1Gi", access_mode="ReadWriteOncePod")]))


def test_inactivity_ttl_is_refused_with_a_clear_error():
    with pytest.raises(Exception, match="inactivity_ttl is not supported with distribute"):
        build_statefulset(torch_compute(inactivity_ttl="10m"), install_env=INSTALL_ENV)


# ---------------------------------------------------------------------- ray: the RayCluster against KubeRay's CRD

@pytest.fixture(scope="module")
def ray_schema() -> Draft7Validator:
    crd = yaml.load(RAY_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 0.9 MB of YAML
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def test_raycluster_passes_the_kuberay_crd_schema(ray_schema):
    compute = Compute(name="rc", backend="kubernetes", namespace="ml", gpus=1).distribute(
        "ray", workers=3, distribution_args={"num_cpus": 2, "ray_version": "2.60.0"})
    rc = build_raycluster(compute, install_env=INSTALL_ENV)
    assert schema_errors(ray_schema, rc) == []
    assert rc["metadata"]["annotations"][RAY_OVERWRITE_CMD_ANNOTATION] == "true"
    spec = rc["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["name"] == CONTAINER_NAME and "readinessProbe" in head  # the pod kernel runs in the head pod
    assert 'eval "$KUBERAY_GEN_RAY_START_CMD" &' in head["command"][-1] and "-m pod_kernel" in head["command"][-1]
    assert {e["name"]: e.get("value") for e in head["env"]}["RAY_ADDRESS"] == "127.0.0.1:6379"
    (group,) = spec["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"] == {"num-cpus": "2"}
    worker = group["template"]["spec"]["containers"][0]
    assert worker["command"][-1].endswith('eval "exec $KUBERAY_GEN_RAY_START_CMD"') and "readinessProbe" not in worker
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_ray_schema_check_refuses_what_the_api_server_would(ray_schema):
    compute = Compute(name="rc", backend="kubernetes", namespace="ml").distribute("ray", workers=2)
    rc = build_raycluster(compute, install_env=INSTALL_ENV)
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 1  # a typo: an unknown field
    del rc["spec"]["headGroupSpec"]["template"]
    errors = schema_errors(ray_schema, rc)
    assert any("replica" in e for e in errors) and any("template" in e for e in errors)


# ---------------------------------------------------------------------- on the fake cluster

@pytest.fixture
def cluster(tmp_path, monkeypatch, kt_home):
    """A fake cluster with the StatefulSet controller; the `kubernetes` backend of this process uses it."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


def test_two_ranks_on_the_fake_cluster_run_a_gloo_all_reduce(cluster, ip, capsys):
    pytest.importorskip("torch")
    from ipshell import run
    from test_distributed import all_reduce_rank

    port = free_port()  # rank 0's rendezvous port: every fake pod listens on this machine
    compute = kt.Compute(name="ddpk", backend="kubernetes").distribute("pytorch", workers=2,
                                                                      distribution_args={"master_port": port})
    lines: list[str] = []
    group = connect_group(compute, on_event=lines.append)  # seed API: the StatefulSet, both ranks ready, connected
    assert [c.handle.where.split()[1] for c in group.ranks] == ["tester-ddpk-0", "tester-ddpk-1"]
    assert any("all 2 workers of 'ddpk' ready in" in line for line in lines)
    master = f"tester-ddpk-0.tester-ddpk.{NS}.svc"
    if cluster_dns_available():  # the fake cluster DNS resolves rank 0's name to its pod: the world forms
        results = kt.fn(all_reduce_rank, name="ddpk").to(compute)()
        assert [(r["rank"], r["sum"], r["env"]["MASTER_ADDR"]) for r in results] == [(0, 3.0, master),
                                                                                   (1, 3.0, master)]
    run(ip, "%kt config backend=kubernetes")
    run(ip, "%%kt --workers 2 --name ddpk\n" + ALL_REDUCE)  # the running ranks, through the magic
    out = capsys.readouterr().out
    for rank in (0, 1):
        env = [("LOCAL_RANK", "0"), ("MASTER_ADDR", master), ("MASTER_PORT", str(port)), ("NODE_RANK", str(rank)),
               ("RANK", str(rank)), ("WORLD_SIZE", "2")]
        assert f"[stdout:{rank}] env {env}" in out, out
        if cluster_dns_available():
            assert f"[stdout:{rank}] sum 3.0" in out, out
    sts = cluster.store.get("statefulsets", NS, "tester-ddpk")
    assert sts["status"]["readyReplicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    pods = {p["metadata"]["name"]: p for p in cluster.pods(compute)}
    assert sorted(pods) == ["tester-ddpk-0", "tester-ddpk-1"]
    assert pods["tester-ddpk-1"]["spec"]["subdomain"] == "tester-ddpk"
    assert pods["tester-ddpk-1"]["metadata"]["labels"]["apps.kubernetes.io/pod-index"] == "1"
    run(ip, "%kt logs ddpk-r1 --tail 50")  # one rank's log, by its name
    assert "serving on 127.0.0.1" in capsys.readouterr().out
    run(ip, "%kt status ddpk")
    status = capsys.readouterr().out
    assert "ddpk: 2 pytorch workers (ddpk-r0, ddpk-r1)" in status
    assert "--- rank 1\nready: pod tester-ddpk-1 on node fake-node-1" in status
    assert [p["metadata"]["name"] for p in kd.rank_pods_of_name("ddpk-r1")] == ["tester-ddpk-1"]  # its logs
    assert kd.rank_pods_of_name("ddpk-r2") == [] and kd.status_of_name("ddpk-r2") is None
    whole = kd.status_of_name("ddpk")  # the group as one compute (what the backend's status says of it)
    assert (whole.phase, whole.detail) == ("ready", "2 pytorch workers (ddpk-r0, ddpk-r1)")
    from kt_jupyter.widgets.panel import group_monitors

    monitors = group_monitors(["ddpk-r0", "ddpk-r1"], "kubernetes", [c.handle for c in group.ranks])
    assert [m.status.where.split()[1] for m in monitors] == ["tester-ddpk-0", "tester-ddpk-1"]
    assert all(m.metrics.current("cpu").endswith("%") for m in monitors)  # each rank's own sample, via its pod
    for m in monitors:
        m.stop()
    run(ip, "%kt list --backend kubernetes")  # the group once, by its name, not a row per rank
    listed = capsys.readouterr().out
    assert "2 pytorch workers: StatefulSet tester-ddpk" in listed and "ddpk-r" not in listed, listed
    assert [r.name for r in kt_backend().list()] == ["ddpk"]
    # another worker count under the same name is a clear error; a single kernel of that name too
    with pytest.raises(Exception, match="runs 2 pytorch workers, not 3 pytorch"):
        run(ip, "%%kt --workers 3 --name ddpk\n1")
    with pytest.raises(Exception, match="runs as 2 pytorch workers; add --workers 2"):
        run(ip, "%%kt --name ddpk\n1")
    with pytest.raises(Exception, match=r"already running with memory=None \(not '3Gi'\)"):
        run(ip, "%%kt --workers 2 --memory 3Gi --name ddpk\n1")
    cluster.store.delete("pods", NS, "tester-ddpk-1", grace_period_s=1)  # evicted: the world lost a rank
    why = group.ranks[1].handle.close_hook.__self__.wait_gone(30)  # its pod watch tells, no API request
    assert why.startswith("pod kernel 'ddpk-r1' (pod tester-ddpk-1) was deleted or evicted (its StatefulSet is "
                          "starting it again)"), why
    assert group.liveness() == f"rank 1 of 'ddpk': {why}"  # the group's answer names the rank
    assert kd.status_of_name("ddpk").phase in ("launching", "ready")  # the StatefulSet brings rank 1 back
    forget("kubernetes", "ddpk")  # another process: it finds the StatefulSet's spec and compares
    with pytest.raises(Exception, match=r"already running with memory=None \(not '3Gi'\)"):
        connect_group(compute.with_overrides(memory="3Gi"))
    run(ip, "%kt down ddpk")
    for plural in ("statefulsets", "pods", "services", "secrets", "configmaps"):
        assert not cluster.objects(plural, label_selector(compute)), plural


def test_workers_another_notebook_restarted_are_used_not_replaced(cluster):
    """Another notebook restarts the group (`%kt restart`: delete it, apply it again). This process's next use finds
    its ranks gone and new pods, all started since: it uses them rather than deleting the group and applying it
    once more (which the other notebook's next cell would answer in turn)."""
    import time

    from barriers import wait_until

    compute = kt.Compute(name="ddpr", backend="kubernetes").distribute("pytorch", workers=2)
    group = connect_group(compute)
    try:
        time.sleep(1.1)  # a pod's start time has whole seconds; a person restarts it later than that
        assert kd.delete_group("ddpr", NS, grace_period_s=1)  # the other notebook's restart, in its own words
        kd.launch_group(compute)
        uid = cluster.store.get("statefulsets", NS, "tester-ddpr")["metadata"]["uid"]
        wait_until(lambda: group.liveness() is not None, 30, "the old ranks seen gone")
        events: list[str] = []
        again = connect_group(compute, on_event=events.append)
        assert any("another notebook restarted them" in e for e in events), events
        assert cluster.store.get("statefulsets", NS, "tester-ddpr")["metadata"]["uid"] == uid  # not applied again
        assert [c.handle.where.split()[1] for c in again.ranks] == ["tester-ddpr-0", "tester-ddpr-1"]
        assert again.liveness() is None
    finally:
        forget("kubernetes", "ddpr")
        kd.delete_group("ddpr", NS, grace_period_s=1)


def test_a_rank_that_cannot_start_is_named_and_its_statefulset_deleted(cluster):
    compute = Compute(name="bad", backend="kubernetes", image=MISSING_IMAGE).distribute("pytorch", workers=2)
    with pytest.raises(ImagePullError, match=r"worker rank \d \(bad-r\d\) did not start, so none of the 2 workers"):
        connect_group(compute)
    assert deleting(cluster.store.get("statefulsets", NS, "tester-bad"))


def test_a_crash_looping_rank_is_named_with_its_last_log_lines(cluster):
    image = Image().run_bash("echo 'cannot reach the dataset bucket' >&2; exit 3")
    compute = Compute(name="crash", backend="kubernetes", image=image).distribute("pytorch", workers=2)
    with pytest.raises(CrashLoopError, match=r"worker rank \d \(crash-r\d\) did not start") as raised:
        connect_group(compute)
    assert "Last log lines of the container:\n" in str(raised.value)
    assert "cannot reach the dataset bucket" in str(raised.value)


def test_a_rank_whose_image_pull_meets_a_registry_429_is_said_and_retried(cluster):
    """A rank's pod is judged as a single kernel's: a 429 the kubelet retries is a progress line naming the rank,
    not silence (nor a failure), and the group starts once the pull goes through."""
    messages: list[str] = []
    compute = Compute(name="flaky", backend="kubernetes", image=FLAKY_IMAGE).distribute("pytorch", workers=2)
    group = connect_group(compute, on_event=messages.append)
    assert any(re.match(r"worker rank \d \(flaky-r\d\): image pull failed; the kubelet retries it \(ErrImagePull:", m)
               and "429 Too Many Requests" in m for m in messages), messages
    assert len(group.ranks) == 2


def test_an_unschedulable_rank_is_named_once_its_grace_has_passed(cluster, monkeypatch):
    monkeypatch.setenv("KT_UNSCHEDULABLE_GRACE", "0.5")  # no autoscaler adds a node with this many CPUs
    compute = Compute(name="big", backend="kubernetes", cpus=64).distribute("pytorch", workers=2)
    with pytest.raises(UnschedulableError, match=r"worker rank \d \(big-r\d\) did not start.*Insufficient cpu"):
        connect_group(compute)
    assert deleting(cluster.store.get("statefulsets", NS, "tester-big"))


def test_a_namespace_that_forbids_network_policies_says_how_to_go_on(cluster):
    cluster.store.denied.add(("patch", "networkpolicies"))
    compute = Compute(name="np", backend="kubernetes").distribute("pytorch", workers=2)
    with pytest.raises(KubernetesAPIError, match="allow networkpolicies in namespace 'kt-test', or set "
                                                 "KT_NETWORK_POLICY=0") as raised:
        connect_group(compute)
    assert "`%kt down np` removes the rest" in str(raised.value)


def test_a_user_who_may_not_read_statefulsets_still_runs_single_kernels(cluster, ip):
    from ipshell import run

    cluster.store.denied |= {("get", "statefulsets"), ("get", "rayclusters")}  # a namespace's edit-less role
    cluster.store.denied |= {("list", "statefulsets"), ("list", "rayclusters")}
    run(ip, "%%kt --backend kubernetes --name one\nx = 41 + 1")
    assert ip.user_ns["x"] == 42
    assert [r.name for r in kt_backend().list()] == ["one"]  # what it may not read it has none of


def test_a_ray_compute_without_kuberay_names_the_operator(cluster):
    compute = Compute(name="rc", backend="kubernetes").distribute("ray", workers=2)
    with pytest.raises(BackendUnavailable, match=f"KubeRay operator.*KubeRay {kd.KUBERAY_MIN_VERSION} or later") \
            as raised:
        connect_group(compute)
    assert "\n" not in str(raised.value)  # one line: nothing else to say


def test_a_ray_compute_runs_its_cells_in_the_kuberay_head_pod(cluster, ip, capsys):
    from ipshell import run

    FakeKubeRayOperator.install(cluster.kubelet)  # the fake runs no Ray: the head pod's pod kernel only
    run(ip, "%kt config backend=kubernetes")
    run(ip, "%%kt --workers 3 --framework ray --name rk\nimport os\n"
            "seen = (os.environ['RAY_ADDRESS'], os.environ['RAY_AUTH_MODE'], os.environ['HOSTNAME'])")
    assert ip.user_ns["seen"] == ("127.0.0.1:6379", "token", "tester-rk-head")
    assert "the Ray head (its workers join it) of 'rk' ready in" in capsys.readouterr().err
    rc = cluster.store.get("rayclusters", NS, "tester-rk")
    assert rc["spec"]["workerGroupSpecs"][0]["replicas"] == 2 and rc["status"]["desiredWorkerReplicas"] == 2
    assert [(r.name, r.where) for r in kt_backend().list()] == [
        ("rk", f"3 ray workers: RayCluster tester-rk (namespace {NS})")]
    run(ip, "%kt status rk")
    status = capsys.readouterr().out
    assert "--- rank 0\nready: pod tester-rk-head on node fake-node-1" in status
    assert "--- rank 2\na Ray worker pod (a Ray node, no pod kernel)" in status
    with pytest.raises(Exception, match="runs 3 ray workers, not 2 ray"):
        run(ip, "%%kt --workers 2 --framework ray --name rk\n1")
    run(ip, "%kt down rk")
    compute = Compute(name="rk", backend="kubernetes")
    assert cluster.store.get("rayclusters", NS, "tester-rk") is None
    for plural in ("pods", "secrets", "configmaps"):
        assert not cluster.objects(plural, label_selector(compute)), plural
