"""One table of limiter cases, run through the Lua script in a real redis-server and
through its Python twin; both must give exactly the expected answers.

Times are given explicitly (the "now" override) so the answers are exact; T is a
minute before both a UTC day and a UTC month end, so windows roll over in the table.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
from headway_contract import RedisSettings
from headway_sidecar import limiting_local as local
from headway_sidecar import limiting_redis

from tests.fixtures.redis import RedisServer

T = 1_775_001_540_000  # 2026-03-31 23:59:00 UTC
DAY, MONTH = 20260331, 202603
NEXT_DAY, NEXT_MONTH = 20260401, 202604
ADMITTED, REFUSED, DEMOTED, NEVER_FITS = local.ADMITTED, local.REFUSED, local.DEMOTED, 3
TPM, RPM, TPD, CONCURRENCY, COST = local.TPM, local.RPM, local.TPD, local.CONCURRENCY, local.COST
L = local.Limits

Call = Callable[[Sequence[str], Sequence[str]], Awaitable[list[int]]]


def reserve(
    limits: Sequence[local.Limits],
    tokens: int,
    at: int,
    *,
    cost: int = 0,
    demote: bool = False,
    member: str = "m",
    lease: int = 30_000,
) -> list[str]:
    return local.reserve_args(
        limits,
        tokens=tokens,
        cost_nano=cost,
        may_demote=demote,
        member=member,
        lease_ms=lease,
        now=str(at),
    )


def adjust(
    levels: Sequence[local.Level],
    at: int,
    *,
    t0: int,
    tokens: int = 0,
    requests: int = 0,
    cost: int = 0,
    member: str = "",
    charged: bool = True,
    day: int = DAY,
    month: int = MONTH,
) -> list[str]:
    a = local.Adjustment(t0, charged, tokens, requests, day, month, cost, member)
    return local.adjust_args(a, levels, now=str(at))


def usage(quotas: int, at: int) -> list[str]:
    return local.usage_args(quotas, now=str(at))


@dataclass(frozen=True)
class Step:
    quotas: tuple[str, ...]
    args: list[str]
    expect: list[int]


def one(args: list[str], expect: list[int]) -> Step:
    return Step(("t/q",), args, expect)


def head(outcome: int, code: int, index: int, wait: int, at: int, *levels: int) -> list[int]:
    day, month = (DAY, MONTH) if at < T + 60_000 else (NEXT_DAY, NEXT_MONTH)
    return [outcome, code, index, wait, at, day, month, *levels]


TPM100 = L(tpm=100, rpm=3)
TPM_RPM = L(tpm=100, rpm=10)
A, B = L(tpm=100), L(tpm=50, concurrency=5)

CASES: dict[str, list[Step]] = {
    "token bucket refills at limit per minute, wait is exact": [
        one(reserve([TPM100], 60, T), head(ADMITTED, 0, 0, 0, T, 3_600_000, 60_000)),
        one(reserve([TPM100], 60, T), head(REFUSED, TPM, 1, 12_000, T, 3_600_000, 60_000)),
        one(
            reserve([TPM100], 60, T + 12_000),
            head(ADMITTED, 0, 0, 0, T + 12_000, 6_000_000, 84_000),
        ),
        one(
            reserve([TPM100], 1, T + 12_000),
            head(REFUSED, TPM, 1, 600, T + 12_000, 6_000_000, 84_000),
        ),
    ],
    "requests per minute": [
        one(reserve([L(rpm=2)], 10, T), head(ADMITTED, 0, 0, 0, T, 0, 60_000)),
        one(reserve([L(rpm=2)], 10, T), head(ADMITTED, 0, 0, 0, T, 0, 120_000)),
        one(reserve([L(rpm=2)], 10, T + 1), head(REFUSED, RPM, 1, 29_999, T + 1, 0, 119_998)),
    ],
    "a request that can never fit says which limit": [
        one(reserve([L(tpm=100, tpd=50)], 101, T), head(NEVER_FITS, TPM, 1, 0, T, 0, 0)),
        one(reserve([L(tpm=100, tpd=50)], 60, T), head(NEVER_FITS, TPD, 1, 0, T, 0, 0)),
        one(reserve([L(concurrency=0)], 1, T), head(NEVER_FITS, CONCURRENCY, 1, 0, T, 0, 0)),
        one(reserve([L(cost_nano=5)], 1, T, cost=6), head(NEVER_FITS, COST, 1, 0, T, 0, 0)),
    ],
    "tokens per day is a UTC calendar day": [
        one(reserve([L(tpd=1000)], 900, T), head(ADMITTED, 0, 0, 0, T, 0, 0)),
        one(
            reserve([L(tpd=1000)], 200, T + 30_000),
            head(REFUSED, TPD, 1, 30_000, T + 30_000, 0, 0),
        ),
        one(reserve([L(tpd=1000)], 200, T + 60_000), head(ADMITTED, 0, 0, 0, T + 60_000, 0, 0)),
        one(usage(1, T + 60_000), [0, 0, 200, 1, 0, 0]),
    ],
    "cost per month is a UTC month; a refund frees it": [
        one(reserve([L(cost_nano=1000)], 1, T, cost=600), head(ADMITTED, 0, 0, 0, T, 0, 0)),
        one(
            reserve([L(cost_nano=1000)], 1, T, cost=600),
            head(REFUSED, COST, 1, 60_000, T, 0, 0),
        ),
        one(
            adjust([local.Level(-1, -1, 0, 0)], T + 1, t0=T, tokens=-1, requests=-1, cost=-600),
            [T + 1],
        ),
        one(
            reserve([L(cost_nano=1000)], 1, T + 2, cost=600),
            head(ADMITTED, 0, 0, 0, T + 2, 0, 0),
        ),
        one(usage(1, T + 2), [0, 0, 1, 1, 600, 0]),
    ],
    "concurrency counts leases until released or expired, renewals extend them": [
        one(reserve([L(concurrency=1)], 1, T, member="a"), head(ADMITTED, 0, 0, 0, T, 0, 0)),
        one(
            reserve([L(concurrency=1)], 1, T + 1, member="b"),
            head(REFUSED, CONCURRENCY, 1, 1000, T + 1, 0, 0),
        ),
        one(adjust([local.Level(-1, -1, 0, 0)], T + 2, t0=T, member="a"), [T + 2]),
        one(
            reserve([L(concurrency=1)], 1, T + 3, member="b"),
            head(ADMITTED, 0, 0, 0, T + 3, 0, 0),
        ),
        one(
            reserve([L(concurrency=1)], 1, T + 30_003, member="c"),
            head(ADMITTED, 0, 0, 0, T + 30_003, 0, 0),
        ),
        one(local.renew_args(1, 30_000, ["c"], now=str(T + 50_003)), [T + 50_003]),
        one(
            reserve([L(concurrency=1)], 1, T + 60_003, member="d"),
            head(REFUSED, CONCURRENCY, 1, 1000, T + 60_003, 0, 0),
        ),
        one(usage(1, T + 80_003), [0, 0, 0, 0, 0, 0]),
    ],
    "demote admits over the per-minute limits without charging them": [
        one(reserve([L(tpm=100)], 100, T, demote=True), head(ADMITTED, 0, 0, 0, T, 6_000_000, 0)),
        one(
            reserve([L(tpm=100)], 50, T, demote=True),
            head(DEMOTED, TPM, 1, 30_000, T, 6_000_000, 0),
        ),
        one(
            adjust([local.Level(100, -1, 6_000_000, 0)], T, t0=T, tokens=10, charged=False),
            [T],
        ),
        one(usage(1, T), [6_000_000, 0, 160, 2, 0, 0]),
    ],
    "demote never bypasses the daily limit": [
        one(
            reserve([L(tpm=100, tpd=120)], 100, T, demote=True),
            head(ADMITTED, 0, 0, 0, T, 6_000_000, 0),
        ),
        one(
            reserve([L(tpm=100, tpd=120)], 50, T, demote=True),
            head(REFUSED, TPD, 1, 60_000, T, 6_000_000, 0),
        ),
    ],
    "several quotas: all admit or nothing is charged": [
        Step(
            ("t/a", "t/b"),
            reserve([A, B], 40, T, member="m1"),
            head(ADMITTED, 0, 0, 0, T, 2_400_000, 0, 2_400_000, 0),
        ),
        Step(
            ("t/a", "t/b"),
            reserve([A, B], 40, T, member="m2"),
            head(REFUSED, TPM, 2, 36_000, T, 2_400_000, 0, 2_400_000, 0),
        ),
        Step(("t/a", "t/b"), usage(2, T), [2_400_000, 0, 40, 1, 0, 0, 2_400_000, 0, 40, 1, 0, 1]),
    ],
    "refund returns tokens and the request; an overrun goes into debt": [
        one(reserve([TPM_RPM], 60, T), head(ADMITTED, 0, 0, 0, T, 3_600_000, 60_000)),
        one(
            adjust(
                [local.Level(100, 10, 3_600_000, 60_000)], T + 1000, t0=T, tokens=-60, requests=-1
            ),
            [T + 1000],
        ),
        one(usage(1, T + 1000), [0, 0, 0, 0, 0, 0]),
        one(
            reserve([TPM_RPM], 60, T + 2000),
            head(ADMITTED, 0, 0, 0, T + 2000, 3_600_000, 60_000),
        ),
        one(
            adjust([local.Level(100, 10, 3_600_000, 60_000)], T + 2000, t0=T + 2000, tokens=30),
            [T + 2000],
        ),
        one(usage(1, T + 2000), [5_400_000, 60_000, 90, 1, 0, 0]),
        one(
            reserve([TPM_RPM], 20, T + 2000),
            head(REFUSED, TPM, 1, 6_000, T + 2000, 5_400_000, 60_000),
        ),
    ],
    "a late refund gives back only what has not drained yet": [
        one(reserve([L(tpm=100)], 60, T, member="x"), head(ADMITTED, 0, 0, 0, T, 3_600_000, 0)),
        one(
            reserve([L(tpm=100)], 40, T + 30_000, member="y"),
            head(ADMITTED, 0, 0, 0, T + 30_000, 3_000_000, 0),
        ),
        one(
            adjust([local.Level(100, -1, 3_600_000, 0)], T + 30_000, t0=T, tokens=-60),
            [T + 30_000],
        ),
        one(usage(1, T + 30_000), [2_400_000, 0, 40, 2, 0, 0]),
    ],
}


@pytest.fixture(params=["lua", "python"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Call]:
    if request.param == "python":
        yield local.LocalStore(clock=lambda: 0.0).call
        return
    server: RedisServer = request.getfixturevalue("redis")
    redis = limiting_redis.RedisStore(RedisSettings(url=server.url), timeout=5.0)
    try:
        yield redis.call
    finally:
        await redis.aclose()


@pytest.mark.parametrize("case", list(CASES))
async def test_limiter_table(store: Call, case: str) -> None:
    for number, step in enumerate(CASES[case], 1):
        answer = await store(step.quotas, step.args)
        assert answer == step.expect, f"step {number} of {case!r}: {step.args}"


async def test_lua_and_python_agree_on_random_traffic(redis: RedisServer) -> None:
    """Thousands of random operations: the script and the twin never disagree."""
    rng = random.Random(20261204)
    lua = limiting_redis.RedisStore(RedisSettings(url=redis.url), timeout=5.0)
    twin = local.LocalStore(clock=lambda: 0.0)
    quotas = {
        "r/a": L(tpm=500, rpm=20, tpd=60_000, concurrency=3, cost_nano=300_000),
        "r/b": L(tpm=300, concurrency=2),
        "r/c": L(rpm=5, tpd=20_000),
    }
    live: list[tuple[tuple[str, ...], list[local.Level], int, bool, str]] = []
    now = T - 3 * 60_000
    try:
        for n in range(2000):
            now += rng.choice((0, 1, 7, 250, 1900, 15_000))
            ids = tuple(sorted(rng.sample(list(quotas), rng.randint(1, 2))))
            limits = [quotas[q] for q in ids]
            roll = rng.random()
            if roll < 0.55 or not live:
                args = reserve(
                    limits,
                    rng.randint(1, 320),
                    now,
                    cost=rng.randint(0, 3000),
                    demote=rng.random() < 0.2,
                    member=f"m{n}",
                    lease=rng.choice((5_000, 30_000)),
                )
            elif roll < 0.9:
                ids, levels, t0, charged, member = live.pop(rng.randrange(len(live)))
                day, _, month, _ = local.windows(t0)
                args = adjust(
                    levels,
                    now,
                    t0=t0,
                    tokens=rng.randint(-300, 200),
                    requests=rng.choice((0, -1)),
                    cost=rng.randint(-3000, 3000),
                    member=member,
                    charged=charged,
                    day=day,
                    month=month,
                )
            elif roll < 0.95:
                args = usage(len(ids), now)
            else:
                args = local.renew_args(len(ids), 30_000, [x[4] for x in live], now=str(now))
            expected = await twin.call(ids, args)
            assert await lua.call(ids, args) == expected, f"operation {n}: {args}"
            if args[0] == "reserve" and expected[0] in (ADMITTED, DEMOTED):
                levels = [
                    local.Level(x.tpm, x.rpm, expected[7 + 2 * i], expected[8 + 2 * i])
                    for i, x in enumerate(limits)
                ]
                live.append((ids, levels, now, expected[0] == ADMITTED, f"m{n}"))
    finally:
        await lua.aclose()
