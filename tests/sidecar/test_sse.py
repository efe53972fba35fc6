import json

import pytest
from headway_sidecar import sse

STREAM = (
    b": keepalive\n\n"
    b'event: message\nid: 7\ndata: {"a": "H\xc3\xa9llo \xf0\x9f\x98\x80"}\n\n'
    b"data:no-space\r\n\r\n"
    b"data: line one\rdata:  line two\r\rretry: 1500\ndata\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    sse.Event(comment="keepalive"),
    sse.Event(data='{"a": "Héllo 😀"}', event="message", id="7"),
    sse.Event(data="no-space"),
    sse.Event(data="line one\n line two"),
    sse.Event(data="", retry=1500),
    sse.Event(data="[DONE]"),
]


def decode(*chunks: bytes, max_event_bytes: int = sse.DEFAULT_MAX_EVENT_BYTES) -> list[sse.Event]:
    decoder = sse.Decoder(max_event_bytes)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.flush()


async def test_decoder_reads_every_field_kind() -> None:
    assert decode(STREAM) == EXPECTED


async def test_decoder_is_indifferent_to_where_reads_split() -> None:
    for cut in range(len(STREAM) + 1):
        assert decode(STREAM[:cut], STREAM[cut:]) == EXPECTED, cut
    assert decode(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


async def test_decoder_joins_crlf_split_between_reads() -> None:
    # A CR ending one read and an LF starting the next are one line end, not
    # two (which would be a blank line and dispatch "a" alone).
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [sse.Event(data="a\nb")]


async def test_decoder_keeps_multibyte_characters_split_across_reads() -> None:
    body = 'data: {"content": "é中😀"}\n\n'.encode()
    for cut in range(len(body) + 1):
        (event,) = decode(body[:cut], body[cut:])
        assert json.loads(event.data or "")["content"] == "é中😀"


async def test_decoder_handles_an_event_far_above_aiohttp_line_limit() -> None:
    text = "x" * (1024 * 1024)
    body = f'data: {{"content": "{text}"}}\n\n'.encode()
    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)]
    (event,) = decode(*chunks)
    assert json.loads(event.data or "")["content"] == text


async def test_decoder_refuses_an_event_over_its_limit() -> None:
    decoder = sse.Decoder(max_event_bytes=1000)
    assert decoder.feed(b"data: " + b"x" * 900 + b"\n\n") == [sse.Event(data="x" * 900)]
    with pytest.raises(sse.EventTooLarge, match="1000-byte limit"):
        decoder.feed(b"data: " + b"x" * 600 + b"\n" + b"data: " + b"y" * 600 + b"\n")


async def test_decoder_bounds_a_line_that_never_ends() -> None:
    decoder = sse.Decoder(max_event_bytes=4096)
    with pytest.raises(sse.EventTooLarge):
        for _ in range(100):
            decoder.feed(b"data: " + b"z" * 100)


async def test_decoder_does_not_count_comments_against_the_event() -> None:
    decoder = sse.Decoder(max_event_bytes=100)
    events = []
    for _ in range(50):
        events += decoder.feed(b": ping " + b"p" * 50 + b"\n")
    events += decoder.feed(b"data: ok\n\n")
    assert events[-1] == sse.Event(data="ok")
    assert len(events) == 51


async def test_decoder_strips_a_leading_bom_once() -> None:
    assert decode(b"\xef\xbb", b"\xbfdata: a\n\n") == [sse.Event(data="a")]
    assert decode(b"data: \xef\xbb\xbfa\n\n") == [sse.Event(data="\ufeffa")]


async def test_decoder_flush_returns_an_unterminated_event() -> None:
    assert decode(b"data: [DONE]") == [sse.Event(data="[DONE]")]
    assert decode(b'data: {"a":1}\n') == [sse.Event(data='{"a":1}')]
    assert decode(b"data: x\r") == [sse.Event(data="x")]
    assert decode(b"event: error\n") == []


async def test_decoder_replaces_invalid_utf8_rather_than_failing() -> None:
    assert decode(b"data: \xff\xfe\n\n") == [sse.Event(data="\ufffd\ufffd")]


@pytest.mark.parametrize(
    "data", ["plain", "", "two\nlines", "crlf\r\nand cr\rmix", "sep\u2028kept", "\n"]
)
async def test_encoder_round_trips_through_the_decoder(data: str) -> None:
    encoded = sse.encode(data, event="delta", id="3")
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert decode(encoded) == [sse.Event(data=expected, event="delta", id="3")]


async def test_encoder_writes_the_openai_shape() -> None:
    assert sse.encode('{"a":1}') == b'data: {"a":1}\n\n'
    assert sse.encode_json({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse.encode_comment("queued") == b": queued\n\n"
    assert sse.encode_event(sse.Event(comment="k")) == b": k\n\n"
    assert sse.DONE == b"data: [DONE]\n\n"


async def test_encoder_refuses_a_line_break_in_a_field() -> None:
    with pytest.raises(ValueError, match="line break"):
        sse.encode("x", event="a\nb")


async def test_encode_json_escapes_a_lone_surrogate() -> None:
    payload = json.loads('{"content": "\\ud83d"}')
    (event,) = decode(sse.encode_json(payload))
    assert json.loads(event.data or "") == payload
