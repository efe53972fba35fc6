"""The limiter when Redis dies or hangs: fail-open keeps deciding from this
replica's share, fail-closed refuses at once, and shared limits resume when
Redis is back. Redis is a real redis-server, stopped or frozen with SIGSTOP.

Each decision runs under a generous deadline: with no bound on the wait a
frozen Redis would hang the call forever, so finishing at all is the proof;
the measured latencies are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import pytest
from headway_contract import Limiter as LimiterSettings
from headway_contract import RedisSettings
from headway_sidecar import errors, limiting

from tests.fixtures.redis import RedisServer
from tests.sidecar.test_limiting import quota, reserve

DEADLINE = 5.0  # seconds; far above the bound, far below "hung"
TEAM = quota(tokens_per_minute=100)

MakeLimiter = Callable[[str], limiting.Limiter]


@pytest.fixture
async def make_limiter(redis: RedisServer) -> AsyncIterator[MakeLimiter]:
    made: list[limiting.Limiter] = []

    def make(fail_mode: str) -> limiting.Limiter:
        settings = LimiterSettings(
            redis=RedisSettings(url=redis.url), fail_mode=fail_mode, redis_timeout=0.1
        )
        # Two replicas: the fail-open share is ceil(100 / 2) = 50 tokens.
        limiter = limiting.Limiter(settings, 2)
        made.append(limiter)
        return limiter

    yield make
    redis.thaw()
    for limiter in made:
        await limiter.aclose()


async def timed(call: Awaitable[object]) -> tuple[float, object]:
    """(seconds taken, result or the HeadwayError raised), within DEADLINE."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(DEADLINE):
            result: object = await call
    except errors.HeadwayError as e:
        result = e
    return time.monotonic() - started, result


async def until_shared(limiter: limiting.Limiter) -> None:
    """Poll (through the breaker's probes) until Redis decides again."""
    deadline = time.monotonic() + 20
    while True:
        await limiter.usage(TEAM.id)
        if not limiter.degraded:
            return
        assert time.monotonic() < deadline, "the limiter never went back to Redis"
        await asyncio.sleep(0.1)


async def break_redis(redis: RedisServer, how: str) -> None:
    if how == "stopped":
        redis.stop()
    else:
        redis.freeze()


async def mend_redis(redis: RedisServer, how: str) -> None:
    if how == "stopped":
        redis.start()
    else:
        redis.thaw()


@pytest.mark.parametrize("how", ["stopped", "frozen"])
async def test_fail_open_decides_from_the_local_share_then_shares_again(
    redis: RedisServer,
    make_limiter: MakeLimiter,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter, other_replica = make_limiter("open"), make_limiter("open")
    await reserve(limiter, TEAM, tokens=10)
    assert not limiter.degraded

    await break_redis(redis, how)
    with caplog.at_level(logging.WARNING, logger="headway_sidecar.limiting"):
        latencies = []
        for _ in range(10):
            took, result = await timed(reserve(limiter, TEAM, tokens=1))
            assert isinstance(result, limiting.Admission)
            latencies.append(took)
        assert limiter.degraded
        assert "rate limiter degraded (local share)" in caplog.text

        # The local share is half the limit; 10 tokens of it are gone.
        await reserve(limiter, TEAM, tokens=40)
        _, refused = await timed(reserve(limiter, TEAM, tokens=5))
        assert isinstance(refused, errors.RateLimited)
        assert refused.headers()["x-ratelimit-limit-tokens"] == "50"
        print(f"\nfail-open, Redis {how}: decisions took {_spread(latencies)}")

        await mend_redis(redis, how)
        await until_shared(limiter)
        assert "rate limiter shared again" in caplog.text

    # Both replicas count against the one shared bucket again (60 exceeds the
    # local share, so only Redis could admit it).
    await reserve(limiter, TEAM, tokens=60)
    with pytest.raises(errors.RateLimited) as shared:
        await reserve(other_replica, TEAM, tokens=60)
    assert shared.value.headers()["x-ratelimit-limit-tokens"] == "100"


@pytest.mark.parametrize("how", ["stopped", "frozen"])
async def test_fail_closed_answers_unavailable_quickly(
    redis: RedisServer, make_limiter: MakeLimiter, how: str
) -> None:
    limiter = make_limiter("closed")
    admission = await reserve(limiter, TEAM, tokens=10)

    await break_redis(redis, how)
    latencies = []
    for _ in range(10):
        took, result = await timed(reserve(limiter, TEAM, tokens=1))
        assert isinstance(result, errors.LimiterUnavailable)
        assert (result.status, result.code) == (503, "rate_limiter_unavailable")
        latencies.append(took)
    assert limiter.degraded
    # Settling through a dead Redis must not hang or fail the response either.
    took, settled = await timed(limiter.settle(admission, tokens=10, cost=Decimal(0)))
    assert settled is None
    print(f"\nfail-closed, Redis {how}: refusals took {_spread(latencies)}, settle {took:.3f}s")

    await mend_redis(redis, how)
    await until_shared(limiter)
    await reserve(limiter, TEAM, tokens=1)


async def test_bad_redis_settings_are_refused_and_the_old_ones_kept(
    redis: RedisServer, make_limiter: MakeLimiter
) -> None:
    limiter = make_limiter("closed")
    missing = RedisSettings(url=redis.url, password_file="/nonexistent/redis-password")
    with pytest.raises(OSError):
        limiter.reconfigure(LimiterSettings(redis=missing, fail_mode="closed"), 2)
    with pytest.raises(ValueError):
        limiter.reconfigure(LimiterSettings(redis=RedisSettings(url="http://nope")), 2)
    plain_with_tls = RedisSettings(url=redis.url, tls_ca_file="/etc/ssl/certs/ca.pem")
    with pytest.raises(ValueError, match="rediss://"):
        limiter.reconfigure(LimiterSettings(redis=plain_with_tls), 2)
    await reserve(limiter, TEAM, tokens=10)
    assert (await limiter.usage(TEAM.id)).tokens_today == 10


def _spread(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    return f"median {ordered[len(ordered) // 2] * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"


async def test_fail_open_never_calls_too_large_what_only_the_share_refuses(
    redis: RedisServer, make_limiter: MakeLimiter
) -> None:
    limiter = make_limiter("open")
    redis.stop()
    # 60 tokens exceed this replica's share (50) but not the quota (100).
    _, refused = await timed(reserve(limiter, TEAM, tokens=60))
    assert type(refused) is errors.RateLimited
    assert refused.headers()["retry-after"] == "1"
    _, never = await timed(reserve(limiter, TEAM, tokens=101))
    assert isinstance(never, errors.NeverFits)
