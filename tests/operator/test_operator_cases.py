"""Cases 37-40 of ../shared/cases/gateway-failures.md, against a real control plane.

37: status written through the subresource with no kopf "inconsistencies" and no loop.
38: no finalizer of ours or kopf's, so deletes never wait, with or without an operator.
39: watch timeouts set, peering only with distinct priorities, large objects in the stream.
40: an invalid object that got past an older CRD: InvalidSpec, others still served,
    the config keeps its last good content.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from headway_contract import loads
from headway_operator import running

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import condition, poll

POOL_TEMPLATE = {"spec": {"containers": [{"name": "server", "image": "example/server:1"}]}}


def _pool(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "pool", "namespace": namespace},
        "spec": {
            "models": ["m"],
            "server": {"template": POOL_TEMPLATE},
            "scaling": {"mode": "external"},
            "nodePool": {"gpusPerReplica": 0},
        },
    }


def _route(namespace: str, name: str = "chat") -> dict[str, Any]:
    return {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "InferenceRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": name, "backends": [{"pool": "pool"}]},
    }


def _quota(namespace: str, name: str, tokens_per_minute: int = 1000) -> dict[str, Any]:
    return {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "TokenQuota",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"limits": {"tokensPerMinute": tokens_per_minute}},
    }


def _document(cluster: ControlPlane, namespace: str) -> Any:
    config_map = cluster.get("configmap", "pool-config", "-n", namespace)
    return loads(config_map["data"]["config.json"])


def _tenants(cluster: ControlPlane, namespace: str) -> set[str]:
    try:
        return {t.name for t in _document(cluster, namespace).tenants}
    except Exception:  # not written yet
        return set()


@pytest.fixture
def setup(
    cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path
) -> tuple[ControlPlane, str, str, Path]:
    operating.install_crds(cluster)
    namespace = scratch_namespace("case")
    return cluster, namespace, operating.operator_token(cluster), tmp_path


@pytest.mark.cluster
def test_case37_status_lands_once_without_inconsistencies(
    setup: tuple[ControlPlane, str, str, Path],
) -> None:
    cluster, namespace, token, workdir = setup
    with operating.running(cluster, namespace, token, workdir) as operator:
        cluster.apply([_pool(namespace), _route(namespace)])
        route = poll(
            lambda: (
                (r := cluster.get("inferenceroute", "chat", "-n", namespace))
                and condition(r, "Accepted").get("status") == "True"
                and r
            ),
            "route Accepted",
            120,
            operator,
        )
        created = int(route["metadata"]["resourceVersion"])
        # Several 1 s sync passes later the route has not been written again.
        time.sleep(5)
        again = cluster.get("inferenceroute", "chat", "-n", namespace)
        assert again["metadata"]["resourceVersion"] == route["metadata"]["resourceVersion"]
        assert again["status"] == route["status"]
        assert condition(again, "ResolvedRefs")["status"] == "True"
        assert created > 0
        assert "inconsistencies" not in operator.log()
        # kopf keeps nothing in our strict status, nor in annotations, for event handlers.
        assert set(again["status"]) == {"conditions"}


@pytest.mark.cluster
def test_case38_deletes_never_wait_for_a_finalizer(
    setup: tuple[ControlPlane, str, str, Path],
) -> None:
    cluster, namespace, token, workdir = setup
    with operating.running(cluster, namespace, token, workdir) as operator:
        cluster.apply([_pool(namespace), _route(namespace), _quota(namespace, "keeper")])
        poll(lambda: "keeper" in _tenants(cluster, namespace), "keeper served", 120, operator)
        for _ in range(10):
            cluster.apply(_quota(namespace, "p1"))
            poll(lambda: "p1" in _tenants(cluster, namespace), "p1 in the config", 60, operator)
            quota = cluster.get("tokenquota", "p1", "-n", namespace)
            assert not quota["metadata"].get("finalizers")
            before = _document(cluster, namespace).version
            cluster.kubectl("delete", "tokenquota", "p1", "-n", namespace, "--timeout=30s")
            poll(
                lambda before=before: (  # type: ignore[misc]
                    "p1" not in _tenants(cluster, namespace)
                    and _document(cluster, namespace).version != before
                ),
                "p1 gone from the config",
                60,
                operator,
            )
        for kind in ("modelpool", "inferenceroute", "tokenquota"):
            for item in cluster.get(kind, "-n", namespace)["items"]:
                assert not item["metadata"].get("finalizers"), item["metadata"]
                annotations = item["metadata"].get("annotations") or {}
                assert not any(k.startswith("headway.dev/") for k in annotations)

    # With no operator at all, deleting still completes: nothing waits for it.
    cluster.apply(_quota(namespace, "p2"))
    cluster.kubectl("delete", "tokenquota", "p2", "-n", namespace, "--timeout=30s")
    cluster.kubectl("delete", "modelpool", "pool", "-n", namespace, "--timeout=30s")
    assert not cluster.get("tokenquotas", "-n", namespace, "--field-selector=metadata.name=p2")[
        "items"
    ]


def test_case39_watch_timeouts_are_set_and_peering_needs_a_priority() -> None:
    flags = running.parse(["ns"], False, [])
    settings = running.settings(flags)
    assert settings.watching.server_timeout == 600
    assert settings.watching.client_timeout == 660
    assert settings.watching.connect_timeout
    assert settings.peering.standalone is True
    # kopf must keep its state out of our strict status schemas.
    assert settings.persistence.progress_storage.__class__.__name__ == (
        "AnnotationsProgressStorage"
    )
    assert settings.scanning.disabled is True

    with pytest.raises(SystemExit):
        running.parse([], True, ["--", "--peering", "headway"])  # no priority: refused
    with pytest.raises(SystemExit):
        running.parse([], True, ["--watch-server-timeout=60s", "--watch-client-timeout=30s"])
    standby = running.settings(
        running.parse([], True, ["--", "--peering", "headway", "--priority", "100"])
    )
    assert standby.peering.standalone is False
    assert standby.peering.priority == 100
    assert standby.peering.name == "headway"


@pytest.mark.cluster
def test_case39_large_objects_in_the_watch_stream(
    setup: tuple[ControlPlane, str, str, Path],
) -> None:
    cluster, namespace, token, workdir = setup
    with operating.running(cluster, namespace, token, workdir) as operator:
        cluster.apply([_pool(namespace), _route(namespace), _quota(namespace, "a")])
        poll(lambda: "a" in _tenants(cluster, namespace), "a served", 120, operator)
        # Close to the API server's 1 MiB limit on a Secret: one watch line of ~1.3 MB.
        big = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "big", "namespace": namespace},
            "stringData": {f"k{i}": "x" * 100_000 for i in range(9)},
        }
        # create, not apply: apply would copy it into an annotation (256 KiB at most).
        cluster.kubectl("create", "-f", "-", input=json.dumps(big))
        cluster.apply(_quota(namespace, "b"))
        poll(lambda: "b" in _tenants(cluster, namespace), "b served after", 120, operator)
        assert "too long" not in operator.log().lower()


def _permissive(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as an older release might have had it: no schema checks at all."""
    loose = copy.deepcopy(crd)
    for version in loose["spec"]["versions"]:
        version["schema"] = {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        }
        version.pop("selectableFields", None)
    return loose


@pytest.mark.cluster
def test_case40_an_invalid_object_keeps_the_last_good_config(
    setup: tuple[ControlPlane, str, str, Path],
) -> None:
    cluster, namespace, token, workdir = setup
    crd = yaml.safe_load((operating.ROOT / "crds" / "tokenquotas.yaml").read_text())
    with operating.running(cluster, namespace, token, workdir) as operator:
        cluster.apply([_pool(namespace), _route(namespace), _quota(namespace, "team")])
        poll(lambda: "team" in _tenants(cluster, namespace), "team served", 120, operator)
        good = _document(cluster, namespace)
        try:
            cluster.apply(_permissive(crd))
            bad = _quota(namespace, "team")
            bad["spec"] = {"tenant": "x" * 300, "limits": {"tokensPerMinute": -5, "rpm": "ten"}}
            cluster.apply(bad)
            quota = poll(
                lambda: (
                    (q := cluster.get("tokenquota", "team", "-n", namespace))
                    and condition(q, "Ready").get("reason") == "InvalidSpec"
                    and q
                ),
                "InvalidSpec",
                60,
                operator,
            )
            assert "spec." in condition(quota, "Ready")["message"]

            # Others keep being reconciled; the bad one keeps its last good limits.
            cluster.apply(_quota(namespace, "other"))
            poll(lambda: "other" in _tenants(cluster, namespace), "other served", 60, operator)
            document = _document(cluster, namespace)
            (team,) = [t for t in document.tenants if t.name == "team"]
            (good_team,) = [t for t in good.tenants if t.name == "team"]
            assert team == good_team
        finally:
            operating.install_crds(cluster)
