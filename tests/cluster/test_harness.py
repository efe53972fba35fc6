"""Proof that the test control plane is a real Kubernetes, not a stand-in.

Covers the version it reports, CRD schema validation, RBAC with ServiceAccount
tokens, and (cluster profile) Deployments reaching Running on kwok nodes and
garbage collection of owned objects.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from tests.fixtures.kube import ControlPlane, Scratch

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.harness.headway.dev"},
    "spec": {
        "group": "harness.headway.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"replicas": {"type": "integer", "minimum": 0}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def widget(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "harness.headway.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    }


def established(plane: ControlPlane, crd: str) -> bool:
    conditions = plane.get("crd", crd).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.mark.kube
def test_apiserver_reports_the_built_version(apiserver: ControlPlane) -> None:
    status, body = apiserver.request("GET", "/version")

    assert status == 200
    assert body["gitVersion"].startswith("v1.36.")
    assert body["major"] == "1"


@pytest.mark.kube
def test_crd_becomes_established_and_enforces_its_schema(
    apiserver: ControlPlane, scratch_namespace: Scratch
) -> None:
    apiserver.apply(WIDGET_CRD)
    apiserver.wait_for(
        lambda: established(apiserver, "widgets.harness.headway.dev"), "Widget CRD Established"
    )
    namespace = scratch_namespace("crd")

    apiserver.apply(widget(namespace, "good", 2))
    refused = apiserver.kubectl(
        "apply", "-f", "-", input=json.dumps(widget(namespace, "bad", -1)), check=False
    )

    assert apiserver.get("widget", "good", "-n", namespace)["spec"]["replicas"] == 2
    assert refused.returncode != 0
    assert "spec.replicas" in refused.stderr
    assert "greater than or equal to 0" in refused.stderr


@pytest.mark.kube
def test_service_account_token_is_held_to_its_cluster_role(
    apiserver: ControlPlane, scratch_namespace: Scratch
) -> None:
    namespace = scratch_namespace("rbac")
    reader = unique("configmap-reader")
    apiserver.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "narrow", "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": reader},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": reader},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": reader,
                },
                "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": namespace}],
            },
        ]
    )
    token = apiserver.token_for_service_account(namespace, "narrow")

    allowed, _ = apiserver.request("GET", f"/api/v1/namespaces/{namespace}/configmaps", token=token)
    denied, body = apiserver.request("GET", f"/api/v1/namespaces/{namespace}/secrets", token=token)

    assert allowed == 200
    assert denied == 403
    assert f"system:serviceaccount:{namespace}:narrow" in body["message"]


def pods_of(plane: ControlPlane, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = plane.get("pods", "-n", namespace, "-l", f"app={app}")["items"]
    return items


def running_on_kwok(plane: ControlPlane, namespace: str, app: str) -> dict[str, Any] | None:
    for pod in pods_of(plane, namespace, app):
        if pod["status"].get("phase") == "Running" and pod["spec"].get("nodeName"):
            return pod
    return None


def deployment(namespace: str, name: str, gpu: bool = False) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "registry.invalid/none:0"}
    pod_spec: dict[str, Any] = {"containers": [container]}
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
        pod_spec["nodeSelector"] = {"headway.dev/node-pool": "gpu"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


@pytest.mark.cluster
def test_deployment_pod_runs_on_a_kwok_node(
    cluster: ControlPlane, scratch_namespace: Scratch
) -> None:
    namespace = scratch_namespace("deploy")
    cluster.apply([deployment(namespace, "cpu-app"), deployment(namespace, "gpu-app", gpu=True)])

    cpu_pod = cluster.wait_for(
        lambda: running_on_kwok(cluster, namespace, "cpu-app"), "cpu-app pod Running"
    )
    gpu_pod = cluster.wait_for(
        lambda: running_on_kwok(cluster, namespace, "gpu-app"), "gpu-app pod Running"
    )
    replica_sets = cluster.get("replicasets", "-n", namespace)["items"]

    assert gpu_pod["spec"]["nodeName"] == cluster.nodes["gpu"]
    assert cpu_pod["spec"]["nodeName"] in cluster.nodes.values()
    assert cpu_pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert {rs["metadata"]["ownerReferences"][0]["name"] for rs in replica_sets} == {
        "cpu-app",
        "gpu-app",
    }
    assert cpu_pod["status"]["podIP"].startswith("127.0.1.")


@pytest.mark.cluster
def test_pod_can_be_given_a_loopback_ip(cluster: ControlPlane, scratch_namespace: Scratch) -> None:
    namespace = scratch_namespace("podip")
    cluster.apply(deployment(namespace, "sidecar"))
    pod = cluster.wait_for(
        lambda: running_on_kwok(cluster, namespace, "sidecar"), "sidecar pod Running"
    )
    name = pod["metadata"]["name"]

    ip = cluster.set_pod_ip(namespace, name)

    def patched() -> dict[str, Any] | None:
        status: dict[str, Any] = cluster.get("pod", name, "-n", namespace)["status"]
        return status if status.get("podIP") == ip else None

    status = cluster.wait_for(patched, f"pod {name} to keep IP {ip}")
    assert ip.startswith("127.")
    assert status["podIPs"] == [{"ip": ip}]


@pytest.mark.cluster
def test_deleting_an_owner_collects_its_children(
    cluster: ControlPlane, scratch_namespace: Scratch
) -> None:
    namespace = scratch_namespace("gc")
    cluster.apply(deployment(namespace, "doomed"))
    cluster.wait_for(lambda: running_on_kwok(cluster, namespace, "doomed"), "doomed pod Running")

    cluster.kubectl("delete", "deployment", "doomed", "-n", namespace, "--wait=false")

    cluster.wait_for(
        lambda: not cluster.get("replicasets", "-n", namespace)["items"], "ReplicaSet collected"
    )
    cluster.wait_for(lambda: not pods_of(cluster, namespace, "doomed"), "pods collected")


@pytest.mark.cluster
def test_a_scratch_namespace_gives_its_gpu_back(cluster: ControlPlane) -> None:
    with cluster.scratch_namespace("scratch") as namespace:
        cluster.apply(deployment(namespace, "holder", gpu=True))
        cluster.wait_for(lambda: running_on_kwok(cluster, namespace, "holder"), "holder Running")

    assert not cluster.get("pods", "-n", namespace)["items"]
    # The rest of the namespace goes in the background: Terminating or already gone.
    status, body = cluster.request("GET", f"/api/v1/namespaces/{namespace}")
    assert status == 404 or body["status"]["phase"] == "Terminating", body
