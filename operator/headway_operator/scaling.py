"""The autoscaling policy: from what the sidecars report to a replica count.

Pure: no I/O and no clock of its own, so recorded load sequences replay in
tests. It owns the parsing of a sidecar's ``GET /load`` answer (the operator
never imports the sidecar), the merging of TTFT histograms across pods, and
``decide``, the policy of design section 6 as written in docs/autoscaling.md.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from headway_contract import CLASSES

from headway_operator import specs

INF = float("inf")
# Seconds of TTFT samples behind the p95: long enough for a stable percentile,
# short enough that a spike shows within one default scale-up cooldown (30s).
TTFT_WINDOW = 30.0
# Fewer real-time first tokens than this in the window say nothing about
# latency: one long prompt must not buy a GPU.
MIN_TTFT_SAMPLES = 10
# Scaling down waits until the p95 is this far under ttftTarget, so the
# replica added for a TTFT spike is not removed while latency is borderline.
TTFT_HEADROOM = 0.8


class LoadError(ValueError):
    """A ``/load`` answer that cannot be read; the message names the field."""


# -- histograms -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts, as Prometheus keeps them; the last bound is +Inf."""

    bounds: tuple[float, ...] = (INF,)
    counts: tuple[int, ...] = (0,)

    @property
    def count(self) -> int:
        return self.counts[-1]

    def at(self, bound: float) -> int:
        """Observations at or under ``bound``, read off this histogram's own buckets."""
        index = bisect.bisect_right(self.bounds, bound) - 1
        return self.counts[index] if index >= 0 else 0

    def __add__(self, other: Histogram) -> Histogram:
        # Equal bounds are the rule; a sidecar with other buckets (another
        # version during a rollout) is folded in at its own bounds, which can
        # only move a quantile up, the safe side for scaling.
        if other.bounds == self.bounds:
            pairs = zip(self.counts, other.counts, strict=True)
            return Histogram(self.bounds, tuple(a + b for a, b in pairs))
        bounds = tuple(sorted(set(self.bounds) | set(other.bounds)))
        return Histogram(bounds, tuple(self.at(b) + other.at(b) for b in bounds))

    def since(self, earlier: Histogram) -> Histogram:
        """The observations made after ``earlier``; all of them if the counter was reset."""
        if earlier.bounds != self.bounds:
            return self
        delta = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        # A restarted sidecar counts from zero: some bucket then holds fewer
        # observations than before, and the difference stops being cumulative.
        if delta[0] < 0 or any(a > b for a, b in itertools.pairwise(delta)):
            return self
        return Histogram(self.bounds, delta)

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated inside its bucket; None without observations.

        Past the highest finite bound the answer is that bound, as Prometheus'
        histogram_quantile does.
        """
        if self.count == 0:
            return None
        rank = q * self.count
        index = next(i for i, c in enumerate(self.counts) if c >= rank)
        upper = self.bounds[index]
        if upper == INF:
            return self.bounds[-2] if len(self.bounds) > 1 else None
        lower = self.bounds[index - 1] if index > 0 else 0.0
        below = self.counts[index - 1] if index > 0 else 0
        inside = self.counts[index] - below
        return lower + (upper - lower) * (rank - below) / inside if inside else upper


def merge(histograms: Iterable[Histogram]) -> Histogram:
    total = Histogram()
    for histogram in histograms:
        total = total + histogram
    return total


# -- what one sidecar reports ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """One replica's ``/load``: per-class counts and cumulative TTFT histograms."""

    capacity: int  # upstream slots
    batch_slots: int  # slots batch may hold
    waiting: Mapping[str, int]
    inflight: Mapping[str, int]
    ttft: Mapping[str, Histogram]
    pool: str | None = None  # the pool the sidecar's config is for, when it says


def parse_load(data: object) -> Load:
    """Read a ``/load`` body; unknown fields and classes are ignored, as newer sidecars add some."""
    top = _mapping(data, "<body>")
    capacity = _count(top.get("capacity"), "capacity")
    if capacity < 1:
        raise LoadError(f"capacity: expected at least 1 (got {capacity})")
    batch_slots = top.get("batchSlots")
    ttft = _mapping(top.get("ttft", {}), "ttft")
    pool = top.get("pool")
    return Load(
        pool=pool if isinstance(pool, str) else None,
        capacity=capacity,
        batch_slots=capacity if batch_slots is None else _count(batch_slots, "batchSlots"),
        waiting=_per_class(top.get("queueDepth"), "queueDepth"),
        inflight=_per_class(top.get("inflight"), "inflight"),
        ttft={c: _histogram(ttft[c], f"ttft.{c}") for c in CLASSES if c in ttft},
    )


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LoadError(f"{where}: expected an object (got {type(value).__name__})")
    return value


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LoadError(f"{where}: expected a non-negative integer (got {value!r})")
    return value


def _per_class(value: object, where: str) -> dict[str, int]:
    counts = _mapping(value, where)
    return {c: _count(counts.get(c, 0), f"{where}.{c}") for c in CLASSES}


def _histogram(value: object, where: str) -> Histogram:
    buckets = _mapping(value, where).get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise LoadError(f"{where}.buckets: expected a non-empty list")
    pairs = []
    for index, bucket in enumerate(buckets):
        bucket = _mapping(bucket, f"{where}.buckets[{index}]")
        try:
            bound = float(bucket.get("le"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise LoadError(f"{where}.buckets[{index}].le: expected a number or +Inf") from None
        pairs.append((bound, _count(bucket.get("count"), f"{where}.buckets[{index}].count")))
    pairs.sort()
    if pairs[-1][0] != INF:
        raise LoadError(f"{where}.buckets: the last bucket must be +Inf")
    # Cumulative counts never fall; a scrape racing an observation may show that.
    counts = [max(c for _, c in pairs[: i + 1]) for i in range(len(pairs))]
    return Histogram(tuple(b for b, _ in pairs), tuple(counts))


def ttft_interval(previous: Mapping[str, Histogram], current: Mapping[str, Histogram]) -> Histogram:
    """First tokens observed between two scrapes, merged over pods (keyed by pod).

    A pod seen for the first time only sets its baseline: its counters may hold
    hours of history, as when the operator restarts.
    """
    return merge(h.since(previous[pod]) for pod, h in current.items() if pod in previous)


# -- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signals:
    """What the ready replicas reported at one moment, summed over them."""

    ready: int  # ready replicas that answered /load
    unreported: int = 0  # ready replicas that did not answer
    capacity: float = 1.0  # slots per replica (mean over those that answered)
    batch_slots: float = 1.0  # slots batch may hold per replica
    waiting: Mapping[str, int] = field(default_factory=dict)
    inflight: Mapping[str, int] = field(default_factory=dict)
    # Real-time first tokens per scrape interval: (end of interval, merged histogram).
    ttft: Sequence[tuple[float, Histogram]] = ()

    @classmethod
    def of(
        cls,
        loads: Sequence[Load],
        unreported: int = 0,
        ttft: Sequence[tuple[float, Histogram]] = (),
    ) -> Signals:
        if not loads:
            return cls(ready=0, unreported=unreported, ttft=ttft)
        return cls(
            ready=len(loads),
            unreported=unreported,
            capacity=sum(load.capacity for load in loads) / len(loads),
            batch_slots=sum(load.batch_slots for load in loads) / len(loads),
            waiting={c: sum(load.waiting.get(c, 0) for load in loads) for c in CLASSES},
            inflight={c: sum(load.inflight.get(c, 0) for load in loads) for c in CLASSES},
            ttft=ttft,
        )


@dataclass(frozen=True, slots=True)
class History:
    """What ``decide`` remembers between calls; start with ``History()``."""

    # (time, recommended replicas) of the last scaleDownDelay.
    recommendations: tuple[tuple[float, int], ...] = ()
    observing_since: float | None = None  # start of the unbroken run of recommendations
    last_scale_up: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The replica count to ask for, why, and the numbers behind it."""

    replicas: int
    reason: str  # CamelCase, for Events: ScaleUp, ScaleDown, Steady, ...
    wanted: int  # what demand asks for before min/max; above max means ScalingLimited
    realtime_waiting: int = 0
    batch_waiting: int = 0
    ttft_p95: float | None = None  # seconds, real-time, None without enough samples
    ttft_samples: int = 0
    message: str = ""


def realtime_p95(signals: Signals, history: History, now: float) -> tuple[float | None, int]:
    """p95 of real-time TTFT over the window, and how many samples it rests on.

    The window starts no earlier than the last scale-up: latency measured
    before it says nothing about the capacity added since.
    """
    start = now - TTFT_WINDOW
    if history.last_scale_up is not None:
        start = max(start, history.last_scale_up)
    merged = merge(h for t, h in signals.ttft if t > start)
    if merged.count < MIN_TTFT_SAMPLES:
        return None, merged.count
    return merged.quantile(0.95), merged.count


def decide(
    scaling: specs.Scaling, signals: Signals, current: int, history: History, now: float
) -> tuple[Decision, History]:
    """The replica count for this moment, and the history to pass to the next call.

    ``current`` is the Deployment's replica count, ``now`` any monotonic clock
    in seconds. The policy is explained in docs/autoscaling.md.
    """
    low, high = scaling.min_replicas, scaling.max_replicas

    # A changed spec applies at once, whatever the load.
    if not low <= current <= high:
        bounded = min(max(current, low), high)
        decision = Decision(bounded, "OutOfBounds", bounded, message=_bounds(current, scaling))
        last_up = now if bounded > current else history.last_scale_up
        return decision, replace(history, last_scale_up=last_up)

    # Nothing reports (replicas starting, or none ready): no evidence either way,
    # and the run of low demand that a scale-down needs starts over.
    if signals.ready == 0:
        message = f"no ready replica reported its load; keeping {current}"
        decision = Decision(current, "NoLoadReports", current, message=message)
        return decision, replace(history, recommendations=(), observing_since=None)

    p95, samples = realtime_p95(signals, history, now)
    wanted, healthy, why = _demand(scaling, signals, p95)
    held = ""
    if wanted < current:
        # Reasons to hold what runs rather than trust a lower count.
        if signals.unreported:
            held = f"; {signals.unreported} replica(s) did not report, not scaling down"
        elif not healthy:
            held = "; real-time is over its targets, not scaling down"
        elif p95 is not None and p95 > scaling.ttft_target * TTFT_HEADROOM:
            held = f"; TTFT p95 within {1 - TTFT_HEADROOM:.0%} of target, not scaling down"
    recommended = current if held else min(max(wanted, low), high)

    since = history.observing_since if history.observing_since is not None else now
    recent = tuple(r for r in history.recommendations if r[0] > now - scaling.scale_down_delay)
    history = History((*recent, (now, recommended)), since, history.last_scale_up)

    replicas, reason = current, "Steady"
    if recommended > current:
        last_up = history.last_scale_up
        if last_up is not None and now - last_up < scaling.scale_up_cooldown:
            reason = "ScaleUpCooldown"
            held = f"; last scale-up {now - last_up:.0f}s ago, cooldown "
            held += f"{scaling.scale_up_cooldown:g}s"
        else:
            replicas, reason = recommended, "ScaleUp"
            history = replace(history, last_scale_up=now)
    elif recommended < current:
        # Down only to the highest recommendation of the whole delay, and only
        # once the recommendations cover it: demand must stay low, not dip.
        highest = max(r for _, r in history.recommendations)
        if now - since >= scaling.scale_down_delay and highest < current:
            replicas, reason = highest, "ScaleDown"
        else:
            reason = "ScaleDownDelay"
            held = f"; waiting for {scaling.scale_down_delay:g}s of low demand"

    decision = Decision(
        replicas=replicas,
        reason=reason,
        wanted=wanted,
        realtime_waiting=signals.waiting.get("realtime", 0),
        batch_waiting=signals.waiting.get("batch", 0),
        ttft_p95=p95,
        ttft_samples=samples,
        message=f"{current} -> {replicas}: {why}{held}",
    )
    return decision, history


def _demand(scaling: specs.Scaling, signals: Signals, p95: float | None) -> tuple[int, bool, str]:
    """Replicas the demand needs (before min/max), whether real-time is healthy, and why."""
    target = scaling.target_queue_per_replica
    waiting, inflight = signals.waiting, signals.inflight
    realtime = waiting.get("realtime", 0) + inflight.get("realtime", 0)
    batch = waiting.get("batch", 0) + inflight.get("batch", 0)

    # With n replicas, demand d leaves d - n*slots waiting; keeping that under
    # n*target needs n >= d / (slots + target).
    per_replica = signals.capacity + target
    realtime_need = _ceil(realtime / per_replica)
    ttft_high = p95 is not None and p95 > scaling.ttft_target
    healthy = waiting.get("realtime", 0) <= target * signals.ready and not ttft_high

    need = realtime_need
    if healthy:
        # Batch counts only while real-time is fine, and only at the share of
        # slots it may hold.
        together = _ceil((realtime + batch) / per_replica)
        batch_alone = _ceil(batch / (signals.batch_slots + target))
        need = max(need, together, batch_alone)
    if ttft_high:
        # One step over what is ready: replicas still starting count as the step.
        need = max(need, signals.ready + 1)

    ttft = "n/a" if p95 is None else f"{p95:.3f}s"
    why = (
        f"real-time {realtime} (waiting {waiting.get('realtime', 0)}), "
        f"batch {batch} (waiting {waiting.get('batch', 0)}) "
        f"{'counted' if healthy else 'not counted'}, over {signals.ready} ready replica(s) of "
        f"{signals.capacity:g} slots and a target of {target:g} waiting each; "
        f"TTFT p95 {ttft} (target {scaling.ttft_target:g}s); demand asks for {need}"
    )
    return need, healthy, why


def _ceil(value: float) -> int:
    # NB: 9 / 3.0 must be 3, not 4 through a rounding error.
    return math.ceil(round(value, 9))


def _bounds(current: int, scaling: specs.Scaling) -> str:
    return (
        f"{current} replicas is outside minReplicas {scaling.min_replicas} and "
        f"maxReplicas {scaling.max_replicas}"
    )
