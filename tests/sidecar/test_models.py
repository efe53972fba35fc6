"""GET /v1/models lists exactly the routes the caller's quotas let it call."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable

import aiohttp
from headway_sidecar import serving

from tests.sidecar.conftest import document, tenant

Start = Callable[..., Awaitable[serving.Running]]


async def test_models_lists_only_the_routes_a_tenant_may_call(start_sidecar: Start) -> None:
    data = document(8000)
    other = copy.deepcopy(data["routes"][0])
    other["model"] = "chat-large"
    data["routes"].append(other)
    data["tenants"].append(tenant("team-b", "sk-team-b", routes=["chat-large"]))
    running = await start_sidecar(data)

    async def listed(api_key: str) -> list[str]:
        headers = {"authorization": f"Bearer {api_key}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{running.url}/v1/models", headers=headers) as r,
        ):
            assert r.status == 200
            return [m["id"] for m in (await r.json())["data"]]

    assert await listed("sk-team-a") == ["chat", "chat-large"]
    assert await listed("sk-team-b") == ["chat-large"]
