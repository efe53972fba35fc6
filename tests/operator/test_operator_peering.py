"""Case 39 (b): an active and a standby operator with distinct peering priorities.

The standby pauses while the active one runs and takes over once it is gone;
the chart's RBAC with operator.standby.enabled is all either one has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import poll
from tests.operator.test_operator_cases import _pool, _quota, _route, _tenants

pytestmark = pytest.mark.cluster


def test_case39_b_the_standby_pauses_then_takes_over(
    cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path
) -> None:
    operating.install_crds(cluster)
    cluster.kubectl(
        "apply", "--server-side", "-f", str(operating.ROOT / "helm/headway/crds/kopf-peering.yaml")
    )
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s"
    )
    namespace = scratch_namespace("peer")
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "headway", "namespace": namespace},
    }
    done = cluster.kubectl("create", "-f", "-", input=json.dumps(peering), check=False)
    assert done.returncode == 0, done.stderr
    token = operating.operator_token(cluster, "operator.standby.enabled=true", release="hwpeer")
    (tmp_path / "active").mkdir()
    (tmp_path / "standby").mkdir()
    active = operating.Operator(cluster, namespace, token, tmp_path / "active")
    standby = operating.Operator(cluster, namespace, token, tmp_path / "standby")
    try:
        active.start("--peering=headway", "--priority=200")
        poll(lambda: "Initial authentication has finished" in active.log(), "active up", 60)
        standby.start("--peering=headway", "--priority=100")
        cluster.apply([_pool(namespace), _route(namespace), _quota(namespace, "a")])
        poll(lambda: "a" in _tenants(cluster, namespace), "a served", 120, active, standby)
        time.sleep(3)  # several of the active one's 1 s passes
        # Paused in favour of the higher priority: the standby has rendered nothing.
        assert "config generation" in active.log()
        assert "config generation" not in standby.log()

        active.stop()  # a pod deleted: kopf leaves the peering on its way out
        cluster.apply(_quota(namespace, "b"))
        poll(lambda: "b" in _tenants(cluster, namespace), "b served by the standby", 120, standby)
        assert "config generation" in standby.log()
    finally:
        active.stop()
        standby.stop()
