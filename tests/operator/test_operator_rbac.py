"""The chart's RBAC is enough for the operator and no more; the namespaced variant works too.

Every other operator test already runs with the chart's ServiceAccount token
(a missing permission fails them); these check the other side.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import condition, managed, poll

pytestmark = pytest.mark.cluster


def _can(cluster: ControlPlane, token: str, *args: str) -> bool:
    done = cluster.kubectl("auth", "can-i", *args, token=token, check=False)
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), done.stderr
    return answer == "yes"


def test_the_cluster_role_grants_what_the_operator_uses_and_no_more(
    cluster: ControlPlane,
) -> None:
    operating.install_crds(cluster)
    token = operating.operator_token(cluster)
    allowed = [
        ("watch", "modelpools.headway.dev"),
        ("patch", "modelpools.headway.dev", "--subresource=status"),
        ("create", "deployments.apps"),
        ("patch", "deployments.apps", "--subresource=scale"),
        ("create", "secrets"),
        ("list", "secrets"),
        ("patch", "pods"),
        ("create", "events"),
    ]
    refused = [
        ("patch", "modelpools.headway.dev"),  # the spec is the user's
        ("delete", "modelpools.headway.dev"),
        ("delete", "services"),
        ("delete", "secrets"),
        ("patch", "secrets"),  # push tokens and hashing keys are never rewritten
        ("delete", "pods"),
        ("create", "pods"),
        ("get", "nodes"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "kopfpeerings.kopf.dev"),  # only with a standby
    ]
    for args in allowed:
        assert _can(cluster, token, *args, "-A"), args
    for args in refused:
        assert not _can(cluster, token, *args, "-A"), args


def test_a_namespaced_install_runs_the_operator_with_roles_only(
    cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path
) -> None:
    operating.install_crds(cluster)
    namespace = scratch_namespace("rbac")
    release = "hwns"
    objects = operating.render_rbac(
        cluster, f"operator.watchNamespaces={{{namespace}}}", release=release
    )
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Role", "RoleBinding", "ServiceAccount"]
    assert all(o["metadata"].get("namespace") for o in objects)
    cluster.apply(objects)
    token = cluster.token_for_service_account(
        operating.RELEASE_NAMESPACE, f"{release}-headway-operator"
    )
    assert _can(cluster, token, "list", "secrets", "-n", namespace)
    assert not _can(cluster, token, "list", "secrets", "-n", "kube-system")

    with operating.running(cluster, namespace, token, tmp_path) as operator:
        cluster.apply(operating.examples(namespace))
        poll(
            lambda: (
                {"chat", "chat-large"} <= set(managed(cluster, "services", namespace))
                and all(
                    condition(r, "Accepted").get("status") == "True"
                    for r in cluster.get("inferenceroutes", "-n", namespace)["items"]
                )
            ),
            "examples reconciled with Roles only",
            180,
            operator,
        )
        assert "Forbidden" not in operator.log()
