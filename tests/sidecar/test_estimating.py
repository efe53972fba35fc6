import json
from typing import Any

import pytest
from headway_sidecar import errors, estimating


def chat(*contents: object, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": c} for c in contents]
    return {"model": "m", "messages": messages, **fields}


def utf8(text: str) -> int:
    return len(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "Grüße aus Köln",
        "日本語のテキストはトークンが多い",
        "😀🎉👩‍👩‍👧‍👦" * 20,
        "مرحبا بالعالم",
    ],
)
async def test_input_estimate_bounds_text_in_any_script(text: str) -> None:
    # A byte-level BPE token covers at least one byte, so bytes bound tokens.
    estimate = estimating.estimate_input_tokens(chat(text))
    assert estimate >= utf8(text) + estimating.MESSAGE_OVERHEAD + estimating.REQUEST_OVERHEAD
    assert estimate > estimating.estimate_input_tokens(chat(""))


async def test_input_estimate_counts_every_message_and_part() -> None:
    one = estimating.estimate_input_tokens(chat("a" * 100))
    two = estimating.estimate_input_tokens(chat("a" * 100, "b" * 50))
    assert two - one == 50 + estimating.MESSAGE_OVERHEAD

    parts = [{"type": "text", "text": "a" * 100}, {"type": "text", "text": "ü" * 10}]
    assert estimating.estimate_input_tokens(chat(parts)) == one + 20


async def test_input_estimate_counts_media_parts_by_a_constant() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    with_image = estimating.estimate_input_tokens(chat([{"type": "text", "text": "hi"}, image]))
    assert with_image == estimating.estimate_input_tokens(chat("hi")) + estimating.MEDIA_TOKENS


async def test_input_estimate_counts_tools_and_tool_calls() -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    bare = estimating.estimate_input_tokens(chat("hi"))
    assert estimating.estimate_input_tokens(chat("hi", tools=tools)) >= (
        bare + estimating.TOOLS_OVERHEAD + len(json.dumps(tools))
    )
    body = chat("hi")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q":"x"}'}}
    body["messages"].append({"role": "assistant", "content": None, "tool_calls": [call]})
    body["messages"].append({"role": "tool", "tool_call_id": "c1", "content": "result"})
    assert estimating.estimate_input_tokens(body) >= bare + len(json.dumps(call)) + len("result")


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("héllo", 6),
        (["ab", "cde"], 5),
        ([1, 2, 3, 4], 4),
        ([[1, 2], [3, 4, 5]], 5),
    ],
)
async def test_input_estimate_for_prompts_and_embedding_inputs(prompt: object, tokens: int) -> None:
    count = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str | list) else 1
    overhead = estimating.PROMPT_OVERHEAD * count
    for field in ("prompt", "input"):
        assert estimating.estimate_input_tokens({"model": "m", field: prompt}) == tokens + overhead


async def test_output_cap_is_n_times_the_larger_limit() -> None:
    assert estimating.output_cap(chat("x", max_tokens=100), 512) == 100
    assert estimating.output_cap(chat("x", max_completion_tokens=300, max_tokens=100), 512) == 300
    assert estimating.output_cap(chat("x", n=3, max_tokens=100), 512) == 300
    assert estimating.output_cap(chat("x"), 512) == 512
    assert estimating.output_cap(chat("x", n=2, max_tokens=None), 512) == 1024


async def test_output_cap_for_completions_and_embeddings() -> None:
    batch = {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}
    assert estimating.output_cap(batch, 512, "completions") == 60
    assert estimating.output_cap(batch, 512) == 60
    best_of = {"model": "m", "prompt": "a", "max_tokens": 10, "n": 1, "best_of": 4}
    assert estimating.output_cap(best_of, 512, "completions") == 40
    tokens = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 10}
    assert estimating.output_cap(tokens, 512, "completions") == 10
    assert estimating.output_cap({"model": "m", "input": "a"}, 512, "embeddings") == 0
    assert estimating.output_cap({"model": "m", "input": "a"}, 512) == 0


async def test_estimate_validates_then_sizes_the_reservation() -> None:
    body = chat("hello", n=2, max_tokens=50)
    estimate = estimating.estimate(body, "chat", 512)
    assert estimate.input_tokens == estimating.estimate_input_tokens(body)
    assert estimate.output_cap == 100
    assert estimate.choices == 2
    assert estimate.reservation == estimate.input_tokens + 100
    assert estimating.ENDPOINTS["/v1/embeddings"] == "embeddings"


@pytest.mark.parametrize(
    ("body", "endpoint", "param"),
    [
        ([], "chat", None),
        ({"messages": []}, "chat", "model"),
        ({"model": "m", "messages": "hi"}, "chat", "messages"),
        ({"model": "m", "messages": []}, "chat", "messages"),
        ({"model": "m", "messages": ["hi"]}, "chat", "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "chat", "messages[0].role"),
        (chat("ok", 5), "chat", "messages[1].content"),
        (chat([{"text": "no type"}]), "chat", "messages[0].content"),
        (chat("x", n=0), "chat", "n"),
        (chat("x", n="2"), "chat", "n"),
        (chat("x", n=True), "chat", "n"),
        (chat("x", n=500), "chat", "n"),
        (chat("x", max_tokens=-1), "chat", "max_tokens"),
        (chat("x", max_tokens=1.5), "chat", "max_tokens"),
        (chat("x", max_completion_tokens="10"), "chat", "max_completion_tokens"),
        (chat("x", stream="yes"), "chat", "stream"),
        (chat("x", stream_options=[]), "chat", "stream_options"),
        (
            chat("x", stream_options={"include_usage": "true"}),
            "chat",
            "stream_options.include_usage",
        ),
        (chat("x", tools={"name": "f"}), "chat", "tools"),
        ({"model": "m"}, "completions", "prompt"),
        ({"model": "m", "prompt": 5}, "completions", "prompt"),
        ({"model": "m", "prompt": ["a", 1]}, "completions", "prompt"),
        ({"model": "m", "prompt": "a", "best_of": 0}, "completions", "best_of"),
        ({"model": "m", "input": [[1, "x"]]}, "embeddings", "input"),
        ({"model": "m", "input": []}, "embeddings", "input"),
    ],
)
async def test_validate_names_the_bad_field(body: object, endpoint: Any, param: str | None) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        estimating.validate(body, endpoint)
    assert info.value.status == 400
    assert info.value.param == param
    if param is not None:
        assert param in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "endpoint"),
    [
        (chat("x", n=None, max_tokens=None, stream=True, stream_options=None), "chat"),
        (chat([{"type": "text", "text": "x"}], None), "chat"),
        ({"model": "m", "prompt": [[1], [2, 3]], "stream": False}, "completions"),
        ({"model": "m", "input": [1, 2, 3]}, "embeddings"),
        ({"model": "m", "input": ""}, "embeddings"),
    ],
)
async def test_validate_accepts_well_formed_bodies(body: dict[str, Any], endpoint: Any) -> None:
    assert estimating.validate(body, endpoint) is body
