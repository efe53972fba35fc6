"""Overload: real-time requests keep their TTFT while a batch backlog waits.

A simulator with 4 generation slots behind a sidecar with ``maxConcurrency: 4``.
One tenant keeps 40 batch requests waiting while 10 real-time streams arrive
one by one; the same again with the backlog in the real-time class (one class,
so arrival order decides). The test prints the p95 TTFT of the probes unloaded,
with priority and in one class, and asserts only the comparison: timings on a
shared 2-core machine are not asserted in absolute terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.sidecar.conftest import Process, Stack, start_stack, wait_load

# ~0.2 s per request: a 50 ms prefill and 16 tokens of 10 ms.
SIM_FLAGS = ("--max-concurrency", "4", "--ttft", "50ms", "--tpot", "10ms", "--output-tokens", "16")
AUTH = {"authorization": "Bearer sk-team-a"}
TOKEN = re.compile(rb'^data:.*"content": ?"[^"]')  # content, not the role-only first chunk
BACKLOG = 40
PROBES = 10
PROBE_GAP = 0.3  # seconds between probe arrivals: longer than one request lasts


def _overload_document(data: dict[str, Any]) -> None:
    data["capacity"] = {
        "maxConcurrency": 4,
        "batchMaxShare": 0.75,
        "queues": {
            "realtime": {"maxDepth": 256, "timeout": 120.0},
            "batch": {"maxDepth": 256, "timeout": 120.0},
        },
    }
    data["tenants"][0]["quotas"][0]["limits"] = {}  # the queue is under test, not the quota


def _p95(values: list[float]) -> float:
    ranked = sorted(values)
    return ranked[math.ceil(0.95 * len(ranked)) - 1]


async def _ttft(http: aiohttp.ClientSession, url: str) -> float:
    """Seconds from sending a real-time stream to its first content delta."""
    body = {
        "model": "chat",
        "stream": True,
        "messages": [{"role": "user", "content": "probe"}],
    }
    headers = {**AUTH, "x-headway-priority": "realtime"}
    started = time.monotonic()
    async with http.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        first: float | None = None
        async for line in r.content:
            if first is None and TOKEN.search(line):
                first = time.monotonic() - started
        assert first is not None, "the probe got no content"
        return first


async def _probe(http: aiohttp.ClientSession, stack: Stack) -> list[float]:
    url = f"{stack.url}/v1/chat/completions"
    probes = []
    for _ in range(PROBES):
        probes.append(asyncio.create_task(_ttft(http, url)))
        await asyncio.sleep(PROBE_GAP)
    return list(await asyncio.gather(*probes))


async def _keep_busy(http: aiohttp.ClientSession, stack: Stack, priority: str) -> None:
    """One client of the backlog: sends the next request as soon as one ends."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "backlog"}]}
    headers = {**AUTH, "x-headway-priority": priority}
    while True:
        async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()


async def _under_backlog(http: aiohttp.ClientSession, stack: Stack, priority: str) -> list[float]:
    # Enough clients that BACKLOG of them wait while the others hold the slots
    # their class may use.
    slots = 3 if priority == "batch" else 4
    workers = [
        asyncio.create_task(_keep_busy(http, stack, priority)) for _ in range(BACKLOG + slots)
    ]
    try:
        await wait_load(
            http, stack.admin_url, lambda load: load["queueDepth"][priority] >= BACKLOG - 3
        )
        return await _probe(http, stack)
    finally:
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker


def _idle(load: dict[str, Any]) -> bool:
    return not any(load["queueDepth"].values()) and not any(load["inflight"].values())


async def test_realtime_ttft_survives_a_batch_backlog(
    processes: list[Process], tmp_path: Path
) -> None:
    stack = await start_stack(processes, tmp_path, *SIM_FLAGS, edit=_overload_document)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        unloaded = _p95(await _probe(http, stack))
        prioritised = _p95(await _under_backlog(http, stack, "batch"))
        # The abandoned backlog leaves the queue and frees every slot.
        await wait_load(http, stack.admin_url, _idle)
        one_class = _p95(await _under_backlog(http, stack, "realtime"))

    print(
        f"\nreal-time p95 TTFT: unloaded {unloaded * 1000:.0f} ms, "
        f"under a batch backlog {prioritised * 1000:.0f} ms "
        f"({prioritised / unloaded:.1f}x unloaded), "
        f"backlog in the same class {one_class * 1000:.0f} ms "
        f"({one_class / unloaded:.1f}x unloaded, {one_class / prioritised:.1f}x the priority run)"
    )
    assert prioritised < one_class / 2
