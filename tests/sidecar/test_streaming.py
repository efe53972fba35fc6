import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import pytest
from headway_sidecar import errors, sse, streaming

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
WITH_USAGE = {**CHAT, "stream_options": {"include_usage": True}}


def data(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(content: str, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}],
    }


def finish(reason: str = "stop", index: int = 0) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {}, "finish_reason": reason}],
    }


def usage(prompt: int, completion: int) -> dict[str, Any]:
    counts = {"prompt_tokens": prompt, "completion_tokens": completion}
    return {"id": "c1", "choices": [], "usage": {**counts, "total_tokens": prompt + completion}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def upstream(pieces: Sequence[bytes], clock: Clock | None = None) -> AsyncIterator[bytes]:
    for piece in pieces:
        if clock is not None:
            clock.now += 1.0
        yield piece


async def relay(
    body: dict[str, Any],
    pieces: Sequence[bytes],
    *,
    input_estimate: int = 1000,
    clock: Clock | None = None,
    **options: Any,
) -> tuple[bytes, streaming.Accounting]:
    clock = clock or Clock()
    r = streaming.Relay(body, input_estimate=input_estimate, clock=clock, **options)
    out = [await r.start(upstream(pieces, clock))]
    out += [piece async for piece in r.rest()]
    return b"".join(out), r.accounting()


def client_events(raw: bytes) -> list[Any]:
    """The client's events, checked against the exact shape we promise to send."""
    assert raw.endswith(b"\n\n")
    events: list[Any] = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert "\r" not in block
        if block.startswith(": "):
            continue
        assert block.startswith("data: ") and "\n" not in block, block
        text = block.removeprefix("data: ")
        events.append(text if text == "[DONE]" else json.loads(text))
    return events


def chunkings(stream: bytes) -> Iterator[list[bytes]]:
    """Every split into two reads, then one byte per read."""
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]
    yield [stream[i : i + 1] for i in range(len(stream))]


async def relay_every_way(
    body: dict[str, Any], stream: bytes, **options: Any
) -> tuple[bytes, streaming.Accounting]:
    """Relay under every chunking and check they all give the same answer."""
    raw, record = await relay(body, [stream], **options)
    # Timing follows the number of reads, which is the one thing chunking changes.
    untimed = dataclasses.replace(record, first_token_at=None, last_token_at=None)
    for pieces in chunkings(stream):
        other_raw, other = await relay(body, pieces, **options)
        assert other_raw == raw, [len(p) for p in pieces]
        assert dataclasses.replace(other, first_token_at=None, last_token_at=None) == untimed
    return raw, record


def content(events: Sequence[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", ())
    )


def with_usage(events: Sequence[Any]) -> list[dict[str, Any]]:
    return [e for e in events if isinstance(e, dict) and e.get("usage") is not None]


CASE_1 = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"H\xc3\xa9llo"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":'
    b'{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n'
    b"\ndata: [DONE]\n\n"
)


async def test_relay_case1_split_event_and_character_arrive_whole() -> None:
    # The three writes of case 1, then every other chunking.
    first, last = CASE_1.index(b"H\xc3") + 2, CASE_1.index(b"\ndata: [DONE]")
    writes = [CASE_1[:first], CASE_1[first:last], CASE_1[last:]]
    assert writes[0].endswith(b"H\xc3") and writes[2] == b"\ndata: [DONE]\n\n"
    raw, record = await relay(WITH_USAGE, writes)
    assert (await relay_every_way(WITH_USAGE, CASE_1))[0] == raw

    events = client_events(raw)
    assert content(events) == "Héllo"
    assert len(events) == 4 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events if isinstance(e, dict))
    assert (record.input_tokens, record.output_tokens, record.usage_reported) == (5, 2, True)
    assert record.parse_errors == 0
    assert record.outcome == "ok" and record.stream_error is None


async def test_relay_case3_usage_goes_alone_in_the_last_chunk() -> None:
    finish_with_usage = {**finish(), "usage": usage(13, 20)["usage"]}
    stream = data(delta("Hello")) + data(finish_with_usage) + b"data: [DONE]\n\n"
    raw, record = await relay_every_way(WITH_USAGE, stream)

    events = client_events(raw)
    (carrier,) = with_usage(events)
    assert events[-2] is carrier and events[-1] == "[DONE]"
    assert carrier["choices"] == []
    assert carrier["usage"] == {"prompt_tokens": 13, "completion_tokens": 20, "total_tokens": 33}
    assert carrier["id"] == "c1" and carrier["object"] == "chat.completion.chunk"
    (finished,) = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finished.get("usage") is None
    assert (record.input_tokens, record.output_tokens) == (13, 20)


async def test_relay_keeps_usage_last_when_the_upstream_sends_it_early() -> None:
    stream = data(delta("a")) + data(usage(3, 2)) + data(finish()) + b"data: [DONE]\n\n"
    events = client_events((await relay(WITH_USAGE, [stream]))[0])
    assert with_usage(events) == [events[-2]]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


CASE_4 = (
    b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n'
    b"\n"
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n'
    b"\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":1,"total_tokens":27}}\n'
    b"\n"
    b"data: [DONE]\n\n"
)


async def test_prepare_upstream_body_case4a_always_asks_for_usage() -> None:
    raw = json.dumps(CHAT).encode()
    sent = json.loads(streaming.prepare_upstream_body(CHAT, raw))
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == CHAT

    kept = {**CHAT, "stream_options": {"include_usage": False, "continuous_usage_stats": False}}
    assert json.loads(streaming.prepare_upstream_body(kept))["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    asked = json.dumps(WITH_USAGE).encode()
    assert streaming.prepare_upstream_body(WITH_USAGE, asked) is asked
    whole = {**CHAT, "stream": False}
    assert streaming.prepare_upstream_body(whole, b"as sent") == b"as sent"
    renamed = json.loads(streaming.prepare_upstream_body(whole, b"as sent", model="llama"))
    assert renamed == {**whole, "model": "llama"}


async def test_relay_case4_strips_usage_the_client_did_not_ask_for() -> None:
    raw, record = await relay_every_way(CHAT, CASE_4)
    events = client_events(raw)
    assert len(events) == 3 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["content"] == "ok"
    assert events[1]["choices"][0]["finish_reason"] == "stop"
    assert b"usage" not in raw
    assert (record.input_tokens, record.output_tokens, record.total_tokens) == (26, 1, 27)


async def test_relay_strips_null_usage_fields_for_a_client_that_did_not_ask() -> None:
    openai_style = {**delta("x"), "usage": None}
    stream = data(openai_style) + data({**finish(), "usage": None}) + data(usage(1, 1))
    raw, _ = await relay(CHAT, [stream + b"data: [DONE]\n\n"])
    assert b"usage" not in raw
    raw, _ = await relay(WITH_USAGE, [stream + b"data: [DONE]\n\n"])
    assert len(with_usage(client_events(raw))) == 1


@pytest.mark.parametrize(
    "ending",
    [b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n", b""],
    ids=["spaced", "unspaced", "crlf", "closed-without-done"],
)
@pytest.mark.parametrize("body", [CHAT, WITH_USAGE], ids=["plain", "include-usage"])
async def test_relay_case5_counts_done_once_in_every_spelling(
    ending: bytes, body: dict[str, Any]
) -> None:
    stream = data(delta("x" * 33)) + data(usage(13, 33)) + ending
    raw, record = await relay_every_way(body, stream)
    assert record.total_tokens == 46
    assert record.parse_errors == 0
    assert raw.count(b"[DONE]") == 1 and raw.endswith(sse.DONE)
    assert record.outcome == "ok"


CASE_7 = (
    b": keepalive\n\nevent: error\n"
    b'data: {"error":{"message":"invalid request","type":"invalid_request_error","code":400}}\n\n'
)


async def test_relay_case7_error_before_content_raises_the_upstream_status() -> None:
    for pieces in chunkings(CASE_7):
        r = streaming.Relay(CHAT, input_estimate=10)
        with pytest.raises(streaming.UpstreamErrorResponse) as info:
            await r.start(upstream(pieces))
        error = info.value
        assert error.status == 400
        assert error.body()["error"]["message"] == "invalid request"
        assert error.body()["error"]["type"] == "invalid_request_error"
        assert not streaming.may_fail_over(error)
        assert r.accounting().outcome == "upstream_error"
        assert r.accounting().stream_error == "upstream_error"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"type": "overloaded_error", "message": "busy"}, 503),
        ({"type": "server_error", "message": "boom"}, 502),
        ({"type": "InternalServerError", "message": "x", "code": 500}, 500),
        ({"type": "rate_limit_error", "message": "slow down"}, 429),
    ],
)
async def test_relay_tells_retryable_early_errors_apart(error: dict[str, Any], status: int) -> None:
    stream = data({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    stream += data({"error": error})
    r = streaming.Relay(CHAT, input_estimate=10)
    with pytest.raises(streaming.UpstreamErrorResponse) as info:
        await r.start(upstream([stream]))
    assert info.value.status == status
    assert streaming.may_fail_over(info.value) is (status >= 500)


async def test_upstream_error_reads_http_error_bodies() -> None:
    vllm = b'{"object":"error","message":"too long","type":"BadRequestError","code":400}'
    error = streaming.upstream_error(400, vllm)
    assert (error.status, error.message, error.type) == (400, "too long", "BadRequestError")
    error = streaming.upstream_error(503, b"<html>Service Unavailable</html>")
    assert error.status == 503 and streaming.may_fail_over(error)
    assert "Service Unavailable" not in error.to_json().decode()
    assert streaming.may_fail_over(errors.UpstreamError("unreachable"))
    assert not streaming.may_fail_over(errors.UpstreamTimeout("slow"))


async def test_relay_case13_disconnect_keeps_input_and_delivered_output() -> None:
    deltas = [data(delta("w")) for _ in range(50)]
    pieces = [*deltas, data(finish()), data(usage(1000, 50)), b"data: [DONE]\n\n"]
    r = streaming.Relay(CHAT, input_estimate=1000)
    received = len(client_events(await r.start(upstream(pieces))))
    stream = r.rest()
    async for piece in stream:
        received += len(client_events(piece))
        if received == 20:
            break
    await stream.aclose()

    record = r.accounting()
    assert record.outcome == "client_cancelled"
    assert record.stream_error == "client_disconnect"
    assert (record.input_tokens, record.output_tokens) == (1000, 20)
    assert record.total_tokens >= 1020


@pytest.mark.parametrize(("prompt", "completion"), [(600, 1), (5, 900)])
async def test_relay_case17_charges_both_sides_of_usage(prompt: int, completion: int) -> None:
    stream = data(delta("x")) + data(finish()) + data(usage(prompt, completion))
    _, record = await relay(CHAT, [stream + b"data: [DONE]\n\n"], input_estimate=10)
    assert record.total_tokens == prompt + completion
    whole = {"choices": [], "usage": usage(prompt, completion)["usage"]}
    charged = streaming.account_response(json.dumps(whole).encode(), input_estimate=10)
    assert charged.total_tokens == prompt + completion


async def test_relay_passes_a_1mib_event_whole() -> None:
    text = "é" * (512 * 1024)
    stream = data(delta(text)) + data(finish()) + b"data: [DONE]\n\n"
    pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    for chunks in (pieces, [stream[:3], stream[3:]], [stream]):
        raw, record = await relay(CHAT, chunks, input_estimate=7)
        assert content(client_events(raw)) == text
        # No usage: the delta counts by its bytes, and the input is the estimate.
        assert (record.input_tokens, record.output_tokens) == (7, 1024 * 1024 // 4)
        assert not record.usage_reported


async def test_relay_refuses_an_event_over_its_limit() -> None:
    huge = data(delta("x" * 5000))
    r = streaming.Relay(CHAT, input_estimate=1, max_event_bytes=4096)
    with pytest.raises(errors.UpstreamError, match="larger than 4096 bytes"):
        await r.start(upstream([huge]))

    raw, record = await relay(CHAT, [data(delta("ok")), huge], max_event_bytes=4096)
    assert client_events(raw)[-1]["error"]["code"] == "upstream_protocol_error"
    assert record.stream_error == "oversized_event" and b"[DONE]" not in raw


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
async def test_relay_reads_crlf_and_cr_streams(newline: bytes) -> None:
    raw, record = await relay_every_way(WITH_USAGE, CASE_1.replace(b"\n", newline))
    assert content(client_events(raw)) == "Héllo"
    assert (record.total_tokens, record.parse_errors) == (7, 0)


async def test_relay_n2_interleaved_choices() -> None:
    stream = (
        data(delta("a", 0))
        + data(delta("b", 1))
        + data(delta("cc", 1))
        + data(finish("stop", 1))
        + data(delta("d", 0))
        + data(finish("length", 0))
    )
    body = {**CHAT, "n": 2}
    raw, record = await relay_every_way(body, stream)
    events = client_events(raw)
    assert len(events) == 7 and events[-1] == "[DONE]"  # closed after both finished
    assert record.output_tokens == 4
    assert record.finish_reasons == ((0, "length"), (1, "stop"))
    assert record.outcome == "truncated"

    # One choice still open when the upstream closes: not a finished answer.
    raw, record = await relay(body, [stream[: stream.index(b"data", 200)]])
    assert "error" in client_events(raw)[-1] and b"[DONE]" not in raw
    assert record.stream_error == "incomplete" and record.outcome == "upstream_error"


async def test_relay_records_length_as_truncated() -> None:
    stream = data(delta("x")) + data(finish("length")) + data(usage(3, 1)) + sse.DONE
    _, record = await relay(CHAT, [stream])
    assert record.outcome == "truncated" and record.stream_error is None


async def failing_upstream(pieces: Sequence[bytes], error: Exception) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    raise error


async def test_relay_ends_a_broken_stream_with_an_error_event() -> None:
    r = streaming.Relay(CHAT, input_estimate=9)
    broken = failing_upstream(
        [data(delta("one")), data(delta("two"))], aiohttp.ClientPayloadError("reset")
    )
    raw = await r.start(broken) + b"".join([piece async for piece in r.rest()])
    events = client_events(raw)
    assert content(events) == "onetwo"
    assert events[-1]["error"]["code"] == "upstream_disconnected"
    assert b"[DONE]" not in raw
    record = r.accounting()
    assert (record.stream_error, record.outcome) == ("disconnect", "upstream_error")
    assert (record.input_tokens, record.output_tokens) == (9, 2)


async def test_relay_before_any_event_raises_so_the_handler_can_fail_over() -> None:
    r = streaming.Relay(CHAT, input_estimate=9)
    with pytest.raises(errors.UpstreamError) as info:
        await r.start(failing_upstream([b": ping\n\n"], ConnectionResetError()))
    assert streaming.may_fail_over(info.value)

    r = streaming.Relay(CHAT, input_estimate=9)
    with pytest.raises(errors.UpstreamError, match="before the answer was complete"):
        await r.start(upstream([b": ping\n\n"]))


async def test_relay_error_event_mid_stream_is_terminal() -> None:
    stream = data(delta("partial")) + b'event: error\ndata: {"error":{"message":"oom"}}\n\n'
    raw, record = await relay(CHAT, [stream + data(delta("never")) + sse.DONE])
    events = client_events(raw)
    assert content(events) == "partial"
    assert events[-1]["error"]["message"] == "oom"
    assert record.stream_error == "upstream_error" and b"[DONE]" not in raw


async def test_relay_eof_inside_an_event_is_incomplete() -> None:
    stream = data(delta("a")) + data(delta("b"))[:20]
    raw, record = await relay(CHAT, [stream])
    events = client_events(raw)
    assert content(events) == "a" and events[-1]["error"]["code"] == "upstream_incomplete"
    assert record.parse_errors == 1 and record.stream_error == "incomplete"


async def test_relay_without_usage_counts_deltas_and_reports_what_it_charges() -> None:
    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}}
    stream = (
        data({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        + data({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]})
        + data({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
        + data(delta("twelve bytes"))
        + data(finish())
        + sse.DONE
    )
    raw, record = await relay_every_way(WITH_USAGE, stream, input_estimate=40)
    assert (record.input_tokens, record.output_tokens, record.usage_reported) == (40, 5, False)
    (carrier,) = with_usage(client_events(raw))
    assert carrier["usage"] == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45}


async def test_relay_times_first_and_last_token_for_ttft_and_tpot() -> None:
    clock = Clock()  # each upstream read advances it by one second
    pieces = [
        b": warming up\n\n",
        data({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        data(delta("a")),
        data(delta("b")),
        data(delta("c")),
        data(finish()),
        data(usage(5, 3)),
        sse.DONE,
    ]
    _, record = await relay(CHAT, pieces, clock=clock)
    assert record.first_token_at == 103.0  # the role chunk and the comment do not count
    assert record.last_token_at == 105.0
    assert record.ttft(arrival=100.0) == 3.0
    assert record.tpot == 1.0  # (105 - 103) / (3 - 1)


async def test_relay_holds_role_chunks_but_not_past_its_bound() -> None:
    role = data({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    r = streaming.Relay(CHAT, input_estimate=1, hold_bytes=len(role) * 3)
    head = await r.start(upstream([b": hi\n\n", role, role, data(delta("x")), sse.DONE]))
    assert client_events(head)[:2] == [json.loads(role[6:])] * 2
    assert b": hi" not in head

    r = streaming.Relay(CHAT, input_estimate=1, hold_bytes=len(role) * 3)
    head = await r.start(upstream([role] * 10))
    assert len(client_events(head)) == 4


async def test_relay_forwards_comments_after_release() -> None:
    raw, _ = await relay(CHAT, [data(delta("a")), b": keepalive\n\n", data(finish()), sse.DONE])
    assert b": keepalive\n\n" in raw


async def stalled(pieces: Sequence[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    await asyncio.sleep(3600)
    yield b""


async def test_relay_enforces_the_first_token_deadline() -> None:
    loop = asyncio.get_running_loop()
    role = data({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    r = streaming.Relay(CHAT, input_estimate=1, first_token_deadline=loop.time() + 0.05)
    with pytest.raises(errors.UpstreamTimeout, match="first-token"):
        await r.start(stalled([role]))
    assert r.accounting().stream_error == "timeout"


async def test_relay_enforces_the_total_deadline_mid_stream() -> None:
    loop = asyncio.get_running_loop()
    r = streaming.Relay(
        CHAT, input_estimate=1, first_token_deadline=loop.time() + 60, deadline=loop.time() + 0.1
    )
    head = await r.start(stalled([data(delta("a"))]))
    rest = [piece async for piece in r.rest()]
    assert client_events(rest[-1])[-1]["error"]["code"] == "upstream_timeout"
    assert content(client_events(head)) == "a"
    assert r.accounting().stream_error == "timeout"


async def test_account_response_reads_usage_or_estimates() -> None:
    answer = {
        "choices": [
            {"index": 0, "message": {"content": "x" * 40}, "finish_reason": "length"},
            {"index": 1, "message": {"content": "hi"}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},
    }
    record = streaming.account_response(json.dumps(answer).encode(), input_estimate=99)
    assert (record.input_tokens, record.output_tokens, record.usage_reported) == (12, 11, True)
    assert record.outcome == "truncated"
    assert record.finish_reasons == ((0, "length"), (1, "stop"))

    del answer["usage"]
    record = streaming.account_response(json.dumps(answer).encode(), input_estimate=99)
    assert (record.input_tokens, record.output_tokens, record.usage_reported) == (99, 11, False)

    embedding = {"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    record = streaming.account_response(json.dumps(embedding).encode(), input_estimate=99)
    assert (record.input_tokens, record.output_tokens) == (8, 0)

    record = streaming.account_response(b'{"truncated', input_estimate=99)
    assert (record.total_tokens, record.parse_errors) == (99, 1)
