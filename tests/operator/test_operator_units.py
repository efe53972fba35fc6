"""Pure parts of the operator: manifests, template checks, conditions, usage arithmetic."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp import web
from headway_operator import children, kubeapi, observing, running, specs, statuses, usage
from headway_operator.children import SidecarSettings
from headway_operator.statuses import FALSE, TRUE, Condition

TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"app": "server"}},
    "spec": {
        "containers": [
            {"name": "server", "image": "vllm", "volumeMounts": [{"name": "m", "mountPath": "/m"}]},
            {"name": "helper", "image": "busybox"},
        ],
        "volumes": [{"name": "m", "emptyDir": {}}],
        "nodeSelector": {"zone": "a"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
    },
}


def _pool(template: dict[str, Any] | None = None, gpus: int = 2) -> specs.ModelPool:
    return specs.parse_model_pool(
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "ModelPool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "models": ["m"],
                "server": {"template": template or copy.deepcopy(TEMPLATE)},
                "scaling": {"minReplicas": 2, "maxReplicas": 4},
                "nodePool": {
                    "nodeSelector": {"pool": "gpu"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "gpusPerReplica": gpus,
                },
            },
        }
    )


def test_deployment_injects_the_sidecar_and_keeps_the_template() -> None:
    body = children.deployment(_pool(), "uid-1", SidecarSettings(), replicas=None)
    spec = body["spec"]["template"]["spec"]

    assert "replicas" not in body["spec"]  # the autoscaler's after creation
    assert [c["name"] for c in spec["containers"]] == ["server", "helper", "headway-sidecar"]
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert "resources" not in spec["containers"][1]  # only the server gets GPUs
    assert spec["nodeSelector"] == {"zone": "a", "pool": "gpu"}
    assert [t["key"] for t in spec["tolerations"]] == ["spot", "nvidia.com/gpu"]
    assert body["spec"]["template"]["metadata"]["labels"] == {
        "app": "server",
        "headway.dev/pool": "p",
    }
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # The push token is mounted into the sidecar and nowhere else.
    for container in spec["containers"][:2]:
        assert all(m["name"] != "headway-push" for m in container.get("volumeMounts", []))
    sidecar = spec["containers"][2]
    assert {m["name"] for m in sidecar["volumeMounts"]} == set(children.VOLUMES)
    assert not any("subPath" in m for m in sidecar["volumeMounts"])
    # The template given is not modified in place.
    assert _pool().template == TEMPLATE

    created = children.deployment(_pool(), "uid-1", SidecarSettings(), replicas=2)
    assert created["spec"]["replicas"] == 2


def test_deployment_without_gpus_sets_no_gpu_limit() -> None:
    body = children.deployment(_pool(gpus=0), "u", SidecarSettings(), replicas=None)
    assert "resources" not in body["spec"]["template"]["spec"]["containers"][0]


def test_redis_secrets_are_mounted_into_the_sidecar_only() -> None:
    settings = SidecarSettings(redis_password_secret="redis-auth", redis_tls_secret="redis-tls")
    spec = children.deployment(_pool(), "u", settings, replicas=None)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["headway-redis"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][-1]["volumeMounts"]}
    assert mounts["headway-redis"] + "/password" == children.REDIS_PASSWORD_FILE
    assert mounts["headway-redis-tls"] + "/ca.crt" == children.REDIS_CA_FILE


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(hostNetwork=True), "hostNetwork is set"),
        (lambda s: s.update(hostPID=True), "hostPID is set"),
        (lambda s: s.update(hostIPC=True), "hostIPC is set"),
        (lambda s: s.update(serviceAccountName="admin"), "serviceAccountName 'admin'"),
        (lambda s: s.update(serviceAccount="admin"), "serviceAccountName 'admin'"),
        (
            lambda s: s["containers"][1].update(securityContext={"privileged": True}),
            "containers[1].securityContext.privileged",
        ),
        (
            lambda s: s.update(
                initContainers=[{"name": "i", "securityContext": {"privileged": True}}]
            ),
            "initContainers[0].securityContext.privileged",
        ),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s["containers"].append({"name": "headway-sidecar"}), "reserved"),
        (lambda s: s["volumes"].append({"name": "headway-config"}), "reserved"),
        (lambda s: s.update(containers=[]), "needs the model server"),
    ],
)
def test_templates_that_escalate_or_clash_are_refused(change: Any, expected: str) -> None:
    template = copy.deepcopy(TEMPLATE)
    change(template["spec"])
    found = children.refusals(_pool(template))
    assert any(expected in reason for reason in found), found


def test_the_pools_own_service_account_is_allowed() -> None:
    template = copy.deepcopy(TEMPLATE)
    template["spec"]["serviceAccountName"] = "p"
    assert children.refusals(_pool(template)) == []
    assert children.refusals(_pool()) == []


def test_conditions_keep_their_transition_time_while_the_status_holds() -> None:
    first = statuses.merge([Condition("Ready", FALSE, "A", "a")], None, 1, "T1")
    same = statuses.merge([Condition("Ready", FALSE, "B", "b")], first, 2, "T2")
    flipped = statuses.merge([Condition("Ready", TRUE, "C", "c")], same, 2, "T3")

    assert first[0]["lastTransitionTime"] == "T1"
    assert same[0]["lastTransitionTime"] == "T1" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "T3"
    assert same[0]["observedGeneration"] == 2


def test_only_new_false_conditions_are_worth_an_event() -> None:
    wanted = [Condition("Ready", FALSE, "SecretNotFound", "x"), Condition("Other", TRUE, "Ok", "")]
    before = statuses.merge(wanted, None, 1, "T")
    assert [c.type for c in statuses.newly_false(wanted, None)] == ["Ready"]
    assert statuses.newly_false(wanted, before) == []
    moved = [Condition("Ready", FALSE, "KeyConflict", "y")]
    assert [c.reason for c in statuses.newly_false(moved, before)] == ["KeyConflict"]


def test_an_unchanged_status_is_not_applied_again() -> None:
    conditions = statuses.merge([Condition("Ready", TRUE, "Ok", "")], None, 1, "T")
    current = {"conditions": conditions, "desiredReplicas": 3, "config": {"version": "v1"}}
    assert not statuses.differs({"conditions": conditions, "config": {"version": "v1"}}, current)
    assert statuses.differs({"config": {"version": "v2"}}, current)
    assert statuses.differs({"usage": {"tokensToday": 1}}, current)


def test_entries_compare_their_status_so_kopf_keeps_the_new_one() -> None:
    body: dict[str, Any] = {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "InferenceRoute",
        "metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": "m", "backends": [{"pool": "p"}]},
    }
    before = observing.resource_entry("InferenceRoute", body)
    body["status"] = {"conditions": [{"type": "Accepted"}]}
    assert observing.resource_entry("InferenceRoute", body) != before


def test_a_terminating_pod_is_not_ready() -> None:
    pod: dict[str, Any] = {
        "metadata": {"name": "x", "labels": {"headway.dev/pool": "p"}},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert observing.pod_entry(pod).ready
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not observing.pod_entry(pod).ready


def test_usage_follows_the_documented_redis_layout() -> None:
    now = datetime.datetime(2026, 12, 4, 12, 0, 0, tzinfo=datetime.UTC)
    now_ms = now.timestamp() * 1000
    # 1000 tokens used 30 s ago, draining a 1200 tokens/minute bucket: 400 left.
    rate = 1200 * usage.TICKS_PER_TOKEN / 60_000
    minute = {"tu": str(1000 * usage.TICKS_PER_TOKEN), "ta": str(now_ms - 30_000), "tr": str(rate)}
    found = usage.usage(
        now,
        minute,
        {"id": "20261204", "tokens": "5000", "requests": "7"},
        {"id": "202612", "cost": "1230000000"},
    )
    assert found == {
        "tokensThisMinute": 400,
        "tokensToday": 5000,
        "requestsToday": 7,
        "costThisMonth": "1.23",
    }
    stale = usage.usage(now, {}, {"id": "20261203", "tokens": "9"}, {"id": "202611", "cost": "1"})
    assert stale == {
        "tokensThisMinute": 0,
        "tokensToday": 0,
        "requestsToday": 0,
        "costThisMonth": "0",
    }


def test_operator_flags_and_chart_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWAY_SIDECAR_IMAGE", "registry/headway:1.2")
    monkeypatch.setenv("HEADWAY_REDIS_URL", "redis://redis.headway:6379/0")
    monkeypatch.setenv("HEADWAY_REDIS_PASSWORD_SECRET", "redis-auth")
    monkeypatch.setenv("HEADWAY_REDIS_PASSWORD_FILE", "/etc/headway/redis/password")
    flags = running.parse(
        [], True, ["--", "--standalone", "--liveness=http://0.0.0.0:8081/healthz"]
    )
    assert flags.clusterwide and flags.peering is None
    assert flags.options.sidecar.image == "registry/headway:1.2"
    assert flags.options.redis is not None
    assert flags.options.redis.password_file == children.REDIS_PASSWORD_FILE
    assert flags.options.usage_redis is not None
    assert flags.options.usage_redis.password_file == "/etc/headway/redis/password"
    with pytest.raises(SystemExit):
        running.parse([], True, ["--peering=p", "--priority=1", "--standalone"])


async def test_the_api_client_logs_in_again_after_a_401() -> None:
    async def pods(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer rotated":
            return web.json_response({"reason": "Unauthorized", "message": "expired"}, status=401)
        return web.json_response({"kind": "PodList", "items": []})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods", pods)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    tokens = iter(["expired", "rotated"])

    def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token=next(tokens))

    try:
        async with aiohttp.ClientSession() as session:
            api = kubeapi.Client(session, login)
            listed = await api.request("GET", kubeapi.PODS.path("ns"))
            assert listed["kind"] == "PodList"
            fixed = kubeapi.Client(session, kopf.ConnectionInfo(server=api._server, token="old"))
            with pytest.raises(kubeapi.ApiError) as refused:
                await fixed.request("GET", kubeapi.PODS.path("ns"))
            assert refused.value.status == 401 and refused.value.message == "expired"
    finally:
        await runner.cleanup()
