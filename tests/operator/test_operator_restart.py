"""An operator killed half-way, or restarted at rest, converges without duplicates or rewrites."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from headway_contract import loads

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import condition, managed, poll

pytestmark = pytest.mark.cluster

EXPECTED = {
    "deployments": {"llama-8b", "llama-70b", "llama-8b-warm"},
    "services": {"llama-8b", "llama-70b", "chat", "chat-large"},
    "configmaps": {"llama-8b-config", "llama-70b-config"},
    "secrets": {"llama-8b-push-token", "llama-70b-push-token", "headway-hashing-keys"},
}


def _children(cluster: ControlPlane, namespace: str) -> dict[str, dict[str, dict[str, Any]]]:
    return {kind: managed(cluster, kind, namespace) for kind in EXPECTED}


def _converged(cluster: ControlPlane, namespace: str) -> bool:
    children = _children(cluster, namespace)
    if any(set(children[kind]) != names for kind, names in EXPECTED.items()):
        return False
    pools = cluster.get("modelpools", "-n", namespace)["items"]
    routes = cluster.get("inferenceroutes", "-n", namespace)["items"]
    return all(p.get("status", {}).get("config", {}).get("version") for p in pools) and all(
        condition(r, "Accepted").get("status") == "True" for r in routes
    )


def _replica_sets(cluster: ControlPlane, namespace: str, pool: str) -> list[str]:
    items = cluster.get("replicasets", "-n", namespace, "-l", f"headway.dev/pool={pool}")["items"]
    return [item["metadata"]["name"] for item in items]


def test_an_operator_killed_mid_way_converges_without_duplicates(
    cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path
) -> None:
    operating.install_crds(cluster)
    namespace = scratch_namespace("restart")
    operator = operating.Operator(cluster, namespace, operating.operator_token(cluster), tmp_path)
    operator.start()
    try:
        cluster.apply(operating.examples(namespace))
        # Kill it (no cleanup at all) as soon as it has written part of the children.
        poll(
            lambda: managed(cluster, "configmaps", namespace) or None, "first child", 120, operator
        )
        operator.stop(signal.SIGKILL)

        operator.start()
        poll(lambda: _converged(cluster, namespace), "converged after the kill", 180, operator)
        first = _children(cluster, namespace)
        for pool in ("llama-8b", "llama-70b"):
            # One ReplicaSet each: the restart did not change the pod template.
            assert len(_replica_sets(cluster, namespace, pool)) == 1
            assert first["deployments"][pool]["spec"]["replicas"] == 1
        tokens = {n: s["data"] for n, s in first["secrets"].items()}

        # A restart at rest rewrites nothing: same objects, same content, same generation.
        operator.stop()
        operator.start()
        poll(lambda: operator.log().count("Initial authentication has finished") >= 3, "start")
        poll(lambda: _converged(cluster, namespace), "converged after the restart", 120, operator)
        # Give the new process a few of its 1 s sync intervals to rewrite anything it would.
        time.sleep(5)
        operator.check_alive()
        second = _children(cluster, namespace)
        for kind in ("services", "configmaps", "secrets"):
            for name, child in second[kind].items():
                before = first[kind][name]["metadata"]["resourceVersion"]
                assert child["metadata"]["resourceVersion"] == before, (kind, name)
        for name, deployment in second["deployments"].items():
            assert (
                deployment["metadata"]["generation"]
                == (first["deployments"][name]["metadata"]["generation"])
            )
        assert {n: s["data"] for n, s in second["secrets"].items()} == tokens
        for name in ("llama-8b-config", "llama-70b-config"):
            before_doc = loads(first["configmaps"][name]["data"]["config.json"])
            after_doc = loads(second["configmaps"][name]["data"]["config.json"])
            assert after_doc.generation == before_doc.generation
    finally:
        operator.stop()
