"""Metrics, access log and credentials, seen from outside a real ``headway sidecar`` process.

A scripted upstream records every header it receives, so the test can check
that no credential is forwarded; the process's stderr is its whole log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from headway_sidecar.metrics import OUTCOMES
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.sample import key_hash
from tests.sidecar.conftest import (
    Handler,
    Process,
    Scripted,
    document,
    read_events,
    scrape,
    spawn_sidecar,
    until,
    write_json,
)
from tests.sidecar.test_admin import METRIC_NAMES

KEYS = {
    "team-a": "sk-live-team-a-0123456789abcdef",
    "team-b": "sk-live-team-b-fedcba9876543210",
}
WRONG_KEY = "sk-live-wrong-5555555555555555"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "a b c"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
        )
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk({"role": "assistant", "content": ""}))
    for word in ("a", " b", " c"):
        await response.write(_chunk({"content": word}))
    await response.write(_chunk({}, "stop"))
    usage = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
    await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


def _document(upstream: Scripted) -> dict[str, Any]:
    data = document(upstream.port)
    data["tenants"] = [
        {
            "name": name,
            "keyHashes": [key_hash(key)],
            "quotas": [{"id": f"default/{name}", "limits": {"tokensPerMinute": 100000}}],
        }
        for name, key in KEYS.items()
    ]
    return data


async def test_metrics_access_log_and_no_credentials_anywhere(
    processes: list[Process],
    tmp_path: Path,
    start_upstream: Callable[[Handler], Awaitable[Scripted]],
) -> None:
    upstream = await start_upstream(_answer)
    config = write_json(tmp_path / "config.json", _document(upstream))
    sidecar = await spawn_sidecar(processes, config)
    base, admin = sidecar.urls
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}]}

    async with aiohttp.ClientSession() as http:
        requests: list[tuple[str, dict[str, Any] | bytes, dict[str, str], int]] = [
            ("/v1/chat/completions", {**chat, "stream": True}, _bearer("team-a"), 200),
            ("/v1/chat/completions", chat, {"api-key": KEYS["team-b"]}, 200),
            ("/v1/chat/completions", chat, {"x-api-key": KEYS["team-a"]}, 200),
            ("/v1/chat/completions", chat, {"authorization": f"Bearer {WRONG_KEY}"}, 401),
            ("/v1/chat/completions", {**chat, "model": "bogus-1"}, _bearer("team-a"), 404),
            ("/v1/chat/completions", b'{"model": "chat",}', _bearer("team-a"), 400),
            (f"/x/{WRONG_KEY}.php", chat, _bearer("team-b"), 404),
        ]
        for path, body, headers, status in requests:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {**headers, "content-type": "application/json"}
            async with http.post(f"{base}{path}", data=data, headers=headers) as r:
                assert r.status == status, (path, await r.text())
                if r.status == 200 and r.content_type == "text/event-stream":
                    events = await read_events(r)
                    assert events[-1] == "[DONE]"
                else:
                    answer = await r.json()
                    if status != 200:
                        assert set(answer["error"]) >= {"message", "type", "code"}
        text = await scrape(http, admin)

        async def every_line_logged() -> bool:
            return len(_access_lines(sidecar)) >= len(requests)

        await until(every_line_logged)

    # No credential went upstream, whatever header it came in.
    assert len(upstream.headers) == 3
    for received in upstream.headers:
        names = {name.lower() for name in received}
        assert not names & {"authorization", "api-key", "x-api-key", "cookie"}
        _assert_no_secret(json.dumps(received))

    # Every series of the design, with label values from the configuration only.
    declared = {family.name for family in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in declared, name
    _assert_no_secret(text)
    allowed = {
        "route": {"chat", "unmatched"},
        "tenant": {"team-a", "team-b", "unknown"},
        "priority": {"realtime", "batch"},
        "outcome": set(OUTCOMES),
        "type": {"input", "output"},
    }
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            for label, values in allowed.items():
                if label in found.labels:
                    assert found.labels[label] in values, (found.name, found.labels)

    # One JSON line per request, with the fields an operator needs.
    lines = _access_lines(sidecar)
    assert len(lines) == len(requests)
    for line, (_, _, _, status) in zip(lines, requests, strict=True):
        assert line["status"] == status
        for field in ("route", "tenant", "class", "outcome", "input_tokens", "output_tokens"):
            assert field in line
        assert "queue_ms" in line and "ttft_ms" in line
    streamed = lines[0]
    assert streamed["route"] == "chat" and streamed["tenant"] == "team-a"
    assert streamed["class"] == "realtime" and streamed["outcome"] == "ok"
    assert (streamed["input_tokens"], streamed["output_tokens"]) == (7, 3)
    assert streamed["ttft_ms"] is not None and streamed["queue_ms"] is not None
    assert lines[1]["tenant"] == "team-b" and lines[1]["ttft_ms"] is None
    assert lines[3]["outcome"] == "unauthenticated" and lines[3]["tenant"] == "unknown"
    assert lines[4]["route"] == "unmatched"
    assert lines[5]["outcome"] == "invalid_request"
    assert lines[6]["path"] == "unmatched"
    _assert_no_secret("".join(sidecar.log))


def _bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def _assert_no_secret(text: str) -> None:
    for secret in (*KEYS.values(), WRONG_KEY, "hmac-sha256:"):
        assert secret not in text
    # Nor a recognisable part of one.
    assert not re.search(r"0123456789ab|fedcba9876|5555555555", text)


def _access_lines(process: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log if line.startswith("{")]
