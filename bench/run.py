"""``python -m bench.run``: start the arms, drive every scenario round by round, record medians.

Stages share a simulator setting: ``fast`` (no TTFT/TPOT, 16 tokens) for
added latency, the concurrency sweep, CPU per request and Redis round trips;
``stream`` (TTFT 200 ms, TPOT 20 ms, 64 tokens) for streams and memory;
``overload`` (the same timing, 32 slots) for priority against FIFO. Within a
stage every arm runs once per round per load level, in an order rotated each
round, so drift on this shared machine falls on every arm alike. Results go
to ``--out`` as CSV (every run) and summary.json (medians of rounds, ratios),
plots to ``--plots``, and tables to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import arms, deps, load, procs, report

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("latency", "sweep", "limiter", "streaming", "overload")
Row = dict[str, Any]

FAST = arms.Upstream(ttft=0.0, tpot=0.0, output_tokens=16, max_concurrency=8192)
STREAM = arms.Upstream(ttft=0.2, tpot=0.02, output_tokens=64, max_concurrency=8192)
OVERLOAD = arms.Upstream(ttft=0.2, tpot=0.02, output_tokens=64, max_concurrency=32)
ROOMY = arms.Capacity(max_concurrency=8192)


@dataclass(frozen=True)
class Plan:
    arms: tuple[str, ...]
    scenarios: tuple[str, ...]
    rounds: int
    quick: bool
    loadgen: str
    latency_seconds: float
    sweep: tuple[int, ...]
    sweep_seconds: float
    streams: tuple[int, ...]
    stream_seconds: float
    overload_seconds: float
    batch_share: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            arms=tuple(args.arms),
            scenarios=tuple(args.scenarios),
            rounds=args.rounds or (1 if quick else 3),
            quick=quick,
            loadgen=args.loadgen,
            latency_seconds=2 if quick else 5,
            sweep=(4, 32) if quick else (4, 16, 64, 256),
            sweep_seconds=2 if quick else 4,
            streams=tuple(args.streams) or ((16, 64) if quick else (64, 256, 1024)),
            stream_seconds=4 if quick else 10,
            overload_seconds=8 if quick else 30,
            batch_share=args.batch_share,
        )


def rotated(items: Sequence[str], by: int) -> list[str]:
    """The arms in round ``by``'s order: each round starts with the next arm."""
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


# -- stages ----------------------------------------------------------------------------------


@contextlib.contextmanager
def stage(
    ctx: arms.Context, names: Sequence[str], upstream: arms.Upstream, capacity: arms.Capacity
) -> Iterator[tuple[arms.Simulator, dict[str, arms.Endpoint]]]:
    """One simulator and every arm in front of it, stopped on the way out."""
    simulator = arms.start_simulator(ctx, upstream)
    endpoints: dict[str, arms.Endpoint] = {}
    try:
        for name in names:
            endpoints[name] = arms.start(name, ctx, simulator, capacity)
            log.info("started %s at %s", name, endpoints[name].url)
        yield simulator, endpoints
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
        simulator.stop()


def measure(
    endpoint: arms.Endpoint, ctx: arms.Context, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run one load and charge the arm's process tree (and Redis) for it.

    A run that fails (the client gave up, the arm died) is recorded as an error
    and the round goes on, so one arm's collapse does not lose the others' numbers.
    """
    try:
        return _measure(endpoint, ctx, run)
    except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, StopIteration) as e:
        stderr = getattr(e, "stderr", "") or ""
        log.error("%s failed: %s %s", endpoint.arm, e, stderr[-500:])
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _measure(
    endpoint: arms.Endpoint, ctx: arms.Context, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    endpoint.process.check()
    redis = ctx.redis_url if _uses_redis(endpoint, ctx) else None
    redis_before = arms.redis_commands(redis) if redis else None
    cpu_before, wall_before = procs.cpu_seconds(endpoint.process.pid), time.perf_counter()
    result = run()
    cpu = procs.cpu_seconds(endpoint.process.pid) - cpu_before
    wall = time.perf_counter() - wall_before
    # Requests the arm handled: wrk's answered ones, or every stream the client sent.
    served = result.get("sent") or result.get("ok") or 0
    result["proxy_cpu_s"] = cpu
    result["proxy_cores"] = cpu / wall
    result["cpu_us_per_request"] = cpu / served * 1e6 if served else math.nan
    result["rss_mib"] = procs.rss_mib(endpoint.process.pid)
    if redis_before is not None and redis:
        after = arms.redis_commands(redis)
        calls = sum(after.values()) - sum(redis_before.values()) - 1  # the INFO call itself
        result["redis_commands_per_request"] = calls / served if served else math.nan
        result["redis_commands"] = json.dumps(
            {k: v - redis_before.get(k, 0) for k, v in after.items() if v != redis_before.get(k, 0)}
        )
    endpoint.process.check()
    return result


def _uses_redis(endpoint: arms.Endpoint, ctx: arms.Context) -> bool:
    return endpoint.arm == "headway-full" and ctx.redis_url is not None


def requests_run(plan: Plan, endpoint: arms.Endpoint, concurrency: int, seconds: float) -> Row:
    if plan.loadgen == "wrk":
        return load.run_wrk(
            endpoint.url,
            key=endpoint.key,
            model=arms.MODEL,
            concurrency=concurrency,
            duration=seconds,
            max_tokens=FAST.output_tokens,
            core=procs.LOAD_CORE,
        )
    return client(
        "requests",
        endpoint,
        f"--concurrency={concurrency}",
        f"--duration={seconds}",
        f"--max-tokens={FAST.output_tokens}",
    )


def client(mode: str, endpoint: arms.Endpoint, *flags: str) -> Row:
    """``python -m bench.load`` pinned beside the simulator; its JSON summary."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            procs.LOAD_CORE,
            sys.executable,
            "-m",
            "bench.load",
            mode,
            "--url",
            endpoint.url,
            "--key",
            endpoint.key,
            "--model",
            arms.MODEL,
            *flags,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    result: Row = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def warm(plan: Plan, endpoints: dict[str, arms.Endpoint]) -> None:
    """A short load through each arm first: imports, pools and caches before timing."""
    for endpoint in endpoints.values():
        requests_run(plan, endpoint, 4, 1)


def run_fast(ctx: arms.Context, plan: Plan) -> list[Row]:
    """Added latency at concurrency 1, then the sweep, CPU per request and Redis calls."""
    rows: list[Row] = []
    levels = ([1] if "latency" in plan.scenarios else []) + (
        list(plan.sweep) if "sweep" in plan.scenarios else []
    )
    with stage(ctx, plan.arms, FAST, ROOMY) as (_, endpoints):
        warm(plan, endpoints)
        if "limiter" in plan.scenarios:
            rows.extend(run_limiter(ctx, plan, endpoints))
        for r in range(plan.rounds):
            for level in levels:
                seconds = plan.latency_seconds if level == 1 else plan.sweep_seconds
                batch: dict[str, Row] = {}
                for name in rotated(plan.arms, r):
                    endpoint = endpoints[name]
                    result = measure(
                        endpoint,
                        ctx,
                        functools.partial(requests_run, plan, endpoint, level, seconds),
                    )
                    if "error" not in result:
                        result["rps"] = result["ok"] / result["duration_s"]
                        result["rps_per_core"] = (
                            result["rps"] / result["proxy_cores"]
                            if result["proxy_cores"]
                            else math.nan
                        )
                    batch[name] = {"scenario": "sweep", "round": r, "arm": name, "level": level}
                    batch[name].update(result)
                    log.info("round %d c=%d %s: %s", r, level, name, _brief(result))
                _add_over_direct(batch, ("p50_ms", "p99_ms"))
                rows.extend(batch.values())
        rows.extend(memory_rows(endpoints, "fast"))
    return rows


def run_limiter(ctx: arms.Context, plan: Plan, endpoints: dict[str, arms.Endpoint]) -> list[Row]:
    """Decision latency in process (Redis and memory) and Redis round trips per request."""
    rows: list[Row] = []
    count = 300 if plan.quick else 3000
    for name in ("headway-bare", "headway-full"):
        endpoint = endpoints.get(name)
        if endpoint is None or endpoint.config is None:
            continue
        for r in range(plan.rounds):
            out = subprocess.run(
                [
                    "taskset",
                    "-c",
                    procs.PROXY_CORE,
                    sys.executable,
                    "-m",
                    "bench.limiter",
                    "--config",
                    str(endpoint.config),
                    f"--count={count}",
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"scenario": "limiter", "round": r, "arm": name, "level": "decision"})
            rows[-1].update(result)
            log.info("round %d limiter %s: %s", r, name, result)
        if name == "headway-full" and ctx.redis_url:
            trips = redis_round_trips(ctx.redis_url, endpoint, 50 if plan.quick else 200)
            rows.append({"scenario": "limiter", "round": 0, "arm": name, "level": "redis", **trips})
            log.info("redis round trips %s: %s", name, trips)
    return rows


def redis_round_trips(redis_url: str, endpoint: arms.Endpoint, count: int) -> Row:
    """Commands per request as Redis sees them (MONITOR), split into what a client sent
    (round trips) and what a server-side script ran."""
    with tempfile.NamedTemporaryFile("w+", suffix=".monitor") as seen:
        monitor = subprocess.Popen(
            ["taskset", "-c", procs.LOAD_CORE, "redis-cli", "-u", redis_url, "monitor"],
            stdout=seen,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            body = json.dumps(load.chat_body(arms.MODEL, stream=False, max_tokens=16)).encode()
            headers = {
                "authorization": f"Bearer {endpoint.key}",
                "content-type": "application/json",
            }
            for _ in range(count):
                request = urllib.request.Request(
                    endpoint.url + "/v1/chat/completions", data=body, headers=headers
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            time.sleep(0.5)
        finally:
            monitor.terminate()
            monitor.wait(10)
        seen.seek(0)
        lines = [x for x in seen.read().splitlines() if x[:1].isdigit()]
    scripted = [x for x in lines if "[0 lua]" in x]
    sent = [x for x in lines if "[0 lua]" not in x]
    names: dict[str, int] = {}
    for line in sent:
        name = line.split('"', 2)[1].lower()
        names[name] = names.get(name, 0) + 1
    return {
        "requests": count,
        "round_trips_per_request": len(sent) / count,
        "script_commands_per_request": len(scripted) / count,
        "sent": json.dumps(names, sort_keys=True),
    }


def run_streams(ctx: arms.Context, plan: Plan) -> list[Row]:
    """Many concurrent streams: added TTFT p99, stalled streams, memory under load."""
    rows: list[Row] = []
    stall = 5 * STREAM.tpot
    with stage(ctx, plan.arms, STREAM, ROOMY) as (_, endpoints):
        warm(plan, endpoints)
        for r in range(plan.rounds):
            for level in plan.streams:
                batch: dict[str, Row] = {}
                for name in rotated(plan.arms, r):
                    endpoint = endpoints[name]
                    flags = (
                        f"--streams={level}",
                        f"--duration={plan.stream_seconds}",
                        f"--warmup={min(2.0, plan.stream_seconds / 3)}",
                        f"--ramp={1.0}",
                        f"--stall-gap={stall}",
                        f"--max-tokens={STREAM.output_tokens}",
                    )
                    result = measure(
                        endpoint, ctx, functools.partial(client, "streams", endpoint, *flags)
                    )
                    with contextlib.suppress(OSError):
                        result["peak_rss_mib"] = procs.peak_rss_mib(endpoint.process.pid)
                    batch[name] = {"scenario": "streaming", "round": r, "arm": name}
                    batch[name].update({"level": level, **result})
                    log.info("round %d streams=%d %s: %s", r, level, name, _brief(result))
                _add_over_direct(batch, ("ttft_p50_ms", "ttft_p99_ms"))
                rows.extend(batch.values())
        rows.extend(memory_rows(endpoints, "stream"))
    return rows


def run_overload(ctx: arms.Context, plan: Plan) -> list[Row]:
    """1.5x the simulator's capacity, 20% real-time: Headway's priority against FIFO.

    Capacity is slots / (TTFT + (tokens - 1) x TPOT) requests per second. The
    unloaded reference sends the same real-time arrivals without the batch ones.
    """
    rows: list[Row] = []
    service = OVERLOAD.ttft + (OVERLOAD.output_tokens - 1) * OVERLOAD.tpot
    rate = 1.5 * OVERLOAD.max_concurrency / service
    names = [a for a in ("direct", "headway-full") if a in plan.arms]
    variants: list[tuple[str, str, tuple[str, ...]]] = []
    if "headway-full" in names:
        variants += [
            ("unloaded", "headway-full", (f"--rate={rate * 0.2}", "--realtime-share=1")),
            ("priority", "headway-full", (f"--rate={rate}",)),
            ("fifo", "headway-full", (f"--rate={rate}", "--fifo")),
        ]
    if "direct" in names:
        variants += [
            ("direct-unloaded", "direct", (f"--rate={rate * 0.2}", "--realtime-share=1")),
            ("direct-fifo", "direct", (f"--rate={rate}", "--no-class")),
        ]
    slots = arms.Capacity(OVERLOAD.max_concurrency, batch_max_share=plan.batch_share)
    with stage(ctx, names, OVERLOAD, slots) as (_, endpoints):
        for r in range(plan.rounds):
            for variant, name, extra in rotated_variants(variants, r):
                endpoint = endpoints[name]
                flags = (
                    *extra,
                    f"--duration={plan.overload_seconds}",
                    f"--warmup={plan.overload_seconds / 8}",
                    f"--max-tokens={OVERLOAD.output_tokens}",
                    f"--seed={r}",
                )
                result = measure(endpoint, ctx, functools.partial(client, "open", endpoint, *flags))
                row = {"scenario": "overload", "round": r, "arm": name, "level": variant}
                row.update({"rate": rate, "batch_share": plan.batch_share, **result})
                rows.append(row)
                log.info("round %d overload %s: %s", r, variant, _brief(result))
    return rows


def rotated_variants(
    variants: list[tuple[str, str, tuple[str, ...]]], by: int
) -> list[tuple[str, str, tuple[str, ...]]]:
    k = by % len(variants) if variants else 0
    return [*variants[k:], *variants[:k]]


def memory_rows(endpoints: dict[str, arms.Endpoint], stage_name: str) -> list[Row]:
    return [
        {
            "scenario": "memory",
            "arm": name,
            "level": stage_name,
            "round": 0,
            "rss_mib": procs.rss_mib(e.process.pid),
            "peak_rss_mib": procs.peak_rss_mib(e.process.pid),
        }
        for name, e in endpoints.items()
    ]


def _add_over_direct(batch: dict[str, Row], keys: Sequence[str]) -> None:
    """Paired differences against the direct arm of the same round and load level."""
    direct = batch.get("direct")
    if direct is None:
        return
    for row in batch.values():
        for key in keys:
            if key in row and key in direct:
                row["added_" + key] = row[key] - direct[key]


def _brief(result: Row) -> str:
    keep = (
        "rps",
        "p50_ms",
        "p99_ms",
        "ttft_p99_ms",
        "stalled_streams",
        "realtime_ttft_p99_ms",
        "batch_ttft_p99_ms",
        "cpu_us_per_request",
        "redis_commands_per_request",
        "failed",
        "realtime_failed",
    )
    return " ".join(f"{k}={result[k]:.4g}" for k in keep if isinstance(result.get(k), float | int))


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name, command in {
        "nginx": [deps.nginx_binary(), "-v"],
        "wrk": ["wrk", "-v"],
        "redis": ["redis-server", "--version"],
    }.items():
        with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "litellm": deps.LITELLM,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **versions,
    }


def start_redis(ctx: arms.Context) -> procs.Process:
    port = procs.free_port()
    process = procs.start(
        "redis-server",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
        core=procs.LOAD_CORE,
        log_dir=ctx.logs,
    )
    ctx.redis_url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        process.check()
        try:
            arms.redis_commands(ctx.redis_url)
            return process
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, one round")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (3; quick 1)")
    parser.add_argument(
        "--scenarios", type=_csv(SCENARIOS), default=list(SCENARIOS), help=",".join(SCENARIOS)
    )
    parser.add_argument(
        "--arms", type=_csv(arms.ARMS), default=list(arms.ARMS), help=",".join(arms.ARMS)
    )
    parser.add_argument(
        "--batch-share", type=float, default=0.75, help="overload: batchMaxShare (0.75)"
    )
    parser.add_argument("--streams", type=_ints, default=[], help="stream counts (64,256,1024)")
    parser.add_argument(
        "--loadgen", choices=("wrk", "aiohttp"), default="wrk", help="non-streaming client (wrk)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--plots", type=Path, default=REPO / "docs", help="where PNGs go")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--setup-only", action="store_true", help="install what the arms need")
    parser.add_argument("--keep", type=Path, help="keep configs and logs in this folder")
    parser.add_argument(
        "--summarise-only", action="store_true", help="rebuild summary, plots, tables from --out"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="with --summarise-only: add the rounds of another run's results folder",
    )
    return parser


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        picked = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in picked if x not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(choices)}")
        return picked

    return parse


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    plan = Plan.from_args(args)
    if "direct" not in plan.arms:
        plan = Plan(**{**plan.__dict__, "arms": ("direct", *plan.arms)})
    if args.summarise_only:
        info = json.loads((args.out / "summary.json").read_text())["machine"]
        rows: list[Row] = report.read_rows(args.out)
        for folder in args.merge:
            # Later runs' rounds follow the earlier ones', so medians span all of them.
            offset = 1 + max((int(r["round"]) for r in rows), default=-1)
            rows += [{**r, "round": int(r["round"]) + offset} for r in report.read_rows(folder)]
        return _publish(args, rows, plan, info)
    everything = args.setup_only
    needed = {
        "nginx": everything or "nginx" in plan.arms,
        "wrk": everything or plan.loadgen == "wrk",
        "redis-server": everything or "headway-full" in plan.arms,
    }
    deps.ensure(
        tuple(k for k, v in needed.items() if v),
        litellm=everything or "litellm" in plan.arms,
        profilers=everything,
    )
    if args.setup_only:
        return 0
    # Every stream holds a socket in the client, the proxy and the simulator.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    os.sched_setaffinity(0, {int(procs.LOAD_CORE)})

    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hwb-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = arms.Context(work)
        if "headway-full" in plan.arms:
            stack.callback(start_redis(ctx).stop)
        rows = []
        if {"latency", "sweep"} & set(plan.scenarios):
            rows += run_fast(ctx, plan)
        if "streaming" in plan.scenarios:
            rows += run_streams(ctx, plan)
        if "overload" in plan.scenarios:
            rows += run_overload(ctx, plan)

    return _publish(args, rows, plan, {**machine(), "plan": {**plan.__dict__}})


def _publish(args: argparse.Namespace, rows: list[Row], plan: Plan, info: Row) -> int:
    one_stream = STREAM.ttft + (STREAM.output_tokens - 1) * STREAM.tpot
    arms_seen = tuple(dict.fromkeys(str(r["arm"]) for r in rows))
    summary = report.summarise(rows, arms_seen, one_stream)
    report.write(args.out, rows, summary, info)
    if not args.no_plots:
        report.plot(summary, args.plots)
    print(report.tables(summary, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
