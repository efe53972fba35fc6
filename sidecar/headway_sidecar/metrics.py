"""The sidecar's Prometheus metrics (design section 5), registered on a registry passed in.

Label values come from configuration only: a route or tenant the config does
not name is recorded as ``unmatched`` or ``unknown``, so no request can add a
series. Gauges that mirror the scheduler read it at scrape time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypedDict

from headway_contract import CLASSES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Sample

UNMATCHED_ROUTE = "unmatched"
UNKNOWN_TENANT = "unknown"
# Requests that name no model (GET /v1/models): empty, as no model can be named so.
NO_ROUTE = ""

OUTCOMES = (
    "ok",
    "truncated",
    "rate_limited",
    "queue_full",
    "queue_timeout",
    "upstream_error",
    "upstream_timeout",
    "client_cancelled",
    "invalid_request",
    "unauthenticated",
    "unavailable",
)
RELOAD_RESULTS = ("ok", "error", "stale")

# Seconds. TTFT of an interactive chat is tens of ms to tens of seconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Bucket(TypedDict):
    le: str  # upper bound as Prometheus writes it, "+Inf" last
    count: int  # cumulative


class HistogramSnapshot(TypedDict):
    buckets: list[Bucket]
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class Labels:
    """The bounded label values of one request."""

    route: str = UNMATCHED_ROUTE
    tenant: str = UNKNOWN_TENANT
    priority: str = "realtime"


def bounded(value: str | None, known: Collection[str], fallback: str) -> str:
    return value if value is not None and value in known else fallback


class Metrics:
    """Every series the sidecar exports; one instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "headway_requests",
            "Requests answered, by outcome",
            ["route", "tenant", "priority", "outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "headway_queue_depth", "Requests waiting for a slot", ["priority"], registry=registry
        )
        self.inflight = Gauge(
            "headway_inflight_requests",
            "Requests holding an upstream slot",
            ["priority"],
            registry=registry,
        )
        self.capacity = Gauge(
            "headway_capacity_slots", "Upstream slots of this replica", registry=registry
        )
        self.queue_wait = Histogram(
            "headway_queue_wait_seconds",
            "Time from arrival to a slot",
            ["priority"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "headway_time_to_first_token_seconds",
            "Streaming requests: arrival to the first content delta",
            ["route", "priority"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "headway_time_per_output_token_seconds",
            "Streaming requests: (last token - first token) / (completion tokens - 1)",
            ["route", "priority"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "headway_tokens",
            "Tokens charged, from upstream usage or counted",
            ["route", "tenant", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "headway_cost",
            "Cost charged, in the pool's pricing currency",
            ["route", "tenant", "currency"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "headway_rate_limited",
            "Requests refused by a quota",
            ["tenant", "limit"],
            registry=registry,
        )
        self.duration = Histogram(
            "headway_request_duration_seconds",
            "Arrival to the last byte, every request",
            ["route", "priority"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.demotions = Counter(
            "headway_demotions",
            "Real-time requests served as batch because a quota said demote",
            ["tenant"],
            registry=registry,
        )
        self.stream_errors = Counter(
            "headway_stream_errors",
            "Streams that went wrong, by kind",
            ["kind"],
            registry=registry,
        )
        self.limiter_degraded = Gauge(
            "headway_limiter_degraded",
            "1 while the shared limiter is unreachable and local limits apply",
            registry=registry,
        )
        self.config_info = Gauge(
            "headway_config_info",
            "The config version in use (always 1)",
            ["version"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "headway_config_reloads",
            "Config documents offered, by result",
            ["result"],
            registry=registry,
        )
        self._config_version: str | None = None
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)

    def watch_scheduler(
        self,
        depth: Callable[[str], int],
        inflight: Callable[[str], int],
        capacity: Callable[[], int],
    ) -> None:
        """Make the queue gauges read the scheduler at scrape time."""
        for priority in CLASSES:
            self.queue_depth.labels(priority).set_function(functools.partial(depth, priority))
            self.inflight.labels(priority).set_function(functools.partial(inflight, priority))
        self.capacity.set_function(capacity)

    def watch_limiter(self, degraded: Callable[[], bool]) -> None:
        self.limiter_degraded.set_function(lambda: 1.0 if degraded() else 0.0)

    def set_config_version(self, version: str) -> None:
        if self._config_version is not None and self._config_version != version:
            self.config_info.remove(self._config_version)
        self.config_info.labels(version).set(1)
        self._config_version = version

    def count_tokens(
        self,
        labels: Labels,
        *,
        input_tokens: int,
        output_tokens: int,
        cost: Decimal | None,
        currency: str | None,
    ) -> None:
        self.tokens.labels(labels.route, labels.tenant, "input").inc(input_tokens)
        self.tokens.labels(labels.route, labels.tenant, "output").inc(output_tokens)
        if cost is not None and currency is not None:
            self.cost.labels(labels.route, labels.tenant, currency).inc(float(cost))

    def ttft_snapshot(self, priority: str) -> HistogramSnapshot:
        """Cumulative TTFT buckets of one class, summed over routes (for ``/load``)."""
        return _merge_buckets(next(iter(self.ttft.collect())).samples, priority)


def _merge_buckets(samples: Iterable[Sample], priority: str) -> HistogramSnapshot:
    counts = {_le(b): 0 for b in (*TTFT_BUCKETS, float("inf"))}
    total, count = 0.0, 0
    for sample in samples:
        if sample.labels.get("priority") != priority:
            continue
        if sample.name.endswith("_bucket"):
            counts[sample.labels["le"]] += int(sample.value)
        elif sample.name.endswith("_sum"):
            total += sample.value
        elif sample.name.endswith("_count"):
            count += int(sample.value)
    buckets = [Bucket(le=le, count=n) for le, n in counts.items()]
    return HistogramSnapshot(buckets=buckets, count=count, sum=total)


def _le(bound: float) -> str:
    # Spelled as prometheus_client spells ``le`` for bounds of this size.
    return "+Inf" if bound == float("inf") else repr(float(bound))
