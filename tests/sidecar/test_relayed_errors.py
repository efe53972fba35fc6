"""An upstream's error answer reaches the client OpenAI-shaped, never as the model
server's own text (which may be a traceback), with its status unchanged."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from headway_sidecar import serving

from tests.sidecar.conftest import Handler, Scripted, document

Start = Callable[..., Awaitable[serving.Running]]
StartUpstream = Callable[[Handler], Awaitable[Scripted]]
AUTH = {"authorization": "Bearer sk-team-a"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
TRACEBACK = 'Traceback (most recent call last):\n  File "/srv/vllm/api.py", line 9\nKeyError'


def _answer(status: int, body: str, content_type: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type=content_type)

    return handle


@pytest.mark.parametrize(
    ("status", "body", "content_type", "kind", "message"),
    [
        (500, TRACEBACK, "text/plain", "server_error", "(500)"),
        (400, "<html><body>Bad Request</body></html>", "text/html", "invalid_request_error", ""),
        (
            400,
            json.dumps({"object": "error", "message": "max_tokens is too large", "code": 400}),
            "application/json",
            "invalid_request_error",
            "max_tokens is too large",
        ),
        (422, json.dumps({"error": "bad field"}), "application/json", "invalid_request_error", ""),
    ],
    ids=["traceback-500", "html-400", "flat-vllm-400", "error-string-422"],
)
async def test_upstream_error_that_is_not_openai_shaped_is_wrapped(
    start_upstream: StartUpstream,
    start_sidecar: Start,
    status: int,
    body: str,
    content_type: str,
    kind: str,
    message: str,
) -> None:
    upstream = await start_upstream(_answer(status, body, content_type))
    running = await start_sidecar(document(upstream.port))

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{running.url}/v1/chat/completions", json=CHAT, headers=AUTH) as r,
    ):
        text = await r.text()
        assert r.status == status
        assert r.content_type == "application/json"

    error = json.loads(text)["error"]
    assert error["type"] == kind
    assert message in error["message"]
    assert "Traceback" not in text and ".py" not in text and "<html>" not in text


async def test_openai_shaped_upstream_error_is_relayed_as_it_is(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    body = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    upstream = await start_upstream(_answer(400, json.dumps(body), "application/json"))
    running = await start_sidecar(document(upstream.port))

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{running.url}/v1/chat/completions", json=CHAT, headers=AUTH) as r,
    ):
        assert r.status == 400
        assert await r.json() == body
