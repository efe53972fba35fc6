"""Limiter decisions alone: reserve then settle, in process, against the same redis-server.

``python -m bench.limiter --config DOC`` times the sidecar's own
``limiting.Limiter`` for the first tenant's quotas of a rendered document (Redis
when the document names it, memory otherwise) and prints one JSON line. Run
pinned to the proxy's core, so it is timed the way the sidecar runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from headway_sidecar import configuring, limiting

from bench.load import percentile


async def decisions(config: str, count: int) -> dict[str, Any]:
    document = configuring.read_document(config)
    limiter = limiting.Limiter(document.limiter, document.replicas)
    quotas = document.tenants[0].quotas
    reserve: list[float] = []
    settle: list[float] = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            admission = await limiter.reserve(
                quotas, tokens=80, cost=Decimal("0.00004"), priority="realtime"
            )
            t1 = time.perf_counter()
            await limiter.settle(admission, tokens=30, cost=Decimal("0.00001"))
            t2 = time.perf_counter()
            reserve.append(t1 - t0)
            settle.append(t2 - t1)
    finally:
        await limiter.aclose()
    return {
        "store": "redis" if document.limiter.redis else "memory",
        "degraded": limiter.degraded,
        "decisions": count,
        "reserve_p50_us": percentile(reserve, 50) * 1e6,
        "reserve_p99_us": percentile(reserve, 99) * 1e6,
        "settle_p50_us": percentile(settle, 50) * 1e6,
        "settle_p99_us": percentile(settle, 99) * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    parser.add_argument("--config", required=True, help="a rendered contract document")
    parser.add_argument("--count", type=int, default=2000, help="reserve+settle pairs")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(decisions(args.config, args.count))), flush=True)


if __name__ == "__main__":
    main()
