"""The limiter as the proxy uses it: reserve, settle, refund, headers and errors.

Most tests run twice, against a real redis-server and against the in-memory
store, since both must behave the same. Times are real (Redis's own clock), so
assertions leave room for the seconds a loaded machine may take.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
from headway_contract import Limiter as LimiterSettings
from headway_contract import Limits, Quota, QuotaPriority, RedisSettings
from headway_sidecar import errors, limiting
from redis.crc import key_slot

from tests.fixtures.redis import RedisServer

MakeLimiter = Callable[..., limiting.Limiter]


def quota(name: str = "team", *, on_exceeded: str = "reject", **limits: Any) -> Quota:
    return Quota(
        id=f"default/{name}",
        limits=Limits(**limits),
        routes=None,
        priority=QuotaPriority(default="realtime", allowed=("realtime", "batch")),
        on_exceeded=on_exceeded,
        fair_share_weight=1,
    )


async def reserve(
    limiter: limiting.Limiter,
    *quotas: Quota,
    tokens: int,
    cost: str = "0",
    priority: str = "realtime",
) -> limiting.Admission:
    return await limiter.reserve(quotas, tokens=tokens, cost=Decimal(cost), priority=priority)


@pytest.fixture(params=["redis", "memory"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    made: list[limiting.Limiter] = []
    redis = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        # A generous timeout: these tests are about semantics, not a slow machine.
        redis = RedisSettings(url=server.url)

    def make(replicas: int = 1, **options: Any) -> limiting.Limiter:
        settings = LimiterSettings(redis=redis, fail_mode="closed", redis_timeout=2.0)
        limiter = limiting.Limiter(settings, replicas, **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_retry_after_is_the_time_until_the_request_fits(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team = quota(tokens_per_minute=100)
    await reserve(limiter, team, tokens=60)

    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=60)

    # 20 tokens over a bucket refilling 100 per minute: 12 s, less what has passed.
    e = refused.value
    assert e.limit == "tokens_per_minute"
    assert (e.status, e.type, e.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert 6_000 < int(e.headers()["retry-after-ms"]) <= 12_000
    assert e.headers()["retry-after"] == str(-(-int(e.headers()["retry-after-ms"]) // 1000))
    assert e.headers()["x-ratelimit-limit-tokens"] == "100"


async def test_retry_after_rounds_up_to_whole_seconds() -> None:
    """Case 22 (a): 37.2 s until the request fits is `Retry-After: 38`."""
    now = [1_775_001_540.0]
    limiter = limiting.Limiter(LimiterSettings(redis=None), 1, clock=lambda: now[0])
    team = quota(tokens_per_minute=100)
    await reserve(limiter, team, tokens=100)
    now[0] += 22.8

    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=100)

    headers = refused.value.headers()
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("38", "37200")
    assert headers["x-ratelimit-remaining-tokens"] == "38"
    assert headers["x-ratelimit-reset-tokens"] == "37.2s"


async def test_request_that_can_never_fit_says_so(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team = quota(tokens_per_minute=100, tokens_per_day=1000)

    with pytest.raises(errors.NeverFits) as never:
        await reserve(limiter, team, tokens=101)

    e = never.value
    assert (e.status, e.code) == (429, "request_too_large")
    assert e.limit == "tokens_per_minute"
    assert "101 tokens" in e.message and "100" in e.message
    assert e.headers()["x-should-retry"] == "false"
    assert "retry-after" not in e.headers() and "retry-after-ms" not in e.headers()
    # Nothing was charged: a request that fits still gets the whole bucket.
    await reserve(limiter, team, tokens=100)


async def test_several_quotas_all_admit_or_none_is_charged(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team, org = quota("team", tokens_per_minute=100), quota("org", tokens_per_minute=50)
    await reserve(limiter, team, org, tokens=40)

    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, org, tokens=40)

    assert "default/org" in refused.value.message
    assert (await limiter.usage("default/team")).tokens_today == 40
    assert (await limiter.usage("default/org")).tokens_today == 40
    # The team quota alone still has room for what org refused.
    await reserve(limiter, team, tokens=40)


async def test_concurrency_slot_is_released_on_settle_and_on_refund(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    team = quota(concurrent_requests=1)
    first = await reserve(limiter, team, tokens=10)
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=10)
    assert refused.value.limit == "concurrent_requests"

    await limiter.settle(first, tokens=7, cost=Decimal(0))
    second = await reserve(limiter, team, tokens=10)
    await limiter.refund(second)
    third = await reserve(limiter, team, tokens=10)

    assert (await limiter.usage("default/team")).concurrent_requests == 1
    await limiter.settle(third, tokens=3, cost=Decimal(0))
    assert (await limiter.usage("default/team")).concurrent_requests == 0


async def test_refused_requests_do_not_eat_requests_per_minute(make_limiter: MakeLimiter) -> None:
    """Case 11 (3): A in flight, B refused for concurrency, A done, C admitted: RPM is 2."""
    limiter = make_limiter()
    team = quota(concurrent_requests=1, requests_per_minute=2)
    a = await reserve(limiter, team, tokens=10)
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=10)
    assert refused.value.limit == "concurrent_requests"
    await limiter.settle(a, tokens=10, cost=Decimal(0))
    c = await reserve(limiter, team, tokens=10)

    assert (await limiter.usage("default/team")).requests_this_minute == 2
    await limiter.refund(c)
    # A refund gives the request per minute back too.
    assert (await limiter.usage("default/team")).requests_this_minute == 1
    assert (await limiter.usage("default/team")).requests_today == 1


async def test_settle_and_refund_happen_once(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team = quota(tokens_per_minute=1000)
    admission = await reserve(limiter, team, tokens=100)
    await limiter.settle(admission, tokens=50, cost=Decimal(0))
    await limiter.settle(admission, tokens=50, cost=Decimal(0))
    await limiter.refund(admission)
    assert (await limiter.usage("default/team")).tokens_today == 50


async def test_concurrent_reservations_never_over_admit(make_limiter: MakeLimiter) -> None:
    """Case 15: tpm 300, 200 simultaneous requests of 50 + max_tokens 100: two fit."""
    limiter = make_limiter()
    team = quota(tokens_per_minute=300)

    async def attempt() -> limiting.Admission | errors.RateLimited:
        try:
            return await reserve(limiter, team, tokens=150)
        except errors.RateLimited as e:
            return e

    results = await asyncio.gather(*(attempt() for _ in range(200)))
    admitted = [r for r in results if isinstance(r, limiting.Admission)]
    refused = [r for r in results if isinstance(r, errors.RateLimited)]
    # The bucket refills 5 tokens a second; a third request needs 30 s.
    assert len(admitted) == 2
    assert len(refused) == 198 and all("retry-after" in e.headers() for e in refused)

    for admission in admitted:
        await limiter.settle(admission, tokens=130, cost=Decimal(0))
    usage = await limiter.usage("default/team")
    assert usage.tokens_today == 260
    assert 200 < usage.tokens_this_minute <= 260


async def test_settle_counts_input_and_output(make_limiter: MakeLimiter) -> None:
    """Case 17: usage 600 + 1 counts 601; a second such request no longer fits."""
    limiter = make_limiter()
    prompts = quota("prompts", tokens_per_minute=1000)
    first = await reserve(limiter, prompts, tokens=600 + 1)
    await limiter.settle(first, tokens=600 + 1, cost=Decimal(0))
    assert (await limiter.usage("default/prompts")).tokens_today == 601
    with pytest.raises(errors.RateLimited):
        await reserve(limiter, prompts, tokens=600 + 1)

    answers = quota("answers", tokens_per_minute=1000)
    second = await reserve(limiter, answers, tokens=5 + 900)
    await limiter.settle(second, tokens=5 + 900, cost=Decimal(0))
    assert (await limiter.usage("default/answers")).tokens_today == 905


async def test_overrun_is_charged_as_debt(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team = quota(tokens_per_minute=1000)
    admission = await reserve(limiter, team, tokens=100)
    await limiter.settle(admission, tokens=1100, cost=Decimal(0))

    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=1)
    # 101 tokens of debt at 1000 a minute: about 6 s before one token fits.
    assert 3_000 < int(refused.value.headers()["retry-after-ms"]) <= 6_060


async def test_cost_per_month_and_tokens_per_day_refuse_until_the_window_ends(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    spend = quota("spend", cost_per_month=Decimal("1.00"))
    admission = await reserve(limiter, spend, tokens=10, cost="0.60")
    await limiter.settle(admission, tokens=10, cost=Decimal("0.70"))
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, spend, tokens=10, cost="0.40")
    assert refused.value.limit == "cost_per_month"
    assert (await limiter.usage("default/spend")).cost_this_month == Decimal("0.7")

    daily = quota("daily", tokens_per_day=100)
    await reserve(limiter, daily, tokens=80)
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, daily, tokens=30)
    assert refused.value.limit == "tokens_per_day"
    assert refused.value.retry_after is not None and refused.value.retry_after <= 86_400


async def test_headers_describe_the_tightest_bucket(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    team = quota("team", tokens_per_minute=1000, requests_per_minute=10)
    org = quota("org", tokens_per_minute=500)
    admission = await reserve(limiter, team, org, tokens=100)

    headers = admission.headers
    assert headers["x-ratelimit-limit-tokens"] == "500"
    assert headers["x-ratelimit-remaining-tokens"] == "400"
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"


async def test_demote_admits_realtime_over_rate_as_batch(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    soft = quota("soft", on_exceeded="demote", tokens_per_minute=100, tokens_per_day=250)
    assert not (await reserve(limiter, soft, tokens=100)).demoted

    assert (await reserve(limiter, soft, tokens=100)).demoted
    assert not (await reserve(limiter, soft, tokens=10, priority="batch")).demoted
    # The daily limit is not a per-minute one: demote never bypasses it.
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, soft, tokens=100)
    assert refused.value.limit == "tokens_per_day"

    # Where quotas disagree, reject wins over demote.
    hard = quota("hard", tokens_per_minute=100)
    with pytest.raises(errors.RateLimited):
        await reserve(limiter, soft, hard, tokens=10)


async def test_in_memory_limits_hold_this_replicas_share() -> None:
    limiter = limiting.Limiter(LimiterSettings(redis=None), 3)
    team = quota(tokens_per_minute=100, concurrent_requests=2)
    # ceil(100 / 3) = 34 tokens and ceil(2 / 3) = 1 request on this replica.
    await reserve(limiter, team, tokens=34)
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=5)
    assert refused.value.headers()["x-ratelimit-limit-tokens"] == "34"

    limiter.reconfigure(LimiterSettings(redis=None), 1)
    await reserve(limiter, team, tokens=1)
    with pytest.raises(errors.RateLimited) as refused:
        await reserve(limiter, team, tokens=1)
    assert refused.value.limit == "concurrent_requests"


async def test_every_key_expires_and_shares_the_quotas_hash_tag(redis: RedisServer) -> None:
    settings = LimiterSettings(redis=RedisSettings(url=redis.url), redis_timeout=2.0)
    limiter = limiting.Limiter(settings, 1)
    everything = quota(
        "all-limits",
        tokens_per_minute=1000,
        requests_per_minute=10,
        tokens_per_day=10_000,
        concurrent_requests=2,
        cost_per_month=Decimal("5"),
    )
    try:
        admission = await reserve(limiter, everything, tokens=100, cost="0.01")
        with redis.client() as client:
            keys = sorted(client.keys("*"))
            ttls = {key: client.pttl(key) for key in keys}
        await limiter.settle(admission, tokens=90, cost=Decimal("0.01"))
    finally:
        await limiter.aclose()

    assert [k.rsplit(":", 1)[1] for k in keys] == ["day", "leases", "minute", "month"]
    assert all(k.startswith("headway:{default/all-limits}:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # The lease set lives about one lease; the minute hash until its buckets drain.
    assert ttls["headway:{default/all-limits}:leases"] <= limiting.LEASE_MS + 1000
    assert ttls["headway:{default/all-limits}:minute"] <= 61_000


async def test_running_requests_keep_their_lease(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request longer than a lease still counts; a crashed sidecar's do not."""
    monkeypatch.setattr(limiting, "LEASE_MS", 600)
    monkeypatch.setattr(limiting, "RENEW_EVERY", 0.1)
    team = quota(concurrent_requests=1)
    settings = LimiterSettings(redis=RedisSettings(url=redis.url), redis_timeout=2.0)
    running, crashed = limiting.Limiter(settings, 1), limiting.Limiter(settings, 1)
    try:
        admission = await reserve(running, team, tokens=1)
        await asyncio.sleep(1.5)  # several leases long
        with pytest.raises(errors.RateLimited):
            await reserve(crashed, team, tokens=1)
        await running.settle(admission, tokens=1, cost=Decimal(0))

        await reserve(crashed, team, tokens=1)
        await crashed.aclose()  # gone without settling: stops renewing
        deadline = asyncio.get_running_loop().time() + 10
        while (await running.usage("default/team")).concurrent_requests:
            assert asyncio.get_running_loop().time() < deadline, "lease never expired"
            await asyncio.sleep(0.1)
        await reserve(running, team, tokens=1)
    finally:
        await running.aclose()
        await crashed.aclose()
