"""The sidecar cases of shared/cases/gateway-failures.md, each through the public port.

Every test runs a real in-process sidecar in front of the simulator or of a
scripted upstream that writes exact bytes, flushed and paused between writes
so that the sidecar reads them separately, and asserts the case's expected
values on what the client got, what the upstream got, the limiter's counters
and the metrics. Test names carry the case number (``test_case_<n>_...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import re
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from headway_sidecar import limiting, serving
from multidict import CIMultiDictProxy

from tests.fixtures.redis import RedisServer
from tests.sidecar.conftest import (
    Handler,
    Scripted,
    Sim,
    document,
    eventually,
    metric,
    tenant,
)

Start = Callable[..., Awaitable[serving.Running]]
StartUpstream = Callable[[Handler], Awaitable[Scripted]]

KEY = "sk-team-a"
TENANT = "team-a"
QUOTA = "default/team-a"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# -- the client side -------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def data(self) -> list[str]:
        return sse_data(self.body)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON events of an SSE body, ``[DONE]`` left out."""
        return [json.loads(d) for d in self.data if d != "[DONE]"]


def sse_data(raw: bytes) -> list[str]:
    """The data of each event of an SSE body.

    Parsed here with nothing from headway_sidecar, and decoded strictly, so a
    UTF-8 character the sidecar cut in two fails the test.
    """
    events = []
    for block in re.split(r"\r\n\r\n|\n\n|\r\r", raw.decode("utf-8")):
        lines = [line for line in re.split(r"\r\n|\n|\r", block) if line.startswith("data:")]
        if lines:
            events.append("\n".join(line[5:].removeprefix(" ") for line in lines))
    return events


async def call(
    url: str,
    body: dict[str, Any] | bytes | AsyncIterator[bytes],
    *,
    path: str = CHAT,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = dict(headers or {})
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    data: bytes | io.BytesIO | AsyncIterator[bytes]
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        sent.setdefault("content-type", "application/json")
    elif isinstance(body, bytes) and len(body) > 1024 * 1024:
        data = io.BytesIO(body)  # aiohttp warns that big bytes would block the loop
    else:
        data = body
    async with aiohttp.ClientSession() as http, http.post(url + path, data=data, headers=sent) as r:
        return Answer(r.status, r.headers, await r.read())


def chat(content: str = "hi", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return {**body, **extra}


def completion(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "prompt": prompt, **extra}


WITH_USAGE = {"stream_options": {"include_usage": True}}


# -- the upstream side -----------------------------------------------------------------------


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def delta(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    part = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": part, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}


def usage_only(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": usage(prompt, completion),
    }


def whole_answer(prompt: int, completion: int, *, text: str = "ok") -> dict[str, Any]:
    """A non-streaming answer that suits both chat and completions clients."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "text": text,
        "finish_reason": "stop",
    }
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [choice],
        "usage": usage(prompt, completion),
    }


def sse_writes(*writes: bytes, pause: float = 0.05) -> Handler:
    """An upstream answering 200 with exactly these writes, flushed and paused between."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i, piece in enumerate(writes):
            if i:
                await asyncio.sleep(pause)
            await response.write(piece)
        await response.write_eof()
        return response

    return answer


def json_answer(
    payload: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status, headers=headers)

    return answer


class Gate:
    """Holds upstream answers until the test opens it; counts who is waiting."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0
        self.aborted = 0  # answers the sidecar gave up on (connection closed)

    async def hold(self) -> None:
        self.waiting += 1
        try:
            await self.opened.wait()
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.waiting -= 1


# -- the sidecar -----------------------------------------------------------------------------


def config(
    port: int,
    *tenants: dict[str, Any],
    max_concurrency: int | None = None,
    queue_timeouts: tuple[float, float] | None = None,
    timeouts: dict[str, float] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The sample document at an upstream port, with these tenants and changes."""
    data = document(port, **top)
    if tenants:
        data["tenants"] = list(tenants)
    if max_concurrency is not None:
        data["capacity"]["maxConcurrency"] = max_concurrency
    if queue_timeouts is not None:
        for priority, timeout in zip(("realtime", "batch"), queue_timeouts, strict=True):
            data["capacity"]["queues"][priority]["timeout"] = timeout
    if timeouts is not None:
        data["routes"][0]["timeouts"] = timeouts
    return data


def with_redis(data: dict[str, Any], server: RedisServer) -> dict[str, Any]:
    """Limits shared through a real redis-server, failing closed so no local fallback hides it.

    The generous timeout keeps a busy test machine from tripping the breaker.
    """
    data["limiter"] = {"redis": {"url": server.url}, "failMode": "closed", "redisTimeout": 2.0}
    return data


def limited(name: str, key: str, **limits: int) -> dict[str, Any]:
    """A tenant with exactly these limits (camelCase names, as in the contract)."""
    return tenant(name, key, limits=limits)


async def counters(running: serving.Running, quota_id: str = QUOTA) -> limiting.Usage:
    """One quota's counters, read through the limiter the sidecar decides with.

    ``tokens_today`` and ``requests_today`` are fixed windows, exact; the
    per-minute levels drain at limit/60 a second.
    """
    return await running.gateway.limiter.usage(quota_id)


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an async condition with a generous deadline; no timing asserted."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached within the deadline"
        await asyncio.sleep(0.02)


def tokens_metric(running: serving.Running, kind: str, tenant_name: str = TENANT) -> float:
    return metric(running, "headway_tokens_total", route="chat", tenant=tenant_name, type=kind)


def stream_errors(running: serving.Running) -> float:
    """headway_stream_errors_total summed over every kind."""
    total = 0.0
    for family in running.gateway.metrics.registry.collect():
        if family.name == "headway_stream_errors":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    # The access logger passes its fields as ``extra``, so they sit in __dict__.
    return [r.__dict__["access"] for r in caplog.records if r.name == "headway.access"]


def relay_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "headway_sidecar.streaming" and r.levelno >= logging.WARNING
    ]


# -- case 1: SSE events split across reads ---------------------------------------------------

CASE_1_WRITES = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"H\xc3',
    b'\xa9llo"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n',
    b"\ndata: [DONE]\n\n",
)


def _content(chunks: Sequence[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


async def test_case_1_event_split_across_reads_and_inside_a_utf8_character(
    start_upstream: StartUpstream, start_sidecar: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Case 1: an SSE event split across reads, and inside "é", arrives whole and intact."""
    caplog.set_level(logging.INFO)
    upstream = await start_upstream(sse_writes(*CASE_1_WRITES))
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=True, **WITH_USAGE))

    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.data[-1] == "[DONE]"
    assert len(answer.data) == 4  # three JSON events, then [DONE]
    chunks = answer.chunks
    assert _content(chunks) == "Héllo"
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"] == usage(5, 2)
    assert tokens_metric(running, "input") == 5
    assert tokens_metric(running, "output") == 2
    assert (await counters(running)).tokens_today == 7
    assert stream_errors(running) == 0
    assert relay_warnings(caplog) == []


async def test_case_1_every_byte_in_its_own_read(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 1: one byte per upstream write, CRLF line ends and 4-byte emoji, still intact."""
    text = ["Ça ", "va 🙂", " très ", "bien 🚀"]
    stream = b"".join(event(delta(t)) for t in text) + event(delta(finish="stop"))
    stream += event(usage_only(11, 4)) + b"data: [DONE]\n\n"
    stream = stream.replace(b"\n", b"\r\n")
    upstream = await start_upstream(
        sse_writes(*(stream[i : i + 1] for i in range(len(stream))), pause=0.001)
    )
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=True, **WITH_USAGE))

    assert answer.status == 200
    assert _content(answer.chunks) == "".join(text)
    assert answer.data.count("[DONE]") == 1
    assert answer.chunks[-1]["usage"] == usage(11, 4)
    assert stream_errors(running) == 0


async def test_case_1_one_event_larger_than_a_mib(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 1: one 3 MiB event (past aiohttp's 128 KiB line limit) in 64 KiB reads, intact."""
    text = "é" * (3 * 1024 * 1024 // 2)
    stream = event(delta(text)) + event(delta(finish="stop")) + event(usage_only(5, 1))
    stream += b"data: [DONE]\n\n"
    pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    upstream = await start_upstream(sse_writes(*pieces, pause=0.001))
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=True))

    assert answer.status == 200
    assert _content(answer.chunks) == text
    assert answer.data[-1] == "[DONE]"
    assert stream_errors(running) == 0


async def test_case_1_through_the_openai_sdk(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 1: the official SDK reads "Héllo" and the usage from the split stream."""
    upstream = await start_upstream(sse_writes(*CASE_1_WRITES))
    running = await start_sidecar(config(upstream.port))

    async with openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key=KEY) as client:
        stream = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usages = [], []
        async for chunk in stream:
            pieces += [c.delta.content or "" for c in chunk.choices]
            if chunk.usage is not None:
                usages.append(chunk.usage.total_tokens)

    assert "".join(pieces) == "Héllo"
    assert usages == [7]


# -- case 3: the usage chunk has choices: [] -------------------------------------------------

CASE_3_SHAPES = {
    # OpenAI-compatible servers that put usage on the finish chunk.
    "usage-on-finish": (
        event(delta("Hello")),
        event({**delta(finish="stop"), "usage": usage(13, 20)}),
        b"data: [DONE]\n\n",
    ),
    # vLLM: a trailing usage-only chunk.
    "trailing-usage-chunk": (
        event(delta("Hello")),
        event(delta(finish="stop")),
        event(usage_only(13, 20)),
        b"data: [DONE]\n\n",
    ),
    # Continuous usage statistics: running usage on every chunk, the last one final.
    "usage-on-every-chunk": (
        event({**delta("Hello"), "usage": usage(13, 1)}),
        event({**delta(finish="stop"), "usage": usage(13, 20)}),
        b"data: [DONE]\n\n",
    ),
    # The same usage twice, on the finish chunk and after it: charged once.
    "usage-twice": (
        event(delta("Hello")),
        event({**delta(finish="stop"), "usage": usage(13, 20)}),
        event(usage_only(13, 20)),
        b"data: [DONE]\n\n",
    ),
    # Usage in the second-to-last chunk (Grok), a null usage on the last.
    "usage-before-the-last-chunk": (
        event(delta("Hello")),
        event({**delta(), "usage": usage(13, 20)}),
        event({**delta(finish="stop"), "usage": None}),
        b"data: [DONE]\n\n",
    ),
}


@pytest.mark.parametrize("shape", CASE_3_SHAPES)
async def test_case_3_usage_chunk_has_empty_choices(
    start_upstream: StartUpstream, start_sidecar: Start, shape: str
) -> None:
    """Case 3: exactly one usage chunk, the last before [DONE], with choices == []."""
    upstream = await start_upstream(sse_writes(*CASE_3_SHAPES[shape]))
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=True, **WITH_USAGE))

    assert answer.status == 200
    chunks = answer.chunks
    with_usage = [c for c in chunks if c.get("usage") is not None]
    assert len(with_usage) == 1
    assert with_usage[0] is chunks[-1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage(13, 20)
    finishing = [c for c in chunks if any(ch.get("finish_reason") for ch in c["choices"])]
    assert len(finishing) == 1
    assert finishing[0].get("usage") is None
    assert _content(chunks) == "Hello"
    assert answer.data[-1] == "[DONE]"
    assert tokens_metric(running, "input") == 13
    assert tokens_metric(running, "output") == 20


# -- case 4: the trailing usage-only chunk ---------------------------------------------------

CASE_4_WRITES = (
    b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":1,'
    b'"total_tokens":27}}\n\n',
    b"data: [DONE]\n\n",
)


@pytest.mark.parametrize(
    "options",
    [None, {}, {"include_usage": False}],
    ids=["no-stream-options", "empty-stream-options", "include-usage-false"],
)
async def test_case_4_usage_requested_upstream_and_hidden_from_the_client(
    start_upstream: StartUpstream, start_sidecar: Start, options: dict[str, Any] | None
) -> None:
    """Case 4: usage asked for upstream, charged, and not shown to a client that did not ask."""
    upstream = await start_upstream(sse_writes(*CASE_4_WRITES))
    running = await start_sidecar(config(upstream.port))
    body = chat(stream=True)
    if options is not None:
        body["stream_options"] = options

    answer = await call(running.url, body)

    # (a) the body sent upstream asks for usage
    assert upstream.bodies[0]["stream_options"] == {"include_usage": True}
    # (b) content chunk, finish chunk, [DONE]: the usage-only chunk is not forwarded
    assert answer.status == 200
    assert len(answer.data) == 3
    content, finish = answer.chunks
    assert content["choices"][0]["delta"] == {"content": "ok"}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert all(c.get("usage") is None for c in answer.chunks)
    assert answer.data[2] == "[DONE]"
    # (c) the counters and metrics of the key grow by 26 prompt and 1 completion tokens
    assert tokens_metric(running, "input") == 26
    assert tokens_metric(running, "output") == 1
    assert (await counters(running)).tokens_today == 27


# -- case 5: [DONE] is never JSON ------------------------------------------------------------

CASE_5_ENDINGS = {
    "space": b"data: [DONE]\n\n",
    "no-space": b"data:[DONE]\n\n",
    "crlf": b"data: [DONE]\r\n\r\n",
    "closed-without-done": b"",
}


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage-asked", "usage-not-asked"])
@pytest.mark.parametrize("ending", CASE_5_ENDINGS)
async def test_case_5_done_sentinel_never_parsed_and_usage_charged_once(
    start_upstream: StartUpstream,
    start_sidecar: Start,
    caplog: pytest.LogCaptureFixture,
    ending: str,
    include_usage: bool,
) -> None:
    """Case 5: every [DONE] spelling, or none: charged exactly 46, one [DONE] to the client."""
    caplog.set_level(logging.INFO)
    writes = [event(delta("Hi")), event(usage_only(13, 33))]
    if CASE_5_ENDINGS[ending]:
        writes.append(CASE_5_ENDINGS[ending])
    upstream = await start_upstream(sse_writes(*writes))
    running = await start_sidecar(config(upstream.port))
    body = chat(stream=True, **(WITH_USAGE if include_usage else {}))

    answer = await call(running.url, body)

    assert answer.status == 200
    # Documented policy: a stream that ends cleanly after usage gets [DONE] appended.
    assert answer.data.count("[DONE]") == 1
    assert answer.data[-1] == "[DONE]"
    assert answer.body.count(b"[DONE]") == 1
    assert [c.get("usage") for c in answer.chunks if c.get("usage")] == (
        [usage(13, 33)] if include_usage else []
    )
    assert tokens_metric(running, "input") + tokens_metric(running, "output") == 46
    assert (await counters(running)).tokens_today == 46
    assert relay_warnings(caplog) == []
    assert stream_errors(running) == 0


@dataclass
class RawUpstream:
    """A plain TCP server speaking just enough HTTP/1.1 to answer with exact bytes."""

    port: int
    requests: list[bytes]


@pytest.fixture
async def start_raw_upstream() -> AsyncIterator[Callable[[bytes], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> RawUpstream:
        requests: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            requests.append(head + await reader.readexactly(int(length[1]) if length else 0))
            writer.write(answer)
            await writer.drain()
            writer.close()  # the close is what ends the body

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return RawUpstream(server.sockets[0].getsockname()[1], requests)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_case_5_done_missing_and_the_body_ended_by_closing_the_connection(
    start_raw_upstream: Callable[[bytes], Awaitable[RawUpstream]], start_sidecar: Start
) -> None:
    """Case 5: no [DONE], the connection closed right after usage: one [DONE], 46 charged."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    upstream = await start_raw_upstream(head + event(delta("Hi")) + event(usage_only(13, 33)))
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=True))

    assert answer.status == 200
    assert answer.data.count("[DONE]") == 1
    assert answer.data[-1] == "[DONE]"
    assert not any("error" in c for c in answer.chunks)
    assert (await counters(running)).tokens_today == 46
    assert stream_errors(running) == 0


# -- case 7: an error as the first event of a 200 --------------------------------------------

CASE_7_ERROR = {
    "error": {"message": "invalid request", "type": "invalid_request_error", "code": 400}
}
ROLE_ONLY = {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
ERROR_DATA = json.dumps(CASE_7_ERROR).encode()
CASE_7_BODIES = {
    "event-error": b": keepalive\n\nevent: error\ndata: " + ERROR_DATA,
    "data-error": b": keepalive\n\ndata: " + ERROR_DATA,
    # A role-only chunk carries no token, so the error still comes before any content.
    "after-role-chunk": event(ROLE_ONLY) + b"event: error\ndata: " + ERROR_DATA,
}


def _with_spare(data: dict[str, Any], spare: Scripted) -> dict[str, Any]:
    """A second pool, ``spare``, as the route's fallback (reached like another pool's sidecar)."""
    data["pools"].append({"name": "spare", "address": spare.url})
    data["routes"][0]["fallback"] = [{"pool": "spare", "weight": 1}]
    return data


@pytest.mark.parametrize("shape", CASE_7_BODIES)
async def test_case_7_error_event_first_in_a_200_becomes_a_400(
    start_upstream: StartUpstream,
    start_sidecar: Start,
    caplog: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    """Case 7: an error event before any content is answered as HTTP 400 JSON, no failover."""
    caplog.set_level(logging.INFO)
    upstream = await start_upstream(sse_writes(CASE_7_BODIES[shape] + b"\n\n"))
    spare = await start_upstream(sse_writes(event(delta("from spare", finish="stop"))))
    running = await start_sidecar(_with_spare(config(upstream.port), spare))

    answer = await call(running.url, chat(stream=True))

    assert answer.status == 400
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["message"] == "invalid request"
    assert error["type"] == "invalid_request_error"
    assert b"data:" not in answer.body
    assert spare.bodies == []  # no failover for a 4xx
    labels = {"route": "chat", "tenant": TENANT, "priority": "realtime"}
    assert metric(running, "headway_requests_total", outcome="upstream_error", **labels) == 1
    assert metric(running, "headway_requests_total", outcome="ok", **labels) == 0
    [record] = access_records(caplog)
    assert (record["status"], record["outcome"]) == (400, "upstream_error")


async def test_case_7_sdk_fails_fast_without_retrying(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 7: the SDK sees a 400 at once and does not resubmit."""
    upstream = await start_upstream(sse_writes(CASE_7_BODIES["event-error"] + b"\n\n"))
    running = await start_sidecar(config(upstream.port))

    async with openai.AsyncOpenAI(
        base_url=f"{running.url}/v1", api_key=KEY, max_retries=3
    ) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
            )

    assert refused.value.status_code == 400
    assert len(upstream.bodies) == 1


async def test_case_7_overloaded_error_first_fails_over(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 7: an overloaded_error before any byte may fail over to the next backend."""
    overloaded = {"error": {"message": "busy", "type": "overloaded_error"}}
    upstream = await start_upstream(
        sse_writes(b"event: error\ndata: " + json.dumps(overloaded).encode() + b"\n\n")
    )
    spare = await start_upstream(
        sse_writes(event(delta("from spare")), event(delta(finish="stop")), b"data: [DONE]\n\n")
    )
    running = await start_sidecar(_with_spare(config(upstream.port), spare))

    answer = await call(running.url, chat(stream=True))

    assert answer.status == 200
    assert _content(answer.chunks) == "from spare"
    assert len(upstream.bodies) == 1
    assert len(spare.bodies) == 1


# -- case 11: concurrency slots never leak; a refused request takes no RPM --------------------


LEASES_KEY = "headway:{default/t11}:leases"  # the in-flight set of the t11 quota


def _case_11_tenant() -> dict[str, Any]:
    return limited("t11", "sk-t11", concurrentRequests=1, requestsPerMinute=2)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_case_11_client_abort_mid_stream_frees_the_slot(
    start_upstream: StartUpstream,
    start_sidecar: Start,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    """Case 11 (1): a client that hangs up after 2 chunks frees its slot; the next gets 200."""
    aborted = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(whole_answer(5, 1))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(400):
                await response.write(event(delta("x")))
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            aborted.set()
            raise
        return response

    upstream = await start_upstream(answer)
    data = config(upstream.port, _case_11_tenant())
    server: RedisServer | None = None
    if store == "redis":
        server = request.getfixturevalue("redis")
        data = with_redis(data, server)
    running = await start_sidecar(data)

    async with aiohttp.ClientSession() as http:
        response = await http.post(
            running.url + CHAT, json=chat(stream=True), headers={"authorization": "Bearer sk-t11"}
        )
        assert response.status == 200
        received = 0
        async for line in response.content:
            received += line.startswith(b"data: {")
            if received == 2:
                break
        if server is not None:
            # The in-flight key holds this request and expires on its own: a
            # sidecar that dies here cannot leak the slot for ever.
            with server.client() as redis:
                assert redis.zcard(LEASES_KEY) == 1
                assert redis.pttl(LEASES_KEY) > 0
        response.close()  # closes the socket, not just the response
        closed = time.monotonic()

    async def settled() -> bool:
        return (await counters(running, "default/t11")).concurrent_requests == 0

    await until(settled)
    print(f"case 11 ({store}): in-flight 0 {time.monotonic() - closed:.3f} s after the abort")
    if server is not None:
        with server.client() as redis:
            assert redis.zcard(LEASES_KEY) == 0
    await asyncio.wait_for(aborted.wait(), 10)  # the upstream request was aborted too
    assert running.gateway.scheduler.inflight("realtime") == 0
    after = await call(running.url, chat(), key="sk-t11")
    assert after.status == 200


@pytest.mark.parametrize("hang", ["whole", "stream", "stream-after-headers"])
async def test_case_11_upstream_timeout_frees_the_slot(
    start_upstream: StartUpstream, start_sidecar: Start, hang: str
) -> None:
    """Case 11 (2): an upstream that hangs past the timeout gets 504; the slot is free after."""
    gate = Gate()
    stream = hang != "whole"

    async def answer(request: web.Request) -> web.StreamResponse:
        if not stream:
            if len(upstream.bodies) == 1:
                await gate.hold()
            return web.json_response(whole_answer(5, 1))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        if len(upstream.bodies) == 1:
            if hang == "stream-after-headers":
                await response.prepare(request)
            await gate.hold()
        await response.prepare(request)
        await response.write(event(delta("ok", finish="stop")) + event(usage_only(5, 1)))
        await response.write_eof()
        return response

    upstream = await start_upstream(answer)
    running = await start_sidecar(
        config(upstream.port, _case_11_tenant(), timeouts={"firstToken": 2.0, "total": 2.0})
    )

    timed_out = await call(running.url, chat(stream=stream), key="sk-t11")

    assert timed_out.status == 504
    assert timed_out.json()["error"]["code"] == "upstream_timeout"
    assert (await counters(running, "default/t11")).concurrent_requests == 0
    assert running.gateway.scheduler.inflight("realtime") == 0
    await eventually(lambda: gate.aborted == 1)  # the hung upstream request was closed
    after = await call(running.url, chat(stream=stream), key="sk-t11")
    assert after.status == 200


async def test_case_11_refused_for_concurrency_takes_no_request_per_minute(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 11 (3): B refused for concurrency while A runs; then C is admitted (rpm=2)."""
    gate = Gate()

    async def answer(request: web.Request) -> web.StreamResponse:
        if len(upstream.bodies) == 1:
            await gate.hold()
        return web.json_response(whole_answer(5, 1))

    upstream = await start_upstream(answer)
    running = await start_sidecar(config(upstream.port, _case_11_tenant()))

    a = asyncio.create_task(call(running.url, chat(), key="sk-t11"))
    await eventually(lambda: gate.waiting == 1)
    b = await call(running.url, chat(), key="sk-t11")
    gate.opened.set()
    assert (await a).status == 200
    c = await call(running.url, chat(), key="sk-t11")

    assert b.status == 429
    assert b.json()["error"]["type"] == "rate_limit_error"
    assert "concurrent" in b.json()["error"]["message"]
    assert int(b.headers["retry-after"]) >= 1
    limit = "concurrent_requests"
    assert metric(running, "headway_rate_limited_total", tenant="t11", limit=limit) == 1
    assert c.status == 200
    used = await counters(running, "default/t11")
    assert used.requests_today == 2  # A and C, not B
    assert 1 < used.requests_this_minute <= 2
    assert used.concurrent_requests == 0
    assert len(upstream.bodies) == 2


# -- case 13: a client that hangs up is still charged ----------------------------------------


async def test_case_13_client_disconnect_is_charged(
    start_upstream: StartUpstream, start_sidecar: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Case 13: hanging up after 20 of 50 deltas charges input plus output, and it counts."""
    caplog.set_level(logging.INFO)
    writes = [event(delta("t")) for _ in range(50)]
    writes += [event(delta(finish="stop")), event(usage_only(1000, 50)), b"data: [DONE]\n\n"]
    upstream = await start_upstream(sse_writes(*writes, pause=0.02))
    running = await start_sidecar(
        config(upstream.port, limited("t13", "sk-t13", tokensPerMinute=2000))
    )
    # About 1000 prompt tokens by the sidecar's estimate (bytes + template overhead).
    prompt = "p" * (1000 - 64 - 8)
    body = chat(prompt, stream=True, max_tokens=500)

    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            running.url + CHAT, json=body, headers={"authorization": "Bearer sk-t13"}
        )
        assert response.status == 200
        received = 0
        async for line in response.content:
            received += line.startswith(b"data: {")
            if received == 20:
                break
        response.close()
        closed = time.monotonic()

    def recorded() -> bool:
        return any(r["tenant"] == "t13" for r in access_records(caplog))

    await eventually(recorded)
    print(f"case 13: settled {time.monotonic() - closed:.3f} s after the client hung up")
    [record] = access_records(caplog)
    assert record["outcome"] == "client_cancelled"
    assert record["input_tokens"] >= 1000
    assert record["output_tokens"] >= 20
    used = await counters(running, "default/t13")
    # Input plus what was delivered, at most the estimate plus all 50; never the
    # 1500-token reservation left in place.
    assert 1020 <= used.tokens_today <= 1000 + 50
    assert tokens_metric(running, "output", "t13") >= 20

    # The next identical request (reserving 1500) no longer fits the updated
    # counter, and its retry-after is what that counter implies (the bucket
    # drains 2000/60 tokens a second since the first request was admitted).
    refused = await call(running.url, body, key="sk-t13")
    elapsed = time.monotonic() - started
    assert refused.status == 429
    rate = 2000 / 60
    earliest = math.ceil((1020 + 1500 - 2000) / rate - elapsed)
    latest = math.ceil((1050 + 1500 - 2000) / rate)
    assert earliest <= int(refused.headers["retry-after"]) <= latest


@pytest.mark.parametrize("ending", ["client-hangs-up", "upstream-timeout"])
async def test_case_13_whole_answer_cut_short_is_charged_its_input(
    start_upstream: StartUpstream, start_sidecar: Start, ending: str
) -> None:
    """Case 13: a whole (non-streaming) answer dropped before it came still charges input."""
    # A model server answering without streaming sends nothing, headers
    # included, until it is done: hanging up before then must not make it free.
    gate = Gate()

    async def answer(request: web.Request) -> web.StreamResponse:
        await gate.hold()
        return web.json_response(whole_answer(1000, 50))

    upstream = await start_upstream(answer)
    timeouts = {"firstToken": 1.0, "total": 1.0} if ending == "upstream-timeout" else None
    running = await start_sidecar(
        config(upstream.port, limited("t13", "sk-t13", tokensPerMinute=2000), timeouts=timeouts)
    )
    body = chat("p" * (1000 - 64 - 8), max_tokens=500)  # 1000 tokens by estimate

    sent = asyncio.create_task(call(running.url, body, key="sk-t13"))
    await eventually(lambda: gate.waiting == 1)
    if ending == "client-hangs-up":
        sent.cancel()
    else:
        assert (await sent).status == 504
    await eventually(lambda: gate.aborted == 1)  # the model server was told to stop

    async def settled() -> bool:
        return (await counters(running, "default/t13")).concurrent_requests == 0

    await until(settled)
    used = await counters(running, "default/t13")
    # The prompt was sent and read: charged (not the 1500 reservation, not nothing).
    assert used.tokens_today == 1000
    assert used.requests_today == 1


# -- case 15: concurrent requests cannot bypass TPM ------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_case_15_concurrent_requests_cannot_bypass_tpm(
    start_upstream: StartUpstream,
    start_sidecar: Start,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    """Case 15: five concurrent 150-token reservations, tpm=300: two admitted, 260 charged."""
    gate = Gate()

    async def answer(request: web.Request) -> web.StreamResponse:
        await gate.hold()
        return web.json_response(whole_answer(50, 80))

    upstream = await start_upstream(answer)
    data = config(upstream.port, limited("t15", "sk-t15", tokensPerMinute=300))
    server: RedisServer | None = None
    if store == "redis":
        server = request.getfixturevalue("redis")
        data = with_redis(data, server)
        with server.client() as redis:
            redis.config_resetstat()
    running = await start_sidecar(data)
    # 46 bytes plus 4 around the prompt: an estimate of exactly 50 input tokens.
    body = completion("x" * 46, max_tokens=100)
    started = time.monotonic()

    calls = [
        asyncio.create_task(call(running.url, body, path=COMPLETIONS, key="sk-t15"))
        for _ in range(5)
    ]
    # Hold the admitted ones upstream until every other has been answered.
    await eventually(lambda: sum(t.done() for t in calls) + gate.waiting == 5)
    gate.opened.set()
    answers = await asyncio.gather(*calls)

    admitted = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    assert len(admitted) == 2
    assert len(refused) == 3
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert all(a.json()["error"]["type"] == "rate_limit_error" for a in refused)
    assert len(upstream.bodies) == 2
    if server is not None:
        # One atomic script call per reservation (5) and per settlement (2).
        await until(lambda: _settled_in_redis(server, 2))
        with server.client() as redis:
            assert _script_calls(redis) == 5 + 2
    used = await counters(running, "default/t15")
    assert used.tokens_today == 260  # settled from 150 reserved to 130 used, each
    drained = 300 / 60 * (time.monotonic() - started)
    assert 260 - drained <= used.tokens_this_minute <= 260


def _script_calls(redis: Any) -> int:
    stats = redis.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))


async def _settled_in_redis(server: RedisServer, admitted: int) -> bool:
    # Settlement runs just after the answer is sent; wait for both to land.
    with server.client() as redis:
        return _script_calls(redis) >= 5 + admitted


# -- case 17: TPM counts input and output ----------------------------------------------------


async def test_case_17_tpm_counts_input_and_output(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 17: usage 600/1 charges 601 and refuses the next request; 5/900 charges 905."""

    async def answer(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["prompt"]
        return web.json_response(whole_answer(5, 900) if prompt == "x" else whole_answer(600, 1))

    upstream = await start_upstream(answer)
    running = await start_sidecar(
        config(
            upstream.port,
            limited("big-prompts", "sk-t17a", tokensPerMinute=1000),
            limited("long-answers", "sk-t17b", tokensPerMinute=1000),
        )
    )
    # 596 bytes plus 4: an estimate of 600 tokens, so 601 reserved with max_tokens=1.
    big_prompt = completion("y" * 596, max_tokens=1)
    started = time.monotonic()

    first = await call(running.url, big_prompt, path=COMPLETIONS, key="sk-t17a")
    assert first.status == 200
    used = await counters(running, "default/big-prompts")
    assert used.tokens_today == 601
    assert 601 - 1000 / 60 * (time.monotonic() - started) <= used.tokens_this_minute <= 601

    for _ in range(2):
        refused = await call(running.url, big_prompt, path=COMPLETIONS, key="sk-t17a")
        assert refused.status == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
    limit = "tokens_per_minute"
    assert metric(running, "headway_rate_limited_total", tenant="big-prompts", limit=limit) == 2
    assert len(upstream.bodies) == 1

    second = await call(
        running.url, completion("x", max_tokens=900), path=COMPLETIONS, key="sk-t17b"
    )
    assert second.status == 200
    assert (await counters(running, "default/long-answers")).tokens_today == 905
    assert tokens_metric(running, "input", "long-answers") == 5
    assert tokens_metric(running, "output", "long-answers") == 900


# -- case 22: retry-after on our 429s and on relayed ones ------------------------------------


async def test_case_22_own_429_has_retry_after_rounded_up(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 22 (a): 37.2 s until the request fits is sent as Retry-After: 38, OpenAI body."""
    upstream = await start_upstream(json_answer(whole_answer(500, 100)))
    running = await start_sidecar(
        config(upstream.port, limited("t22", "sk-t22", tokensPerMinute=600))
    )
    started = time.monotonic()

    # 600 tokens used; then a 372-token request (74 estimated + 298) needs
    # 372 tokens to drain at 10 a second: 37.2 s.
    assert (await call(running.url, chat(max_tokens=100), key="sk-t22")).status == 200
    refused = await call(running.url, chat(max_tokens=298), key="sk-t22")
    elapsed = time.monotonic() - started

    assert refused.status == 429
    assert refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    # Exactly 38 unless the machine took over 0.2 s between the two requests.
    allowed = range(max(1, math.ceil(37.2 - elapsed)), 39)
    assert int(refused.headers["retry-after"]) in allowed
    assert refused.headers["x-ratelimit-limit-tokens"] == "600"


async def test_case_22_never_fitting_request_says_do_not_retry(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 22 (a), the other side: a request larger than the limit gets no Retry-After."""
    upstream = await start_upstream(json_answer(whole_answer(5, 1)))
    running = await start_sidecar(
        config(upstream.port, limited("t22", "sk-t22", tokensPerMinute=600))
    )

    refused = await call(running.url, chat(max_tokens=1000), key="sk-t22")

    assert refused.status == 429
    assert refused.json()["error"]["code"] == "request_too_large"
    assert refused.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.headers
    assert upstream.bodies == []


UPSTREAM_429 = {"error": {"message": "slow down", "type": "rate_limit_error"}}
RETRY_HEADERS = {"retry-after": "30", "retry-after-ms": "30000"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_case_22_relayed_429_keeps_retry_headers(
    start_upstream: StartUpstream, start_sidecar: Start, stream: bool
) -> None:
    """Case 22 (b): an upstream 429's retry-after and retry-after-ms reach the client unchanged."""
    upstream = await start_upstream(json_answer(UPSTREAM_429, status=429, headers=RETRY_HEADERS))
    running = await start_sidecar(config(upstream.port))

    answer = await call(running.url, chat(stream=stream))

    assert answer.status == 429
    assert answer.headers["retry-after"] == "30"
    assert answer.headers["retry-after-ms"] == "30000"
    assert [k.lower() for k in answer.headers if "retry" in k.lower()] == [
        "retry-after",
        "retry-after-ms",
    ]
    assert answer.json() == UPSTREAM_429


async def test_case_22_relayed_429_gives_way_to_a_fallback_that_answers(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 22 (b): an upstream 429 with a fallback that succeeds is a 200."""
    upstream = await start_upstream(json_answer(UPSTREAM_429, status=429, headers=RETRY_HEADERS))
    spare = await start_upstream(json_answer(whole_answer(5, 1, text="spare")))
    running = await start_sidecar(_with_spare(config(upstream.port), spare))

    answer = await call(running.url, chat())

    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "spare"
    assert "retry-after" not in answer.headers


# -- case 24: timed-out queued requests leave the queue --------------------------------------


async def hang_up(url: str, body: dict[str, Any], headers: dict[str, str], after: float) -> bytes:
    """Send a request, read what comes for ``after`` seconds, then close the socket."""
    received = b""
    sent = {"authorization": f"Bearer {KEY}", **headers}
    async with aiohttp.ClientSession() as http:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(after), http.post(url + CHAT, json=body, headers=sent) as r:
                async for piece in r.content.iter_any():
                    received += piece
    # Leaving the block closed the connection: the answer was never read to its end.
    return received


@pytest.mark.parametrize("leaving", ["whole", "stream"])
async def test_case_24_timed_out_and_abandoned_waiters_leave_the_queue(
    start_upstream: StartUpstream, start_sidecar: Start, leaving: str
) -> None:
    """Case 24: five queue timeouts and one hang-up leave the queue; the next is dispatched."""
    gate = Gate()

    async def answer(request: web.Request) -> web.StreamResponse:
        if len(upstream.bodies) == 1:
            await gate.hold()  # the long request holding the only slot
        return web.json_response(whole_answer(5, 1))

    upstream = await start_upstream(answer)
    # Keep-alive comments every 0.1 s, so a waiting stream has begun its answer.
    settings = serving.Settings(poll_interval=0.2, keepalive_interval=0.1, grace=2.0)
    running = await start_sidecar(
        config(upstream.port, max_concurrency=1, queue_timeouts=(1.0, 60.0)), settings=settings
    )
    realtime = {"x-headway-priority": "realtime"}
    batch = {"x-headway-priority": "batch"}
    scheduler = running.gateway.scheduler

    def depth(priority: str) -> float:
        return metric(running, "headway_queue_depth", priority=priority)

    long = asyncio.create_task(call(running.url, chat(), headers=realtime))
    await eventually(lambda: gate.waiting == 1)

    # The batch waiter (60 s timeout) hangs up after 0.5 s; only leaving on
    # disconnect can take it out of the queue within this test.
    body = chat(stream=leaving == "stream")
    left = asyncio.create_task(hang_up(running.url, body, batch, after=0.5))
    timing_out = [
        asyncio.create_task(call(running.url, chat(), headers=realtime)) for _ in range(5)
    ]
    await eventually(lambda: scheduler.depth("batch") == 1)
    if leaving == "stream":
        assert b": queued" in await left
    answers = await asyncio.gather(*timing_out)
    await left

    for timed_out in answers:
        assert timed_out.status == 503
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        assert int(timed_out.headers["retry-after"]) >= 1
    await eventually(lambda: depth("realtime") == 0 and depth("batch") == 0)
    assert scheduler.depth("realtime") == scheduler.depth("batch") == 0
    # Refused before dispatch: refunded, the request per minute included.
    assert (await counters(running)).requests_today == 1

    seventh = asyncio.create_task(call(running.url, chat(), headers=batch))
    await eventually(lambda: depth("batch") == 1)
    gate.opened.set()
    assert (await long).status == 200
    assert (await seventh).status == 200
    assert len(upstream.bodies) == 2  # the long one and the seventh, nobody else


# -- case 33: large bodies up to the configured limit ----------------------------------------


def chat_of_size(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes: one long user message."""
    skeleton = json.dumps(chat(""), separators=(",", ":")).encode()
    padding = b"x" * (size - len(skeleton))
    return skeleton.replace(b'"content":""', b'"content":"' + padding + b'"')


def _unlimited_tokens(data: dict[str, Any]) -> dict[str, Any]:
    # Megabyte prompts would never fit the sample's 100k tokens per minute.
    data["tenants"] = [tenant(TENANT, KEY, limits={"requestsPerMinute": 600})]
    return data


async def test_case_33_body_above_one_mib_is_forwarded_byte_for_byte(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 33: a 1,309,298-byte chat request is forwarded and the upstream gets the same bytes."""
    received: list[bytes] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        received.append(await request.read())
        return web.json_response(whole_answer(5, 1))

    upstream = await start_upstream(answer)
    data = _unlimited_tokens(config(upstream.port))
    # The backend keeps the client's model name, so nothing needs rewriting.
    del data["routes"][0]["backends"][0]["model"]
    running = await start_sidecar(data)
    body = chat_of_size(1_309_298)
    assert len(body) == 1_309_298

    answer_ = await call(running.url, body, headers={"content-type": "application/json"})

    assert answer_.status == 200
    assert received == [body]


async def test_case_33_forty_mib_gets_413_in_openai_shape(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 33: 40 MiB against the default 34 MiB limit is a 413 request_too_large."""
    upstream = await start_upstream(json_answer(whole_answer(5, 1)))
    running = await start_sidecar(_unlimited_tokens(config(upstream.port)))
    assert running.gateway.store.current.document.max_body_bytes == 34 * 1024 * 1024

    refused = await call(
        running.url, chat_of_size(40 * 1024 * 1024), headers={"content-type": "application/json"}
    )

    assert refused.status == 413
    assert refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert upstream.bodies == []


async def test_case_33_limit_is_the_configured_one(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 33: a body of exactly maxBodyBytes is accepted, one byte more is a 413."""
    limit = 2 * 1024 * 1024
    upstream = await start_upstream(json_answer(whole_answer(5, 1)))
    running = await start_sidecar(_unlimited_tokens(config(upstream.port, maxBodyBytes=limit)))
    json_type = {"content-type": "application/json"}

    at_limit = await call(running.url, chat_of_size(limit), headers=json_type)
    past_limit = await call(running.url, chat_of_size(limit + 1), headers=json_type)

    assert at_limit.status == 200
    assert past_limit.status == 413
    assert past_limit.json()["error"]["code"] == "request_too_large"
    assert len(upstream.bodies) == 1


async def test_case_33_chunked_upload_past_the_limit_is_not_buffered(
    start_upstream: StartUpstream, start_sidecar: Start
) -> None:
    """Case 33: 40 MiB sent chunked (no length) is refused after about the limit, not buffered."""
    limit = 4 * 1024 * 1024
    upstream = await start_upstream(json_answer(whole_answer(5, 1)))
    running = await start_sidecar(_unlimited_tokens(config(upstream.port, maxBodyBytes=limit)))
    piece = b"x" * (1024 * 1024)

    async def forty_mib() -> AsyncIterator[bytes]:
        yield b'{"model":"chat","messages":[{"role":"user","content":"'
        for _ in range(40):
            yield piece  # the same object each time: the client holds 1 MiB
        yield b'"}]}'

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        refused = await call(running.url, forty_mib(), headers={"content-type": "application/json"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert refused.status == 413
    assert refused.json()["error"]["code"] == "request_too_large"
    print(f"case 33: peak traced memory growth {(peak - before) / 2**20:.1f} MiB, limit 4 MiB")
    assert peak - before < 3 * limit
    assert upstream.bodies == []


# -- case 34: malformed JSON is a clear 400 --------------------------------------------------

VALID = json.dumps(chat("x")).encode()
CASE_34_BODIES: dict[str, tuple[bytes, str]] = {
    # id: (body, a word the message must use to name the problem)
    "a-trailing-comma": (b'{"model":"m","messages":[{"role":"user","content":"x"}],}', "JSON"),
    "b-empty": (b"", "body is empty"),
    "c-array": (b"[]", "object"),
    "d-messages-a-string": (b'{"model":"m","messages":"hi"}', "messages"),
    "e-truncated": (VALID[:-1], "JSON"),
    "not-utf8": (b'{"model":"\xff\xfe","messages":[]}', "UTF-8"),
    "deeply-nested": (b'{"model":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"),
    "number-too-long": (b'{"model":"m","max_tokens":' + b"1" * 5000 + b"}", "JSON"),
    "stream-not-a-boolean": (json.dumps(chat(stream=True) | {"stream": "yes"}).encode(), "stream"),
}


CHAT_ONLY = ("d-messages-a-string", "stream-not-a-boolean")


@pytest.mark.parametrize(
    ("case", "path"),
    [
        (case, path)
        for case in CASE_34_BODIES
        for path in (CHAT, COMPLETIONS, "/v1/embeddings")
        if path == CHAT or case not in CHAT_ONLY
    ],
)
async def test_case_34_malformed_body_is_a_400_naming_the_problem(
    start_upstream: StartUpstream, start_sidecar: Start, case: str, path: str
) -> None:
    """Case 34: malformed JSON gets 400 invalid_request_error, no traceback, nothing charged."""
    body, named = CASE_34_BODIES[case]
    upstream = await start_upstream(json_answer(whole_answer(5, 1)))
    running = await start_sidecar(config(upstream.port))
    before = await counters(running)

    answer = await call(running.url, body, path=path, headers={"content-type": "application/json"})

    assert answer.status == 400
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named.lower() in error["message"].lower()
    assert "model" not in error["message"].lower()  # never read as an empty request
    text = answer.body.decode()
    assert "Traceback" not in text
    assert not re.search(r"\.py\b|/work/|site-packages|File \"", text)
    assert upstream.bodies == []
    assert await counters(running) == before


# -- case 35: label cardinality stays bounded ------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def scrape(running: serving.Running) -> list[tuple[str, dict[str, str]]]:
    """Every sample of the admin port's /metrics, as (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"{running.admin_url}/metrics") as r:
        text = await r.text()
    return [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def in_batches(
    calls: Sequence[Callable[[], Awaitable[Answer]]], size: int = 50
) -> list[Answer]:
    answers: list[Answer] = []
    for start in range(0, len(calls), size):
        answers += await asyncio.gather(*(c() for c in calls[start : start + size]))
    return answers


async def test_case_35_request_data_never_becomes_a_label(sim: Sim, start_sidecar: Start) -> None:
    """Case 35: 1000 bogus models, users, tenants, 200 scanner paths and more add no series."""
    running = await start_sidecar(config(sim.port))
    assert (await call(running.url, chat())).status == 200  # the ordinary series exist

    def bogus(i: int) -> Callable[[], Awaitable[Answer]]:
        body = {**chat(), "model": f"bogus-{i}", "user": f"u-{i}"}
        return lambda: call(running.url, body, headers={"x-tenant": f"t-{i}"})

    def scanner(i: int) -> Callable[[], Awaitable[Answer]]:
        return lambda: call(running.url, chat(), path=f"/x/{i}-{time.time_ns()}.php")

    def stranger(i: int) -> Callable[[], Awaitable[Answer]]:
        return lambda: call(running.url, chat(), key=f"sk-stranger-{i}")

    def made_up_class(i: int) -> Callable[[], Awaitable[Answer]]:
        return lambda: call(running.url, chat(), headers={"x-headway-priority": f"p-{i}"})

    def forged_hop(i: int) -> Callable[[], Awaitable[Answer]]:
        hop = {"x-headway-hop": f"e30.dev.{i:064x}"}  # "{}" signed with nonsense
        return lambda: call(running.url, chat(), key=None, headers=hop)

    await in_batches([bogus(-i) for i in range(1, 101)])  # warm-up, outside the measure
    series_before = len(await scrape(running))
    rss_before = rss_bytes()

    unknown_models = await in_batches([bogus(i) for i in range(1000)])
    scanners = await in_batches([scanner(i) for i in range(200)])
    strangers = await in_batches([stranger(i) for i in range(100)])
    made_up_classes = await in_batches([made_up_class(i) for i in range(100)])
    forged_hops = await in_batches([forged_hop(i) for i in range(100)])

    rss_growth = rss_bytes() - rss_before
    samples = await scrape(running)
    print(f"case 35: {len(samples) - series_before} new series, RSS +{rss_growth / 2**20:.1f} MiB")
    assert {a.status for a in unknown_models} == {404}
    assert {a.json()["error"]["code"] for a in unknown_models} == {"model_not_found"}
    assert {a.status for a in scanners} == {404}
    assert {a.status for a in strangers} == {401}
    assert {a.status for a in made_up_classes} == {400}
    assert {a.status for a in forged_hops} == {401}

    allowed = {
        "route": {"chat", "unmatched"},
        "tenant": {TENANT, "unknown"},
        "priority": {"realtime", "batch"},
    }
    for name, labels in samples:
        for label, value in labels.items():
            assert label not in allowed or value in allowed[label], (name, labels)
            assert not re.search(r"bogus|\b[utp]-\d|sk-|\.php", value), (name, labels)
    assert len(samples) - series_before < 50
    assert rss_growth < 32 * 2**20
