"""A client that closes its connection as soon as it reads ``data: [DONE]`` (as
``curl -N`` can) got the whole answer: the request is recorded as served, not
cancelled, and its tokens are settled."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.sidecar.conftest import Process, sample_value, scrape, start_stack, until

LABELS = {"route": "chat", "tenant": "team-a", "priority": "realtime"}


async def _read_until_done_then_close(url: str, body: dict[str, object]) -> bytes:
    """POST ``body``, read up to ``data: [DONE]`` and close the socket at once."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + f"host: {parts.netloc}\r\n".encode()
        + b"authorization: Bearer sk-team-a\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    try:
        async with asyncio.timeout(30):
            while b"data: [DONE]" not in received:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        writer.transport.abort()  # no goodbye: the socket just goes
    return received


@pytest.mark.parametrize("usage", [False, True], ids=["no-stream-options", "include-usage"])
async def test_close_right_after_done_is_not_a_cancel(
    processes: list[Process], tmp_path: Path, usage: bool
) -> None:
    stack = await start_stack(processes, tmp_path, "--ttft", "10ms", "--tpot", "2ms")
    body: dict[str, object] = {
        "model": "chat",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    rounds = 5  # the close races the sidecar's last writes; a few rounds lose it reliably
    for _ in range(rounds):
        received = await _read_until_done_then_close(stack.url, body)
        assert received.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" in received

    async with aiohttp.ClientSession() as http:

        async def all_recorded() -> bool:
            text = await scrape(http, stack.admin_url)
            done = sum(
                sample_value(text, "headway_requests_total", outcome=o, **LABELS)
                for o in ("ok", "truncated", "client_cancelled")
            )
            return done == rounds

        await until(all_recorded)
        text = await scrape(http, stack.admin_url)
    assert sample_value(text, "headway_requests_total", outcome="client_cancelled", **LABELS) == 0
    tokens = {"route": "chat", "tenant": "team-a", "type": "output"}
    assert sample_value(text, "headway_tokens_total", **tokens) > 0
