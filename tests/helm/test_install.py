"""`helm install` onto the cluster profile, and the Makefile's cluster targets.

kwok marks pods Running on its fake nodes, so `--wait` sees the operator and
Redis Deployments become Available exactly as on a real cluster; nothing runs
in them. `make deploy` and `make kind-demo` need only helm and kubectl, so
they run here against the same API server (kind and Docker cannot).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import ControlPlane, Scratch, free_port, write_kubeconfig
from tests.helm import charting
from tests.helm.charting import CHART, REPO, Helm
from tests.operator import operating

pytestmark = pytest.mark.cluster


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    fullname: str
    values: dict[str, Any]
    watched: str | None = None  # the one namespace of a namespaced install


@pytest.fixture(scope="module")
def helm(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return charting.make_helm(tmp_path_factory.mktemp("helm-home")).with_kubeconfig(
        cluster.kubeconfig
    )


@contextlib.contextmanager
def _installed(
    cluster: ControlPlane, helm: Helm, values: dict[str, Any], watched: str | None = None
) -> Iterator[Release]:
    """The chart installed into a scratch namespace, uninstalled and deleted after."""
    name = f"hw-{secrets.token_hex(3)}"
    with cluster.scratch_namespace("hw-install") as namespace:
        with charting.values_file(values) as path:
            helm.run(
                "install", name, str(CHART), "--namespace", namespace,
                "-f", str(path), "--wait", "--timeout", "5m",
            )  # fmt: skip
        release = Release(name, namespace, f"{name}-headway", values, watched)
        try:
            yield release
        finally:
            helm.run("uninstall", name, "--namespace", namespace, "--wait", check=False)


@pytest.fixture(scope="module")
def release(cluster: ControlPlane, helm: Helm) -> Iterator[Release]:
    """The chart installed with its Redis, waited on until every Deployment is Available."""
    with _installed(cluster, helm, {"redis": {"enabled": True}}) as installed:
        yield installed


@pytest.fixture(scope="module")
def namespaced_release(cluster: ControlPlane, helm: Helm) -> Iterator[Release]:
    """The chart watching one namespace, with a Role there and nothing cluster-wide."""
    with (
        cluster.scratch_namespace("hw-team") as watched,
        _installed(cluster, helm, {"operator": {"watchNamespaces": [watched]}}, watched) as made,
    ):
        yield made


def _remove_examples(cluster: ControlPlane, namespace: str) -> None:
    """Delete the example pools from a namespace that outlives the test, and their pods.

    The Deployments are the pools' children, so the garbage collector takes them.
    """
    cluster.kubectl("delete", "modelpools,inferenceroutes,tokenquotas", "--all", "-n", namespace)
    cluster.wait_for(
        lambda: not cluster.get("pods", "-n", namespace)["items"], f"pods of {namespace} gone"
    )


def _crd_names() -> list[str]:
    names = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        names += [doc["metadata"]["name"] for doc in yaml.safe_load_all(path.read_text()) if doc]
    return names


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition["type"] == kind:
            status: str = condition["status"]
            return status
    return None


def test_install_establishes_every_crd(cluster: ControlPlane, release: Release) -> None:
    del release
    names = _crd_names()
    assert "modelpools.headway.dev" in names and "clusterkopfpeerings.kopf.dev" in names
    for name in names:
        assert _condition(cluster.get("crd", name), "Established") == "True", name


@pytest.mark.parametrize("component", ["operator", "redis"])
def test_deployment_is_available_on_a_kwok_node(
    cluster: ControlPlane, release: Release, component: str
) -> None:
    deployment = cluster.get(
        "deployment", f"{release.fullname}-{component}", "-n", release.namespace
    )
    assert _condition(deployment, "Available") == "True"
    assert deployment["status"]["availableReplicas"] == 1

    labels = deployment["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods = cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]
    assert len(pods) == 1
    (pod,) = pods
    assert pod["spec"]["nodeName"] in cluster.nodes.values()
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_operator_pod_runs_as_the_chart_service_account(
    cluster: ControlPlane, release: Release
) -> None:
    account = f"{release.fullname}-operator"
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    (pod,) = cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]
    assert pod["spec"]["serviceAccountName"] == account

    token = cluster.token_for_service_account(release.namespace, account)

    def can_i(*args: str) -> str:
        done = cluster.kubectl("auth", "can-i", *args, token=token, check=False)
        return done.stdout.strip()

    assert can_i("watch", "modelpools.headway.dev", "--all-namespaces") == "yes"
    assert can_i("patch", "deployments", "-n", "default") == "yes"
    # Least privilege: no cluster administration.
    assert can_i("delete", "nodes") == "no"
    assert can_i("create", "clusterrolebindings") == "no"
    assert can_i("delete", "namespaces") == "no"


def test_namespaced_install_grants_nothing_outside_its_namespace(
    cluster: ControlPlane, namespaced_release: Release
) -> None:
    release = namespaced_release
    deployment = cluster.get("deployment", f"{release.fullname}-operator", "-n", release.namespace)
    assert _condition(deployment, "Available") == "True"
    token = cluster.token_for_service_account(release.namespace, f"{release.fullname}-operator")

    def can_i(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", *args, token=token, check=False).stdout.strip()

    assert can_i("list", "secrets", "-n", str(release.watched)) == "yes"
    assert can_i("watch", "modelpools.headway.dev", "-n", str(release.watched)) == "yes"
    assert can_i("list", "secrets", "-n", "default") == "no"
    assert can_i("list", "secrets", "--all-namespaces") == "no"
    assert can_i("watch", "modelpools.headway.dev", "--all-namespaces") == "no"


def test_crd_upgrade_step_applies_changed_crds_over_helms(
    cluster: ControlPlane, release: Release, tmp_path: Path
) -> None:
    """The upgrade step docs/install.md gives, on CRDs Helm created."""
    del release
    crds = tmp_path / "crds"
    shutil.copytree(CHART / "crds", crds)  # dereferences the links
    path = crds / "modelpools.yaml"
    crd = yaml.safe_load(path.read_text())
    column = crd["spec"]["versions"][0]["additionalPrinterColumns"][0]
    original = column["description"]
    column["description"] = f"{original} (upgraded)"
    path.write_text(yaml.safe_dump(crd))

    # Helm applies them server-side as field manager "helm" (or another test
    # of the session did, under its own name): without --force-conflicts
    # every changed field is a conflict.
    upgrade = ("apply", "--server-side", "--force-conflicts")
    refused = cluster.kubectl("apply", "--server-side", "-f", str(crds), check=False)
    assert refused.returncode != 0
    assert re.search(r'conflicts? with "', refused.stderr), refused.stderr
    try:
        cluster.kubectl(*upgrade, "-f", str(crds))
        served = cluster.get("crd", "modelpools.headway.dev")
        assert served["spec"]["versions"][0]["additionalPrinterColumns"][0]["description"] == (
            f"{original} (upgraded)"
        )
    finally:
        # Put back the CRD the rest of the session expects.
        cluster.kubectl(*upgrade, "-f", str(CHART / "crds"))
    served = cluster.get("crd", "modelpools.headway.dev")
    assert served["spec"]["versions"][0]["additionalPrinterColumns"][0]["description"] == original


def _make(
    target: str, *variables: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, *variables],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_make_deploy_installs_the_chart(
    cluster: ControlPlane, scratch_namespace: Scratch, helm: Helm
) -> None:
    namespace = scratch_namespace("hw-deploy")
    kubectl = f"{cluster.bin_dir / 'kubectl'} --kubeconfig={cluster.kubeconfig}"
    helm_cmd = f"{helm.binary} --kubeconfig={cluster.kubeconfig}"
    try:
        _make(
            "deploy", f"KUBECTL={kubectl}", f"HELM={helm_cmd}", f"NAMESPACE={namespace}",
            env=helm.environment(),
        )  # fmt: skip
        deployment = cluster.get("deployment", "headway-operator", "-n", namespace)
        assert _condition(deployment, "Available") == "True"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "headway:dev"
        redis = cluster.get("deployment", "headway-redis", "-n", namespace)
        assert _condition(redis, "Available") == "True"
    finally:
        helm.run("uninstall", "headway", "--namespace", namespace, "--wait", check=False)


def test_make_kind_demo_swaps_every_pool_server_for_the_simulator(
    cluster: ControlPlane, release: Release, scratch_namespace: Scratch
) -> None:
    del release  # for the CRDs
    namespace = scratch_namespace("hw-demo")
    kubectl = f"{cluster.bin_dir / 'kubectl'} --kubeconfig={cluster.kubeconfig} -n {namespace}"

    _make("kind-demo", f"KUBECTL={kubectl}", "IMAGE_TAG=demo")

    pools = cluster.get("modelpools", "-n", namespace)["items"]
    assert sorted(p["metadata"]["name"] for p in pools) == ["llama-70b", "llama-8b"]
    for pool in pools:
        (container,) = pool["spec"]["server"]["template"]["spec"]["containers"]
        port = pool["spec"]["server"]["port"]
        assert container["image"] == "headway:demo"
        assert container["args"] == ["simulate", f"--listen=127.0.0.1:{port}"]
    assert len(cluster.get("inferenceroutes", "-n", namespace)["items"]) == 2
    assert len(cluster.get("tokenquotas", "-n", namespace)["items"]) == 3


# --- the installed operator's arguments, run locally with its ServiceAccount ----


@contextlib.contextmanager
def _chart_operator(
    cluster: ControlPlane, release: Release, workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`headway` with the installed Deployment's own arguments and the chart's token.

    Only the liveness address changes: the pod's 0.0.0.0 becomes a free
    loopback port. Yields the process and its liveness URL.
    """
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    (deployment,) = cluster.get("deployments", "-n", release.namespace, "-l", selector)["items"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    args = [
        f"--liveness={liveness}" if arg.startswith("--liveness=") else arg
        for arg in container["args"]
    ]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = workdir / "operator-kubeconfig"
    token = cluster.token_for_service_account(release.namespace, account)
    write_kubeconfig(kubeconfig, cluster.url, cluster.ca_file, token)
    log = workdir / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("headway")), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            start_new_session=True,
        )
    try:
        yield process, liveness
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll like the fixtures do, but fail at once, with the log, if the operator exits."""
    deadline = time.monotonic() + 180
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the operator exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-6000:]}")
        time.sleep(0.5)


def _exists(cluster: ControlPlane, kind: str, name: str, namespace: str) -> bool:
    return cluster.kubectl("get", kind, name, "-n", namespace, check=False).returncode == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.parametrize("installed", ["release", "namespaced_release"])
def test_chart_operator_reconciles_examples(
    cluster: ControlPlane,
    helm: Helm,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    scratch_namespace: Scratch,
    installed: str,
) -> None:
    release: Release = request.getfixturevalue(installed)
    if release.watched:
        # The watched namespace lives as long as the module: give its GPUs back now.
        request.addfinalizer(lambda: _remove_examples(cluster, str(release.watched)))
    namespace = release.watched or scratch_namespace("hw-examples")
    chart = helm.render(release.values, release=release.name, namespace=release.namespace)
    (policy,) = [o for o in chart if o["kind"] == "NetworkPolicy" and "model-pools" in str(o)]
    (priority_class,) = [o for o in chart if o["kind"] == "PriorityClass"]
    log = tmp_path / "operator.log"

    with _chart_operator(cluster, release, tmp_path) as (process, liveness):
        _wait(lambda: _healthy(liveness), "kopf's liveness endpoint", process, log)
        cluster.apply(operating.examples(namespace))

        def missing() -> list[str]:
            pools = cluster.get("modelpools", "-n", namespace)["items"]
            routes = cluster.get("inferenceroutes", "-n", namespace)["items"]
            quotas = cluster.get("tokenquotas", "-n", namespace)["items"]
            return [
                *(f"pool {p['metadata']['name']} config version" for p in pools
                  if not p.get("status", {}).get("config", {}).get("version")),
                *(f"route {r['metadata']['name']} ResolvedRefs" for r in routes
                  if _condition(r, "ResolvedRefs") != "True"),
                *(f"quota {q['metadata']['name']} Ready" for q in quotas
                  if _condition(q, "Ready") != "True"),
                *([] if _exists(cluster, "deployment", "llama-8b-warm", namespace)
                  else ["warm placeholders of llama-8b"]),
            ]  # fmt: skip

        try:
            _wait(lambda: not missing(), "examples reconciled", process, log)
        except AssertionError as e:
            raise AssertionError(f"still missing: {missing()}\n{e}") from None

    # The pool pods carry what the chart's NetworkPolicy and PodMonitor select,
    # and serve on the ports they open; the sidecar is the chart's image.
    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    public_port, admin_port = (rule["ports"][0]["port"] for rule in policy["spec"]["ingress"])
    for pool in ("llama-8b", "llama-70b"):
        deployment = cluster.get("deployment", pool, "-n", namespace)
        template = deployment["spec"]["template"]
        assert expression == {"key": "headway.dev/pool", "operator": "Exists"}
        assert template["metadata"]["labels"]["headway.dev/pool"] == pool
        sidecar = template["spec"]["containers"][-1]
        assert sidecar["image"] == "headway:0.1.0"
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports == {"http": public_port, "admin": admin_port}
    # Warm placeholders (llama-8b asks for one) run at the chart's PriorityClass.
    warm = cluster.get("deployment", "llama-8b-warm", "-n", namespace)
    placeholder = warm["spec"]["template"]
    assert placeholder["spec"]["priorityClassName"] == priority_class["metadata"]["name"]
    assert "headway.dev/pool" not in placeholder["metadata"]["labels"]
