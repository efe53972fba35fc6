"""A real `headway sidecar` process while its real redis-server is stopped or frozen.

Fail-open keeps answering from the replica's local share, with the added
latency bounded by the Redis timeout (the numbers are printed, the assertion
only compares against a generous multiple of the configured timeout);
fail-closed answers 503 `rate_limiter_unavailable` at once; shared limiting
(and `headway_limiter_degraded` 0) comes back with Redis.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.contract.sample import key_hash
from tests.fixtures.redis import RedisServer
from tests.sidecar.conftest import (
    Process,
    document,
    sample_value,
    scrape,
    spawn_sidecar,
    spawn_simulator,
    write_json,
)

KEY = "sk-outage"
REDIS_TIMEOUT = 0.05
BODY = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def config(sim_port: int, redis: RedisServer, fail_mode: str) -> dict[str, Any]:
    data = document(sim_port, replicas=2)
    data["tenants"] = [
        {
            "name": "steady",
            "keyHashes": [key_hash(KEY)],
            "quotas": [
                {
                    "id": "default/steady",
                    "limits": {"tokensPerMinute": 1_000_000, "requestsPerMinute": 100_000},
                    "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
                    "onExceeded": "reject",
                    "fairShareWeight": 1,
                }
            ],
        }
    ]
    data["limiter"] = {
        "redis": {"url": redis.url},
        "failMode": fail_mode,
        "redisTimeout": REDIS_TIMEOUT,
    }
    return data


async def _ask(http: aiohttp.ClientSession, url: str) -> tuple[int, float, dict[str, Any]]:
    started = time.monotonic()
    async with http.post(
        f"{url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"}
    ) as r:
        body = await r.json()
        return r.status, time.monotonic() - started, body


async def _latencies(http: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        status, took, body = await _ask(http, url)
        assert status == 200, body
        times.append(took)
    return times


async def _sidecar(
    processes: list[Process], tmp_path: Path, redis: RedisServer, fail_mode: str
) -> tuple[str, str]:
    sim = await spawn_simulator(processes, "--ttft", "5ms", "--tpot", "1ms")
    data = config(int(sim.url.rsplit(":", 1)[1]), redis, fail_mode)
    sidecar = await spawn_sidecar(processes, write_json(tmp_path / "config.json", data))
    return sidecar.urls[0], sidecar.urls[1]


@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_fail_open_keeps_serving_through_a_redis_outage(
    redis: RedisServer, processes: list[Process], tmp_path: Path, fault: str
) -> None:
    url, admin = await _sidecar(processes, tmp_path, redis, "open")
    async with aiohttp.ClientSession() as http:
        healthy = await _latencies(http, url, 20)
        assert redis.client().keys("*{default/steady}*"), "requests did not reach Redis"
        redis.stop() if fault == "stop" else redis.freeze()
        try:
            degraded = await _latencies(http, url, 20)
            assert sample_value(await scrape(http, admin), "headway_limiter_degraded") == 1
        finally:
            redis.thaw()
            redis.start()
        added = statistics.median(degraded) - statistics.median(healthy)
        print(
            f"\n{fault}: median {statistics.median(healthy) * 1000:.1f} ms healthy, "
            f"{statistics.median(degraded) * 1000:.1f} ms degraded "
            f"(added {added * 1000:.1f} ms, worst {max(degraded) * 1000:.1f} ms)"
        )
        # Bounded by the Redis timeout, not by TCP or the OS: a generous multiple
        # of it, since the machine is shared, but far below any client timeout.
        assert added < 20 * REDIS_TIMEOUT

        # Back to shared limiting once Redis answers again (after the breaker's pause).
        async def shared_again() -> bool:
            await _ask(http, url)
            return sample_value(await scrape(http, admin), "headway_limiter_degraded") == 0

        deadline = time.monotonic() + 60
        while not await shared_again():
            assert time.monotonic() < deadline, "the limiter never left degraded mode"
        redis.client().flushall()
        status, _, _ = await _ask(http, url)
        assert status == 200
        assert redis.client().keys("*{default/steady}*"), "shared limiting did not resume"


async def test_fail_closed_answers_503_quickly_while_redis_is_frozen(
    redis: RedisServer, processes: list[Process], tmp_path: Path
) -> None:
    url, _ = await _sidecar(processes, tmp_path, redis, "closed")
    async with aiohttp.ClientSession() as http:
        await _latencies(http, url, 3)
        redis.freeze()
        try:
            answers = [await _ask(http, url) for _ in range(10)]
        finally:
            redis.thaw()
    print("\nfail-closed answers in ms:", [round(took * 1000, 1) for _, took, _ in answers])
    for status, took, body in answers:
        assert status == 503, body
        assert body["error"]["code"] == "rate_limiter_unavailable"
        assert took < 20 * REDIS_TIMEOUT
