"""``headway demo``: the whole data plane on this machine, a minute of traffic, and a report.

:func:`run` is the orchestrator: render ``examples/`` for loopback, start a
simulator and a sidecar per pool (demo_stack), drive the example tenants'
traffic with the OpenAI SDK (demo_traffic) while sampling the sidecars' ``/load``
and printing progress, then write the report and chart (demo_report). Whatever
ends it (the end, Ctrl-C, SIGTERM, a child that died), every process it started
is stopped by PID, and it says where the logs are.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
from headway_contract import CLASSES

from headway_cli import demo_report, demo_stack, demo_traffic
from headway_cli.demo_report import LoadSample, Sample
from headway_cli.demo_stack import DemoError, Processes, Stack
from headway_cli.demo_traffic import Traffic

OUTPUT_ENV = "HEADWAY_DEMO_OUTPUT"
SAMPLE_EVERY = 1.0  # seconds between /load samples (the chart's resolution)
PROGRESS_EVERY = 5.0  # seconds between progress lines
SETTLE_TIMEOUT = 10.0  # seconds for the sidecars' counters to stop moving after the traffic
EXTRAS = ("openai", "matplotlib")


def run(duration: float) -> int:
    """0 after a full run, 1 on a failure, 2 without the demo extras, 130/143 when stopped."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"headway demo needs {' and '.join(missing)}: pip install -e '.[demo]' "
            "(make venv installs them)",
            file=sys.stderr,
        )
        return 2
    if duration <= 0:
        print("headway demo: --duration must be positive", file=sys.stderr)
        return 2

    # The SDK logs every request at INFO, which would bury the progress lines.
    for name in ("httpx", "httpx2", "openai", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(os.environ.get(OUTPUT_ENV) or "demo-output")
    processes = Processes(out / "logs")
    try:
        asyncio.run(_main(duration, out, processes))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated: stopping every process the demo started", file=sys.stderr)
        return 143
    except DemoError as e:
        print(f"headway demo: {e}", file=sys.stderr)
        return 1
    finally:
        # NB: a second Ctrl-C must not cut the stopping short and leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        processes.stop_all()
        if processes.children:
            print(f"logs: {processes.log_dir}/", file=sys.stderr)


async def _main(duration: float, out: Path, processes: Processes) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    # An interrupted run writes no report: an older one must not pass for its own.
    for name in ("report.txt", "report.json", "ttft.png"):
        (out / name).unlink(missing_ok=True)
    stack = demo_stack.render(demo_stack.examples_dir(), out)
    if stack.redis_url:
        demo_stack.check_redis(stack.redis_url)
    _print_plan(stack, duration)
    started = time.monotonic()
    demo_stack.start_all(stack, processes)
    clients = demo_traffic.Clients(stack)  # imports the SDK while the children start
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await demo_stack.wait_ready(stack, processes, session)
            print(f"ready in {time.monotonic() - started:.1f} s; sending traffic", flush=True)
            traffic, loads, metrics = await _run(stack, processes, clients, session, duration)
    finally:
        await clients.aclose()
    usage = {"demo (clients)": demo_stack.own_usage(), **processes.usage()}

    report = demo_report.build(
        stack, traffic.records, metrics, loads, duration=duration, processes=usage
    )
    text = demo_report.render_text(report, out)
    demo_report.write(report, text, out)
    classes = {name: tenant.default_class for name, tenant in stack.tenants.items()}
    demo_report.chart(traffic.records, loads, classes, out / "ttft.png")
    print("\n" + text, end="", flush=True)


async def _run(
    stack: Stack,
    processes: Processes,
    clients: demo_traffic.Clients,
    session: aiohttp.ClientSession,
    duration: float,
) -> tuple[Traffic, list[LoadSample], list[Sample]]:
    """The traffic, watched; then the sidecars' settled metrics and a last /load sample."""
    traffic = Traffic()
    loads: list[LoadSample] = []
    driving = asyncio.create_task(demo_traffic.drive(stack, clients, traffic, duration))
    try:
        await _watch(stack, processes, session, traffic, loads, driving)
    finally:
        if not driving.done():
            driving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driving
    driving.result()
    metrics = await _settled_metrics(stack, session)
    loads += await _sample(stack, session, traffic.now())
    return traffic, loads, metrics


def _print_plan(stack: Stack, duration: float) -> None:
    print(f"Headway demo: {duration:g} s of traffic against the example resources", flush=True)
    for pool in stack.pools.values():
        gpu = pool.gpu
        print(
            f"  {pool.name}: simulator {pool.simulator_url} ({gpu.max_concurrency} slots, "
            f"TTFT {gpu.ttft * 1000:g} ms, TPOT {gpu.tpot * 1000:g} ms), "
            f"sidecar {pool.url}, admin {pool.admin_url}",
            flush=True,
        )
    limiter = f"Redis at {stack.redis_url}" if stack.redis_url else "in memory"
    print(f"  limits: {limiter}", flush=True)


async def _watch(
    stack: Stack,
    processes: Processes,
    session: aiohttp.ClientSession,
    traffic: Traffic,
    loads: list[LoadSample],
    driving: asyncio.Task[None],
) -> None:
    """Sample /load and print progress until the traffic ends; raise if a child died."""
    next_progress = PROGRESS_EVERY
    while not driving.done():
        processes.check()
        loads += await _sample(stack, session, traffic.now())
        if traffic.now() >= next_progress:
            next_progress += PROGRESS_EVERY
            print(_progress(traffic, loads), flush=True)
        await asyncio.wait({driving}, timeout=SAMPLE_EVERY)


async def _sample(stack: Stack, session: aiohttp.ClientSession, at: float) -> list[LoadSample]:
    samples = []
    for pool in stack.pools.values():
        try:
            async with session.get(f"{pool.admin_url}/load") as response:
                if response.status == 200:
                    samples.append(LoadSample.parse(at, pool.name, await response.json()))
        except (aiohttp.ClientError, TimeoutError):
            continue  # a missed sample is a gap in the chart, not a failure
    return samples


def _progress(traffic: Traffic, loads: list[LoadSample]) -> str:
    records = traffic.records
    done = sum(1 for r in records if r.outcome != "pending")
    limited = sum(1 for r in records if r.outcome == "rate_limited")
    failed = sum(1 for r in records if r.outcome == "error")
    latest = max((s.at for s in loads), default=None)
    p95 = {}
    for c in CLASSES:
        merged = demo_report.merged(s.ttft[c] for s in loads if s.at == latest)
        p95[c] = demo_report.bucket_quantile(merged, 0.95)
    waiting = {c: sum(s.depth.get(c, 0) for s in loads if s.at == latest) for c in CLASSES}
    errors = f", {failed} errors" if failed else ""
    return (
        f"[{traffic.now():5.1f} s] {done} done, {traffic.in_flight} in flight, "
        f"{limited} got 429{errors}; waiting realtime {waiting['realtime']}, "
        f"batch {waiting['batch']}; TTFT p95 realtime {_seconds(p95['realtime'])}, "
        f"batch {_seconds(p95['batch'])}"
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


async def _settled_metrics(stack: Stack, session: aiohttp.ClientSession) -> list[Sample]:
    """The sidecars' /metrics once their request counters stop moving.

    A sidecar records a request when its handler ends, a moment after the
    client saw the last byte.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous: float | None = None
    while True:
        texts = []
        for pool in stack.pools.values():
            url = f"{pool.admin_url}/metrics"
            try:
                async with session.get(url) as response:
                    if response.status != 200:
                        raise DemoError(f"{url} answered {response.status}")
                    texts.append(await response.text())
            except (aiohttp.ClientError, TimeoutError) as e:
                raise DemoError(f"{url}: {e!r}") from None
        samples = demo_report.parse_metrics(texts)
        total = sum(s.value for s in samples if s.name == "headway_requests_total")
        if total == previous or time.monotonic() > deadline:
            return samples
        previous = total
        await asyncio.sleep(0.5)
