"""Two real `headway sidecar` processes share one real redis-server in front of one
`headway simulate`: 200 concurrent requests from one tenant, split between them,
admit no more tokens than the bound in docs/limits.md.

The bound for a window of t seconds is L * (1 + t/60) + the overruns of the
admitted requests; the test computes each request's reservation with the
sidecar's own estimator, so overruns are measured, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from headway_sidecar import estimating

from tests.contract.sample import key_hash
from tests.fixtures.redis import RedisServer
from tests.sidecar.conftest import Process, document, spawn_sidecar, spawn_simulator, write_json

LIMIT = 20_000  # tokens per minute for the tenant
# max_tokens of every request, and what the simulator answers: long answers
# keep actual use close to the reservation, so over-admission would show.
CAP = 400
REQUESTS = 200
KEY = "sk-shared"


def body(i: int) -> dict[str, Any]:
    return {
        "model": "chat",
        "max_tokens": CAP,
        "messages": [{"role": "user", "content": f"question {i}: how far is the moon?"}],
    }


def shared_config(sim_port: int, redis: RedisServer) -> dict[str, Any]:
    data = document(sim_port, replicas=2)
    data["tenants"] = [
        {
            "name": "flood",
            "keyHashes": [key_hash(KEY)],
            "quotas": [
                {
                    "id": "default/flood",
                    "limits": {"tokensPerMinute": LIMIT, "requestsPerMinute": 10_000},
                    "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
                    "onExceeded": "reject",
                    "fairShareWeight": 1,
                }
            ],
        }
    ]
    # Closed, and a timeout for a loaded machine: a local fallback would make
    # this a test of the fail-open share instead of the shared bucket.
    data["limiter"] = {"redis": {"url": redis.url}, "failMode": "closed", "redisTimeout": 2.0}
    data["capacity"]["maxConcurrency"] = 16
    data["capacity"]["queues"]["realtime"] = {"maxDepth": 256, "timeout": 60.0}
    return data


async def test_two_sidecars_sharing_redis_admit_within_the_documented_bound(
    redis: RedisServer, processes: list[Process], tmp_path: Path
) -> None:
    sim = await spawn_simulator(
        processes, "--ttft", "20ms", "--tpot", "1ms", "--output-tokens", str(CAP)
    )
    config = shared_config(int(sim.url.rsplit(":", 1)[1]), redis)
    sidecars = [
        await spawn_sidecar(processes, write_json(tmp_path / f"sidecar-{n}.json", config))
        for n in range(2)
    ]

    async def ask(http: aiohttp.ClientSession, i: int) -> tuple[int, int, dict[str, Any]]:
        url = f"{sidecars[i % 2].url}/v1/chat/completions"
        headers = {"authorization": f"Bearer {KEY}"}
        async with http.post(url, json=body(i), headers=headers) as r:
            answer = json.loads(await r.read())
            headers = {k.lower(): v for k, v in r.headers.items()}
            return r.status, i, {"headers": headers, "json": answer}

    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        results = await asyncio.gather(*(ask(http, i) for i in range(REQUESTS)))
        window = time.monotonic() - started

    served = [(i, a) for status, i, a in results if status == 200]
    refused = [a for status, _, a in results if status == 429]
    assert len(served) + len(refused) == REQUESTS, {s for s, _, _ in results}
    assert all("retry-after" in a["headers"] for a in refused)
    assert {a["json"]["error"]["type"] for a in refused} == {"rate_limit_error"}

    admitted = overrun = 0
    for i, answer in served:
        used = answer["json"]["usage"]["total_tokens"]
        reserved = estimating.estimate_input_tokens(body(i)) + CAP
        admitted += used
        overrun += max(0, used - reserved)
        assert used - reserved <= CAP, "one request overran by more than its output cap"
    bound = LIMIT * (1 + window / 60) + overrun
    demand = sum(estimating.estimate_input_tokens(body(i)) + CAP for i in range(REQUESTS))
    print(
        f"\n{len(served)} of {REQUESTS} admitted in {window:.2f}s: {admitted} tokens, "
        f"bound {bound:.0f} (limit {LIMIT}, overrun {overrun}), demand {demand}; "
        f"per sidecar {[sum(1 for i, _ in served if i % 2 == n) for n in range(2)]}"
    )
    assert admitted <= bound
    # The test can fail: two sidecars each enforcing the whole limit on their
    # own would admit twice the bucket, which the demand covers; and a
    # limiter that refused everything would not pass either.
    assert demand > 2 * bound
    assert admitted > LIMIT / 2
