"""The official OpenAI Python SDK against ``headway sidecar`` in front of ``headway simulate``.

Both are real processes on loopback. Usage is compared with what the same
simulator answers to the same request sent to it directly, so "exact" means
exactly the model server's own counts, streamed or not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.contract.sample import key_hash
from tests.sidecar.conftest import Process, Stack, sample_value, scrape, start_stack

SIM_FLAGS = ("--ttft", "10ms", "--tpot", "2ms", "--output-tokens", "8")
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Say something about foxes and dogs"},
]
SMALL_KEY = "sk-team-small"


def _with_small_tenant(data: dict[str, Any]) -> None:
    data["tenants"].append(
        {
            "name": "team-small",
            "keyHashes": [key_hash(SMALL_KEY)],
            "quotas": [
                {
                    "id": "default/team-small",
                    "limits": {"tokensPerMinute": 1000, "requestsPerMinute": 2},
                    "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
                }
            ],
        }
    )


@pytest.fixture
async def stack(processes: list[Process], tmp_path: Path) -> Stack:
    return await start_stack(processes, tmp_path, *SIM_FLAGS, edit=_with_small_tenant)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key="sk-team-a", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def direct(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """The simulator itself, for the reference answers."""
    async with openai.AsyncOpenAI(
        base_url=f"{stack.sim_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


async def _tokens(stack: Stack, kind: str) -> float:
    async with aiohttp.ClientSession() as http:
        text = await scrape(http, stack.admin_url)
    return sample_value(text, "headway_tokens_total", route="chat", tenant="team-a", type=kind)


async def test_chat_answers_with_the_model_servers_exact_usage(
    stack: Stack, client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    answer = await client.chat.completions.create(model="chat", messages=MESSAGES)
    reference = await direct.chat.completions.create(model="sim", messages=MESSAGES)

    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and reference.usage is not None
    assert answer.usage.model_dump() == reference.usage.model_dump()
    assert answer.usage.completion_tokens == 8
    assert await _tokens(stack, "input") == reference.usage.prompt_tokens
    assert await _tokens(stack, "output") == 8


async def test_stream_without_include_usage_hides_the_usage_chunk_but_counts_it(
    stack: Stack, client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True
        )
    ]
    reference = await direct.chat.completions.create(model="sim", messages=MESSAGES)

    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk reaches this client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reference.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    # The sidecar asked for usage upstream anyway and charged it.
    assert reference.usage is not None
    assert await _tokens(stack, "input") == reference.usage.prompt_tokens
    assert await _tokens(stack, "output") == 8


async def test_stream_with_include_usage_ends_with_one_usage_chunk(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    options: Any = {"include_usage": True}
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True, stream_options=options
        )
    ]
    reference = [
        chunk
        async for chunk in await direct.chat.completions.create(
            model="sim", messages=MESSAGES, stream=True, stream_options=options
        )
    ]

    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert reference[-1].usage is not None and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == reference[-1].usage.model_dump()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(c.choices[0].delta.content or "" for c in reference if c.choices)


async def test_completions_and_embeddings_carry_exact_usage(
    stack: Stack, client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    completion = await client.completions.create(model="chat", prompt="one two three", n=2)
    reference = await direct.completions.create(model="sim", prompt="one two three", n=2)
    assert [c.text for c in completion.choices] == [c.text for c in reference.choices]
    assert completion.usage is not None and reference.usage is not None
    assert completion.usage.model_dump() == reference.usage.model_dump()
    assert completion.usage.completion_tokens == 16

    inputs = ["the quick brown fox", "jumps"]
    embedding = await client.embeddings.create(model="chat", input=inputs)
    expected = await direct.embeddings.create(model="sim", input=inputs)
    assert [e.embedding for e in embedding.data] == [e.embedding for e in expected.data]
    assert embedding.usage.model_dump() == expected.usage.model_dump()
    assert embedding.usage.prompt_tokens == 5

    expected_input = reference.usage.prompt_tokens + expected.usage.prompt_tokens
    assert await _tokens(stack, "input") == expected_input
    assert await _tokens(stack, "output") == 16


async def test_models_lists_the_routes(client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]
    assert models == ["chat"]


async def test_wrong_or_missing_key_is_an_authentication_error(stack: Stack) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key="sk-not-a-key", max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            await wrong.chat.completions.create(model="chat", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body == {
        "message": "Incorrect API key provided.",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }

    # The SDK refuses to send no key at all; a plain client can.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{stack.url}/v1/chat/completions", json={"model": "chat", "messages": MESSAGES}
        ) as r,
    ):
        assert r.status == 401
        assert r.content_type == "application/json"
        error = (await r.json())["error"]
    assert error["type"] == "authentication_error" and error["code"] == "missing_api_key"


async def test_over_the_limit_is_a_rate_limit_error_with_retry_headers(stack: Stack) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key=SMALL_KEY, max_retries=0
    ) as small:
        for _ in range(2):  # requestsPerMinute: 2
            raw = await small.chat.completions.with_raw_response.create(
                model="chat", messages=MESSAGES, max_tokens=100
            )
            assert raw.http_response.status_code == 200
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-limit-tokens"] == "1000"

        with pytest.raises(openai.RateLimitError) as info:
            await small.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=100)
        headers = info.value.response.headers
        # The request bucket refills at 2 per minute: about 30 s until one fits.
        assert 20 <= int(headers["retry-after"]) <= 31
        assert headers["x-ratelimit-remaining-requests"] == "0"
        for name in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{name}-requests" in headers
            assert f"x-ratelimit-{name}-tokens" in headers
        assert info.value.type == "rate_limit_error"
        assert info.value.code == "rate_limit_exceeded"

        # More than the whole per-minute budget can never fit: no retry-after.
        with pytest.raises(openai.RateLimitError) as info:
            await small.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5000)
        assert info.value.code == "request_too_large"
        assert info.value.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in info.value.response.headers
