"""Load generators: wrk for plain requests, an aiohttp client for streams and overload.

wrk (Debian's, C, one thread) drives the non-streaming scenarios so the
client costs little next to the proxies; ``python -m bench.load`` runs the
streaming and overload clients in their own process, pinned beside the
simulator, and prints one JSON summary. The aiohttp ``requests`` mode stands
in for wrk where it is missing (``--loadgen aiohttp``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

PROMPT = "Write two sentences about a quick brown fox and a lazy dog."
# A non-empty content delta: the role-only first chunk ("content":"") is not a token.
_TOKEN = re.compile(rb'"content":\s*"(?!")')
_WRK_MARK = "BENCH-JSON "
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_s":%%.6f,"errors":%%d,"non2xx":%%d,'
    .. '"p50_ms":%%.3f,"p90_ms":%%.3f,"p99_ms":%%.3f,"mean_ms":%%.3f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3))
end
"""


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def chat_body(model: str, *, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


# -- wrk -------------------------------------------------------------------------------------


def run_wrk(
    url: str, *, key: str, model: str, concurrency: int, duration: float, max_tokens: int, core: str
) -> dict[str, Any]:
    """One closed-loop wrk run (one thread, ``concurrency`` keep-alive connections)."""
    body = json.dumps(chat_body(model, stream=False, max_tokens=max_tokens))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"body": body, "key": key, "mark": _WRK_MARK})
    try:
        out = subprocess.run(
            [
                "taskset",
                "-c",
                core,
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{duration:.0f}s",
                "--timeout",
                "30s",
                "-s",
                script.name,
                url + "/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        ).stdout
    finally:
        Path(script.name).unlink()
    line = next(x for x in out.splitlines() if x.startswith(_WRK_MARK))
    result: dict[str, Any] = json.loads(line[len(_WRK_MARK) :])
    result["ok"] = result["requests"] - result["non2xx"] - result["errors"]
    return result


# -- the aiohttp client ----------------------------------------------------------------------


@dataclass
class Stream:
    """What one streamed request saw, in seconds from its start."""

    started: float
    status: int = 0
    ttft: float | None = None
    tokens: int = 0
    longest_gap: float = 0.0
    gaps_over: int = 0
    cls: str = "realtime"


@dataclass
class Client:
    url: str
    key: str
    model: str
    max_tokens: int
    stall_gap: float
    session: aiohttp.ClientSession
    streams: list[Stream] = field(default_factory=list)

    async def stream(self, priority: str | None = None, cls: str = "realtime") -> Stream:
        """Send one streaming chat request and time its tokens as they arrive."""
        body = json.dumps(chat_body(self.model, stream=True, max_tokens=self.max_tokens))
        headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        if priority:
            headers["x-headway-priority"] = priority
        started = time.perf_counter()
        record = Stream(started=started, cls=cls)
        self.streams.append(record)
        try:
            async with self.session.post(
                self.url + "/v1/chat/completions", data=body, headers=headers
            ) as response:
                record.status = response.status
                if response.status != 200:
                    await response.read()
                    return record
                last = 0.0
                async for chunk in response.content.iter_any():
                    tokens = len(_TOKEN.findall(chunk))
                    if not tokens:
                        continue
                    now = time.perf_counter() - started
                    if record.ttft is None:
                        record.ttft = now
                    else:
                        gap = now - last
                        record.longest_gap = max(record.longest_gap, gap)
                        record.gaps_over += gap > self.stall_gap
                    last = now
                    record.tokens += tokens
        except (TimeoutError, aiohttp.ClientError):
            record.status = record.status or -1
        return record


def _session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


def _summarise_streams(streams: Sequence[Stream], elapsed: float) -> dict[str, Any]:
    ok = [s for s in streams if s.status == 200 and s.ttft is not None]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    return {
        "streams": len(streams),
        "ok": len(ok),
        "failed": len(streams) - len(ok),
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "stalled_streams": sum(1 for s in ok if s.gaps_over),
        "stalled_share": sum(1 for s in ok if s.gaps_over) / len(ok) if ok else math.nan,
        "longest_gap_ms": max((s.longest_gap for s in ok), default=math.nan) * 1e3,
        "tokens": sum(s.tokens for s in ok),
        "elapsed_s": elapsed,
    }


async def closed_streams(args: argparse.Namespace) -> dict[str, Any]:
    """``streams`` workers, each streaming one request after another until the deadline.

    Workers start spread over ``ramp`` seconds, and only streams begun after the
    warm-up count, so connection set-up is not charged to the proxies.
    """
    async with _session(args.streams, args.timeout) as session:
        client = Client(args.url, args.key, args.model, args.max_tokens, args.stall_gap, session)
        begin = time.perf_counter()
        deadline = begin + args.duration

        async def worker(i: int) -> None:
            await asyncio.sleep(args.ramp * i / args.streams)
            while time.perf_counter() < deadline:
                await client.stream()

        await asyncio.gather(*(worker(i) for i in range(args.streams)))
        elapsed = time.perf_counter() - begin
    counted = [s for s in client.streams if s.started >= begin + args.warmup]
    # Every stream sent, warm-up included: what the proxy's CPU time is divided by.
    return {**_summarise_streams(counted, elapsed), "sent": len(client.streams)}


async def open_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s, a ``realtime_share`` of them real-time, the rest batch.

    With ``--fifo`` every request asks for the same class, so the sidecar keeps one
    queue in arrival order. Arrivals stop at the deadline; requests already sent
    run to the end, so the slowest (latest in a FIFO backlog) are counted too.
    """
    rng = random.Random(args.seed)
    async with _session(0, args.timeout) as session:
        client = Client(args.url, args.key, args.model, args.max_tokens, args.stall_gap, session)
        begin = time.perf_counter()
        tasks: list[asyncio.Task[Stream]] = []
        due = begin
        while True:
            due += rng.expovariate(args.rate)
            if due - begin > args.duration:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            cls = "realtime" if rng.random() < args.realtime_share else "batch"
            priority = "realtime" if args.fifo else cls
            tasks.append(
                asyncio.create_task(client.stream(priority if args.send_class else None, cls))
            )
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    counted = [s for s in client.streams if s.started >= begin + args.warmup]
    result = {"arrivals": len(client.streams), "sent": len(client.streams), "elapsed_s": elapsed}
    for cls in ("realtime", "batch"):
        summary = _summarise_streams([s for s in counted if s.cls == cls], elapsed)
        result.update({f"{cls}_{k}": v for k, v in summary.items()})
    return result


async def closed_requests(args: argparse.Namespace) -> dict[str, Any]:
    """The wrk stand-in: ``concurrency`` workers sending non-streaming requests back to back."""
    body = json.dumps(chat_body(args.model, stream=False, max_tokens=args.max_tokens))
    headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
    latencies: list[float] = []
    failed = 0
    async with _session(args.concurrency, args.timeout) as session:
        begin = time.perf_counter()
        deadline = begin + args.duration

        async def worker() -> None:
            nonlocal failed
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(
                    args.url + "/v1/chat/completions", data=body, headers=headers
                ) as response:
                    await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - begin
    return {
        "requests": len(latencies) + failed,
        "ok": len(latencies),
        "non2xx": failed,
        "errors": 0,
        "duration_s": elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_ms": sum(latencies) / len(latencies) * 1e3 if latencies else math.nan,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("mode", choices=("streams", "open", "requests"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="none")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds not counted")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--stall-gap", type=float, default=0.1, help="a longer gap is a stall")
    parser.add_argument("--streams", type=int, default=64, help="streams mode: concurrency")
    parser.add_argument("--ramp", type=float, default=1.0, help="streams mode: start spread")
    parser.add_argument("--concurrency", type=int, default=1, help="requests mode")
    parser.add_argument("--rate", type=float, default=10.0, help="open mode: arrivals/s")
    parser.add_argument("--realtime-share", type=float, default=0.2)
    parser.add_argument("--fifo", action="store_true", help="open mode: one class for all")
    parser.add_argument(
        "--no-class", dest="send_class", action="store_false", help="send no priority header"
    )
    parser.add_argument("--seed", type=int, default=8)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runner = {"streams": closed_streams, "open": open_loop, "requests": closed_requests}
    print(json.dumps(asyncio.run(runner[args.mode](args))), flush=True)


if __name__ == "__main__":
    main()
