"""The model-server simulator, driven by the official OpenAI SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from headway_sidecar import simulator

SYSTEM = "You are terse."  # 3 words
QUESTION = "Say hello to the world"  # 5 words
MESSAGES: list[Any] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
]
PROMPT_WORDS = 8
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def text_of(tokens: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(tokens))


@contextlib.asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[TestServer]:
    server = TestServer(simulator.make_app(simulator.Settings(**settings)), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def sdk(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-test", max_retries=0
    )
    try:
        yield client
    finally:
        await client.close()


async def stats(server: TestServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/sim/stats")) as r:
        result: dict[str, Any] = await r.json()
        return result


async def wait_for_stats(server: TestServer, **expected: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        current = await stats(server)
        if all(current[name] == value for name, value in expected.items()):
            return current
        assert time.monotonic() < deadline, f"stats never reached {expected}: {current}"
        await asyncio.sleep(0.01)


def sse_events(raw: str) -> list[str]:
    return [block for block in raw.split("\n\n") if block]


def contents(events: list[str]) -> list[str]:
    found = []
    for event in events:
        if event.startswith("data: {"):
            for choice in json.loads(event[6:])["choices"]:
                content = choice.get("delta", {}).get("content")
                if content:
                    found.append(content)
    return found


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **extra}


# --- Wire format and usage ---------------------------------------------------


async def test_chat_stream_speaks_openai_wire_format() -> None:
    async with serving(ttft=0.01, tpot=0.001, output_tokens=7) as server, sdk(server) as client:
        stream = await client.chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "llama" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(7)
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.usage is None
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_WORDS, 7)
    assert last.usage.total_tokens == PROMPT_WORDS + 7
    assert sum(1 for c in chunks if c.usage is not None) == 1


async def test_chat_stream_ends_with_done_and_no_usage_unless_asked() -> None:
    async with (
        serving(ttft=0.01, tpot=0.001, output_tokens=4) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"), json=chat_body(stream=True)
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(await response.text())

    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    assert contents(events) == WORDS[:4]


async def test_chat_whole_answer_reports_usage_for_every_choice() -> None:
    async with serving(ttft=0.01, tpot=0.001, output_tokens=5) as server, sdk(server) as client:
        answer = await client.chat.completions.create(
            model="m", messages=MESSAGES, n=3, max_tokens=50
        )

    assert answer.object == "chat.completion"
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in answer.choices)
    assert all(c.message.content == text_of(5) for c in answer.choices)
    assert all(c.finish_reason == "stop" for c in answer.choices)
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (PROMPT_WORDS, 15)


async def test_chat_prompt_tokens_never_exceed_utf8_bytes() -> None:
    text = "naïve 東京 🙂🙂 x"
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": text}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": ""},
    ]
    async with serving(ttft=0, tpot=0, output_tokens=1) as server, sdk(server) as client:
        answer = await client.chat.completions.create(model="m", messages=messages)

    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(text.split())
    assert answer.usage.prompt_tokens <= len(text.encode())


async def test_completions_stream_and_whole_count_each_prompt() -> None:
    async with serving(ttft=0.01, tpot=0.001, output_tokens=3) as server, sdk(server) as client:
        whole = await client.completions.create(model="m", prompt=["one two", "three"], n=2)
        stream = await client.completions.create(
            model="m", prompt=[1, 2, 3, 4], stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    assert whole.object == "text_completion"
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert all(c.text == text_of(3) and c.finish_reason == "stop" for c in whole.choices)
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 12)

    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(3)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 3)


async def test_embeddings_report_exact_usage_in_both_encodings() -> None:
    inputs = ["alpha beta gamma", "delta"]
    async with serving(ttft=0.01) as server, sdk(server) as client:
        packed = await client.embeddings.create(model="e", input=inputs)
        floats = await client.embeddings.create(
            model="e", input=inputs, encoding_format="float", dimensions=5
        )
        again = await client.embeddings.create(model="e", input=inputs[0], dimensions=5)

    assert packed.usage.prompt_tokens == packed.usage.total_tokens == 4
    assert floats.usage.prompt_tokens == 4
    assert [d.index for d in packed.data] == [0, 1]
    assert len(packed.data[0].embedding) == simulator.Settings().embedding_dimensions
    assert len(floats.data[0].embedding) == 5
    assert math.isclose(sum(v * v for v in floats.data[1].embedding), 1.0)
    assert floats.data[0].embedding != floats.data[1].embedding
    # The same input gets the same vector; base64 carries it as float32.
    assert again.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_cuts_the_answer_with_length(cap_field: str, stream: bool) -> None:
    async with serving(ttft=0, tpot=0, output_tokens=6) as server, sdk(server) as client:
        results = []
        for cap in (2, 6):
            kwargs: Any = {cap_field: cap}
            if stream:
                chunks = [
                    c
                    async for c in await client.chat.completions.create(
                        model="m", messages=MESSAGES, stream=True, **kwargs
                    )
                ]
                text = "".join(c.choices[0].delta.content or "" for c in chunks)
                results.append((text, chunks[-1].choices[0].finish_reason))
            else:
                answer = await client.chat.completions.create(
                    model="m", messages=MESSAGES, **kwargs
                )
                results.append((answer.choices[0].message.content, answer.choices[0].finish_reason))

    assert results == [(text_of(2), "length"), (text_of(6), "stop")]


async def test_no_usage_setting_never_reports_usage() -> None:
    async with (
        serving(ttft=0, tpot=0, output_tokens=2, usage=False) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model="m", messages=MESSAGES)
        embedded = await session.post(
            server.make_url("/v1/embeddings"), json={"model": "m", "input": "a b"}
        )
        embedding = await embedded.json()

    assert all(c.usage is None and c.choices for c in chunks)
    assert whole.usage is None
    assert "usage" not in embedding


async def test_models_lists_configured_names_and_refuses_others() -> None:
    async with serving(models=("llama", "mistral")) as server, sdk(server) as client:
        listed = [model.id async for model in client.models.list()]
        with pytest.raises(openai.NotFoundError) as refused:
            await client.chat.completions.create(model="gpt-4", messages=MESSAGES)

    assert listed == ["llama", "mistral"]
    assert refused.value.code == "model_not_found"
    assert "gpt-4" in refused.value.message


async def test_health_answers_ok() -> None:
    async with (
        serving() as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/health")) as response,
    ):
        assert response.status == 200


# --- The waiting room --------------------------------------------------------


async def test_waiting_room_admits_in_arrival_order_under_overload() -> None:
    ttft, tpot, tokens = 0.1, 0.02, 20
    service = ttft + (tokens - 1) * tpot
    async with serving(ttft=ttft, tpot=tpot, output_tokens=tokens, max_concurrency=2) as server:
        async with sdk(server) as client:
            first_token: dict[int, float] = {}
            sent: dict[int, float] = {}

            async def one(i: int) -> None:
                sent[i] = time.monotonic()
                stream = await client.chat.completions.create(
                    model="m", messages=MESSAGES, stream=True
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and i not in first_token:
                        first_token[i] = time.monotonic()

            # Each request is sent only once the previous one has arrived, so
            # the arrival order is known without relying on timing.
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(one(i)))
                await wait_for_stats(server, received=i + 1)
            crowded = await stats(server)
            await asyncio.gather(*tasks)
        final = await stats(server)

    assert crowded["completed"] == 0, "the first request finished before the room filled"
    assert (crowded["in_flight"], crowded["waiting"]) == (2, 4)
    assert final["max_in_flight"] == 2
    assert final["completed"] == 6
    assert sorted(first_token, key=first_token.__getitem__) == list(range(6))
    ttfts = [first_token[i] - sent[i] for i in range(6)]
    # Requests 5 and 6 need two earlier generations to end before theirs starts.
    assert min(ttfts[4:]) >= service + ttft - 0.01
    assert max(ttfts[:2]) < min(ttfts[4:])


async def test_client_disconnect_mid_stream_frees_the_slot() -> None:
    async with (
        serving(ttft=0.01, tpot=0.05, output_tokens=1000, max_concurrency=1) as server,
        aiohttp.ClientSession() as session,
    ):
        response = await session.post(
            server.make_url("/v1/chat/completions"), json=chat_body(stream=True)
        )
        seen = 0
        async for line in response.content:
            if line.startswith(b'data: {"') and b'"content":"' in line and b'"role"' not in line:
                seen += 1
                if seen == 2:
                    break
        response.close()
        await wait_for_stats(server, in_flight=0, cancelled=1)

        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(),
            headers={"x-sim-output-tokens": "1"},
        ) as after:
            assert after.status == 200
        assert (await stats(server))["completed"] == 1


async def test_client_disconnect_while_waiting_leaves_the_queue() -> None:
    async with (
        serving(ttft=0.01, tpot=0.05, output_tokens=1000, max_concurrency=1) as server,
        aiohttp.ClientSession() as session,
    ):
        url = server.make_url("/v1/chat/completions")
        holder = await session.post(url, json=chat_body(stream=True))
        waiter = asyncio.create_task(session.post(url, json=chat_body(stream=True)))
        await wait_for_stats(server, in_flight=1, waiting=1)

        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        await wait_for_stats(server, waiting=0, in_flight=1, cancelled=1)

        holder.close()
        await wait_for_stats(server, waiting=0, in_flight=0, cancelled=2)


# --- Faults ------------------------------------------------------------------


async def test_fault_error_answers_the_status_at_once() -> None:
    async with (
        serving(max_concurrency=1) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-sim-fault": "error:503"}
            )
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(stream=True),
            headers={"x-sim-fault": "error:429:2.5"},
        ) as limited:
            body = await limited.json()
            headers = limited.headers
        counters = await stats(server)

    assert failed.value.status_code == 503
    assert failed.value.type == "server_error"
    assert limited.status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    assert counters["max_in_flight"] == 0, "an error at the door takes no slot"
    assert counters["faulted"] == 2


async def test_fault_error_event_is_the_first_event_of_a_200_stream() -> None:
    async with (
        serving(ttft=0.01) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(stream=True),
            headers={"x-sim-fault": "error-event:400"},
        ) as response:
            status = response.status
            events = sse_events(await response.text())
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-sim-fault": "error-event"}
        )
        with pytest.raises(openai.APIError) as failed:
            async for _ in stream:
                pass

    assert status == 200
    assert len(events) == 1
    kind, data = events[0].split("\n")
    assert kind == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", 400)
    assert failed.value.body is not None


async def test_fault_stall_holds_a_slot_before_the_first_byte() -> None:
    stall = 0.3
    async with (
        serving(ttft=0, tpot=0, output_tokens=1) as server,
        aiohttp.ClientSession() as session,
    ):
        started = time.monotonic()
        request = asyncio.create_task(
            session.post(
                server.make_url("/v1/chat/completions"),
                json=chat_body(),
                headers={"x-sim-fault": f"stall:{stall}"},
            )
        )
        during = await wait_for_stats(server, in_flight=1)
        response = await request
        elapsed = time.monotonic() - started
        body = await response.json()
        response.close()

    assert during["completed"] == 0
    assert elapsed >= stall - 0.01
    assert body["choices"][0]["message"]["content"] == text_of(1)


async def test_fault_stall_then_error_answers_after_the_stall() -> None:
    async with serving() as server, aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(),
            headers={"x-sim-fault": "stall:0.2,error:502"},
        ) as response:
            assert response.status == 502
        assert time.monotonic() - started >= 0.19
        assert (await stats(server))["max_in_flight"] == 1


async def test_fault_disconnect_drops_after_n_content_chunks() -> None:
    async with (
        serving(ttft=0.01, tpot=0.001, output_tokens=10) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        raw = b""
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=chat_body(stream=True),
            headers={"x-sim-fault": "disconnect:3"},
        ) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_any():
                    raw += piece

        received = []
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-sim-fault": "disconnect:2"}
        )
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        counters = await wait_for_stats(server, in_flight=0)

    events = sse_events(raw.decode())
    assert contents(events) == WORDS[:3]
    assert "data: [DONE]" not in events
    assert [c for c in received if c] == WORDS[:2]
    assert counters["faulted"] == 2


async def test_fault_disconnect_past_the_end_fires_before_finish() -> None:
    async with (
        serving(ttft=0, tpot=0, output_tokens=2) as server,
        aiohttp.ClientSession() as session,
    ):
        url = server.make_url("/v1/chat/completions")
        raw = b""
        async with session.post(
            url, json=chat_body(stream=True), headers={"x-sim-fault": "disconnect:5"}
        ) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_any():
                    raw += piece
        with pytest.raises(aiohttp.ClientError):
            async with session.post(
                url, json=chat_body(), headers={"x-sim-fault": "disconnect:1"}
            ) as whole:
                await whole.read()

    events = sse_events(raw.decode())
    assert contents(events) == WORDS[:2]
    assert not any('"finish_reason":"stop"' in event for event in events)


async def test_fault_mid_error_sends_an_error_event_after_n_chunks() -> None:
    async with (
        serving(ttft=0.01, tpot=0.001, output_tokens=10) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(
            server.make_url("/v1/completions"),
            json={"model": "m", "prompt": "hi", "stream": True},
            headers={"x-sim-fault": "mid-error:2"},
        ) as response:
            events = sse_events(await response.text())
        received = []
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-sim-fault": "mid-error:3"}
        )
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-sim-fault": "mid-error:1"}
            )

    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {")]
    assert texts == WORDS[:2]
    assert events[-1].startswith("event: error\ndata: ")
    assert json.loads(events[-1].split("data: ", 1)[1])["error"]["code"] == 500
    assert "data: [DONE]" not in events
    assert [c for c in received if c] == WORDS[:3]


async def test_fault_server_wide_from_settings_and_from_put() -> None:
    async with (
        serving(ttft=0, tpot=0, output_tokens=1, fault="error:502") as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        healthy = await client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-sim-fault": "none"}
        )

        url = server.make_url("/sim/fault")
        async with session.put(url, json={"fault": "error:504"}) as changed:
            assert (await changed.json())["fault"] == "error:504"
        with pytest.raises(openai.APIStatusError) as timed_out:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        async with session.put(url, json={"fault": "explode"}) as refused:
            refusal = await refused.json()
        async with session.put(url, json={"fault": None}):
            pass
        recovered = await client.chat.completions.create(model="m", messages=MESSAGES)

    assert failed.value.status_code == 502
    assert healthy.choices[0].message.content == text_of(1)
    assert timed_out.value.status_code == 504
    assert refused.status == 400
    assert "explode" in refusal["error"]["message"]
    assert recovered.choices[0].finish_reason == "stop"


# --- Counters and bad input --------------------------------------------------


async def test_stats_record_the_last_body_and_headers() -> None:
    async with (
        serving(ttft=0, tpot=0, output_tokens=1) as server,
        sdk(server) as client,
        aiohttp.ClientSession() as session,
    ):
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
        seen = await stats(server)
        async with session.post(server.make_url("/sim/reset")):
            pass
        reset = await stats(server)

    assert seen["last_body"]["stream_options"] == {"include_usage": True}
    assert seen["last_body"]["messages"] == MESSAGES
    assert seen["last_headers"]["authorization"] == "Bearer sk-test"
    assert (seen["received"], seen["completed"]) == (1, 1)
    assert (reset["received"], reset["completed"], reset["last_body"]) == (0, 0, None)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "mentions"),
    [
        ("/v1/chat/completions", b"{nope", {}, 400, "JSON"),
        ("/v1/chat/completions", b"[1]", {}, 400, "object"),
        ("/v1/chat/completions", b'{"model":"m"}', {}, 400, "messages"),
        ("/v1/chat/completions", b'{"messages":[{"role":"user"}]}', {}, 400, "model"),
        ("/v1/chat/completions", json.dumps(chat_body(max_tokens=0)), {}, 400, "max_tokens"),
        ("/v1/chat/completions", json.dumps(chat_body(n="2")), {}, 400, "'n'"),
        (
            "/v1/chat/completions",
            json.dumps(chat_body(stream_options={"include_usage": True})),
            {},
            400,
            "stream_options",
        ),
        ("/v1/chat/completions", json.dumps(chat_body()), {"x-sim-fault": "boom"}, 400, "boom"),
        (
            "/v1/chat/completions",
            json.dumps(chat_body()),
            {"x-sim-output-tokens": "many"},
            400,
            "x-sim-output-tokens",
        ),
        ("/v1/chat/completions", json.dumps(chat_body()), {"x-sim-tpot": "fast"}, 400, "tpot"),
        ("/v1/completions", b'{"model":"m","prompt":[]}', {}, 400, "prompt"),
        ("/v1/embeddings", b'{"model":"m","input":"x","encoding_format":"hex"}', {}, 400, "hex"),
        ("/v1/nothing", b"{}", {}, 404, "Not Found"),
    ],
)
async def test_bad_input_gets_an_openai_shaped_error(
    path: str, body: str | bytes, headers: dict[str, str], status: int, mentions: str
) -> None:
    async with (
        serving() as server,
        aiohttp.ClientSession() as session,
        session.post(server.make_url(path), data=body, headers=headers) as response,
    ):
        answer = await response.json()

    assert response.status == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert mentions in answer["error"]["message"]


def test_settings_and_faults_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        simulator.Settings(max_concurrency=0)
    with pytest.raises(ValueError, match="stall:soon"):
        simulator.parse_faults("stall:soon")
    with pytest.raises(ValueError, match="error status"):
        simulator.parse_faults("error:200")
    with pytest.raises(ValueError, match="one of"):
        simulator.parse_faults("disconnect:1,mid-error:2")
    assert simulator.parse_faults("stall:250ms,error:503:1").stall == 0.25
    refused = simulator.run(
        listen=("127.0.0.1", 0), ttft=0.1, tpot=0.1, output_tokens=1, max_concurrency=0, usage=True
    )
    assert refused == 2


# --- The real command --------------------------------------------------------


async def test_simulate_command_serves_and_exits_zero_on_sigterm() -> None:
    headway = Path(sys.executable).with_name("headway")
    process = await asyncio.create_subprocess_exec(
        str(headway),
        "simulate",
        "--listen",
        "127.0.0.1:0",
        "--ttft",
        "10ms",
        "--tpot",
        "1ms",
        "--output-tokens",
        "4",
        "--max-concurrency",
        "2",
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        address = None
        while address is None:
            line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
            assert line, "headway simulate exited before listening"
            found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", line)
            address = found and found.group(1).decode()

        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{address}/health") as health:
                        if health.status == 200:
                            break
                assert time.monotonic() < deadline, "/health never answered"
                await asyncio.sleep(0.05)

        client = openai.AsyncOpenAI(base_url=f"{address}/v1", api_key="sk-x", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
        finally:
            await client.close()

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert code == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(4)
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        PROMPT_WORDS,
        4,
    )
