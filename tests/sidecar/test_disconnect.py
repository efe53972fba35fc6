"""A client that hangs up: mid-stream it frees its slot and aborts the upstream request;
while queued it leaves the queue and never reaches the model server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp

from tests.sidecar.conftest import (
    Process,
    Stack,
    sample_value,
    scrape,
    start_stack,
    until,
    wait_load,
)

# Each answer takes about 5 s: 100 tokens of 50 ms.
SIM_FLAGS = ("--ttft", "50ms", "--tpot", "50ms", "--output-tokens", "100")
AUTH = {"authorization": "Bearer sk-team-a"}
TOKEN = re.compile(rb'"content": ?"[^"]')  # a chunk with text, not the role-only one
STREAM = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _one_slot(data: dict[str, Any]) -> None:
    data["capacity"]["maxConcurrency"] = 1


async def _sim_stats(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with http.get(f"{stack.sim_url}/sim/stats") as r:
        stats: dict[str, Any] = await r.json()
        return stats


async def _until_sim(http: aiohttp.ClientSession, stack: Stack, **expected: int) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            stats = await _sim_stats(http, stack)
            if all(stats[k] == v for k, v in expected.items()):
                return stats
            await asyncio.sleep(0.05)


async def _cancelled_once(http: aiohttp.ClientSession, stack: Stack) -> bool:
    text = await scrape(http, stack.admin_url)
    labels = {"route": "chat", "tenant": "team-a", "priority": "realtime"}
    cancelled = sample_value(text, "headway_requests_total", outcome="client_cancelled", **labels)
    return cancelled == 1


async def test_disconnect_mid_stream_frees_the_slot_and_aborts_upstream(
    processes: list[Process], tmp_path: Path
) -> None:
    stack = await start_stack(processes, tmp_path, *SIM_FLAGS, edit=_one_slot)
    url = f"{stack.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        client = aiohttp.ClientSession()
        response = await client.post(url, json=STREAM, headers=AUTH)
        assert response.status == 200
        contents = 0
        async for line in response.content:
            contents += TOKEN.search(line) is not None
            if contents == 2:
                break
        response.close()  # hang up, mid-answer
        await client.close()

        # The slot is free and the model server stopped generating for it.
        await wait_load(http, stack.admin_url, lambda load: load["inflight"]["realtime"] == 0)
        stats = await _until_sim(http, stack, cancelled=1, in_flight=0)
        assert stats["completed"] == 0

        # Charged for what was used: the prompt and at least the delivered tokens.
        await until(lambda: _cancelled_once(http, stack))
        text = await scrape(http, stack.admin_url)
        output = sample_value(
            text, "headway_tokens_total", route="chat", tenant="team-a", type="output"
        )
        assert output >= 2

        # The one slot serves the next request.
        quick = {**STREAM, "stream": False, "max_tokens": 2}
        async with http.post(url, json=quick, headers=AUTH) as r:
            assert r.status == 200


async def test_disconnect_while_queued_leaves_the_queue(
    processes: list[Process], tmp_path: Path
) -> None:
    stack = await start_stack(processes, tmp_path, *SIM_FLAGS, edit=_one_slot)
    url = f"{stack.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = await http.post(url, json=STREAM, headers=AUTH)
        await wait_load(http, stack.admin_url, lambda load: load["inflight"]["realtime"] == 1)

        waiter_session = aiohttp.ClientSession()
        waiter = asyncio.create_task(waiter_session.post(url, json=STREAM, headers=AUTH))
        await wait_load(http, stack.admin_url, lambda load: load["queueDepth"]["realtime"] == 1)
        waiter.cancel()  # hang up while queued
        await waiter_session.close()

        load = await wait_load(
            http, stack.admin_url, lambda load: load["queueDepth"]["realtime"] == 0
        )
        assert load["inflight"]["realtime"] == 1  # the holder still streams
        await until(lambda: _cancelled_once(http, stack))
        assert (await _sim_stats(http, stack))["received"] == 1  # the waiter never got there
        text = await scrape(http, stack.admin_url)
        assert sample_value(text, "headway_queue_depth", priority="realtime") == 0

        holder.close()
