"""The chart through the real helm, without an API server: lint, schema, renderings.

Marked `kube` because helm comes with the cluster tools (hack/cluster-tools.sh),
so `make test-fast` stays free of the Go build. What the renderings must hold:
one standalone operator by default, a standby only at a distinct kopf priority,
non-root pods, a negative PriorityClass, monitoring only when the cluster has it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.helm import charting
from tests.helm.charting import CHART, VALUES, Helm, objects_of, one

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return charting.make_helm(tmp_path_factory.mktemp("helm-home"))


def _operator_args(deployment: dict[str, Any]) -> list[str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    return args


def _kopf_args(deployment: dict[str, Any]) -> list[str]:
    args = _operator_args(deployment)
    return args[args.index("--") + 1 :]


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("name", sorted(VALUES))
def test_chart_lints(helm: Helm, name: str, strict: bool) -> None:
    with charting.values_file(VALUES[name]) as path:
        done = helm.run("lint", str(CHART), "-f", str(path), *(["--strict"] if strict else []))
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"failMode": "sometimes"}, "/failMode"),
        ({"operator": {"replicas": 2}}, "'replicas' not allowed"),
        ({"operator": {"standby": True}}, "/operator/standby"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
        ({"operator": {"livenessPort": 80}}, "/operator/livenessPort"),
        ({"placeholderPriorityClass": {"value": 5}}, "/placeholderPriorityClass/value"),
        ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
        ({"redis": {"enabled": "yes"}}, "/redis/enabled"),
        ({"networkPolicy": {"adminPort": 0}}, "/networkPolicy/adminPort"),
        ({"monitoring": {"podMonitor": {"interval": "soon"}}}, "/monitoring/podMonitor/interval"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"extra": 1}, "'extra' not allowed"),
    ],
)
def test_schema_refuses_bad_values_naming_the_field(
    helm: Helm, values: dict[str, Any], named: str
) -> None:
    done = helm.template(values, check=False)
    assert done.returncode != 0
    assert "schema" in done.stderr
    assert named in done.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"redis": {"enabled": True, "url": "redis://r:6379"}},
            "redis.enabled and redis.url are exclusive",
        ),
        (
            {"redis": {"url": "redis://r:6379", "tlsSecret": {"name": "t"}}},
            "redis.tlsSecret needs a rediss:// redis.url",
        ),
        ({"redis": {"passwordSecret": {"name": "p"}}}, "redis.passwordSecret needs redis.url"),
        (
            {"redis": {"enabled": True, "passwordSecret": {"name": "p"}}},
            "describe an external Redis",
        ),
    ],
)
def test_contradicting_values_fail_with_the_fields_named(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    done = helm.template(values, check=False)
    assert done.returncode != 0
    assert message in done.stderr


def test_default_is_one_standalone_operator_for_all_namespaces(helm: Helm) -> None:
    objects = helm.render()
    (deployment,) = objects_of(objects, "Deployment")

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert _operator_args(deployment)[:3] == ["--log-level=INFO", "operator", "--all-namespaces"]
    assert not any(a.startswith(("--peering", "--priority")) for a in _kopf_args(deployment))
    assert not objects_of(objects, "ClusterKopfPeering")


def test_standby_runs_at_a_distinct_lower_priority_in_one_peering(helm: Helm) -> None:
    objects = helm.render(VALUES["standby"])
    deployments = objects_of(objects, "Deployment")
    assert len(deployments) == 2

    priorities, peerings = [], set()
    for deployment in deployments:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        kopf = _kopf_args(deployment)
        priorities += [int(a.split("=")[1]) for a in kopf if a.startswith("--priority=")]
        peerings |= {a.split("=")[1] for a in kopf if a.startswith("--peering=")}
    assert len(set(priorities)) == 2, priorities
    # The peering object the two share exists, cluster-wide for a cluster-wide operator.
    (peering,) = objects_of(objects, "ClusterKopfPeering")
    assert peerings == {peering["metadata"]["name"]}
    # The standby is the lower one: it takes over, it never competes.
    by_role = {
        d["metadata"]["labels"]["headway.dev/operator-role"]: int(
            next(a for a in _kopf_args(d) if a.startswith("--priority=")).split("=")[1]
        )
        for d in deployments
    }
    assert by_role["active"] > by_role["standby"]


def test_no_value_makes_two_operators_share_a_priority(helm: Helm) -> None:
    # The only knobs are the standby switch and the peering name; replica
    # counts and priorities are not values at all (the schema refuses them).
    for values in ({"operator": {"priority": 100}}, {"operator": {"standby": {"replicas": 2}}}):
        assert helm.template(values, check=False).returncode != 0


def test_namespaced_install_watches_only_the_listed_namespaces(helm: Helm) -> None:
    objects = helm.render(VALUES["namespaced"])
    for deployment in objects_of(objects, "Deployment"):
        args = _operator_args(deployment)
        assert "--all-namespaces" not in args
        assert args[2:4] == ["--namespace=team-a", "--namespace=team-b"]
    peerings = objects_of(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    policies = objects_of(objects, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]


def test_every_pod_runs_as_non_root_without_privileges(helm: Helm) -> None:
    objects = helm.render(VALUES["redis"])
    assert len(objects_of(objects, "Deployment")) == 2
    for deployment in objects_of(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def test_operator_probes_kopf_liveness_endpoint(helm: Helm) -> None:
    deployment = one(helm.render({"operator": {"livenessPort": 9000}}), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--liveness=http://0.0.0.0:9000/healthz" in _kopf_args(deployment)
    assert container["ports"] == [{"name": "liveness", "containerPort": 9000, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}


def _flags(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in _kopf_args(deployment) if "=" in a)


def test_operator_learns_redis_fail_mode_and_placeholder_class(helm: Helm) -> None:
    objects = helm.render(VALUES["redis"], release="hw", namespace="ops")
    flags = _flags(one(objects, "Deployment", "hw-headway-operator"))
    assert flags["fail-mode"] == "closed"
    assert flags["redis-url"] == "redis://hw-headway-redis.ops.svc:6379/0"
    assert flags["sidecar-image"] == "headway:0.1.0"
    service = one(objects, "Service", "hw-headway-redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    priority_class = one(objects, "PriorityClass")
    assert flags["placeholder-priority-class"] == priority_class["metadata"]["name"]
    assert priority_class["value"] < 0
    assert priority_class["preemptionPolicy"] == "Never"
    assert priority_class["globalDefault"] is False

    # No Redis at all: no URL, so the sidecars limit in memory.
    assert "redis-url" not in _flags(one(helm.render(), "Deployment"))


def test_external_redis_credentials_come_from_secrets_as_files(helm: Helm) -> None:
    deployment = one(helm.render(VALUES["external-redis"]), "Deployment")
    flags = _flags(deployment)
    assert flags["redis-url"] == "rediss://redis.example.internal:6380/0"
    assert flags["redis-password-secret"] == "redis-auth"
    assert flags["redis-password-key"] == "password"
    assert flags["redis-tls-secret"] == "redis-tls"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The password reaches the operator as a file, never as an environment variable.
    assert not any("secretKeyRef" in str(e) for e in container["env"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert flags["redis-password-file"] == f"{mounts['redis-password']}/password"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["redis-password"]["secret"]["secretName"] == "redis-auth"
    assert volumes["redis-password"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert not any(f.startswith("redis") for f in _flags(one(helm.render(), "Deployment")))


def test_monitor_only_where_the_prometheus_operator_is(helm: Helm) -> None:
    assert not objects_of(helm.render(VALUES["monitoring"]), "PodMonitor")

    objects = helm.render(VALUES["monitoring"], "--api-versions", "monitoring.coreos.com/v1")
    monitor = one(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin"
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "30s")
    assert monitor["spec"]["selector"] == {
        "matchExpressions": [{"key": "headway.dev/pool", "operator": "Exists"}]
    }

    namespaced = helm.render(VALUES["namespaced"], "--api-versions", "monitoring.coreos.com/v1")
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a", "team-b"]
    }


def test_network_policy_opens_public_port_to_pods_and_admin_port_to_operator(
    helm: Helm,
) -> None:
    objects = helm.render({}, release="hw", namespace="ops")
    policy = one(objects, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "ops"
    assert policy["spec"]["podSelector"] == {
        "matchExpressions": [{"key": "headway.dev/pool", "operator": "Exists"}],
    }
    public, admin = policy["spec"]["ingress"]
    assert public["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert admin["ports"] == [{"port": 9090, "protocol": "TCP"}]
    operator_peer = admin["from"][0]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert operator_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ops"
    }
    assert operator_peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    # Nothing else gets in: two rules, neither opens the model server's port.
    assert len(policy["spec"]["ingress"]) == 2


def test_dashboard_configmap_carries_the_dashboard_file(helm: Helm) -> None:
    configmap = one(helm.render(), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (CHART / "dashboards" / "headway.json").read_text()
    assert configmap["data"]["headway.json"] == dashboard.rstrip("\n")


def test_optional_parts_can_be_left_out(helm: Helm) -> None:
    kinds = {o["kind"] for o in helm.render(VALUES["minimal"])}
    assert not kinds & {"NetworkPolicy", "ConfigMap", "PriorityClass"}


def _notes(helm: Helm, values: dict[str, Any]) -> str:
    # NOTES.txt renders on install only; a client-side dry run needs no cluster.
    with charting.values_file(values) as path:
        done = helm.run(
            "install", "headway", str(CHART), "--dry-run=client", "-n", "ops", "-f", str(path)
        )
    return done.stdout


def test_notes_warn_when_limits_are_not_shared(helm: Helm) -> None:
    assert "no Redis is configured" in _notes(helm, {})
    notes = _notes(helm, VALUES["redis"])
    assert "chart's single-instance Redis" in notes
    assert "no Redis is configured" not in notes
    assert "helm upgrade` never" in notes or "not upgraded by `helm upgrade`" in notes


@pytest.mark.parametrize("name", sorted(VALUES))
def test_operator_accepts_the_arguments_the_chart_gives_it(helm: Helm, name: str) -> None:
    # The chart and `headway operator` must agree on every flag: an unknown one
    # would crash-loop the operator on a real cluster.
    from headway_cli.main import build_parser
    from headway_operator import running

    for deployment in objects_of(helm.render(VALUES[name]), "Deployment"):
        if deployment["metadata"]["labels"].get("app.kubernetes.io/component") != "operator":
            continue
        # As `headway` itself does: the operator package parses what is left.
        args, rest = build_parser().parse_known_args(_operator_args(deployment))
        assert args.command == "operator"
        flags = running.parse(args.namespaces, args.all_namespaces, rest)
        assert flags.clusterwide == (name != "namespaced")
        assert (flags.peering is None) == (name not in ("standby", "namespaced"))


def test_packaged_chart_holds_the_crds_themselves(helm: Helm, tmp_path: Path) -> None:
    # The chart's crds/ are links into crds/; a published chart must carry the files.
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("headway-*.tgz")
    with tarfile.open(archive) as tar:
        for path in (CHART.parents[1] / "crds").glob("*.yaml"):
            member = tar.extractfile(f"headway/crds/{path.name}")
            assert member is not None and member.read() == path.read_bytes(), path.name
