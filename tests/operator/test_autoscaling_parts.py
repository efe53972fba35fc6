"""The autoscaler's parts that need no API server: placeholders, conditions, reading /load.

``read_load`` is tested against a real in-process sidecar, so the operator's
parsing follows what the sidecar actually serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from headway_operator import autoscaling, children, kubeapi, observing, scaling, specs
from headway_sidecar import serving, simulator
from prometheus_client import CollectorRegistry

from tests.fixtures.kube import free_port
from tests.sidecar.conftest import FAST, document, serve, write_json

SETTINGS = autoscaling.Settings()


def pool(**spec: Any) -> specs.ModelPool:
    server = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "resources": {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "32Gi"}},
    }
    template = {
        "spec": {
            "containers": [server],
            "nodeSelector": {"topology.kubernetes.io/zone": "a"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        }
    }
    body = {
        "apiVersion": specs.API_VERSION,
        "kind": "ModelPool",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"models": ["m"], "server": {"template": template}, **spec},
    }
    return specs.parse_model_pool(body)


GPU_POOL = {
    "nodeSelector": {"headway.dev/node-pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "gpusPerReplica": 2,
    "warmReplicas": 3,
}


def test_placeholders_ask_for_what_a_replica_asks_for_where_it_would_run() -> None:
    body = autoscaling.placeholder_deployment(pool(nodePool=GPU_POOL), "uid-1", SETTINGS)

    assert body is not None
    spec = body["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert body["metadata"]["name"] == "llama-warm"
    assert body["spec"]["replicas"] == 3
    assert spec["priorityClassName"] == "headway-warm-placeholder"
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "24Gi"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    assert spec["nodeSelector"] == {
        "topology.kubernetes.io/zone": "a",
        "headway.dev/node-pool": "gpu",
    }
    assert [t["key"] for t in spec["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    assert body["metadata"]["ownerReferences"][0] == children.owner("ModelPool", "llama", "uid-1")


def test_placeholders_are_never_selected_by_the_pool_service() -> None:
    body = autoscaling.placeholder_deployment(pool(nodePool=GPU_POOL), "uid-1", SETTINGS)

    assert body is not None
    labels = body["spec"]["template"]["metadata"]["labels"]
    assert children.POOL_LABEL not in labels
    assert labels == body["spec"]["selector"]["matchLabels"]


def test_no_warm_replicas_means_no_placeholder_deployment() -> None:
    assert autoscaling.placeholder_deployment(pool(), "uid-1", SETTINGS) is None


def test_cpu_pools_get_placeholders_without_a_gpu_limit() -> None:
    body = autoscaling.placeholder_deployment(
        pool(nodePool={"gpusPerReplica": 0, "warmReplicas": 1}), "uid-1", SETTINGS
    )
    assert body is not None
    assert "limits" not in body["spec"]["template"]["spec"]["containers"][0]["resources"]


def test_scaling_limited_is_true_only_when_demand_exceeds_the_maximum() -> None:
    over = scaling.Decision(replicas=8, reason="ScaleUp", wanted=11)
    within = scaling.Decision(replicas=1, reason="Steady", wanted=0)

    limited = autoscaling.limited_condition(over, pool())
    assert (limited.status, limited.reason) == ("True", "MaxReplicas")
    assert "11 replicas; maxReplicas is 8" in limited.message
    assert autoscaling.limited_condition(within, pool()).status == "False"


def test_capacity_pending_names_the_count_and_the_scheduler_message() -> None:
    pods = autoscaling.Pods(
        ready=(("a", "10.0.0.1"),), total=3, unschedulable=("0/2 nodes: Insufficient gpu.",) * 2
    )
    pending = autoscaling.capacity_condition(pods, pool(nodePool=GPU_POOL))
    assert pending.status == "True"
    assert pending.message == (
        "2 of 3 replicas asking for 2 GPU(s) each wait for a node: 0/2 nodes: Insufficient gpu."
    )
    none = autoscaling.Pods(ready=(), total=1, unschedulable=())
    assert autoscaling.capacity_condition(none, pool()).status == "False"


def test_a_recent_scale_time_in_status_keeps_the_cooldown_across_restarts() -> None:
    ten_seconds_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=10)
    status = {"lastScaleTime": ten_seconds_ago.strftime("%Y-%m-%dT%H:%M:%SZ")}

    state = autoscaling._start(status, now=1000.0)

    assert state.history.last_scale_up == pytest.approx(990.0, abs=2.0)
    assert state.last_scale_time == status["lastScaleTime"]
    assert autoscaling._start({"lastScaleTime": "yesterday"}, 5.0).history.last_scale_up is None


# -- reading /load ---------------------------------------------------------------------------


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[serving.Running]:
    """A real sidecar in front of a fast simulator, both in-process on 127.0.0.1."""
    sim = await serve(simulator.make_app(FAST))
    running = await serving.start(
        config_path=str(write_json(tmp_path / "config.json", document(sim.port))),
        listen=("127.0.0.1", 0),
        admin_listen=("127.0.0.1", 0),
        key_file=None,
        push_token_file=None,
        registry=CollectorRegistry(),
        settings=serving.Settings(grace=1.0),
    )
    yield running
    await running.drain()
    await sim.runner.cleanup()


async def test_read_load_parses_what_a_real_sidecar_serves(sidecar: serving.Running) -> None:
    running = sidecar
    port = int(running.admin_url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        # A streamed request, so the real-time TTFT histogram holds one observation.
        body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": "Bearer sk-team-a"}
        async with session.post(
            f"{running.url}/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200
            await r.read()
        load = await autoscaling.read_load(session, "127.0.0.1", port, 5.0)

    assert load is not None
    assert load.pool == "small"
    assert (load.capacity, load.batch_slots) == (4, 3)
    assert load.waiting == {"realtime": 0, "batch": 0}
    assert load.ttft["realtime"].count == 1
    assert load.ttft["batch"].count == 0


@pytest.mark.parametrize(
    ("status", "text"),
    [(200, "not json"), (200, '{"capacity": "many"}'), (500, "{}"), (404, "")],
)
async def test_read_load_turns_bad_answers_into_none(status: int, text: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text=text)

    app = web.Application()
    app.router.add_get("/load", answer)
    server = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            assert await autoscaling.read_load(session, "127.0.0.1", server.port, 5.0) is None
    finally:
        await server.runner.cleanup()


async def test_read_load_gives_up_on_a_closed_port() -> None:
    async with aiohttp.ClientSession() as session:
        assert await autoscaling.read_load(session, "127.0.0.1", free_port(), 1.0) is None


async def test_a_sidecar_of_another_pool_does_not_count(sidecar: serving.Running) -> None:
    # As when a pod's IP went to another pool's pod between the list and the GET.
    port = int(sidecar.admin_url.rsplit(":", 1)[1])
    pods = autoscaling.Pods(ready=(("pod-a", "127.0.0.1"),), total=1, unschedulable=())
    settings = autoscaling.Settings(admin_port=port)
    async with aiohttp.ClientSession() as session:
        scaler = autoscaling.Autoscaler(None, session, settings)  # type: ignore[arg-type]
        theirs = await scaler._loads(pool(), pods)  # the sidecar serves pool "small"
        ours = await scaler._loads(dataclasses.replace(pool(), name="small"), pods)

    assert theirs == {"pod-a": None}
    assert ours["pod-a"] is not None


class Recorder:
    """Stands in for the API client: records what the loop asks, answers 404."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(f"{method} {path}")
        raise kubeapi.ApiError(404, "NotFound", path)

    async def get(self, resource: kubeapi.Resource, namespace: str, name: str) -> Any:
        self.calls.append(f"GET {resource.path(namespace, name)}")
        return None

    async def apply(self, resource: kubeapi.Resource, namespace: str, body: Any, **_: Any) -> Any:
        self.calls.append(f"APPLY {resource.path(namespace, body['metadata']['name'])}")
        return body


async def test_a_paused_operator_does_not_scale_until_it_is_active() -> None:
    body = {
        "apiVersion": specs.API_VERSION,
        "kind": "ModelPool",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "u1"},
        "spec": {"models": ["m"], "nodePool": {"warmReplicas": 1}},
    }
    entry = observing.resource_entry("ModelPool", body)
    api, stop, active = Recorder(), asyncio.Event(), asyncio.Event()
    settings = autoscaling.Settings(interval=0.01)
    task = asyncio.create_task(
        autoscaling.run(api, lambda: [entry], stop=stop, settings=settings, active=active.is_set)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.2)
    assert api.calls == []  # paused: not even a read

    active.set()
    deadline = asyncio.get_running_loop().time() + 10
    while "GET /apis/apps/v1/namespaces/ml/deployments/llama/scale" not in api.calls:
        assert asyncio.get_running_loop().time() < deadline, api.calls
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert "APPLY /apis/apps/v1/namespaces/ml/deployments/llama-warm" in api.calls
