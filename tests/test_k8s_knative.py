"""Autoscaled computes on the Kubernetes backend: a Knative Service, against the fake cluster with its fake
Knative Serving (:class:`k8s_fake.knative.FakeKnativeServing`: Configuration, Revision, the Revision's
Deployment and pods, the Service's conditions as Knative sets them, min-scale, scale to zero).

The notebook reaches the Revision's pod through the production port-forward connector (the fake API
server's WebSocket relay), as it reaches a Deployment's pod.
"""

from __future__ import annotations

import pytest

from kt_jupyter import backends as backends_mod
from kt_jupyter.backends.kubernetes import KubernetesBackend
from kt_jupyter.compute import Compute, Image
from kt_jupyter.errors import (BackendUnavailable, ComputeSpecError, CrashLoopError, KubernetesAPIError, LaunchError,
                               NotFoundError)
from k8s_fake.cluster import MISSING_IMAGE, NS, fake_cluster
from k8s_fake.knative import SERVICES, FakeKnativeServing

SECURITY_FLAG = "kubernetes.podspec-securitycontext"
#: Seconds the fake cluster may take to remove what a test deleted.
GONE_TIMEOUT_S = 30


@pytest.fixture
def knative(tmp_path, monkeypatch, kt_home):
    """A fake cluster with Knative Serving; the process's `kubernetes` backend uses the real port-forward."""
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        # as an admin enables it for kt's pod (its restricted securityContext): see the flags test below
        cluster.knative = FakeKnativeServing(cluster.kubelet, features={SECURITY_FLAG: "enabled"}).start()
        backend = KubernetesBackend()  # outside a cluster: the production PortForwardConnector
        monkeypatch.setitem(backends_mod._instances, "kubernetes", backend)
        cluster.backend = backend
        try:
            yield cluster
        finally:
            for live in list(backend._live.values()):
                live.close()


def autoscaled(name: str, min_replicas: int, **kw) -> Compute:
    return Compute(name=name, backend="kubernetes", **kw).autoscale(min_replicas=min_replicas, max_replicas=3,
                                                                     target_concurrency=1)


def test_autoscaled_compute_runs_as_a_knative_service_and_down_deletes_it(knative):
    lines: list[str] = []
    compute = autoscaled("auto", 1)
    svc = compute.service_name
    handle = knative.backend.launch(compute, on_event=lines.append)

    applied = [r for r in knative.store.requests if r["method"] == "PATCH" and "serving.knative.dev" in r["path"]]
    assert [r["path"] for r in applied] == [f"/apis/serving.knative.dev/v1/namespaces/{NS}/services/{svc}"]
    assert applied[0]["content_type"] == "application/apply-patch+yaml" and applied[0]["field_manager"] == "kt-jupyter"
    assert knative.store.get("services", NS, svc) is None  # no core Service of ours: Knative makes its own
    service = knative.store.get(SERVICES, NS, svc)
    assert {c["type"]: c["status"] for c in service["status"]["conditions"]} == {
        "ConfigurationsReady": "True", "Ready": "True", "RoutesReady": "True"}
    assert service["status"]["latestReadyRevisionName"] == f"{svc}-00001"
    text = "\n".join(lines)
    assert f'Knative: Configuration "{svc}" is waiting for a Revision to become ready.' in text
    assert "min_replicas" not in text  # min_replicas=1: no scale-to-zero warning
    assert f"(Knative revision {svc}-00001)" in lines[-1]

    # the pod is the Revision's: Knative's labels, owned by the Revision's Deployment (through its ReplicaSet)
    (pod,) = knative.pods(compute)
    labels = pod["metadata"]["labels"]
    assert labels["serving.knative.dev/service"] == svc and labels["serving.knative.dev/revision"] == f"{svc}-00001"
    (rs_ref,) = pod["metadata"]["ownerReferences"]
    rs = knative.store.get("replicasets", NS, rs_ref["name"])
    assert rs["metadata"]["ownerReferences"][0]["name"] == f"{svc}-00001-deployment"
    assert handle.where.startswith(f"pod {pod['metadata']['name']} ")

    # a cell through the production port-forward to the Revision's pod
    session = handle.session()
    session.connect()
    assert session.execute("import os\nstate = os.environ['K_REVISION']\nstate").data == {
        "text/plain": repr(f"{svc}-00001")}
    session.close()
    assert any(r["path"].endswith(f"/pods/{pod['metadata']['name']}/portforward") for r in knative.store.requests)

    # status, reuse, and another notebook finding it by name
    info = knative.backend.status("auto")
    assert info.phase == "ready" and "Knative" in info.where
    assert [(i.name, i.phase) for i in knative.backend.list()] == [("auto", "ready")]  # %kt list shows it once
    again: list[str] = []
    assert knative.backend.launch(compute, on_event=again.append).token == handle.token
    assert "reusing the running pod kernel 'auto'" in again[0]
    other = KubernetesBackend().find("auto")
    assert other is not None and other.token == handle.token and other.spec["autoscaling"]["min_replicas"] == 1
    assert not knative.knative.scale_to_zero(NS, svc)  # min-scale 1 keeps the pod
    with pytest.raises(ComputeSpecError, match="autoscaling="):
        knative.backend.launch(autoscaled("auto", 2))  # another spec under the same name: refused, not replaced

    # %kt down: the Knative Service in the foreground, and everything it made goes with it
    assert knative.backend.delete("auto", grace_period_s=1)
    assert ("services.serving.knative.dev", svc, None, "Foreground") in [
        (p, n, g, pr) for p, n, g, pr in knative.store.deletions if p.startswith("services")]
    for plural in (SERVICES, "revisions", "configurations", "routes", "deployments", "pods", "secrets"):
        assert not knative.objects(plural, f"kt.dev/compute={svc}") and not knative.store.get(plural, NS, svc), plural
    with pytest.raises(NotFoundError):
        knative.backend.status("auto")


def test_min_replicas_zero_warns_and_a_scaled_to_zero_compute_starts_afresh(knative):
    lines: list[str] = []
    compute = autoscaled("zero", 0)
    handle = knative.backend.launch(compute, on_event=lines.append)
    assert any("min_replicas=0" in line and "kernel state is lost" in line for line in lines)
    session = handle.session()
    session.connect()
    session.execute("marker = 'before'")
    session.close()

    assert knative.knative.scale_to_zero(NS, compute.service_name)  # the autoscaler saw no requests
    assert knative.backend.wait_gone("zero", GONE_TIMEOUT_S) is not None
    gone = handle.liveness()  # what the notebook is told
    assert gone.startswith("Knative scaled compute 'zero' to zero") and "the kernel's state" in gone
    info = knative.backend.status("zero")
    assert info.phase == "stopped" and "the next cell starts a new one" in info.detail

    lines.clear()
    fresh = knative.backend.launch(compute, on_event=lines.append)
    assert "Knative scaled compute 'zero' to zero" in lines[0] and "Starting a new one" in lines[0]
    session = fresh.session()
    session.connect()
    assert session.execute("'marker' in globals()").data == {"text/plain": "False"}  # a new kernel, said so above
    session.close()
    knative.backend.delete("zero", grace_period_s=1)


def test_an_image_the_registry_lacks_is_knatives_revision_failure(knative):
    compute = autoscaled("noimg", 1, image=MISSING_IMAGE)
    with pytest.raises(LaunchError) as err:
        knative.backend.launch(compute)
    message = str(err.value)
    assert "Knative cannot run compute 'noimg': RevisionFailed" in message
    assert f'Unable to fetch image "{MISSING_IMAGE}"' in message and "%kt down noimg" in message
    assert not knative.pods(compute)  # Knative resolves the digest before it makes a pod
    info = knative.backend.status("noimg")
    assert info.phase == "failed" and "RevisionFailed" in info.detail
    assert knative.backend.delete("noimg")
    assert knative.store.get(SERVICES, NS, compute.service_name) is None


def test_a_crashing_revision_pod_is_diagnosed_as_a_deployments_is(knative):
    image = Image().run_bash("echo 'cannot reach the dataset bucket' >&2; exit 3")
    with pytest.raises(CrashLoopError) as err:
        knative.backend.launch(autoscaled("crash", 1, image=image))
    text = str(err.value)
    assert "CrashLoopBackOff" in text and "exit code 3" in text and "cannot reach the dataset bucket" in text
    assert "%kt down crash" in text
    assert knative.backend.delete("crash", grace_period_s=1)


def test_a_knative_that_has_not_enabled_the_pods_fields_is_told_which_flags_to_enable(tmp_path, monkeypatch,
                                                                                      kt_home):
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        FakeKnativeServing(cluster.kubelet).start()  # config-features as Knative ships it
        compute = autoscaled("flags", 1, node_selector={"pool": "cpu"})
        with pytest.raises(KubernetesAPIError) as err:
            cluster.backend.launch(compute)
        message = str(err.value)
        assert "must not set the field(s): spec.template.spec.nodeSelector" in message  # Knative's own words
        assert "spec.template.spec.securityContext.fsGroup" in message
        assert "config-features ConfigMap (namespace knative-serving)" in message
        assert f"{SECURITY_FLAG}: enabled" in message and "kubernetes.podspec-nodeselector: enabled" in message
        assert cluster.store.get(SERVICES, NS, compute.service_name) is None and not cluster.pods(compute)
        assert "%kt down flags" in message  # the Secret and ConfigMap applied before it stay, and it says so


def test_a_cluster_without_knative_serving_is_one_clear_message(tmp_path, monkeypatch, kt_home):
    with fake_cluster(tmp_path, monkeypatch) as cluster:
        with pytest.raises(BackendUnavailable) as err:
            cluster.backend.launch(autoscaled("nokn", 1))
        assert "this cluster has no Knative Serving" in str(err.value) and "services.serving.knative.dev" in str(
            err.value) and "drop autoscale()" in str(err.value)
        assert not cluster.objects("secrets")  # nothing applied before the check
        assert not cluster.backend.delete("nokn")  # and a name that is nowhere is no error
        assert cluster.backend.list() == []  # %kt list: no Knative API is no error either


def test_inside_the_cluster_without_a_port_forward_it_says_what_to_do_before_touching_the_cluster():
    from kt_jupyter.backends.portforward import ServiceDNSConnector

    backend = KubernetesBackend(api_client=object(), connector=ServiceDNSConnector())  # any API call would fail
    with pytest.raises(BackendUnavailable) as err:
        backend.launch(autoscaled("svc", 0))
    assert "routes only port 80 through Knative's ingress" in str(err.value)
    assert "KT_K8S_CONNECT=port-forward" in str(err.value)
