"""The limiter's arithmetic in Python, and the in-memory store that runs it.

`evaluate` is the twin of the Lua script in `limiting_redis`: the same
operations on the same argument vector, giving the same integer results (one
table of cases runs through both). The store keeps each quota's state in
memory; a single event loop makes each call atomic, as Redis does the script.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

# A token is 60 000 ticks in a per-minute bucket, so that a bucket of limit L
# drains exactly L ticks per millisecond and all arithmetic stays integral
# (exact in Lua's doubles up to 2**53, i.e. limits far beyond any real one).
TICKS = 60_000
DAY_MS = 86_400_000
# No way to predict when another request ends; this is the hint a client gets.
CONCURRENCY_WAIT_MS = 1_000
NONE = -1  # "no such limit" in an argument vector
NANO = Decimal(10) ** 9  # money is carried as integer billionths of the currency

# Outcomes of a reservation.
REFUSED, ADMITTED, DEMOTED, NEVER_FITS = 0, 1, 2, 3
# Limit codes, also the order in which ties between equal waits are broken.
TPM, RPM, TPD, CONCURRENCY, COST = 1, 2, 3, 4, 5
LIMIT_NAMES = {
    TPM: "tokens_per_minute",
    RPM: "requests_per_minute",
    TPD: "tokens_per_day",
    CONCURRENCY: "concurrent_requests",
    COST: "cost_per_month",
}

# Argument vectors: a header, then one fixed-size block per quota.
RESERVE_HEADER, RESERVE_BLOCK = 8, 5
ADJUST_HEADER, ADJUST_BLOCK = 11, 4
RENEW_HEADER = 4
USAGE_FIELDS = 6

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
# Every call is (operation, now override, number of quotas, ...), all strings,
# exactly what the Lua script receives as ARGV. The override exists for the
# shared test table only; the limiter passes "" so that the store's clock decides.


@dataclass(frozen=True, slots=True)
class Limits:
    """One quota's limits as a store applies them; NONE where unset."""

    tpm: int = NONE
    rpm: int = NONE
    tpd: int = NONE
    concurrency: int = NONE
    cost_nano: int = NONE

    def share(self, replicas: int) -> Limits:
        """This replica's part of each limit, rounded up (the fail-open fallback)."""
        if replicas <= 1:
            return self
        return Limits(*(NONE if v < 0 else _ceil_div(v, replicas) for v in self.values()))

    def values(self) -> tuple[int, int, int, int, int]:
        return (self.tpm, self.rpm, self.tpd, self.concurrency, self.cost_nano)


def reserve_args(
    limits: Sequence[Limits],
    *,
    tokens: int,
    cost_nano: int,
    may_demote: bool,
    member: str,
    lease_ms: int,
    now: str = "",
) -> list[str]:
    header = ["reserve", now, str(len(limits)), str(tokens), str(cost_nano)]
    header += ["1" if may_demote else "0", member, str(lease_ms)]
    return header + [str(v) for quota in limits for v in quota.values()]


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What a settle or refund changes in the counters of every quota of one admission."""

    t0_ms: int  # when the reservation was made (the store's clock)
    minute_charged: bool  # False for a demoted admission: its buckets were not charged
    tokens_delta: int
    requests_delta: int
    day_id: int
    month_id: int
    cost_delta: int  # billionths
    member: str  # concurrency lease to release, "" for none


@dataclass(frozen=True, slots=True)
class Level:
    """One quota's per-minute limits and bucket levels (ticks) right after a reservation."""

    tpm: int
    rpm: int
    tokens_end: int
    requests_end: int


def adjust_args(a: Adjustment, levels: Sequence[Level], now: str = "") -> list[str]:
    values = (a.t0_ms, int(a.minute_charged), a.tokens_delta, a.requests_delta)
    header = ["adjust", now, str(len(levels)), *map(str, values)]
    header += [str(a.day_id), str(a.month_id), str(a.cost_delta), a.member]
    return header + [str(v) for x in levels for v in (x.tpm, x.rpm, x.tokens_end, x.requests_end)]


def usage_args(quotas: int, now: str = "") -> list[str]:
    return ["usage", now, str(quotas)]


def renew_args(quotas: int, lease_ms: int, members: Sequence[str], now: str = "") -> list[str]:
    return ["renew", now, str(quotas), str(lease_ms), *members]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reservation's answer; bucket levels (ticks) are after the charge, if any."""

    outcome: int
    limit: int  # the binding limit code when refused, demoted or never fits, else 0
    quota: int  # index of the quota that binds, when `limit` is set
    wait_ms: int  # until it would fit (undemoted, if demoted); 0 if admitted or never fits
    now_ms: int
    day_id: int  # YYYYMMDD (UTC)
    month_id: int  # YYYYMM (UTC)
    levels: tuple[tuple[int, int], ...]  # per quota: (tpm used, rpm used)

    @classmethod
    def parse(cls, raw: Sequence[int], quotas: int) -> Verdict:
        if len(raw) != 7 + 2 * quotas:
            raise ValueError(f"unexpected reservation answer {raw!r}")
        outcome, limit, quota, wait, now, day_id, month_id = (int(x) for x in raw[:7])
        levels = tuple((int(raw[i]), int(raw[i + 1])) for i in range(7, len(raw), 2))
        return cls(outcome, limit, quota, wait, now, day_id, month_id, levels)


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
    leases: dict[str, int] = field(default_factory=dict)  # member -> expiry ms


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


def never_fits(limits: Sequence[int], tokens: int, cost: int) -> int:
    """The limit code a request exceeds even with every counter at zero, else 0."""
    tpm, rpm, tpd, conc, cost_limit = limits
    if 0 <= tpm < tokens:
        return TPM
    if 0 <= rpm < 1:
        return RPM
    if 0 <= tpd < tokens:
        return TPD
    if 0 <= conc < 1:
        return CONCURRENCY
    if 0 <= cost_limit < cost:
        return COST
    return 0


def _reserve(states: Sequence[QuotaState], a: Sequence[str], now: int) -> list[int]:
    n, tokens, cost = int(a[2]), int(a[3]), int(a[4])
    may_demote, member, lease = a[5] == "1", a[6], int(a[7])
    day_id, day_end, month_id, month_end = windows(now)
    blocks = [
        [int(x) for x in a[RESERVE_HEADER + i * RESERVE_BLOCK :][:RESERVE_BLOCK]] for i in range(n)
    ]
    levels = [
        (
            _bucket_used(s.tpm, now) if b[0] >= 0 else 0,
            _bucket_used(s.rpm, now) if b[1] >= 0 else 0,
        )
        for s, b in zip(states, blocks, strict=True)
    ]

    def answer(outcome: int, code: int, index: int, wait: int) -> list[int]:
        return [
            outcome,
            code,
            index,
            wait,
            now,
            day_id,
            month_id,
            *(x for lv in levels for x in lv),
        ]

    for i, limits in enumerate(blocks):
        code = never_fits(limits, tokens, cost)
        if code:
            return answer(NEVER_FITS, code, i + 1, 0)

    # The request fits once every limit of every quota has room: the longest
    # wait binds. Per-minute waits do not count when the request may be demoted.
    minute = hard = False
    worst = worst_index = worst_wait = 0
    slow = slow_index = slow_wait = 0  # the binding per-minute limit, for a demotion
    for i, (s, limits) in enumerate(zip(states, blocks, strict=True)):
        tpm, rpm, tpd, conc, cost_limit = limits
        day_tokens, _ = _day(s, day_id)
        waits = [0] * 6
        if tpm >= 0:
            waits[TPM] = max(0, _ceil_div(levels[i][0] + (tokens - tpm) * TICKS, tpm))
        if rpm >= 0:
            waits[RPM] = max(0, _ceil_div(levels[i][1] + (1 - rpm) * TICKS, rpm))
        if tpd >= 0 and day_tokens + tokens > tpd:
            waits[TPD] = day_end - now
        if conc >= 0 and _held(s, now) >= conc:
            waits[CONCURRENCY] = CONCURRENCY_WAIT_MS
        if cost_limit >= 0 and _month(s, month_id) + cost > cost_limit:
            waits[COST] = month_end - now
        minute = minute or waits[TPM] > 0 or waits[RPM] > 0
        hard = hard or waits[TPD] > 0 or waits[CONCURRENCY] > 0 or waits[COST] > 0
        for code in (TPM, RPM):
            if waits[code] > slow_wait:
                slow, slow_index, slow_wait = code, i + 1, waits[code]
        for code in (TPM, RPM, TPD, CONCURRENCY, COST):
            if waits[code] > worst_wait and not (may_demote and code in (TPM, RPM)):
                worst, worst_index, worst_wait = code, i + 1, waits[code]
    if hard or (minute and not may_demote):
        return answer(REFUSED, worst, worst_index, worst_wait)

    # A demoted request leaves every per-minute bucket alone (docs/limits.md).
    for i, (s, limits) in enumerate(zip(states, blocks, strict=True)):
        tpm, rpm, _, conc, _ = limits
        if not minute:
            used_tokens, used_requests = levels[i]
            if tpm >= 0:
                used_tokens += tokens * TICKS
                _bucket_store(s.tpm, used_tokens, now, tpm)
            if rpm >= 0:
                used_requests += TICKS
                _bucket_store(s.rpm, used_requests, now, rpm)
            levels[i] = (used_tokens, used_requests)
        day_tokens, day_requests = _day(s, day_id)
        s.day_id, s.day_tokens, s.day_requests = day_id, day_tokens + tokens, day_requests + 1
        s.month_id, s.month_cost = month_id, _month(s, month_id) + cost
        if conc >= 0:
            s.leases[member] = now + lease
    if minute:
        return answer(DEMOTED, slow, slow_index, slow_wait)
    return answer(ADMITTED, 0, 0, 0)


def _adjust(states: Sequence[QuotaState], a: Sequence[str], now: int) -> list[int]:
    t0, charged, tokens_delta, requests_delta = int(a[3]), a[4] == "1", int(a[5]), int(a[6])
    day_id, month_id, cost_delta, member = int(a[7]), int(a[8]), int(a[9]), a[10]
    today, _, this_month, _ = windows(now)
    for i, s in enumerate(states):
        tpm, rpm, tokens_end, requests_end = (
            int(x) for x in a[ADJUST_HEADER + i * ADJUST_BLOCK :][:ADJUST_BLOCK]
        )
        if charged:
            _bucket_adjust(s.tpm, tpm, tokens_delta * TICKS, tokens_end, t0, now)
            _bucket_adjust(s.rpm, rpm, requests_delta * TICKS, requests_end, t0, now)
        # Adjustments to a window that has closed are dropped: the new one owes nothing.
        if day_id == today and (tokens_delta or requests_delta):
            tokens, requests = _day(s, today)
            s.day_id = today
            s.day_tokens = max(0, tokens + tokens_delta)
            s.day_requests = max(0, requests + requests_delta)
        if month_id == this_month and cost_delta:
            s.month_id, s.month_cost = this_month, max(0, _month(s, this_month) + cost_delta)
        if member:
            s.leases.pop(member, None)
    return [now]


def _usage(states: Sequence[QuotaState], now: int) -> list[int]:
    day_id, _, month_id, _ = windows(now)
    answer = []
    for s in states:
        tokens, requests = _day(s, day_id)
        answer += [_bucket_used(s.tpm, now), _bucket_used(s.rpm, now), tokens, requests]
        answer += [_month(s, month_id), _held(s, now)]
    return answer


def _renew(states: Sequence[QuotaState], a: Sequence[str], now: int) -> list[int]:
    lease = int(a[3])
    for s in states:
        for member in a[RENEW_HEADER:]:
            if member in s.leases:
                s.leases[member] = now + lease
    return [now]


def evaluate(states: Sequence[QuotaState], args: Sequence[str], clock_ms: int) -> list[int]:
    """Run one operation on several quotas' state at once, as the Lua script does in Redis."""
    now = int(args[1]) if args[1] else clock_ms
    if int(args[2]) != len(states):
        raise ValueError(f"{args[2]} quotas named, {len(states)} given")
    op = args[0]
    if op == "reserve":
        return _reserve(states, args, now)
    if op == "adjust":
        return _adjust(states, args, now)
    if op == "usage":
        return _usage(states, now)
    if op == "renew":
        return _renew(states, args, now)
    raise ValueError(f"unknown limiter operation {op!r}")


class LocalStore:
    """Quota state in this process: the no-Redis default and the fail-open fallback."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock  # seconds since the epoch; the windows are UTC days and months
        self._states: dict[str, QuotaState] = {}

    async def call(self, quota_ids: Sequence[str], args: Sequence[str]) -> list[int]:
        states = [self._states.setdefault(q, QuotaState()) for q in quota_ids]
        return evaluate(states, args, int(self._clock() * 1000))
