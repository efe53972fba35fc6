"""Medians of rounds, ratios against the targets of issue 8, files, plots and tables."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

Row = dict[str, Any]
BUDGETS_MS = (5.0, 25.0, 100.0)
"""p99 budgets (client-measured, absolute) for requests per second per core."""
ORDER = ("direct", "nginx", "headway-bare", "headway-full", "litellm")


class Cell(dict[str, Any]):
    """Medians of one arm at one level; a metric no round produced reads as NaN."""

    def __missing__(self, key: str) -> float:
        return math.nan


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def medians(rows: list[Row]) -> dict[str, dict[str, dict[str, Row]]]:
    """scenario -> arm -> level -> the median over rounds of every numeric field."""
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row["scenario"], row["arm"], str(row["level"]))].append(row)
    out: dict[str, dict[str, dict[str, Row]]] = defaultdict(lambda: defaultdict(dict))
    for (scenario, arm, level), group in groups.items():
        keys = {k for row in group for k, v in row.items() if _number(v) and k != "round"}
        cell = Cell({k: _median([float(r[k]) for r in group if _number(r.get(k))]) for k in keys})
        cell["rounds"] = len(group)
        cell["failed_runs"] = sum(1 for r in group if r.get("error"))
        out[scenario][arm][level] = cell
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def summarise(rows: list[Row], arms: tuple[str, ...], stream_seconds: float) -> Row:
    """Medians, budgets and targets; ``stream_seconds`` is how long one stream lasts."""
    m = medians(rows)
    summary: Row = {"medians": m}
    sweep, streaming, overload = m.get("sweep", {}), m.get("streaming", {}), m.get("overload", {})

    # Concurrent streams one core could carry at the CPU each stream cost: the
    # measure that the load core (saturated first at 1,024 streams) cannot cap.
    for levels in streaming.values():
        for cell in levels.values():
            cpu = cell["cpu_us_per_request"] / 1e6
            cell["streams_per_core"] = stream_seconds / cpu if cpu > 0 else math.nan

    # Requests per second per core at each p99 budget: the best sweep level within it.
    budgets: Row = {}
    for arm, levels in sweep.items():
        for budget in BUDGETS_MS:
            inside = [c for c in levels.values() if c["ok"] > 0 and c["p99_ms"] <= budget]
            best = max(inside, key=lambda c: c["rps"], default=None)
            budgets.setdefault(arm, {})[f"{budget:g}ms"] = (
                {"rps": best["rps"], "rps_per_core": best["rps_per_core"]} if best else None
            )
    summary["budgets"] = budgets

    targets: list[Row] = []
    for arm in ("headway-bare", "headway-full"):
        if arm not in arms:
            continue
        one = sweep.get(arm, {}).get("1")
        nginx = sweep.get("nginx", {}).get("1")
        if one and nginx:
            over = one["added_p50_ms"] - nginx["added_p50_ms"]
            targets.append(_target(f"{arm}: added p50 at c=1 over nginx's", over, "ms", "<=", 0.5))
        per_core = _best_per_core(sweep.get(arm, {}))
        litellm = _best_per_core(sweep.get("litellm", {}))
        if litellm:
            targets.append(
                _target(
                    f"{arm}: req/s per core vs LiteLLM", _ratio(per_core, litellm), "x", ">=", 10
                )
            )
        streams = streaming.get(arm, {}).get("1024")
        if streams:
            targets.append(
                _target(f"{arm}: stalled streams at 1,024", streams["stalled_streams"], "", "<=", 0)
            )
        carried = [c["streams_per_core"] for c in streaming.get(arm, {}).values()]
        if carried:
            best = max(carried)
            targets.append(_target(f"{arm}: streams one core carries", best, "", ">=", 1000))
        memory = [
            c.get("peak_rss_mib", math.nan) for c in m.get("memory", {}).get(arm, {}).values()
        ]
        if memory:
            targets.append(_target(f"{arm}: peak RSS", max(memory), "MiB", "<=", 150))
    over = overload.get("headway-full", {})
    if {"unloaded", "priority", "fifo"} <= over.keys():
        rt = {k: over[k]["realtime_ttft_p99_ms"] for k in ("unloaded", "priority", "fifo")}
        targets.append(
            _target(
                "overload: real-time TTFT p99, priority / unloaded",
                _ratio(rt["priority"], rt["unloaded"]),
                "x",
                "<=",
                1.25,
            )
        )
        targets.append(
            _target(
                "overload: real-time TTFT p99, priority / FIFO",
                _ratio(rt["priority"], rt["fifo"]),
                "x",
                "<=",
                0.5,
            )
        )
    summary["targets"] = targets
    return summary


def _best_per_core(levels: dict[str, Row]) -> float:
    values = [c["rps_per_core"] for c in levels.values() if not math.isnan(c["rps_per_core"])]
    return max(values) if values else math.nan


def _target(name: str, value: float, unit: str, op: str, goal: float) -> Row:
    met = None if math.isnan(value) else (value <= goal if op == "<=" else value >= goal)
    return {"target": name, "value": value, "unit": unit, "goal": f"{op} {goal:g}", "met": met}


# -- files -----------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON without NaN (null instead), and floats rounded to what the clocks resolve."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write(out: Path, rows: list[Row], summary: Row, info: Row) -> None:
    out.mkdir(parents=True, exist_ok=True)
    by_scenario: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_scenario[row["scenario"]].append(row)
    for scenario, group in by_scenario.items():
        fields = list(dict.fromkeys(k for row in group for k in row))
        with (out / f"{scenario}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in group:
                writer.writerow({k: _fmt(row.get(k)) for k in fields})
    (out / "summary.json").write_text(
        json.dumps(_clean({"machine": info, **summary}), indent=1, sort_keys=True) + "\n"
    )


def read_rows(out: Path) -> list[Row]:
    """The rows of an earlier run back from its CSV files (to summarise again)."""
    rows: list[Row] = []
    for path in sorted(out.glob("*.csv")):
        with path.open(newline="") as f:
            for raw in csv.DictReader(f):
                row: Row = {}
                for key, text in raw.items():
                    if text == "" or text is None:
                        continue
                    try:
                        row[key] = float(text) if key not in ("round", "level") else text
                    except ValueError:
                        row[key] = text
                if "round" in row:
                    row["round"] = int(row["round"])
                if row.get("sent") and _number(row.get("proxy_cpu_s")):
                    row["cpu_us_per_request"] = row["proxy_cpu_s"] / row["sent"] * 1e6
                rows.append(row)
    return rows


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return value


# -- tables ----------------------------------------------------------------------------------


def _arms(cells: dict[str, Any]) -> list[str]:
    return [a for a in ORDER if a in cells]


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def tables(summary: Row, info: Row) -> str:
    m = summary["medians"]
    lines = [f"Machine: {info['nproc']} cores, {info['cpu']}; medians of rounds.", ""]
    sweep = m.get("sweep", {})
    if sweep:
        lines += [
            "| arm | p50 ms (c=1) | p99 ms (c=1) | added p50 ms | added p99 ms |"
            " CPU µs/req (c=1) |",
            "|---|---|---|---|---|---|",
        ]
        for arm in _arms(sweep):
            c = sweep[arm].get("1")
            if c:
                lines.append(
                    f"| {arm} | {_f(c['p50_ms'])} | {_f(c['p99_ms'])} | {_f(c.get('added_p50_ms'))}"
                    f" | {_f(c.get('added_p99_ms'))} | {_f(c['cpu_us_per_request'])} |"
                )
        lines += [
            "",
            "| arm | concurrency | req/s | p99 ms | proxy cores | req/s per core | CPU µs/req |"
            " Redis commands/req |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|")
        for arm in _arms(sweep):
            for level, c in sorted(sweep[arm].items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {arm} | {level} | {_f(c['rps'], 4)} | {_f(c['p99_ms'])} |"
                    f" {_f(c['proxy_cores'], 2)} | {_f(c['rps_per_core'], 4)} |"
                    f" {_f(c['cpu_us_per_request'])} | {_f(c.get('redis_commands_per_request'))} |"
                )
        lines += [
            "",
            "| arm | " + " | ".join(f"p99 ≤ {b:g} ms: req/s (per core)" for b in BUDGETS_MS) + " |",
        ]
        lines.append("|---|" + "---|" * len(BUDGETS_MS))
        for arm in _arms(summary["budgets"]):
            cells = []
            for b in BUDGETS_MS:
                best = summary["budgets"][arm].get(f"{b:g}ms")
                cells.append(
                    f"{_f(best['rps'], 4)} ({_f(best['rps_per_core'], 4)})" if best else "-"
                )
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    streaming = m.get("streaming", {})
    if streaming:
        lines += [
            "",
            "| arm | streams | TTFT p50 ms | TTFT p99 ms | added TTFT p99 ms | stalled streams |"
            " streams counted | longest gap ms | proxy cores | CPU µs/stream |"
            " streams per core | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in _arms(streaming):
            for level, c in sorted(streaming[arm].items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {arm} | {level} | {_f(c['ttft_p50_ms'])} | {_f(c['ttft_p99_ms'])} |"
                    f" {_f(c.get('added_ttft_p99_ms'))} | {_f(c['stalled_streams'])} |"
                    f" {_f(c['ok'])} | {_f(c['longest_gap_ms'])} | {_f(c['proxy_cores'], 2)} |"
                    f" {_f(c['cpu_us_per_request'])} | {_f(c['streams_per_core'], 4)} |"
                    f" {_f(c.get('peak_rss_mib'))} |"
                )
    overload = m.get("overload", {})
    if overload:
        lines += [
            "",
            "| arm | traffic | real-time TTFT p50 ms | real-time TTFT p99 ms | batch TTFT p99 ms |"
            " real-time failed | batch failed |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm in _arms(overload):
            for level, c in overload[arm].items():
                lines.append(
                    f"| {arm} | {level} | {_f(c['realtime_ttft_p50_ms'])} |"
                    f" {_f(c['realtime_ttft_p99_ms'])} | {_f(c.get('batch_ttft_p99_ms'))} |"
                    f" {_f(c['realtime_failed'])} | {_f(c.get('batch_failed'))} |"
                )
    limiter = m.get("limiter", {})
    if limiter:
        lines += [
            "",
            "| arm | store | reserve p50 µs | reserve p99 µs | settle p50 µs | settle p99 µs |",
            "|---|---|---|---|---|---|",
        ]
        for arm in _arms(limiter):
            c = limiter[arm].get("decision")
            if c:
                store = "redis" if arm == "headway-full" else "memory"
                lines.append(
                    f"| {arm} | {store} | {_f(c['reserve_p50_us'])} | {_f(c['reserve_p99_us'])} |"
                    f" {_f(c['settle_p50_us'])} | {_f(c['settle_p99_us'])} |"
                )
        trips = limiter.get("headway-full", {}).get("redis")
        if trips:
            lines += [
                "",
                f"Redis per request (MONITOR, {trips['requests']:.0f} requests):"
                f" {_f(trips['round_trips_per_request'])} round trips,"
                f" {_f(trips['script_commands_per_request'])} commands inside scripts.",
            ]
    memory = m.get("memory", {})
    if memory:
        lines += ["", "| arm | stage | RSS MiB after | peak RSS MiB |", "|---|---|---|---|"]
        for arm in _arms(memory):
            for level, c in memory[arm].items():
                lines.append(f"| {arm} | {level} | {_f(c['rss_mib'])} | {_f(c['peak_rss_mib'])} |")
    if summary["targets"]:
        lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
        for t in summary["targets"]:
            met = {True: "yes", False: "no", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {_f(t['value'])} {t['unit']} | {t['goal']} | {met} |")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------


def plot(summary: Row, folder: Path) -> list[Path]:
    """Small PNGs for docs/benchmarks.md; matplotlib comes with the dev extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    m = summary["medians"]
    written: list[Path] = []

    sweep = m.get("sweep", {})
    if sweep:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
        for arm in _arms(sweep):
            levels = [(int(k), c) for k, c in sweep[arm].items() if c["ok"] > 0]
            levels.sort(key=lambda kv: kv[0])
            x = [k for k, _ in levels]
            axes[0].plot(
                x,
                [c["rps"] for _, c in levels],
                marker="o",
                label=arm,
                color=f"C{ORDER.index(arm)}",
            )
            axes[1].plot(
                x,
                [c["p99_ms"] for _, c in levels],
                marker="o",
                label=arm,
                color=f"C{ORDER.index(arm)}",
            )
        _per_arm_bars(axes[2], sweep, "cpu_us_per_request", "CPU µs per request (median of levels)")
        for ax, title in ((axes[0], "requests/s"), (axes[1], "p99 latency, ms")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrency")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, folder / "bench-sweep.png"))

    streaming = m.get("streaming", {})
    if streaming:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
        for arm in _arms(streaming):
            levels = sorted(streaming[arm].items(), key=lambda kv: int(kv[0]))
            x = [int(k) for k, _ in levels]
            axes[0].plot(
                x,
                [c["ttft_p99_ms"] for _, c in levels],
                marker="o",
                label=arm,
                color=f"C{ORDER.index(arm)}",
            )
            axes[1].plot(
                x,
                [100 * c["stalled_share"] for _, c in levels],
                marker="o",
                label=arm,
                color=f"C{ORDER.index(arm)}",
            )
        _per_arm_bars(axes[2], streaming, "cpu_us_per_request", "CPU µs per stream (64 tokens)")
        axes[0].set_title("TTFT p99, ms (simulator: 200 ms)")
        axes[0].set_yscale("log")
        axes[1].set_title("stalled streams, % (gap > 5 x TPOT)")
        for ax in axes[:2]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streams")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, folder / "bench-streaming.png"))

    overload = m.get("overload", {})
    if overload:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
        labels, values = [], []
        for arm in _arms(overload):
            for level, c in overload[arm].items():
                labels.append(level if arm == "direct" else f"headway: {level}")
                values.append(c["realtime_ttft_p99_ms"] / 1e3)
        ax.barh(labels, values, color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel("real-time TTFT p99, s (log)")
        ax.set_title("1.5x overload, 20% real-time")
        ax.grid(alpha=0.3, axis="x")
        written.append(_save(fig, folder / "bench-overload.png"))
    return written


def _per_arm_bars(ax: Any, cells: dict[str, Any], key: str, title: str) -> None:
    """One bar per arm: the median over load levels of ``key`` (log scale)."""
    names = _arms(cells)
    values = [_median([float(c[key]) for c in cells[a].values()]) for a in names]
    ax.bar(names, values, color=[f"C{ORDER.index(a)}" for a in names])
    ax.set_yscale("log")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.grid(alpha=0.3, axis="y")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
