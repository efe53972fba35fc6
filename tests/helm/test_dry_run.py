"""Every rendering of the chart, validated by the real kube-apiserver.

`kubectl apply --dry-run=server --validate=strict` runs the API server's own
schemas, defaulting and admission on each object without storing it, so a
misspelt field or a wrong type fails here as it would on a user's cluster.
The chart's CRDs (Headway's and kopf's peering) are installed first, and a
stand-in PodMonitor CRD (tests/helm/data) for the monitoring rendering.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import ControlPlane, Scratch
from tests.helm import charting
from tests.helm.charting import CHART, VALUES, Helm, objects_of

pytestmark = pytest.mark.kube

DATA = Path(__file__).resolve().parent / "data"
NAMESPACED = VALUES["namespaced"]["operator"]["watchNamespaces"]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return charting.make_helm(tmp_path_factory.mktemp("helm-home"))


def _apply_crds(api: ControlPlane, path: Path) -> None:
    done = api.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=headway-helm-tests",
        "-f", str(path), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    names = [doc["metadata"]["name"] for f in files for doc in yaml.safe_load_all(f.read_text())]
    done = api.kubectl(
        "wait", "--for=condition=Established", "--timeout=120s",
        *(f"crd/{name}" for name in names), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def api(apiserver: ControlPlane) -> ControlPlane:
    """The API server with the chart's CRDs and the namespaces renderings use."""
    _apply_crds(apiserver, CHART / "crds")
    _apply_crds(apiserver, DATA / "podmonitor-crd.yaml")
    for namespace in NAMESPACED:
        apiserver.create_namespace(namespace)
    return apiserver


def _dry_run(api: ControlPlane, manifest: str) -> str:
    done = api.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest, check=False
    )
    assert done.returncode == 0, f"{done.stderr}\n--- manifest ---\n{manifest}"
    return done.stdout


@pytest.mark.parametrize("name", sorted(VALUES))
def test_api_server_accepts_rendering(
    api: ControlPlane, scratch_namespace: Scratch, helm: Helm, name: str
) -> None:
    namespace = scratch_namespace(f"hw-dry-{name}")
    extra = ("--api-versions", "monitoring.coreos.com/v1") if name == "monitoring" else ()
    manifest = helm.template(VALUES[name], *extra, namespace=namespace).stdout

    out = _dry_run(api, manifest)

    rendered = [doc for doc in yaml.safe_load_all(manifest) if doc]
    assert len(out.strip().splitlines()) == len(rendered)
    assert all(line.endswith("(server dry run)") for line in out.strip().splitlines())
    if name == "monitoring":
        assert "podmonitor.monitoring.coreos.com" in out


def test_api_server_refuses_a_broken_object(
    api: ControlPlane, scratch_namespace: Scratch, helm: Helm
) -> None:
    # The dry run above can fail: a field the API does not know is refused.
    namespace = scratch_namespace("hw-dry-broken")
    objects = helm.render({}, namespace=namespace)
    deployment = objects_of(objects, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 1
    done = api.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [deployment]}),
        check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "prot" in done.stderr


def _rbac(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    roles = objects_of(objects, "ClusterRole") + objects_of(objects, "Role")
    bindings = objects_of(objects, "ClusterRoleBinding") + objects_of(objects, "RoleBinding")
    return roles, bindings


@pytest.mark.parametrize("name", ["default", "namespaced"])
def test_rbac_binds_the_operator_service_account(helm: Helm, name: str) -> None:
    objects = helm.render(VALUES[name], namespace="ops")
    (account,) = objects_of(objects, "ServiceAccount")
    for deployment in objects_of(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
    roles, bindings = _rbac(objects)
    assert roles and bindings
    role_names = {(r["kind"], r["metadata"]["name"]) for r in roles}
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ops"}
        ]
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"]) in role_names or ref["kind"] == "ClusterRole"


def test_namespaced_install_reads_secrets_only_in_its_namespaces(helm: Helm) -> None:
    objects = helm.render(VALUES["namespaced"], namespace="ops")
    roles, _ = _rbac(objects)
    for role in roles:
        grants_secrets = any("secrets" in rule.get("resources", []) for rule in role["rules"])
        if grants_secrets:
            assert role["kind"] == "Role", f"{role['metadata']['name']} reads Secrets cluster-wide"
            assert role["metadata"]["namespace"] in NAMESPACED
    secret_namespaces = {
        r["metadata"].get("namespace")
        for r in roles
        if any("secrets" in rule.get("resources", []) for rule in r["rules"])
    }
    assert secret_namespaces == set(NAMESPACED)


def test_helm_server_dry_run_installs(
    api: ControlPlane, scratch_namespace: Scratch, helm: Helm
) -> None:
    namespace = scratch_namespace("hw-dry-install")
    done = helm.with_kubeconfig(api.kubeconfig).run(
        "install", f"hw-{secrets.token_hex(3)}", str(CHART), "--namespace", namespace,
        "--dry-run=server",
    )  # fmt: skip
    assert "STATUS: pending-install" in done.stdout
    # Capabilities came from this API server's discovery, which serves
    # monitoring.coreos.com/v1 since the module fixture installed the stand-in.
    assert "kind: PodMonitor" in done.stdout
    assert "No PodMonitor was created" not in done.stdout
