"""Token-aware quotas: reserve before admission, settle after, shared through Redis.

`Limiter` is the one object the proxy talks to. It turns quotas into argument
vectors for a store (Redis, or this process's memory when no Redis is
configured or Redis fails with ``failMode: open``), turns the store's answer
into an `Admission` or an error, keeps concurrency leases alive while requests
run, and trips a circuit breaker so that a dead Redis costs a request at most
one bounded wait. The arithmetic lives in `limiting_local` and its Lua twin in
`limiting_redis`; docs/limits.md explains the algorithm and its bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Protocol

from headway_contract import Limiter as LimiterSettings
from headway_contract import Quota
from redis.exceptions import RedisError

from headway_sidecar import errors, limiting_redis
from headway_sidecar import limiting_local as local

logger = logging.getLogger(__name__)

# A crashed sidecar's concurrency slots come back after one lease; live
# requests renew theirs three times per lease.
LEASE_MS = 30_000
RENEW_EVERY = LEASE_MS / 3 / 1000
# Consecutive Redis failures that open the breaker, and how long it stays open
# before one request probes Redis again.
BREAKER_FAILURES = 3
BREAKER_COOLDOWN = 1.0
# How long a call may wait for one of this process's Redis connections in a
# burst before the request is decided as if Redis were down.
QUEUE_WAIT = 1.0
# What a store call may raise when Redis is unreachable, slow or confused.
STORE_FAILURES = (RedisError, OSError, TimeoutError)


class Store(Protocol):
    async def call(self, quota_ids: Sequence[str], args: Sequence[str]) -> list[int]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """One quota's counters now, for TokenQuota.status.usage."""

    tokens_this_minute: int  # still in the bucket (reservations included)
    requests_this_minute: int
    tokens_today: int  # UTC day
    requests_today: int
    cost_this_month: Decimal  # UTC month, in the pools' pricing currency
    concurrent_requests: int


class Admission:
    """An admitted request's reservation, until it is settled or refunded (once)."""

    __slots__ = (
        "_done",
        "adjustment",
        "cost_nano",
        "demoted",
        "headers",
        "levels",
        "quota_ids",
        "store",
        "tokens",
    )

    def __init__(
        self,
        *,
        store: Store,
        quota_ids: tuple[str, ...],
        levels: tuple[local.Level, ...],
        adjustment: local.Adjustment,
        tokens: int,
        cost_nano: int,
        demoted: bool,
        headers: Mapping[str, str],
    ) -> None:
        self.store = store  # settled where it was admitted: Redis, or the local fallback
        self.quota_ids = quota_ids
        self.levels = levels
        self.adjustment = adjustment  # its t0, windows and lease; deltas filled at settle
        self.tokens = tokens
        self.cost_nano = cost_nano
        self.demoted = demoted  # over a per-minute limit under `onExceeded: demote`
        self.headers = headers  # x-ratelimit-* for the response
        self._done = False


class _Breaker:
    """Stops calling Redis after repeated failures; one probe per cooldown."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def open(self) -> bool:
        return self._failures >= self._threshold

    def allows(self) -> bool:
        if not self.open:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures, self._probing = 0, False

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self.open:
            self._open_until = self._clock() + self._cooldown

    def abandoned(self) -> None:
        # A probe cancelled before Redis answered proves nothing either way.
        self._probing = False


class Limiter:
    """Quotas for this sidecar: Redis when configured and reachable, memory otherwise."""

    def __init__(
        self,
        settings: LimiterSettings,
        replicas: int,
        *,
        clock: Callable[[], float] = time.time,
        breaker_failures: int = BREAKER_FAILURES,
        breaker_cooldown: float = BREAKER_COOLDOWN,
    ) -> None:
        self._settings = settings
        self._replicas = max(1, replicas)
        self._local = local.LocalStore(clock)
        self._redis = _connect(settings)
        self._retired: list[limiting_redis.RedisStore] = []
        self._calls = asyncio.Semaphore(limiting_redis.MAX_CONNECTIONS)
        self._breaker = _Breaker(breaker_failures, breaker_cooldown, time.monotonic)
        self._degraded = False
        self._live: dict[str, Admission] = {}  # lease member -> admission holding it
        self._members = (f"{secrets.token_hex(6)}:{n}" for n in itertools.count())
        self._renewer: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but unreachable (local share or 503s apply)."""
        return self._degraded

    def reconfigure(self, settings: LimiterSettings, replicas: int) -> None:
        """Apply new settings; raises ValueError/OSError (old ones stay) if Redis's are bad."""
        if settings.redis != self._settings.redis or (
            settings.redis_timeout != self._settings.redis_timeout
        ):
            store = _connect(settings)
            # Admissions made through the old client still settle through it.
            if self._redis is not None:
                self._retired.append(self._redis)
            self._redis = store
            self._breaker.succeeded()
            self._set_degraded(False, "the Redis settings changed")
        self._settings = settings
        self._replicas = max(1, replicas)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for store in [*self._retired, *([self._redis] if self._redis else [])]:
            await store.aclose()

    # -- the request path ------------------------------------------------------------------------

    async def reserve(
        self, quotas: Sequence[Quota], *, tokens: int, cost: Decimal, priority: str
    ) -> Admission:
        """Charge the request's reservation to every quota at once, or raise why not."""
        if not quotas:
            raise ValueError("a reservation needs at least one quota")
        ids = tuple(q.id for q in quotas)
        cost_nano = local.to_nano(cost)
        member = next(self._members)
        # Where quotas disagree, reject wins over demote (design section 3).
        may_demote = all(q.on_exceeded == "demote" for q in quotas)

        def args(limits: Sequence[local.Limits]) -> list[str]:
            return local.reserve_args(
                limits,
                tokens=tokens,
                cost_nano=cost_nano,
                may_demote=may_demote,
                member=member,
                lease_ms=LEASE_MS,
            )

        store, limits, raw = await self._decide(ids, [_limits(q) for q in quotas], args)
        verdict = local.Verdict.parse(raw, len(quotas))
        headers = _headers(limits, verdict)
        if verdict.outcome == local.NEVER_FITS:
            if (
                store is self._local
                and self._redis is not None
                and not any(
                    local.never_fits(_limits(q).values(), tokens, cost_nano) for q in quotas
                )
            ):
                # Too large for this replica's share only: it fits once Redis is back.
                verdict = dataclasses.replace(verdict, outcome=local.REFUSED, wait_ms=1000)
                detail = "while the shared limiter is unavailable this replica admits its share"
                raise _refused(quotas, limits, verdict, headers, detail)
            raise _never_fits(quotas, limits, verdict, tokens, cost_nano, headers)
        if verdict.outcome == local.REFUSED:
            raise _refused(quotas, limits, verdict, headers)

        admission = Admission(
            store=store,
            quota_ids=ids,
            levels=tuple(
                local.Level(x.tpm, x.rpm, tpm_used, rpm_used)
                for x, (tpm_used, rpm_used) in zip(limits, verdict.levels, strict=True)
            ),
            adjustment=local.Adjustment(
                t0_ms=verdict.now_ms,
                minute_charged=verdict.outcome == local.ADMITTED,
                tokens_delta=0,
                requests_delta=0,
                day_id=verdict.day_id,
                month_id=verdict.month_id,
                cost_delta=0,
                member=member if any(x.concurrency >= 0 for x in limits) else "",
            ),
            tokens=tokens,
            cost_nano=cost_nano,
            demoted=verdict.outcome == local.DEMOTED and priority == "realtime",
            headers=headers,
        )
        if admission.adjustment.member:
            self._live[member] = admission
            self._start_renewing()
        return admission

    async def settle(self, admission: Admission, *, tokens: int, cost: Decimal) -> None:
        """Charge what the request actually used: refund the rest, or go into debt."""
        await self._adjust(
            admission,
            tokens=tokens - admission.tokens,
            requests=0,
            cost_nano=local.to_nano(cost) - admission.cost_nano,
        )

    async def refund(self, admission: Admission) -> None:
        """Give back everything, the request per minute included (nothing reached upstream)."""
        await self._adjust(
            admission, tokens=-admission.tokens, requests=-1, cost_nano=-admission.cost_nano
        )

    async def usage(self, quota_id: str) -> Usage:
        """The quota's counters where this replica's decisions are being made now."""
        ids = (quota_id,)
        raw = await self._call_redis(ids, local.usage_args(1)) if self._redis else None
        if raw is None:
            raw = await self._local.call(ids, local.usage_args(1))
        tpm, rpm, tokens, requests, cost, held = raw[: local.USAGE_FIELDS]
        return Usage(
            tokens_this_minute=-(-tpm // local.TICKS),
            requests_this_minute=-(-rpm // local.TICKS),
            tokens_today=tokens,
            requests_today=requests,
            cost_this_month=local.from_nano(cost),
            concurrent_requests=held,
        )

    # -- stores ----------------------------------------------------------------------------------

    async def _decide(
        self,
        ids: Sequence[str],
        limits: list[local.Limits],
        args: Callable[[Sequence[local.Limits]], list[str]],
    ) -> tuple[Store, list[local.Limits], list[int]]:
        """Where the reservation is decided, with which limits, and the store's answer."""
        redis = self._redis
        if redis is not None:
            raw = await self._call_redis(ids, args(limits))
            if raw is not None:
                return redis, limits, raw
            if self._settings.fail_mode == "closed":
                raise errors.LimiterUnavailable(
                    "The rate limiter is unavailable; the request was not admitted.",
                    retry_after=1,
                )
        shares = [x.share(self._replicas) for x in limits]
        return self._local, shares, await self._local.call(ids, args(shares))

    async def _call_redis(self, ids: Sequence[str], args: Sequence[str]) -> list[int] | None:
        """The script's answer, or None when Redis failed or the breaker is open."""
        redis = self._redis
        if redis is None or not self._breaker.allows():
            return None
        try:
            # NB: a burst queues here, on this process's own connections, not
            # on Redis; only the call itself is held to redis_timeout, or a busy
            # event loop would look like a dead Redis and trip the breaker.
            async with asyncio.timeout(QUEUE_WAIT):
                await self._calls.acquire()
        except TimeoutError:
            self._breaker.abandoned()
            logger.debug("no Redis connection free within %ss", QUEUE_WAIT)
            return None
        try:
            async with asyncio.timeout(self._settings.redis_timeout):
                raw = await redis.call(ids, args)
        except STORE_FAILURES as e:
            self._breaker.failed()
            if self._breaker.open:
                self._set_degraded(True, f"Redis failed: {_describe(e)}")
            else:
                logger.debug("Redis call failed: %s", _describe(e))
            return None
        except BaseException:
            self._breaker.abandoned()
            raise
        finally:
            self._calls.release()
        self._breaker.succeeded()
        self._set_degraded(False, "Redis answers again")
        return raw

    async def _adjust(
        self, admission: Admission, *, tokens: int, requests: int, cost_nano: int
    ) -> None:
        if admission._done:
            return
        admission._done = True
        self._live.pop(admission.adjustment.member, None)
        a = admission.adjustment
        adjustment = local.Adjustment(
            t0_ms=a.t0_ms,
            minute_charged=a.minute_charged,
            tokens_delta=tokens,
            requests_delta=requests,
            day_id=a.day_id,
            month_id=a.month_id,
            cost_delta=cost_nano,
            member=a.member,
        )
        args = local.adjust_args(adjustment, admission.levels)
        if admission.store is self._local:
            await self._local.call(admission.quota_ids, args)
        elif await self._call_store(admission.store, admission.quota_ids, args) is None:
            # Lost: a refund (over-charge, drains within the window), an overrun
            # (bounded by the output cap) or a lease (expires after LEASE_MS).
            logger.info("quota adjustment for %s dropped: Redis unavailable", admission.quota_ids)

    async def _call_store(
        self, store: Store, ids: Sequence[str], args: Sequence[str]
    ) -> list[int] | None:
        if store is self._redis:
            return await self._call_redis(ids, args)
        try:  # a retired Redis client, kept for what it admitted
            async with asyncio.timeout(self._settings.redis_timeout):
                return await store.call(ids, args)
        except STORE_FAILURES:
            return None

    def _set_degraded(self, degraded: bool, reason: str) -> None:
        if degraded == self._degraded:
            return
        self._degraded = degraded
        if degraded:
            mode = "local share" if self._settings.fail_mode == "open" else "refusing requests"
            logger.warning("rate limiter degraded (%s): %s", mode, reason)
        else:
            logger.warning("rate limiter shared again: %s", reason)

    # -- leases ----------------------------------------------------------------------------------

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._live:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self._renew()
            except Exception:
                # Leases not renewed now expire later; the next round tries again.
                logger.exception("renewing concurrency leases failed")

    async def _renew(self) -> None:
        """Extend the lease of every request still running, per store and quota set."""
        groups: dict[tuple[int, tuple[str, ...]], tuple[Store, list[str]]] = {}
        for member, admission in self._live.items():
            key = (id(admission.store), admission.quota_ids)
            groups.setdefault(key, (admission.store, []))[1].append(member)
        for (_, ids), (store, members) in groups.items():
            args = local.renew_args(len(ids), LEASE_MS, members)
            if store is self._local:
                await self._local.call(ids, args)
            else:
                await self._call_store(store, ids, args)


def _connect(settings: LimiterSettings) -> limiting_redis.RedisStore | None:
    if settings.redis is None:
        return None
    return limiting_redis.RedisStore(settings.redis, settings.redis_timeout)


# -- answers ---------------------------------------------------------------------------------


def _limits(quota: Quota) -> local.Limits:
    q = quota.limits

    def value(v: int | None) -> int:
        return local.NONE if v is None else v

    return local.Limits(
        tpm=value(q.tokens_per_minute),
        rpm=value(q.requests_per_minute),
        tpd=value(q.tokens_per_day),
        concurrency=value(q.concurrent_requests),
        cost_nano=local.NONE if q.cost_per_month is None else local.limit_to_nano(q.cost_per_month),
    )


def _headers(limits: Sequence[local.Limits], verdict: local.Verdict) -> dict[str, str]:
    """x-ratelimit-* for the tightest per-minute bucket among the quotas."""
    headers: dict[str, str] = {}
    for kind, index in (("tokens", 0), ("requests", 1)):
        tightest: tuple[int, int, int] | None = None  # remaining, limit, used ticks
        for x, level in zip(limits, verdict.levels, strict=True):
            limit = x.tpm if index == 0 else x.rpm
            if limit < 0:
                continue
            used = level[index]
            remaining = max(0, (limit * local.TICKS - used) // local.TICKS)
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, limit, used)
        if tightest is not None:
            remaining, limit, used = tightest
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(-(-used // limit) if limit else 0)
    return headers


def _duration(ms: int) -> str:
    """Milliseconds the way OpenAI writes reset times: 20ms, 1.5s, 6m0s."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    seconds = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _refused(
    quotas: Sequence[Quota],
    limits: Sequence[local.Limits],
    verdict: local.Verdict,
    headers: Mapping[str, str],
    detail: str = "",
) -> errors.RateLimited:
    name = local.LIMIT_NAMES[verdict.limit]
    quota = quotas[verdict.quota - 1]
    seconds = verdict.wait_ms / 1000
    if not detail and verdict.limit == local.CONCURRENCY:
        held = limits[verdict.quota - 1].concurrency
        detail = f"{held} requests are already in progress"
    elif not detail:
        detail = f"this request would fit in {_duration(verdict.wait_ms)}"
    error = errors.RateLimited(
        f"Rate limit reached for {name} of quota {quota.id}: {detail}. "
        f"Please retry after {math.ceil(seconds)}s.",
        retry_after=seconds,
        headers={**headers, "retry-after-ms": str(verdict.wait_ms)},
    )
    error.limit = name
    return error


def _never_fits(
    quotas: Sequence[Quota],
    limits: Sequence[local.Limits],
    verdict: local.Verdict,
    tokens: int,
    cost_nano: int,
    headers: Mapping[str, str],
) -> errors.NeverFits:
    name = local.LIMIT_NAMES[verdict.limit]
    quota = quotas[verdict.quota - 1]
    limit = limits[verdict.quota - 1]
    needs = {
        local.TPM: f"{tokens} tokens (input estimate plus output cap) against {limit.tpm}",
        local.TPD: f"{tokens} tokens (input estimate plus output cap) against {limit.tpd}",
        local.COST: f"{local.from_nano(cost_nano)} against {local.from_nano(limit.cost_nano)}",
    }.get(verdict.limit, f"1 against {limit.values()[verdict.limit - 1]}")
    shared = "" if limit == _limits(quota) else " (this replica's share: no Redis is configured)"
    error = errors.NeverFits(
        f"This request can never fit the {name} limit of quota {quota.id}: it needs "
        f"{needs}{shared}. Lower max_tokens or shorten the input.",
        headers=headers,
    )
    error.limit = name
    return error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
