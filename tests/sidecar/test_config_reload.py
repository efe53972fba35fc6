"""Config changes while serving: file polling, pushes, and requests that span a swap."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from headway_sidecar import serving

from tests.sidecar.conftest import (
    PUSH_TOKEN,
    Process,
    Sim,
    content_chunks,
    document,
    eventually,
    metric,
    read_events,
    sample_value,
    scrape,
    start_stack,
    tenant,
    until,
    wait_load,
    write_json,
)

Start = Callable[..., Awaitable[serving.Running]]
AUTH = {"authorization": "Bearer sk-team-a"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_polled_file_with_higher_generation_is_applied(
    sim: Sim, start_sidecar: Start, tmp_path: Path
) -> None:
    running = await start_sidecar(document(sim.port))
    newer = document(sim.port, generation=2)
    newer["tenants"].append(tenant("team-b", "sk-team-b"))
    write_json(tmp_path / "config.json", newer)

    await eventually(lambda: running.gateway.store.current.document.generation == 2)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{running.url}/v1/chat/completions",
            json=CHAT,
            headers={"authorization": "Bearer sk-team-b"},
        ) as r,
    ):
        assert r.status == 200
    assert metric(running, "headway_config_reloads_total", result="ok") == 1


async def test_polled_bad_or_older_file_keeps_the_last_good_config(
    sim: Sim, start_sidecar: Start, tmp_path: Path
) -> None:
    running = await start_sidecar(document(sim.port, generation=4))
    kept = running.gateway.store.current.document.version
    path = tmp_path / "config.json"

    path.write_text("{truncated")
    await eventually(lambda: metric(running, "headway_config_reloads_total", result="error") == 1)
    write_json(path, document(sim.port, generation=3, replicas=2))
    await eventually(lambda: metric(running, "headway_config_reloads_total", result="stale") == 1)

    current = running.gateway.store.current.document
    assert (current.version, current.generation) == (kept, 4)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{running.url}/v1/chat/completions", json=CHAT, headers=AUTH) as r,
    ):
        assert r.status == 200


async def test_queued_and_inflight_requests_finish_under_their_config(
    sim: Sim, start_sidecar: Start
) -> None:
    # One slot: the first request holds it, the second waits in the queue.
    data = document(sim.port)
    data["capacity"]["maxConcurrency"] = 1
    running = await start_sidecar(data)
    slow = {**AUTH, "x-sim-ttft": "0.6"}
    newer = document(sim.port, generation=2, routes=[])  # the route is gone
    newer["capacity"]["maxConcurrency"] = 1

    async with aiohttp.ClientSession() as http:
        url = f"{running.url}/v1/chat/completions"

        async def call() -> tuple[int, dict[str, object]]:
            async with http.post(url, json=CHAT, headers=slow) as r:
                return r.status, await r.json()

        first = asyncio.create_task(call())
        await eventually(lambda: running.gateway.scheduler.inflight("realtime") == 1)
        second = asyncio.create_task(call())
        await eventually(lambda: running.gateway.scheduler.depth("realtime") == 1)

        async with http.put(
            f"{running.admin_url}/config",
            data=json.dumps(newer),
            headers={"authorization": f"Bearer {PUSH_TOKEN}"},
        ) as r:
            assert r.status == 200

        async with http.post(url, json=CHAT, headers=AUTH) as r:
            assert r.status == 404  # new arrivals see the new config
        for status, answer in await asyncio.gather(first, second):
            assert status == 200
            assert answer["usage"]["completion_tokens"] == 8  # type: ignore[index]


async def test_rotated_hashing_key_file_is_reloaded(
    sim: Sim, tmp_path: Path, registry: object
) -> None:
    from headway_contract import hash_api_key

    keys = tmp_path / "keys"
    keys.write_text("old:first-secret\n")
    data = document(sim.port)
    data["tenants"][0]["keyHashes"] = [
        hash_api_key("old", b"first-secret", "sk-team-a"),
        hash_api_key("new", b"second-secret", "sk-team-a"),
    ]
    config = write_json(tmp_path / "config.json", data)
    from prometheus_client import CollectorRegistry

    running = await serving.start(
        config_path=str(config),
        listen=("127.0.0.1", 0),
        admin_listen=("127.0.0.1", 0),
        key_file=str(keys),
        push_token_file=None,
        registry=CollectorRegistry(),
        settings=serving.Settings(poll_interval=0.1, grace=1.0),
    )
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{running.url}/v1/chat/completions"
            async with http.post(url, json=CHAT, headers=AUTH) as r:
                assert r.status == 200
            keys.write_text("new:second-secret\n")
            await eventually(lambda: running.gateway.store.current.keys.current[0] == "new")
            async with http.post(url, json=CHAT, headers=AUTH) as r:
                assert r.status == 200
            data["tenants"][0]["keyHashes"] = [hash_api_key("old", b"first-secret", "sk-team-a")]
            data["generation"] = 2
            write_json(config, data)
            await eventually(lambda: running.gateway.store.current.document.generation == 2)
            async with http.post(url, json=CHAT, headers=AUTH) as r:
                assert r.status == 401  # the only hash left is under a key no longer held
    finally:
        await running.drain()


# -- with real processes ---------------------------------------------------------------------

# Each stream takes about 2 s: 100 tokens of 20 ms.
STREAM_FLAGS = ("--ttft", "50ms", "--tpot", "20ms", "--output-tokens", "100")


def _ten_slots(data: dict[str, Any]) -> None:
    # Fewer slots than streams, so that some wait in the queue across the reloads.
    data["capacity"]["maxConcurrency"] = 10
    data["tenants"][0]["quotas"][0]["limits"] = {}


async def test_reloads_during_50_streams_drop_none_of_them(
    processes: list[Process], tmp_path: Path
) -> None:
    stack = await start_stack(processes, tmp_path, *STREAM_FLAGS, edit=_ten_slots)
    url = f"{stack.url}/v1/chat/completions"
    push = {"authorization": f"Bearer {PUSH_TOKEN}"}
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def stream() -> tuple[int, list[Any]]:
            async with http.post(url, json=body, headers=AUTH) as r:
                return r.status, await read_events(r)

        async def generation() -> int:
            async with http.get(f"{stack.admin_url}/config") as r:
                answer: dict[str, Any] = await r.json()
                return int(answer["generation"])

        streams = [asyncio.create_task(stream()) for _ in range(50)]
        await wait_load(http, stack.admin_url, lambda load: load["queueDepth"]["realtime"] > 0)

        # A push: more slots, which the waiting streams may use at once.
        pushed = copy.deepcopy(stack.document)
        pushed["generation"] = 2
        pushed["capacity"]["maxConcurrency"] = 16
        async with http.put(f"{stack.admin_url}/config", json=pushed, headers=push) as r:
            assert r.status == 200, await r.text()
        # A file change: fewer slots again, and a second tenant.
        polled = copy.deepcopy(pushed)
        polled["generation"] = 3
        polled["capacity"]["maxConcurrency"] = 8
        polled["tenants"].append(tenant("team-b", "sk-team-b"))
        write_json(stack.config, polled)
        await until(lambda: _equals(generation(), 3))
        assert not all(s.done() for s in streams), "the reloads happened while streams ran"

        for status, events in await asyncio.gather(*streams):
            assert status == 200
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
            assert content_chunks(events) == 100

        # Refused documents keep the last good config and count as errors.
        bad = copy.deepcopy(polled)
        bad["generation"] = 4
        bad["capacity"]["maxConcurrency"] = 0
        stack.config.write_text(json.dumps(bad))
        unknown = {**copy.deepcopy(polled), "generation": 5, "schemaVersion": 99}
        async with http.put(f"{stack.admin_url}/config", json=unknown, headers=push) as r:
            assert r.status == 400
            assert "schemaVersion" in (await r.json())["error"]["message"]

        async def two_errors() -> bool:
            text = await scrape(http, stack.admin_url)
            return sample_value(text, "headway_config_reloads_total", result="error") == 2

        await until(two_errors)
        text = await scrape(http, stack.admin_url)
        assert sample_value(text, "headway_config_reloads_total", result="ok") == 2
        assert await generation() == 3
        async with http.post(url, json={**body, "stream": False}, headers=AUTH) as r:
            assert r.status == 200


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
