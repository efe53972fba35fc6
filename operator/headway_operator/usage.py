"""TokenQuota ``status.usage``, read from the keys the sidecars' shared limiter keeps in Redis.

The key layout is documented in docs/limits.md ("To read a tenant's usage"),
so the operator reads it without importing the sidecar. One pipeline of four
commands per quota, at most every ``interval`` seconds per namespace: cheap
enough for thousands of quotas. Without Redis there is nothing shared to read
and the usage is left out.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from headway_contract import RedisSettings
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

TICKS_PER_TOKEN = 60_000  # a bucket level is kept in ticks: tokens x 60000
NANO = Decimal(10) ** 9  # the month's cost is kept in billionths


class Reader:
    """One connection pool to the limiter's Redis; ``read`` never raises."""

    def __init__(self, settings: RedisSettings, timeout: float = 1.0) -> None:
        password = None
        if settings.password_file:
            password = Path(settings.password_file).read_text(encoding="utf-8").strip()
        self._client = aioredis.from_url(
            settings.url,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

    async def read(self, quota_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``status.usage`` by quota id ("namespace/name"); {} when Redis cannot be read."""
        if not quota_ids:
            return {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.time()
                for quota_id in quota_ids:
                    for window in ("minute", "day", "month"):
                        pipe.hgetall(f"headway:{{{quota_id}}}:{window}")
                replies = await pipe.execute()
        except (RedisError, OSError) as e:
            logger.warning("cannot read quota usage from Redis: %s", e)
            return {}
        seconds, micros = replies[0]
        now = datetime.datetime.fromtimestamp(int(seconds) + int(micros) / 1e6, datetime.UTC)
        found = {}
        for index, quota_id in enumerate(quota_ids):
            minute, day, month = replies[1 + 3 * index : 4 + 3 * index]
            found[quota_id] = usage(now, minute, day, month)
        return found

    async def close(self) -> None:
        await self._client.aclose()


def usage(
    now: datetime.datetime,
    minute: Mapping[str, str],
    day: Mapping[str, str],
    month: Mapping[str, str],
) -> dict[str, Any]:
    """The four counters from one quota's three hashes, at Redis's own clock ``now``."""
    now_ms = now.timestamp() * 1000
    level = 0.0
    if minute.get("tu"):
        used, at, rate = (float(minute.get(k) or 0) for k in ("tu", "ta", "tr"))
        level = max(0.0, used - (now_ms - at) * rate)
    today = day.get("id") == now.strftime("%Y%m%d")
    this_month = month.get("id") == now.strftime("%Y%m")
    cost = Decimal(month.get("cost") or 0) / NANO if this_month else Decimal(0)
    return {
        "tokensThisMinute": math.ceil(level / TICKS_PER_TOKEN),
        "tokensToday": int(day.get("tokens") or 0) if today else 0,
        "requestsToday": int(day.get("requests") or 0) if today else 0,
        "costThisMonth": f"{cost.quantize(Decimal('0.000001')).normalize():f}",
    }
