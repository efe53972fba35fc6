"""Config delivery to one sidecar's admin port: compare its version, push when it differs.

The ConfigMap mount is the slow path every sidecar polls; this is the fast one
(design section 4). A pod counts as synced only when it reports the desired
version. Network failures are results, not exceptions: the next periodic check
retries, and a sidecar that runs a higher generation than ours (say, after the
ConfigMap was recreated) tells us so, and the operator renders above it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class Outcome:
    synced: bool
    pushed: bool = False  # a PUT was needed
    running_generation: int | None = None  # what the sidecar reported, when it did
    error: str = ""  # why it is not synced, for the ConfigSynced message


async def sync(
    session: aiohttp.ClientSession,
    address: str,
    *,
    token: str,
    text: str,
    version: str,
    seconds: float,
) -> Outcome:
    """Bring the sidecar at ``address`` (host:port of its admin port) to ``version``."""
    limit = aiohttp.ClientTimeout(total=seconds)
    base = f"http://{address}/config"
    try:
        async with session.get(base, timeout=limit) as response:
            running = await _json(response)
        if response.status == 200 and running.get("version") == version:
            return Outcome(synced=True, running_generation=_generation(running))

        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with session.put(base, data=text, headers=headers, timeout=limit) as response:
            answer = await _json(response)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return Outcome(synced=False, error=f"{address}: {type(e).__name__}: {e}".rstrip(": "))
    if response.status == 200 and answer.get("version") == version:
        return Outcome(synced=True, pushed=True, running_generation=_generation(answer))
    error = answer.get("error")
    message = error.get("message") if isinstance(error, dict) else ""
    return Outcome(
        synced=False,
        pushed=True,
        running_generation=_generation(answer),
        error=f"{address}: push refused with {response.status}: {message or 'no reason given'}",
    )


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = json.loads(await response.read())
    except (ValueError, asyncio.IncompleteReadError):
        return {}
    return data if isinstance(data, dict) else {}


def _generation(data: dict[str, Any]) -> int | None:
    value = data.get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
