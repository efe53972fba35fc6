"""examples/autoscaling/: the HPA and KEDA examples agree with the pool and the sidecar.

The HPA is checked by the real API server (server-side dry run); KEDA's CRD is
not installed there, so the ScaledObject is checked against the pool it scales
and the series the sidecar exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from headway_operator import specs
from headway_sidecar.metrics import Metrics
from prometheus_client import CollectorRegistry

from tests.fixtures.kube import ControlPlane, Scratch

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "examples" / "autoscaling"


def load(name: str) -> Any:
    return yaml.safe_load((FOLDER / name).read_text())


def llama_8b(external: bool = True) -> specs.ModelPool:
    body = yaml.safe_load((REPO / "examples" / "llama-8b.yaml").read_text())
    if external:
        body["spec"]["scaling"].update(load("external-mode.yaml")["spec"]["scaling"])
    return specs.parse_model_pool(body)


def exported() -> set[str]:
    """Every series name a sidecar exports (histograms with _bucket, _sum, _count)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def series_in(query: str) -> set[str]:
    """Series names in a PromQL query; label names (followed by ``=``) are not."""
    return set(re.findall(r"\bheadway_[a-z_]+\b(?!\s*=)", query))


def test_every_file_is_yaml_and_external_mode_parses() -> None:
    files = sorted(FOLDER.glob("*.yaml"))
    assert {f.name for f in files} >= {"hpa.yaml", "keda-scaledobject.yaml", "external-mode.yaml"}
    for path in files:
        assert yaml.safe_load(path.read_text()), path
    assert llama_8b().scaling.mode == "external"


def test_keda_follows_the_pools_targets_and_the_sidecars_series() -> None:
    pool = llama_8b()
    scaled = load("keda-scaledobject.yaml")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}

    assert scaled["spec"]["scaleTargetRef"]["name"] == pool.name  # the Deployment's name
    assert scaled["spec"]["minReplicaCount"] == pool.scaling.min_replicas
    assert scaled["spec"]["maxReplicaCount"] == pool.scaling.max_replicas
    demand = triggers["realtime-demand"]["metadata"]
    per_replica = pool.capacity.max_concurrency + pool.scaling.target_queue_per_replica
    assert float(demand["threshold"]) == per_replica
    ttft = triggers["realtime-ttft-p95"]["metadata"]
    assert float(ttft["threshold"]) == pool.scaling.ttft_target
    for trigger in triggers.values():
        query = trigger["metadata"]["query"]
        assert series_in(query) and series_in(query) <= exported(), query
        assert f'pool="{pool.name}"' in query


def test_adapter_rule_and_hpa_name_the_same_metric_of_sidecar_series() -> None:
    pool = llama_8b()
    rule = load("prometheus-adapter-values.yaml")["rules"]["custom"][0]
    hpa = load("hpa.yaml")
    metric = hpa["spec"]["metrics"][0]["pods"]

    assert metric["metric"]["name"] == rule["name"]["as"]
    assert series_in(rule["metricsQuery"]) <= exported()
    per_replica = pool.capacity.max_concurrency + pool.scaling.target_queue_per_replica
    assert float(metric["target"]["averageValue"]) == per_replica
    assert hpa["spec"]["scaleTargetRef"]["name"] == pool.name
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        pool.scaling.min_replicas,
        pool.scaling.max_replicas,
    )
    down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert down == pool.scaling.scale_down_delay


@pytest.mark.kube
def test_the_api_server_accepts_the_hpa(
    apiserver: ControlPlane, scratch_namespace: Scratch
) -> None:
    namespace = scratch_namespace("autoscaling-examples")
    done = apiserver.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace,
        "-f", str(FOLDER / "hpa.yaml"), "-o", "json",
    )  # fmt: skip
    accepted = json.loads(done.stdout)
    assert accepted["kind"] == "HorizontalPodAutoscaler"
    assert accepted["spec"]["metrics"][0]["pods"]["metric"]["name"] == "headway_realtime_demand"
