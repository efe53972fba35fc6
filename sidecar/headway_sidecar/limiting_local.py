"""The limiter's arithmetic in Python, and the in-memory store that runs it.

`evaluate` is the twin of the Lua script in `limiting_redis`: the same
operations on the same argument vector, giving the same integer results (one
table of cases runs through both). The store keeps one quota's state per id in
memory; a single event loop makes each call atomic.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

# A token is 60 000 ticks in a per-minute bucket, so that a bucket of limit L
# drains exactly L ticks per millisecond and all arithmetic stays integral
# (exact in Lua's doubles up to 2**53, i.e. limits far beyond any real one).
TICKS = 60_000
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# No way to predict when another request ends; this is the hint a client gets.
CONCURRENCY_WAIT_MS = 1_000
NONE = -1  # "no such limit" in an argument vector
NANO = Decimal(10) ** 9  # money is carried as integer billionths of the currency

# Outcomes of a reservation.
REFUSED, ADMITTED, DEMOTED, NEVER_FITS = 0, 1, 2, 3
# Limit codes, also the order in which ties between equal waits are broken.
TPM, RPM, TPD, CONCURRENCY, COST = 1, 2, 3, 4, 5

_EPOCH = datetime.date(1970, 1, 1)


def to_nano(amount: Decimal) -> int:
    """A cost in billionths, rounded up: never under-charge."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def limit_to_nano(amount: Decimal) -> int:
    """A cost limit in billionths, rounded down: never over-grant."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_FLOOR))


def from_nano(nano: int) -> Decimal:
    return Decimal(nano) / NANO


# -- the operations ---------------------------------------------------------------------------
#
# Every call is (operation, now override, arguments...), all strings, exactly
# what the Lua script receives as ARGV. The override exists for the shared
# test table only; the limiter always passes "" so that Redis's clock decides.


@dataclass(frozen=True, slots=True)
class Limits:
    """One quota's limits as a store applies them; NONE where unset."""

    tpm: int
    rpm: int
    tpd: int
    concurrency: int
    cost_nano: int


def reserve_args(
    limits: Limits, *, tokens: int, cost_nano: int, may_demote: bool, member: str, lease_ms: int
) -> list[str]:
    return [
        "reserve",
        "",
        *map(str, (limits.tpm, limits.rpm, limits.tpd, limits.concurrency, limits.cost_nano)),
        str(tokens),
        str(cost_nano),
        "1" if may_demote else "0",
        member,
        str(lease_ms),
    ]


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What a settle or refund changes in one quota's counters."""

    minute_charged: bool  # False for a demoted admission: its buckets were not charged
    t0_ms: int  # when the reservation was made (the store's clock)
    tokens_delta: int
    tokens_end: int  # the tpm bucket level, in ticks, right after the reservation
    requests_delta: int
    requests_end: int
    day_id: int
    day_tokens_delta: int
    day_requests_delta: int
    month_id: int
    cost_delta: int  # billionths
    member: str  # concurrency lease to release, "" for none


def adjust_args(limits: Limits, a: Adjustment) -> list[str]:
    values = (
        limits.tpm,
        limits.rpm,
        a.t0_ms,
        "1" if a.minute_charged else "0",
        a.tokens_delta,
        a.tokens_end,
        a.requests_delta,
        a.requests_end,
        a.day_id,
        a.day_tokens_delta,
        a.day_requests_delta,
        a.month_id,
        a.cost_delta,
    )
    return ["adjust", "", *map(str, values), a.member]


def usage_args() -> list[str]:
    return ["usage", ""]


def renew_args(members: Sequence[str], lease_ms: int) -> list[str]:
    return ["renew", "", str(lease_ms), *members]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reservation's answer; bucket levels are after the charge, if any."""

    outcome: int
    limit: int  # the binding limit code when refused or demoted, else 0
    wait_ms: int  # until the request would fit; 0 when admitted or never fits
    now_ms: int
    tpm_used: int  # ticks
    rpm_used: int  # ticks
    day_id: int  # YYYYMMDD (UTC)
    month_id: int  # YYYYMM (UTC)

    @classmethod
    def parse(cls, raw: Sequence[int]) -> Verdict:
        if len(raw) != 8:
            raise ValueError(f"unexpected reservation answer {raw!r}")
        return cls(*(int(x) for x in raw))


# -- the Python twin of the Lua script --------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    used: int = 0  # ticks
    at: int = 0  # ms when `used` was true
    rate: int = 0  # ticks drained per ms (the limit it was stored with)


@dataclass(slots=True)
class QuotaState:
    tpm: _Bucket = field(default_factory=_Bucket)
    rpm: _Bucket = field(default_factory=_Bucket)
    day_id: int = 0
    day_tokens: int = 0
    day_requests: int = 0
    month_id: int = 0
    month_cost: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # member -> expiry ms


def windows(now_ms: int) -> tuple[int, int, int, int]:
    """(day id, end of day ms, month id, end of month ms) for a UTC time."""
    days = now_ms // DAY_MS
    date = _EPOCH + datetime.timedelta(days=days)
    next_month = datetime.date(date.year + date.month // 12, date.month % 12 + 1, 1)
    return (
        date.year * 10_000 + date.month * 100 + date.day,
        (days + 1) * DAY_MS,
        date.year * 100 + date.month,
        (next_month - _EPOCH).days * DAY_MS,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _bucket_used(bucket: _Bucket, now: int) -> int:
    return max(0, bucket.used - max(0, now - bucket.at) * bucket.rate)


def _bucket_store(bucket: _Bucket, used: int, now: int, rate: int) -> None:
    bucket.used, bucket.at, bucket.rate = used, now, rate


def _bucket_adjust(bucket: _Bucket, limit: int, delta: int, end: int, t0: int, now: int) -> None:
    if limit < 0 or delta == 0:
        return
    if delta < 0:
        # Give back only what is left of the reservation after draining since
        # t0; the rest has already flowed out and refunding it would over-grant.
        left = end - max(0, now - t0) * limit
        if left <= 0:
            return
        delta = max(delta, -left)
    _bucket_store(bucket, max(0, _bucket_used(bucket, now) + delta), now, limit)


def _held(state: QuotaState, now: int) -> int:
    for member in [m for m, expiry in state.leases.items() if expiry <= now]:
        del state.leases[member]
    return len(state.leases)


def _day(state: QuotaState, day_id: int) -> tuple[int, int]:
    return (state.day_tokens, state.day_requests) if state.day_id == day_id else (0, 0)


def _month(state: QuotaState, month_id: int) -> int:
    return state.month_cost if state.month_id == month_id else 0


def _reserve(s: QuotaState, a: Sequence[str], now: int) -> list[int]:
    tpm, rpm, tpd, conc, cost_limit, tokens, cost = (int(x) for x in a[2:9])
    may_demote, member, lease = a[9] == "1", a[10], int(a[11])
    day_id, day_end, month_id, month_end = windows(now)
    tpm_used = _bucket_used(s.tpm, now) if tpm >= 0 else 0
    rpm_used = _bucket_used(s.rpm, now) if rpm >= 0 else 0
    day_tokens, day_requests = _day(s, day_id)
    month_cost = _month(s, month_id)
    in_flight = _held(s, now) if conc >= 0 else 0

    def answer(outcome: int, code: int, wait: int) -> list[int]:
        return [outcome, code, wait, now, tpm_used, rpm_used, day_id, month_id]

    if tpm >= 0 and tokens > tpm:
        return answer(NEVER_FITS, TPM, 0)
    if tpd >= 0 and tokens > tpd:
        return answer(NEVER_FITS, TPD, 0)
    if cost_limit >= 0 and cost > cost_limit:
        return answer(NEVER_FITS, COST, 0)

    waits = [0] * 6
    if tpm >= 0:
        waits[TPM] = max(0, _ceil_div(tpm_used + (tokens - tpm) * TICKS, tpm))
    if rpm >= 0:
        waits[RPM] = max(0, _ceil_div(rpm_used + (1 - rpm) * TICKS, rpm))
    if tpd >= 0 and day_tokens + tokens > tpd:
        waits[TPD] = day_end - now
    if conc >= 0 and in_flight >= conc:
        waits[CONCURRENCY] = CONCURRENCY_WAIT_MS
    if cost_limit >= 0 and month_cost + cost > cost_limit:
        waits[COST] = month_end - now
    worst = 0
    for code in (TPM, RPM, TPD, CONCURRENCY, COST):
        if waits[code] > 0 and (worst == 0 or waits[code] > waits[worst]):
            worst = code
    hard = waits[TPD] > 0 or waits[CONCURRENCY] > 0 or waits[COST] > 0
    minute = waits[TPM] > 0 or waits[RPM] > 0
    if hard or (minute and not may_demote):
        return answer(REFUSED, worst, waits[worst])

    # A demoted request leaves the per-minute buckets alone (docs/limits.md).
    if not minute:
        if tpm >= 0:
            tpm_used += tokens * TICKS
            _bucket_store(s.tpm, tpm_used, now, tpm)
        if rpm >= 0:
            rpm_used += TICKS
            _bucket_store(s.rpm, rpm_used, now, rpm)
    s.day_id, s.day_tokens, s.day_requests = day_id, day_tokens + tokens, day_requests + 1
    s.month_id, s.month_cost = month_id, month_cost + cost
    if conc >= 0:
        s.leases[member] = now + lease if lease > 0 else math.inf
    if minute:
        return answer(DEMOTED, worst, waits[worst])
    return answer(ADMITTED, 0, 0)


def _adjust(s: QuotaState, a: Sequence[str], now: int) -> list[int]:
    tpm, rpm, t0 = int(a[2]), int(a[3]), int(a[4])
    if a[5] == "1":
        _bucket_adjust(s.tpm, tpm, int(a[6]) * TICKS, int(a[7]), t0, now)
        _bucket_adjust(s.rpm, rpm, int(a[8]) * TICKS, int(a[9]), t0, now)
    day_id, _, month_id, _ = windows(now)
    # Adjustments to a window that has closed are dropped: the new one owes nothing.
    if int(a[10]) == day_id and (int(a[11]) != 0 or int(a[12]) != 0):
        tokens, requests = _day(s, day_id)
        s.day_id = day_id
        s.day_tokens = max(0, tokens + int(a[11]))
        s.day_requests = max(0, requests + int(a[12]))
    if int(a[13]) == month_id and int(a[14]) != 0:
        cost = _month(s, month_id)
        s.month_id, s.month_cost = month_id, max(0, cost + int(a[14]))
    if a[15]:
        s.leases.pop(a[15], None)
    return [now]


def _usage(s: QuotaState, now: int) -> list[int]:
    day_id, _, month_id, _ = windows(now)
    tokens, requests = _day(s, day_id)
    return [
        _bucket_used(s.tpm, now),
        _bucket_used(s.rpm, now),
        tokens,
        requests,
        _month(s, month_id),
        _held(s, now),
    ]


def _renew(s: QuotaState, a: Sequence[str], now: int) -> list[int]:
    lease = int(a[2])
    for member in a[3:]:
        if member in s.leases:
            s.leases[member] = now + lease
    return [now]


def evaluate(state: QuotaState, args: Sequence[str], clock_ms: int) -> list[int]:
    """Run one operation on one quota's state, as the Lua script does in Redis."""
    now = int(args[1]) if args[1] else clock_ms
    op = args[0]
    if op == "reserve":
        return _reserve(state, args, now)
    if op == "adjust":
        return _adjust(state, args, now)
    if op == "usage":
        return _usage(state, now)
    if op == "renew":
        return _renew(state, args, now)
    raise ValueError(f"unknown limiter operation {op!r}")


class LocalStore:
    """Quota state in this process: the no-Redis default and the fail-open fallback."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock  # seconds since the epoch; the windows are UTC days and months
        self._states: dict[str, QuotaState] = {}

    async def call(self, quota_id: str, args: Sequence[str]) -> list[int]:
        state = self._states.setdefault(quota_id, QuotaState())
        return evaluate(state, args, int(self._clock() * 1000))
