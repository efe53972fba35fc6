"""What the demo measured, put together: report.txt, report.json and the ttft.png chart.

Two sources, kept apart so each number says where it comes from. The client
side (the SDK's view of every request) gives requests, 429s, tokens from usage,
costs as tokens x the answering pool's prices, and exact TTFT per tenant. The
sidecars give what only they know: the class each request was served in
(demotions), queue wait, and TTFT/TPOT per class, as percentiles interpolated
inside their Prometheus histogram buckets, the way ``histogram_quantile`` does.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from headway_contract import CLASSES, Pricing
from prometheus_client.parser import text_string_to_metric_families

from headway_cli.demo_stack import Stack
from headway_cli.demo_traffic import Record

WINDOW = 5.0  # seconds per point of the chart's per-class TTFT p95 line
Buckets = dict[float, float]  # upper bound -> cumulative count
TTFT = "headway_time_to_first_token_seconds"
TPOT = "headway_time_per_output_token_seconds"
WAIT = "headway_queue_wait_seconds"


# -- samples from the sidecars ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One pool's ``GET /load`` at one time (seconds from the start of traffic)."""

    at: float
    pool: str
    depth: Mapping[str, int]
    inflight: Mapping[str, int]
    ttft: Mapping[str, Buckets]

    @classmethod
    def parse(cls, at: float, pool: str, body: Mapping[str, Any]) -> LoadSample:
        ttft = {
            c: {_bound(b["le"]): float(b["count"]) for b in body["ttft"][c]["buckets"]}
            for c in CLASSES
        }
        return cls(at, pool, dict(body["queueDepth"]), dict(body["inflight"]), ttft)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(texts: Iterable[str]) -> list[Sample]:
    """Every sample of every sidecar's ``/metrics``, pools side by side."""
    return [
        Sample(s.name, s.labels, s.value)
        for text in texts
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _sum_by(samples: Sequence[Sample], name: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for s in samples:
        if s.name == name:
            totals[s.labels.get(label, "")] += s.value
    return dict(totals)


def _histogram(samples: Sequence[Sample], name: str, priority: str) -> Buckets:
    """Cumulative buckets of one class, summed over routes and pools."""
    buckets: Buckets = defaultdict(float)
    for s in samples:
        if s.name == f"{name}_bucket" and s.labels.get("priority") == priority:
            buckets[_bound(s.labels["le"])] += s.value
    return dict(buckets)


def _bound(le: str) -> float:
    return math.inf if le == "+Inf" else float(le)


def bucket_quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile, linear inside the bucket that holds it; None without observations.

    As Prometheus does: the lowest bucket starts at 0, and a quantile in the
    +Inf bucket is reported as the highest finite bound.
    """
    bounds = sorted(buckets)
    total = buckets.get(math.inf, buckets[bounds[-1]] if bounds else 0.0)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of exact values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- the report ------------------------------------------------------------------------------


def build(
    stack: Stack,
    records: Sequence[Record],
    metrics: Sequence[Sample],
    loads: Sequence[LoadSample],
    *,
    duration: float,
    processes: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """report.json's content (docs/demo.md says how to read it)."""
    return {
        "duration_s": duration,
        "limiter": {
            "redis": stack.redis_url,
            # Set on a sidecar that has lost Redis and applies local limits instead.
            "degraded": any(s.value > 0 for s in metrics if s.name == "headway_limiter_degraded"),
        },
        "pools": {
            pool.name: {
                "models": list(pool.models),
                "slots": pool.gpu.max_concurrency,
                "simulated_ttft_s": pool.gpu.ttft,
                "simulated_tpot_s": pool.gpu.tpot,
                "output_tokens": pool.gpu.output_tokens,
                "pricing": _pricing(pool.pricing),
                "peak_queue": _peak_queue(loads, pool.name),
                "after_traffic": _after(loads, pool.name),
            }
            for pool in stack.pools.values()
        },
        "tenants": {
            name: _tenant(stack, name, [r for r in records if r.tenant == name], metrics)
            for name in sorted({r.tenant for r in records})
        },
        "classes": {c: _class(metrics, c) for c in CLASSES},
        "processes": processes,
        "sources": {
            "tenants": "client side (OpenAI SDK): requests, 429s, usage tokens, exact TTFT; "
            "cost = usage tokens x the answering pool's prices; 'sidecar' from /metrics",
            "classes": "sidecars' histograms (/metrics), percentiles interpolated in buckets",
        },
    }


def _tenant(
    stack: Stack, name: str, mine: Sequence[Record], metrics: Sequence[Sample]
) -> dict[str, Any]:
    """One tenant: the client's counts, tokens and costs, and the sidecars' view of it."""
    pricing = {model: pool.pricing for pool in stack.pools.values() for model in pool.models}
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"input": 0, "output": 0})
    cost = Decimal(0)
    for r in mine:
        if not r.model:
            continue  # no answer, so no usage
        tokens[r.model]["input"] += r.input_tokens
        tokens[r.model]["output"] += r.output_tokens
        price = pricing.get(r.model)
        if price is not None:
            cost += price.cost(r.input_tokens, r.output_tokens)

    outcomes = Counter(r.outcome for r in mine)
    ttfts = [r.ttft for r in mine if r.ttft is not None]
    by_limit = {
        s.labels["limit"]: int(s.value)
        for s in metrics
        if s.name == "headway_rate_limited_total" and s.labels.get("tenant") == name
    }
    return {
        "class": stack.tenants[name].default_class if name in stack.tenants else "",
        "requests": len(mine),
        "ok": outcomes["ok"],
        "rate_limited": outcomes["rate_limited"],
        "rate_limited_by_code": dict(Counter(r.code for r in mine if r.status == 429)),
        "errors": outcomes["error"],
        "cancelled": outcomes["cancelled"],
        "input_tokens": sum(t["input"] for t in tokens.values()),
        "output_tokens": sum(t["output"] for t in tokens.values()),
        "tokens_by_model": dict(sorted(tokens.items())),
        "cost": str(cost),
        "ttft_p50_s": quantile(ttfts, 0.5),
        "ttft_p95_s": quantile(ttfts, 0.95),
        "sidecar": {
            "cost": _sum_by(metrics, "headway_cost_total", "tenant").get(name, 0.0),
            "demotions": int(_sum_by(metrics, "headway_demotions_total", "tenant").get(name, 0)),
            "rate_limited": sum(by_limit.values()),
            "rate_limited_by_limit": by_limit,
        },
    }


def _class(metrics: Sequence[Sample], priority: str) -> dict[str, Any]:
    ttft, tpot, wait = (_histogram(metrics, name, priority) for name in (TTFT, TPOT, WAIT))
    return {
        "streams": int(ttft.get(math.inf, 0)),
        "ttft_p50_s": bucket_quantile(ttft, 0.5),
        "ttft_p95_s": bucket_quantile(ttft, 0.95),
        "tpot_p50_s": bucket_quantile(tpot, 0.5),
        "queue_wait_p50_s": bucket_quantile(wait, 0.5),
        "queue_wait_p95_s": bucket_quantile(wait, 0.95),
    }


def _pricing(pricing: Pricing | None) -> dict[str, str] | None:
    if pricing is None:
        return None
    return {
        "input_per_million": str(pricing.input_per_million),
        "output_per_million": str(pricing.output_per_million),
        "currency": pricing.currency,
    }


def _peak_queue(loads: Sequence[LoadSample], pool: str) -> dict[str, int]:
    return {
        c: max((s.depth.get(c, 0) for s in loads if s.pool == pool), default=0) for c in CLASSES
    }


def _after(loads: Sequence[LoadSample], pool: str) -> dict[str, int] | None:
    """Slots held and requests waiting at the last sample: anything left is a leak."""
    last = max((s for s in loads if s.pool == pool), key=lambda s: s.at, default=None)
    if last is None:
        return None
    return {"in_flight": sum(last.inflight.values()), "waiting": sum(last.depth.values())}


def costs_match(tenant: Mapping[str, Any]) -> bool:
    """Whether the client's cost and the sidecars' headway_cost_total agree (float sums)."""
    ours, theirs = float(Decimal(tenant["cost"])), float(tenant["sidecar"]["cost"])
    return math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9)


# -- text ------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def render_text(report: Mapping[str, Any], out: Path) -> str:
    """The report as printed and written to report.txt: one section per paragraph."""
    limiter = report["limiter"]
    where = f"Redis at {limiter['redis']}" if limiter["redis"] else "in memory"
    degraded = " (degraded to local limits at the end)" if limiter["degraded"] else ""
    lines = [f"Headway demo: {report['duration_s']:g} s of traffic; limits {where}{degraded}"]
    for section in (_pools_text, _tenants_text, _classes_text, _processes_text, _summary):
        lines += ["", *section(report)]
    files = ", ".join(str(out / n) for n in ("report.txt", "report.json", "ttft.png"))
    lines += [
        "",
        "Costs are usage tokens x the answering pool's prices (client side); 'sidecar' says",
        f"whether the sidecars' headway_cost_total agrees. Written: {files}",
    ]
    return "\n".join(lines) + "\n"


def _pools_text(report: Mapping[str, Any]) -> list[str]:
    lines = ["Pools (simulated GPUs, one replica each)"]
    for name, pool in report["pools"].items():
        price = pool["pricing"]
        priced = (
            f"{price['input_per_million']}/{price['output_per_million']} {price['currency']} "
            "per 1M input/output tokens"
            if price
            else "no pricing"
        )
        lines.append(
            f"  {name:<10} {pool['slots']} slots, TTFT {_ms(pool['simulated_ttft_s'])}, "
            f"TPOT {_ms(pool['simulated_tpot_s'])}, {priced}; peak queue "
            f"realtime {pool['peak_queue']['realtime']}, batch {pool['peak_queue']['batch']}"
        )
    return lines


def _tenants_text(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "Tenants (client side; demoted and sidecar cost from the sidecars' /metrics)",
        f"  {'tenant':<12} {'class':<9} {'requests':>8} {'ok':>5} {'429':>4} {'demoted':>7} "
        f"{'in tok':>8} {'out tok':>8} {'cost':>10} {'sidecar':>10} {'TTFT p50':>9} {'p95':>8}",
    ]
    for name, t in report["tenants"].items():
        cost = float(Decimal(t["cost"]))
        # Float sums differ in the last digit shown; say whether they agree instead.
        sidecar = "same" if costs_match(t) else f"{t['sidecar']['cost']:.6f}"
        lines.append(
            f"  {name:<12} {t['class']:<9} {t['requests']:>8} {t['ok']:>5} "
            f"{t['rate_limited']:>4} {t['sidecar']['demotions']:>7} {t['input_tokens']:>8} "
            f"{t['output_tokens']:>8} {cost:>10.6f} {sidecar:>10} "
            f"{_ms(t['ttft_p50_s']):>9} {_ms(t['ttft_p95_s']):>8}"
        )
        by_limit = {k: n for k, n in t["sidecar"]["rate_limited_by_limit"].items() if n}
        if by_limit:
            limits = ", ".join(f"{k} {n}" for k, n in sorted(by_limit.items()))
            lines.append(f"  {'':<12} 429s by limit (sidecars): {limits}")
        if t["errors"] or t["cancelled"]:
            lines.append(f"  {'':<12} errors {t['errors']}, cancelled {t['cancelled']}")
    return lines


def _classes_text(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "Classes (sidecars' histograms, interpolated within buckets; TTFT includes the wait)",
        f"  {'class':<9} {'streams':>7} {'TTFT p50':>9} {'p95':>8} {'TPOT p50':>9} "
        f"{'wait p50':>9} {'p95':>8}",
    ]
    for name, c in report["classes"].items():
        lines.append(
            f"  {name:<9} {c['streams']:>7} {_ms(c['ttft_p50_s']):>9} {_ms(c['ttft_p95_s']):>8} "
            f"{_ms(c['tpot_p50_s']):>9} {_ms(c['queue_wait_p50_s']):>9} "
            f"{_ms(c['queue_wait_p95_s']):>8}"
        )
    return lines


def _processes_text(report: Mapping[str, Any]) -> list[str]:
    lines = ["Processes (peak RSS, CPU time)"]
    for name, used in report["processes"].items():
        lines.append(f"  {name:<20} {used['peak_rss_mib']:>7.1f} MiB {used['cpu_s']:>7.1f} s")
    total = sum(used["peak_rss_mib"] for used in report["processes"].values())
    lines.append(f"  {'all (sum of peaks)':<20} {total:>7.1f} MiB")
    return lines


def _summary(report: Mapping[str, Any]) -> list[str]:
    """The design's promises, each checked against this run's numbers."""
    lines = ["In short"]
    realtime, batch = report["classes"]["realtime"], report["classes"]["batch"]
    fast, slow = realtime["ttft_p95_s"], batch["ttft_p95_s"]
    if fast and slow:
        lines.append(
            f"  real-time TTFT p95 {_ms(fast)} against batch {_ms(slow)}: "
            f"{slow / fast:.1f}x lower under the same load"
        )
    limited = [
        f"{name} ({t['rate_limited']} got 429, {t['sidecar']['demotions']} demoted)"
        for name, t in report["tenants"].items()
        if t["rate_limited"] or t["sidecar"]["demotions"]
    ]
    lines.append("  limited: " + (", ".join(limited) if limited else "no tenant"))
    busy = []
    for name, pool in report["pools"].items():
        after = pool["after_traffic"]
        if after is None:
            busy.append(f"{name} (no /load sample)")
        elif after["in_flight"] or after["waiting"]:
            busy.append(f"{name} ({after['in_flight']} in flight, {after['waiting']} waiting)")
    lines.append(
        "  afterwards: "
        + (f"not idle: {', '.join(busy)}" if busy else "every pool idle, no slot left held")
    )
    differ = [name for name, t in report["tenants"].items() if not costs_match(t)]
    lines.append(
        "  costs: the sidecars' headway_cost_total "
        + (f"differs for {', '.join(differ)}" if differ else "agrees for every tenant")
    )
    return lines


def write(report: Mapping[str, Any], text: str, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.txt").write_text(text, encoding="utf-8")


# -- chart -----------------------------------------------------------------------------------


def chart(
    records: Sequence[Record],
    loads: Sequence[LoadSample],
    classes: Mapping[str, str],
    path: Path,
) -> None:
    """TTFT over time (each request, and each class's p95), and queue depth by class.

    ``classes`` gives each tenant's default class, the colour of its points.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, (top, bottom) = pyplot.subplots(
        2, 1, sharex=True, figsize=(10, 7), height_ratios=(3, 2), layout="constrained"
    )
    colours = {"realtime": "tab:blue", "batch": "tab:orange"}
    light = {"realtime": "cornflowerblue", "batch": "sandybrown"}
    for index, tenant in enumerate(sorted({r.tenant for r in records})):
        done = [r for r in records if r.tenant == tenant and r.ttft is not None]
        klass = classes.get(tenant, "")
        top.scatter(
            [r.start + (r.ttft or 0.0) for r in done],
            [r.ttft for r in done],
            s=9,
            alpha=0.4,
            marker="o^sD"[index % 4],
            color=light.get(klass, "grey"),
            label=f"{tenant}, {klass} (each request)",
        )
    for c, (times, p95s) in _p95_lines(loads).items():
        top.plot(
            times, p95s, color=colours[c], linewidth=2.5, marker="o", label=f"{c} p95 (sidecars)"
        )
    top.set_yscale("log")
    top.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    top.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
    top.set_ylabel("time to first token (s)")
    top.set_title("TTFT by class over time")
    top.legend(loc="upper left", fontsize="small")
    top.grid(True, which="both", alpha=0.3)

    for c in CLASSES:
        times, depths = _depths(loads, c)
        bottom.step(times, depths, where="post", color=colours[c], label=f"{c} waiting")
    bottom.set_xlabel("seconds since traffic started")
    bottom.set_ylabel("queue depth (all pools)")
    bottom.legend(loc="upper left", fontsize="small")
    bottom.grid(True, alpha=0.3)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _minor_label(value: float, _: object) -> str:
    """Label 2, 3 and 5 times a power of ten only, so the labels never overlap."""
    if value <= 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(leading) in (2, 3, 5) else ""


def _depths(loads: Sequence[LoadSample], priority: str) -> tuple[list[float], list[int]]:
    by_time: dict[float, int] = defaultdict(int)
    for s in loads:
        by_time[s.at] += s.depth.get(priority, 0)
    times = sorted(by_time)
    return times, [by_time[t] for t in times]


def _p95_lines(loads: Sequence[LoadSample]) -> dict[str, tuple[list[float], list[float]]]:
    """Per class, the p95 of the TTFTs recorded in each WINDOW (differences of /load)."""
    rounds: dict[float, list[LoadSample]] = defaultdict(list)
    for s in loads:
        rounds[s.at].append(s)
    lines: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in CLASSES}
    previous: dict[str, Buckets] | None = None
    last = -math.inf
    for at in sorted(rounds):
        if at - last < WINDOW and previous is not None:
            continue
        totals = {c: merged(s.ttft[c] for s in rounds[at]) for c in CLASSES}
        if previous is not None:
            for c in CLASSES:
                window = {b: n - previous[c].get(b, 0.0) for b, n in totals[c].items()}
                p95 = bucket_quantile(window, 0.95)
                if p95 is not None:
                    lines[c][0].append(at)
                    lines[c][1].append(p95)
        previous, last = totals, at
    return lines


def merged(histograms: Iterable[Buckets]) -> Buckets:
    merged: Buckets = defaultdict(float)
    for histogram in histograms:
        for bound, count in histogram.items():
            merged[bound] += count
    return dict(merged)
