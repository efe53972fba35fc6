"""The request path through an in-process sidecar: classes, queue answers, keep-alives,
demotion and fallback to another pool's sidecar through the signed hop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from headway_sidecar import serving
from multidict import CIMultiDict

from tests.sidecar.conftest import (
    SIM_HEADERS,
    Sim,
    content_chunks,
    document,
    eventually,
    metric,
    read_events,
    tenant,
)

Start = Callable[..., Awaitable[serving.Running]]
AUTH = {"authorization": "Bearer sk-team-a"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
SLOW = {**AUTH, "x-sim-ttft": "1.0"}


def _one_slot(**queues: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(data: dict[str, Any]) -> dict[str, Any]:
        data["capacity"]["maxConcurrency"] = 1
        data["capacity"]["queues"]["realtime"].update(queues)
        return data

    return edit


def _settings(keepalive: float = 5.0) -> serving.Settings:
    return serving.Settings(
        poll_interval=0.2, grace=2.0, keepalive_interval=keepalive, forward_headers=SIM_HEADERS
    )


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.post(url, json=body, headers=headers) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_queued_stream_gets_keepalive_comments_then_its_answer(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(_one_slot()(document(sim.port)), settings=_settings(0.1))
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(_post(http, url, CHAT, SLOW))
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 1)
        async with http.post(url, json=STREAM, headers=AUTH) as r:
            assert r.status == 200
            raw = await r.read()
        assert (await holder)[0] == 200
    comments = [line for line in raw.split(b"\n") if line.startswith(b": queued")]
    assert len(comments) >= 3, "one comment per keep-alive interval while waiting"
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert content_chunks(events) == 8 and raw.endswith(b"data: [DONE]\n\n")
    # Comments are not tokens: TTFT counts from arrival to the first content.
    labels = {"route": "chat", "priority": "realtime"}
    assert metric(running, "headway_time_to_first_token_seconds_count", **labels) == 1
    assert metric(running, "headway_time_to_first_token_seconds_sum", **labels) >= 0.5


async def test_stream_that_times_out_after_keepalives_ends_with_an_error_event(
    sim: Sim, start_sidecar: Start
) -> None:
    data = _one_slot(timeout=0.5)(document(sim.port))
    running = await start_sidecar(data, settings=_settings(0.1))
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(_post(http, url, CHAT, {**AUTH, "x-sim-ttft": "2.0"}))
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 1)
        async with http.post(url, json=STREAM, headers=AUTH) as r:
            assert r.status == 200  # committed by the first keep-alive
            events = await read_events(r)
        holder.cancel()
    assert events[-1]["error"]["code"] == "queue_timeout"
    assert "[DONE]" not in events
    assert running.gateway.scheduler.depth("realtime") == 0
    labels = {"route": "chat", "tenant": "team-a", "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="queue_timeout", **labels) == 1


async def test_full_queue_and_queue_timeout_are_503_with_retry_after(
    sim: Sim, start_sidecar: Start
) -> None:
    data = _one_slot(maxDepth=1, timeout=0.5)(document(sim.port))
    running = await start_sidecar(data)
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(_post(http, url, CHAT, {**AUTH, "x-sim-ttft": "2.0"}))
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 1)
        waiting = asyncio.create_task(_post(http, url, CHAT, AUTH))
        await eventually(lambda: running.gateway.scheduler.depth("realtime") == 1)

        status, headers, body = await _post(http, url, CHAT, AUTH)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_full"
        assert "x-ratelimit-limit-tokens" in headers

        status, headers, body = await waiting
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_timeout"
        holder.cancel()
    # Neither reached the model server, so neither was charged.
    assert sim.stats()["received"] == 1


async def test_priority_header_is_honoured_only_where_allowed(
    sim: Sim, start_sidecar: Start
) -> None:
    data = document(sim.port)
    data["tenants"].append(
        tenant("team-b", "sk-team-b", priority={"default": "batch", "allowed": ["batch"]})
    )
    running = await start_sidecar(data)
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        asks = [
            ("sk-team-a", "batch", 200),
            ("sk-team-a", None, 200),
            ("sk-team-b", "realtime", 200),  # not allowed: the quota's default applies
            ("sk-team-a", "urgent", 400),
        ]
        for key, wanted, status in asks:
            headers = {"authorization": f"Bearer {key}"}
            if wanted:
                headers["x-headway-priority"] = wanted
            assert (await _post(http, url, CHAT, headers))[0] == status

    def served(tenant: str, priority: str) -> float:
        labels = {"route": "chat", "tenant": tenant, "priority": priority, "outcome": "ok"}
        return metric(running, "headway_requests_total", **labels)

    assert served("team-a", "batch") == 1 and served("team-a", "realtime") == 1
    assert served("team-b", "batch") == 1 and served("team-b", "realtime") == 0


async def test_over_rate_realtime_is_demoted_to_batch(sim: Sim, start_sidecar: Start) -> None:
    data = document(sim.port)
    quota = data["tenants"][0]["quotas"][0]
    quota["limits"] = {"requestsPerMinute": 1}
    quota["onExceeded"] = "demote"
    running = await start_sidecar(data)
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            assert (await _post(http, url, CHAT, AUTH))[0] == 200
    assert metric(running, "headway_demotions_total", tenant="team-a") == 1
    labels = {"route": "chat", "tenant": "team-a", "outcome": "ok"}
    assert metric(running, "headway_requests_total", priority="batch", **labels) == 1


async def test_unreachable_backend_falls_back_to_another_pools_sidecar(
    start_simulator: Callable[..., Awaitable[Sim]], start_sidecar: Start
) -> None:
    big_sim = await start_simulator()
    # The big pool's sidecar: its own pool is "big"; it trusts hops, not keys.
    big = document(big_sim.port, pool="big", tenants=[])
    big["pools"] = [{"name": "big", "address": "http://127.0.0.1:1"}]
    big["routes"][0]["backends"] = [{"pool": "big", "weight": 1, "model": "big-model"}]
    big_sidecar = await start_sidecar(big, name="big")

    # The small pool's model server is down (nothing listens on its port).
    small = document(1)
    small["pools"].append({"name": "big", "address": big_sidecar.url})
    small["routes"][0]["fallback"] = [{"pool": "big"}]
    small_sidecar = await start_sidecar(small, name="small")

    async with aiohttp.ClientSession() as http:
        url = f"{small_sidecar.url}/v1/chat/completions"
        async with http.post(url, json=STREAM, headers=AUTH) as r:
            assert r.status == 200
            events = await read_events(r)
        assert content_chunks(events) == 8 and events[-1] == "[DONE]"
        stats = big_sim.stats()
        assert stats["received"] == 1 and stats["last_body"]["model"] == "big-model"
        assert "authorization" not in {k.lower() for k in stats["last_headers"]}

        # A forged hop header is refused without reaching the model server.
        forged = {"x-headway-hop": "e30.dev.00", **AUTH}
        big_url = f"{big_sidecar.url}/v1/chat/completions"
        async with http.post(big_url, json=CHAT, headers=forged) as r:
            assert r.status == 401
        assert big_sim.stats()["received"] == 1

    # The small sidecar charged the tenant; the big one counted its queue only.
    labels = {"route": "chat", "tenant": "team-a"}
    assert metric(small_sidecar, "headway_tokens_total", type="output", **labels) == 8
    assert metric(big_sidecar, "headway_tokens_total", type="output", **labels) == 0
    assert metric(big_sidecar, "headway_queue_wait_seconds_count", priority="realtime") == 1


async def test_client_leaving_a_non_streaming_request_aborts_it_upstream(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port))
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(_post(http, url, CHAT, {**AUTH, "x-sim-ttft": "5.0"}))
        await eventually(lambda: sim.stats()["in_flight"] == 1)
        call.cancel()
        await eventually(lambda: sim.stats()["cancelled"] == 1 and sim.stats()["in_flight"] == 0)
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 0)
    labels = {"route": "chat", "tenant": "team-a", "priority": "realtime"}
    await eventually(
        lambda: metric(running, "headway_requests_total", outcome="client_cancelled", **labels) == 1
    )


async def _fault(
    http: aiohttp.ClientSession, running: serving.Running, fault: str, body: dict[str, Any]
) -> tuple[int, CIMultiDict[str], bytes]:
    url = f"{running.url}/v1/chat/completions"
    return await _post(http, url, body, {**AUTH, "x-sim-fault": fault})


async def test_upstream_dying_mid_stream_ends_with_an_error_event_never_done(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port))
    async with aiohttp.ClientSession() as http:
        faults = (("disconnect:3", "mid-answer"), ("mid-error:3", "simulated failure"))
        for fault, message in faults:
            status, _, raw = await _fault(http, running, fault, STREAM)
            assert status == 200
            events = [
                json.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")
            ]
            assert content_chunks(events) == 3
            assert "error" in events[-1], fault
            assert b"[DONE]" not in raw
            assert message in events[-1]["error"]["message"]
    assert (
        metric(running, "headway_stream_errors_total", kind="disconnect")
        + metric(running, "headway_stream_errors_total", kind="incomplete")
        == 1
    )
    assert metric(running, "headway_stream_errors_total", kind="upstream_error") == 1
    labels = {"route": "chat", "tenant": "team-a", "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="upstream_error", **labels) == 2
    # Charged for what was produced: without usage, at least one token per delta.
    tokens = {"route": "chat", "tenant": "team-a", "type": "output"}
    assert metric(running, "headway_tokens_total", **tokens) >= 6
    assert running.gateway.scheduler.inflight("realtime") == 0


async def test_upstream_errors_before_the_first_byte_are_http_errors(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(document(sim.port))
    async with aiohttp.ClientSession() as http:
        status, headers, raw = await _fault(http, running, "error:503:7", CHAT)
        assert status == 503 and headers["retry-after"] == "7"
        assert "error" in json.loads(raw)
        status, headers, raw = await _fault(http, running, "error-event:400", STREAM)
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert json.loads(raw)["error"]["message"]


async def test_first_token_timeout_frees_the_slot_and_the_model_server(
    sim: Sim, start_sidecar: Start
) -> None:
    data = document(sim.port)
    data["routes"][0]["timeouts"]["firstToken"] = 0.3
    running = await start_sidecar(data)
    async with aiohttp.ClientSession() as http:
        status, _, raw = await _fault(http, running, "stall:5", STREAM)
    assert status == 504
    assert json.loads(raw)["error"]["code"] == "upstream_timeout"
    assert running.gateway.scheduler.inflight("realtime") == 0
    await eventually(lambda: sim.stats()["cancelled"] == 1 and sim.stats()["in_flight"] == 0)
    assert sim.stats()["completed"] == 0, "answered before the stall ended"


async def test_upstream_error_after_keepalives_is_a_terminal_error_event(
    sim: Sim, start_sidecar: Start
) -> None:
    running = await start_sidecar(_one_slot()(document(sim.port)), settings=_settings(0.1))
    url = f"{running.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(_post(http, url, CHAT, {**AUTH, "x-sim-ttft": "0.5"}))
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 1)
        status, _, raw = await _post(http, url, STREAM, {**AUTH, "x-sim-fault": "error:400"})
        assert (await holder)[0] == 200
    assert status == 200 and raw.startswith(b": queued")
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 1 and events[0]["error"]["type"] == "invalid_request_error"
    assert b"[DONE]" not in raw
    labels = {"route": "chat", "tenant": "team-a", "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="upstream_error", **labels) == 1
