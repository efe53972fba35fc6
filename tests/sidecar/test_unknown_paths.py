"""Requests outside the API get OpenAI-shaped errors naming what was wrong, and every
request is metered on bounded labels (GET /v1/models names no model: route "")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from headway_sidecar import serving

from tests.sidecar.conftest import document, metric

Start = Callable[..., Awaitable[serving.Running]]
AUTH = {"authorization": "Bearer sk-team-a"}


async def test_unknown_path_and_wrong_method_read_like_openai(start_sidecar: Start) -> None:
    running = await start_sidecar(document(8000))
    long_path = "/v1/" + "x" * 500
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{running.url}/v1/nope", headers=AUTH) as r:
            assert r.status == 404
            error = (await r.json())["error"]
        assert error["message"] == "Invalid URL (GET /v1/nope)"
        assert error["type"] == "invalid_request_error"

        async with http.get(f"{running.url}/v1/chat/completions", headers=AUTH) as r:
            assert r.status == 405
            error = (await r.json())["error"]
        assert error["message"] == "POST is required on /v1/chat/completions"
        assert error["type"] == "invalid_request_error"

        async with http.get(f"{running.url}{long_path}", headers=AUTH) as r:
            message = (await r.json())["error"]["message"]
        assert message == f"Invalid URL (GET {long_path[:200]})"
    unmatched = {"route": "unmatched", "tenant": "unknown", "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="invalid_request", **unmatched) == 3


async def test_models_listing_is_metered_without_a_route(start_sidecar: Start) -> None:
    running = await start_sidecar(document(8000))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{running.url}/v1/models", headers=AUTH) as r,
    ):
        assert r.status == 200
    labels = {"route": "", "tenant": "team-a", "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="ok", **labels) == 1
    unmatched = {**labels, "route": "unmatched"}
    assert metric(running, "headway_requests_total", outcome="ok", **unmatched) == 0
