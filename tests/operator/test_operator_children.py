"""The operator on a real control plane: examples/ in, exactly the expected children out.

The operator runs as `headway operator` with the chart's ServiceAccount token.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from headway_contract import load_hashing_keys, loads
from headway_operator import cli

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import condition, managed, poll

pytestmark = pytest.mark.cluster


@pytest.fixture
def namespace(cluster: ControlPlane, scratch_namespace: Scratch) -> str:
    operating.install_crds(cluster)
    return scratch_namespace("op")


@pytest.fixture
def operator(cluster: ControlPlane, namespace: str, tmp_path: Path) -> Any:
    token = operating.operator_token(cluster)
    with operating.running(cluster, namespace, token, tmp_path) as running:
        yield running


def _ready(obj: dict[str, Any], kind: str) -> bool:
    return condition(obj, kind).get("status") == "True"


def _examples_applied(cluster: ControlPlane, namespace: str, op: operating.Operator) -> None:
    cluster.apply(operating.examples(namespace))

    def converged() -> bool:
        pools = cluster.get("modelpools", "-n", namespace)["items"]
        routes = cluster.get("inferenceroutes", "-n", namespace)["items"]
        quotas = cluster.get("tokenquotas", "-n", namespace)["items"]
        return (
            len(pools) == 2
            and all(p.get("status", {}).get("config", {}).get("version") for p in pools)
            and len(routes) == 2
            and all(_ready(r, "Accepted") and _ready(r, "ResolvedRefs") for r in routes)
            and all(_ready(q, "Ready") for q in quotas)
            and len(managed(cluster, "services", namespace)) == 4
        )

    poll(converged, "examples converged", 180, op)


def test_examples_yield_exactly_the_expected_children(
    cluster: ControlPlane, namespace: str, operator: operating.Operator, tmp_path: Path
) -> None:
    _examples_applied(cluster, namespace, operator)
    pools = {p["metadata"]["name"]: p for p in cluster.get("modelpools", "-n", namespace)["items"]}

    # llama-8b asks for one warm placeholder, which the autoscaler's task keeps.
    poll(
        lambda: (
            set(managed(cluster, "deployments", namespace))
            == {"llama-8b", "llama-70b", "llama-8b-warm"}
        ),
        "exactly the pools' Deployments",
        60,
        operator,
    )
    assert set(managed(cluster, "services", namespace)) == {
        "llama-8b", "llama-70b", "chat", "chat-large"
    }  # fmt: skip
    assert set(managed(cluster, "configmaps", namespace)) == {"llama-8b-config", "llama-70b-config"}
    assert set(managed(cluster, "secrets", namespace)) == {
        "llama-8b-push-token", "llama-70b-push-token", "headway-hashing-keys"
    }  # fmt: skip

    # Every child of a pool is controlled by it, so the garbage collector removes it.
    for kind in ("deployments", "services", "configmaps", "secrets"):
        for name, child in managed(cluster, kind, namespace).items():
            if name == "headway-hashing-keys":
                assert "ownerReferences" not in child["metadata"]  # shared by the namespace
                continue
            (ref,) = child["metadata"]["ownerReferences"]
            owner = pools.get(ref["name"])
            if owner is not None:
                assert ref["uid"] == owner["metadata"]["uid"] and ref["controller"] is True
            else:
                assert ref["kind"] == "InferenceRoute" and ref["name"] == name

    # The documents in the ConfigMaps are what `headway render` makes of examples/
    # with the namespace's hashing key: the operator calls the same rendering.
    secret = cluster.get("secret", "headway-hashing-keys", "-n", namespace)
    key_file = tmp_path / "keys"
    key_file.write_bytes(base64.b64decode(secret["data"]["keys"]))
    for body in operating.examples(namespace):
        (tmp_path / "in").mkdir(exist_ok=True)
        name = f"{body['kind']}-{body['metadata']['name']}.json"
        (tmp_path / "in" / name).write_text(json.dumps(body))
    offline, problems = cli.render_files([str(tmp_path / "in")], keys=load_hashing_keys(key_file))
    assert problems == []
    for name, pool in pools.items():
        config_map = cluster.get("configmap", f"{name}-config", "-n", namespace)
        document = loads(config_map["data"]["config.json"])
        assert document.version == offline.documents[namespace, name].version
        assert pool["status"]["config"]["version"] == document.version
        # Raised once per content change while the examples arrive one by one.
        assert document.generation >= 1

    # kwok runs the pods but no sidecar answers on their IPs: a ready replica
    # is reported as not synced, with the address that failed.
    def reported() -> list[dict[str, Any]] | None:
        found = []
        for pool in cluster.get("modelpools", "-n", namespace)["items"]:
            status = pool.get("status", {})
            synced = condition(pool, "ConfigSynced")
            if status.get("readyReplicas", 0) == 0:
                if synced.get("status") != "Unknown":
                    return None
            elif synced.get("reason") != "PushFailed":
                return None
            found.append(pool)
        return found if any(p["status"].get("readyReplicas") for p in found) else None

    for pool in poll(reported, "ConfigSynced reported", 120, operator):
        status = pool["status"]
        assert status["config"]["syncedReplicas"] == 0
        if status["readyReplicas"]:
            assert ":9090" in condition(pool, "ConfigSynced")["message"]
            assert condition(pool, "Ready")["reason"] == "ConfigNotSynced"


def test_the_deployment_injects_the_sidecar(
    cluster: ControlPlane, namespace: str, operator: operating.Operator
) -> None:
    _examples_applied(cluster, namespace, operator)
    deployment = cluster.get("deployment", "llama-70b", "-n", namespace)
    spec = deployment["spec"]["template"]["spec"]
    server, sidecar = spec["containers"]

    assert deployment["spec"]["replicas"] == 1  # minReplicas, at creation only
    assert server["name"] == "vllm"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "volumeMounts" not in sidecar or sidecar["name"] == "headway-sidecar"
    assert sidecar["name"] == "headway-sidecar"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"]["requests"]["cpu"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert set(mounts) == {"headway-config", "headway-keys", "headway-push"}
    assert all("subPath" not in m for m in mounts.values())  # whole directories
    # The push token reaches the sidecar only.
    assert all(m["name"] != "headway-push" for m in server.get("volumeMounts", []))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["headway-config"]["configMap"]["name"] == "llama-70b-config"
    assert volumes["headway-push"]["secret"]["secretName"] == "llama-70b-push-token"
    assert spec["nodeSelector"] == {"headway.dev/node-pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["automountServiceAccountToken"] is False
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["headway.dev/pool"] == "llama-70b"
    assert labels["app.kubernetes.io/name"] == "llama-70b"  # the template's own stay

    route = cluster.get("service", "chat", "-n", namespace)
    assert route["spec"]["selector"] == {"route.headway.dev/chat": "true"}
    assert route["spec"]["ports"][0]["port"] == 8080


def test_a_users_edit_to_a_child_is_reverted(
    cluster: ControlPlane, namespace: str, operator: operating.Operator
) -> None:
    _examples_applied(cluster, namespace, operator)
    before = cluster.get("configmap", "llama-8b-config", "-n", namespace)["data"]["config.json"]
    cluster.kubectl(
        "patch", "configmap", "llama-8b-config", "-n", namespace, "--type=merge",
        "-p", json.dumps({"data": {"config.json": "{}"}}),
    )  # fmt: skip
    cluster.kubectl(
        "set", "image", "deployment/llama-8b", "headway-sidecar=evil:latest", "-n", namespace
    )

    def images() -> list[str]:
        deployment = cluster.get("deployment", "llama-8b", "-n", namespace)
        return [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]

    def reverted() -> bool:
        data = cluster.get("configmap", "llama-8b-config", "-n", namespace)["data"]
        return data["config.json"] == before and not any("evil" in i for i in images())

    poll(reverted, "edits reverted", 60, operator)

    # Replicas belong to the scaler (here a user, as with scaling.mode external):
    # the reconciles that follow keep the count and still revert the image.
    cluster.kubectl(
        "patch", "modelpool", "llama-8b", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"scaling": {"mode": "external"}}}),
    )  # fmt: skip
    cluster.kubectl("scale", "deployment/llama-8b", "--replicas=3", "-n", namespace)
    cluster.kubectl(
        "set", "image", "deployment/llama-8b", "headway-sidecar=evil:2", "-n", namespace
    )
    poll(lambda: not any("evil" in i for i in images()), "edit reverted again", 60, operator)
    assert cluster.get("deployment", "llama-8b", "-n", namespace)["spec"]["replicas"] == 3
    # The replica count is part of the config (each sidecar's fail-open share).
    poll(
        lambda: (
            loads(
                cluster.get("configmap", "llama-8b-config", "-n", namespace)["data"]["config.json"]
            ).replicas
            == 3
        ),
        "replicas in the config",
        60,
        operator,
    )


def test_missing_refs_and_refused_templates_are_reported(
    cluster: ControlPlane, namespace: str, operator: operating.Operator
) -> None:
    _examples_applied(cluster, namespace, operator)
    cluster.apply(
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "InferenceRoute",
            "metadata": {"name": "ghost", "namespace": namespace},
            "spec": {"model": "ghost", "backends": [{"pool": "llama-8b"}, {"pool": "nowhere"}]},
        }
    )
    pool = operating.examples(namespace)[1]  # llama-8b
    assert pool["metadata"]["name"] == "llama-8b"
    pool["metadata"]["name"] = "root"
    pool["spec"]["server"]["template"]["spec"]["hostNetwork"] = True
    pool["spec"]["server"]["template"]["spec"]["containers"][0]["securityContext"] = {
        "privileged": True
    }
    cluster.apply(pool)
    # Passes the operator's checks but not the API server's: reported, others go on.
    broken = copy.deepcopy(pool)
    broken["metadata"]["name"] = "broken"
    broken["spec"]["server"]["template"]["spec"] = {"containers": [{"name": "server"}]}
    cluster.apply(broken)

    def reported() -> tuple[dict[str, Any], dict[str, Any]] | None:
        route = cluster.get("inferenceroute", "ghost", "-n", namespace)
        root = cluster.get("modelpool", "root", "-n", namespace)
        refs, ready = condition(route, "ResolvedRefs"), condition(root, "Ready")
        if refs.get("status") == "False" and ready.get("reason") == "TemplateRefused":
            return refs, ready
        return None

    refs, ready = poll(reported, "conditions", 60, operator)
    rejected = poll(
        lambda: (
            condition(cluster.get("modelpool", "broken", "-n", namespace), "Ready")
            if condition(cluster.get("modelpool", "broken", "-n", namespace), "Ready").get("reason")
            == "ChildRejected"
            else None
        ),
        "broken pool reported",
        60,
        operator,
    )
    assert "image" in rejected["message"]
    assert "'nowhere'" in refs["message"] and refs["reason"] == "PoolNotFound"
    assert "hostNetwork" in ready["message"] and "privileged" in ready["message"]
    assert "root" not in managed(cluster, "deployments", namespace)

    def events() -> set[str] | None:
        items = cluster.get("events", "-n", namespace)["items"]
        reasons = {e["reason"] for e in items if e["source"].get("component") == "headway-operator"}
        return reasons if {"PoolNotFound", "TemplateRefused"} <= reasons else None

    poll(events, "Events", 60, operator)
    # The rest of the route is still served by the pool that exists.
    document = loads(
        cluster.get("configmap", "llama-8b-config", "-n", namespace)["data"]["config.json"]
    )
    assert document.route("ghost") is not None


def test_deleting_resources_removes_children_and_config(
    cluster: ControlPlane, namespace: str, operator: operating.Operator
) -> None:
    _examples_applied(cluster, namespace, operator)
    cluster.kubectl("delete", "inferenceroute", "chat-large", "-n", namespace)
    cluster.kubectl("delete", "tokenquota", "analytics", "-n", namespace)

    def cleaned() -> bool:
        document = loads(
            cluster.get("configmap", "llama-70b-config", "-n", namespace)["data"]["config.json"]
        )
        tenants = {t.name for t in document.tenants}
        return (
            document.route("chat-large") is None
            and "analytics" not in tenants
            and "chat-large" not in managed(cluster, "services", namespace)
        )

    poll(cleaned, "route and tenant removed", 120, operator)

    cluster.kubectl("delete", "modelpool", "llama-70b", "-n", namespace, "--timeout=60s")
    poll(
        lambda: (
            not {n for n in managed(cluster, "deployments", namespace) if n == "llama-70b"}
            and "llama-70b-config" not in managed(cluster, "configmaps", namespace)
        ),
        "children collected",
        120,
        operator,
    )
    route = poll(
        lambda: (
            (r := cluster.get("inferenceroute", "chat", "-n", namespace))
            and condition(r, "ResolvedRefs").get("status") == "False"
            and r
        ),
        "chat reports the missing pool",
        60,
        operator,
    )
    assert "llama-70b" in condition(route, "ResolvedRefs")["message"]
