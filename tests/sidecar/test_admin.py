"""The admin port: metrics, health, readiness, config in force, pushes, load."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from headway_sidecar import serving

from tests.sidecar.conftest import PUSH_TOKEN, Sim, document, metric

Start = Callable[..., Awaitable[serving.Running]]
AUTH = {"authorization": "Bearer sk-team-a"}
PUSH = {"authorization": f"Bearer {PUSH_TOKEN}"}

METRIC_NAMES = (
    "headway_requests_total",
    "headway_queue_depth",
    "headway_inflight_requests",
    "headway_capacity_slots",
    "headway_queue_wait_seconds",
    "headway_time_to_first_token_seconds",
    "headway_time_per_output_token_seconds",
    "headway_tokens_total",
    "headway_cost_total",
    "headway_rate_limited_total",
    "headway_request_duration_seconds",
    "headway_demotions_total",
    "headway_stream_errors_total",
    "headway_limiter_degraded",
    "headway_config_info",
    "headway_config_reloads_total",
)


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **extra}
    if stream:
        body["stream"] = True
    return body


async def test_metrics_expose_every_series_of_the_design(sim: Sim, start_sidecar: Start) -> None:
    running = await start_sidecar(document(sim.port))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{running.url}/v1/chat/completions", json=chat(True), headers=AUTH
        ) as r:
            assert r.status == 200
            await r.read()
        async with http.get(f"{running.admin_url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in METRIC_NAMES:
        base = name.removesuffix("_total")
        assert name in text or base in declared, name
    assert "headway_capacity_slots 4.0" in text
    version = running.gateway.store.current.document.version
    assert f'headway_config_info{{version="{version}"}} 1.0' in text
    assert (
        'headway_requests_total{outcome="ok",priority="realtime",route="chat",tenant="team-a"}'
        in text
    )


async def test_healthz_answers_and_readyz_follows_the_model_server(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{running.admin_url}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{running.admin_url}/readyz") as r:
            assert r.status == 200
        await sim.runner.cleanup()
        async with http.get(f"{running.admin_url}/readyz") as r:
            assert r.status == 503
            assert "unreachable" in (await r.json())["status"]


async def test_readyz_is_503_while_draining(sim: Sim, start_sidecar: Start) -> None:
    running = await start_sidecar(document(sim.port))
    running.gateway.begin_drain()
    async with aiohttp.ClientSession() as http, http.get(f"{running.admin_url}/readyz") as r:
        assert r.status == 503
        assert (await r.json())["status"] == "draining"


async def test_get_config_reports_version_and_generation(sim: Sim, start_sidecar: Start) -> None:
    running = await start_sidecar(document(sim.port, generation=7))
    async with aiohttp.ClientSession() as http, http.get(f"{running.admin_url}/config") as r:
        assert await r.json() == {
            "version": running.gateway.store.current.document.version,
            "generation": 7,
        }


async def test_put_config_needs_the_push_token(sim: Sim, start_sidecar: Start) -> None:
    running = await start_sidecar(document(sim.port))
    newer = json.dumps(document(sim.port, generation=2, replicas=3))
    async with aiohttp.ClientSession() as http:
        url = f"{running.admin_url}/config"
        async with http.put(url, data=newer) as r:
            assert r.status == 401
        async with http.put(url, data=newer, headers={"authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.put(url, data=newer, headers={"authorization": PUSH_TOKEN}) as r:
            assert r.status == 401
        assert running.gateway.store.current.document.generation == 1

        async with http.put(url, data=newer, headers=PUSH) as r:
            assert r.status == 200
            applied = await r.json()
    assert applied["generation"] == 2 and applied["changed"] is True
    assert running.gateway.store.current.document.replicas == 3
    assert metric(running, "headway_config_reloads_total", result="ok") == 1


async def test_put_config_is_refused_without_a_token_file(sim: Sim, start_sidecar: Start) -> None:
    running = await start_sidecar(document(sim.port), push_token=False)
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{running.admin_url}/config",
            data=json.dumps(document(sim.port, generation=2)),
            headers=PUSH,
        ) as r,
    ):
        assert r.status == 403
    assert running.gateway.store.current.document.generation == 1


async def test_put_config_refuses_lower_generation_and_bad_documents(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port, generation=5))
    kept = running.gateway.store.current.document.version
    url = f"{running.admin_url}/config"
    unknown_schema = document(sim.port, generation=9, schemaVersion=2)
    bad_field = document(sim.port, generation=9)
    bad_field["capacity"]["maxConcurrency"] = "lots"
    async with aiohttp.ClientSession() as http:
        async with http.put(
            url, data=json.dumps(document(sim.port, generation=4)), headers=PUSH
        ) as r:
            assert r.status == 409
            assert "lower" in (await r.json())["error"]["message"]
        for bad in (json.dumps(unknown_schema), json.dumps(bad_field), "{not json"):
            async with http.put(url, data=bad, headers=PUSH) as r:
                assert r.status == 400
                answer = await r.json()
                assert answer["version"] == kept
        async with http.put(url, data=json.dumps(bad_field), headers=PUSH) as r:
            assert "capacity.maxConcurrency" in (await r.json())["error"]["message"]
        async with http.get(url) as r:
            assert await r.json() == {"version": kept, "generation": 5}
    assert metric(running, "headway_config_reloads_total", result="error") == 4
    assert metric(running, "headway_config_reloads_total", result="stale") == 1
    assert metric(running, "headway_config_info", version=kept) == 1


async def test_put_config_of_the_running_document_changes_nothing(
    sim: Sim, start_sidecar: Start
) -> None:
    data = document(sim.port, generation=3)
    running = await start_sidecar(data)
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"{running.admin_url}/config", data=json.dumps(data), headers=PUSH) as r,
    ):
        assert r.status == 200
        assert (await r.json())["changed"] is False


async def test_load_reports_queues_capacity_and_ttft_buckets(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port))
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(
                f"{running.url}/v1/chat/completions", json=chat(True), headers=AUTH
            ) as r:
                await r.read()
        async with http.get(f"{running.admin_url}/load") as r:
            load = await r.json()
    assert load["capacity"] == 4 and load["batchSlots"] == 3
    assert load["queueDepth"] == {"realtime": 0, "batch": 0}
    assert load["inflight"] == {"realtime": 0, "batch": 0}
    realtime = load["ttft"]["realtime"]
    assert realtime["count"] == 3
    assert realtime["buckets"][-1] == {"le": "+Inf", "count": 3}
    counts = [b["count"] for b in realtime["buckets"]]
    assert counts == sorted(counts), "buckets are cumulative"
    assert load["ttft"]["batch"]["count"] == 0
    assert "p95" not in json.dumps(load)
