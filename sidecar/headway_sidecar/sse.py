"""Server-sent events on the wire: an incremental decoder and the encoder.

The decoder takes transport-sized chunks (``content.iter_any()``; never
``readline``, whose 128 KiB line limit one large event exceeds) and returns
whole events however reads split lines, events or UTF-8 characters, keeping
at most ``max_event_bytes`` of one event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024  # far above any chunk a model server sends
DONE = b"data: [DONE]\n\n"

# NB: str.splitlines() would also split on U+2028 and friends, which JSON
# strings may carry raw; SSE ends lines with CR, LF or CRLF only.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DATA_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEError(ValueError):
    """The byte stream cannot be decoded as server-sent events."""


class EventTooLarge(SSEError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event exceeded the {limit}-byte limit")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event, or one comment line (``data`` is then None)."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    @property
    def is_comment(self) -> bool:
        return self.data is None


class Decoder:
    """Turns byte chunks into events, following the WHATWG parsing rules.

    Two deliberate departures: a comment is returned as soon as its line ends
    (a proxy forwards keep-alives, the spec drops them), and ``flush()``
    returns an unterminated final event instead of discarding it, so the
    caller can judge whether a stream that ended without its blank line
    still carried a usable event. Not reusable after it raised.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._searched = 0  # bytes of _buffer known to hold no line end
        self._first_line = True
        self._event_bytes = 0  # completed lines of the event being built
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        start = 0
        while True:
            match = _LINE_END.search(self._buffer, self._searched)
            # A CR that ends the buffer may be the first half of a CRLF.
            if match is None or (match.group() == b"\r" and match.end() == len(self._buffer)):
                break
            self._take_line(bytes(self._buffer[start : match.start()]), events)
            start = self._searched = match.end()
        del self._buffer[:start]
        self._searched = len(self._buffer)
        if self._buffer.endswith(b"\r"):
            self._searched -= 1
        if self._event_bytes + len(self._buffer) > self.max_event_bytes:
            raise EventTooLarge(self.max_event_bytes)
        return events

    def flush(self) -> list[Event]:
        """At end of stream: the partial line and pending event, if any."""
        events: list[Event] = []
        if self._buffer:
            self._take_line(bytes(self._buffer.rstrip(b"\r")), events)
            self._buffer.clear()
            self._searched = 0
        self._dispatch(events)
        return events

    def _take_line(self, raw: bytes, events: list[Event]) -> None:
        if self._first_line:
            raw = raw.removeprefix(_BOM)
            self._first_line = False
        if not raw:
            self._dispatch(events)
            return
        # Comments leave at once, so only the event's own lines count.
        size = len(raw) + 1 if raw.startswith(b":") else self._event_bytes + len(raw) + 1
        if size > self.max_event_bytes:
            raise EventTooLarge(self.max_event_bytes)

        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if not name:
            events.append(Event(comment=value))
            return
        self._event_bytes = size
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, events: list[Event]) -> None:
        if self._data:
            events.append(
                Event(data="\n".join(self._data), event=self._event, id=self._id, retry=self._retry)
            )
        self._data = []
        self._event = self._id = None
        self._retry = None
        self._event_bytes = 0


def encode(
    data: str, *, event: str | None = None, id: str | None = None, retry: int | None = None
) -> bytes:
    """One event; multi-line data becomes several ``data:`` lines."""
    lines: list[str] = []
    for field, value in (("event", event), ("id", id)):
        if value is not None:
            if _DATA_LINE_END.search(value):
                raise ValueError(f"an SSE {field} cannot contain a line break: {value!r}")
            lines.append(f"{field}: {value}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    lines.extend(f"data: {part}" for part in _DATA_LINE_END.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def encode_event(event: Event) -> bytes:
    if event.data is None:
        return encode_comment(event.comment or "")
    return encode(event.data, event=event.event, id=event.id, retry=event.retry)


def encode_comment(text: str = "") -> bytes:
    """Comment lines, e.g. the keep-alives sent while a request is queued."""
    return "".join(f": {part}\n" for part in _DATA_LINE_END.split(text)).encode() + b"\n"


def encode_json(payload: object, *, event: str | None = None, id: str | None = None) -> bytes:
    try:
        return encode(
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event=event, id=id
        )
    except UnicodeEncodeError:
        # A lone surrogate (from a "\ud83d" escape) has no UTF-8 form; escaped
        # it stays valid JSON.
        return encode(json.dumps(payload, separators=(",", ":")), event=event, id=id)
