"""``headway simulate``: an OpenAI-compatible model server that times itself like a GPU.

It owns the simulated upstream used by the demo, the tests and the benchmarks:
chat, completions and embeddings answered after a time to first token (TTFT)
and a time per output token (TPOT), through ``max_concurrency`` generation slots
behind a FIFO waiting room, with injectable faults and counters for tests.

Tokens. Prompt tokens are the whitespace-separated words of every message's text
(completions and embeddings: of each input; a token-id array counts its ids), so
never more than the UTF-8 bytes the sidecar estimates. Each choice generates
min(output tokens, cap) tokens, cap = ``max_completion_tokens``, else
``max_tokens``; ``finish_reason`` is "length" only when the cap cut the answer
short. Completion tokens are the tokens generated over all choices. A stream
carries usage only with ``stream_options.include_usage``, as a last chunk with
``choices: []``; ``usage=False`` (``--no-usage``) never reports it.

Per-request headers, each overriding the server's setting:
    x-sim-ttft: 0.5 or 500ms      x-sim-tpot: 0.02 or 20ms
    x-sim-output-tokens: 12       x-sim-fault: faults, or "none" for no fault
Faults, comma-separated (``Settings.fault``, ``PUT /sim/fault`` or the header):
    error:<status>[:<s>]  that HTTP status with an OpenAI error body, at once
                          (retry-after and retry-after-ms when <s> is given)
    error-event[:<status>]  HTTP 200 SSE whose first event is ``event: error``
                          with ``{"error": {..., "code": <status>}}`` (500)
    stall:<seconds>       hold a slot this long before the first byte (an error
                          fault then answers after the stall)
    disconnect:<n>        close the connection after n content chunks, no [DONE]
    mid-error:<n>         after n content chunks an ``event: error``, no [DONE]
A fault counted in chunks fires at the end of a shorter answer. Non-streaming
requests get error-event and mid-error as an HTTP error status instead.

Control: ``GET /sim/stats`` (counters, last body and headers received),
``POST /sim/reset``, ``PUT /sim/fault`` with ``{"fault": "<faults>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import secrets
import signal
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, TypeVar

from aiohttp import web
from headway_contract import parse_duration

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024
"""Bytes a request body may have; far above aiohttp's 1 MiB so that long
conversations the sidecar forwards are never refused here."""

_DRAIN = 1.0
"""Seconds answers in progress get to finish after SIGTERM."""

_MAX_CHOICES = 128
_MAX_DIMENSIONS = 4096

_WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
"""The generated text, one word per token, repeated as needed."""

_WORDS_JSON = tuple(json.dumps(word).encode() for word in _WORDS)
_MARK = "\x00"
_MARK_JSON = json.dumps(_MARK)
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
_LISTED_MODEL = "headway-sim"


# --- Settings and faults ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """What goes wrong with a request; the empty value is a healthy server."""

    spec: str = ""
    error_status: int | None = None
    retry_after: float | None = None
    error_event: int | None = None
    stall: float = 0.0
    disconnect_after: int | None = None
    mid_error_after: int | None = None

    @property
    def cut_after(self) -> int | None:
        """Content chunks before the answer breaks off, if it does."""
        if self.disconnect_after is not None:
            return self.disconnect_after
        return self.mid_error_after


@dataclass(frozen=True, slots=True)
class Settings:
    """How the simulated server behaves unless a request's headers say otherwise."""

    ttft: float = 0.2
    """Seconds from the start of generation to the first token (0.2, a short
    prompt's prefill on one GPU)."""
    tpot: float = 0.02
    """Seconds between output tokens (0.02, a mid-sized model's decode step)."""
    output_tokens: int = 64
    """Tokens each choice generates unless the request's cap is lower (64)."""
    max_concurrency: int = 32
    """Requests generating at once; the rest wait in arrival order (32)."""
    usage: bool = True
    """Report usage (on); off mimics servers that never count tokens."""
    models: tuple[str, ...] = ()
    """Model names served; empty (the default) accepts any name."""
    fault: str = ""
    """Faults for every request, in the x-sim-fault syntax (none)."""
    embedding_dimensions: int = 16
    """Length of an embedding when the request sets no ``dimensions`` (16:
    enough to tell inputs apart, small enough to stay cheap)."""

    def __post_init__(self) -> None:
        if self.ttft < 0 or self.tpot < 0:
            raise ValueError("ttft and tpot must not be negative")
        if self.output_tokens < 0:
            raise ValueError("output_tokens must not be negative")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not 1 <= self.embedding_dimensions <= _MAX_DIMENSIONS:
            raise ValueError(f"embedding_dimensions must be 1..{_MAX_DIMENSIONS}")
        parse_faults(self.fault)


def parse_faults(spec: str) -> Faults:
    """The faults in ``spec`` (see the module docstring). Raises ValueError."""
    text = spec.strip()
    if text in ("", "none"):
        return Faults(spec="")
    found: dict[str, Any] = {}
    for part in text.split(","):
        kind, _, arg = part.strip().partition(":")
        if kind in found:
            raise ValueError(f"fault {kind!r} is given twice in {spec!r}")
        found[kind] = _fault_argument(kind, arg, part.strip())
    if "disconnect" in found and "mid-error" in found:
        raise ValueError("choose one of disconnect and mid-error")
    status, retry_after = found.get("error", (None, None))
    return Faults(
        spec=text,
        error_status=status,
        retry_after=retry_after,
        error_event=found.get("error-event"),
        stall=found.get("stall", 0.0),
        disconnect_after=found.get("disconnect"),
        mid_error_after=found.get("mid-error"),
    )


def _fault_argument(kind: str, arg: str, part: str) -> Any:
    try:
        if kind == "error":
            status, _, retry_after = arg.partition(":")
            return _status(status), (_seconds(retry_after) if retry_after else None)
        if kind == "error-event":
            return _status(arg) if arg else 500
        if kind == "stall":
            return _seconds(arg)
        if kind in ("disconnect", "mid-error"):
            count = int(arg)
            if count < 0:
                raise ValueError("a chunk count must not be negative")
            return count
    except ValueError as e:
        raise ValueError(f"bad fault {part!r}: {e}") from None
    raise ValueError(
        f"unknown fault {part!r}; expected error:<status>, error-event, stall:<seconds>, "
        "disconnect:<n> or mid-error:<n>"
    )


def _status(text: str) -> int:
    status = int(text)
    if not 400 <= status <= 599:
        raise ValueError(f"status {status} is not an error status (400-599)")
    return status


def _seconds(text: str) -> float:
    """Plain seconds (``0.5``) or a duration (``500ms``)."""
    try:
        value = float(text)
    except ValueError:
        value = parse_duration(text)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{text!r} is not a time in seconds")
    return value


# --- Slots and counters ----------------------------------------------------


class WaitingRoom:
    """Generation slots with a FIFO queue in front, like a server's scheduler.

    A freed slot passes straight to the oldest waiter, so a newcomer can never
    overtake the queue; a waiter that leaves (its client hung up) leaves at once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0
        self.peak = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.busy < self.capacity and not self._queue:
            self.busy += 1
            self.peak = max(self.peak, self.busy)
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                # NB: handed a slot just as the client left; pass it on.
                self._release()
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(ticket)
            raise

    def _release(self) -> None:
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self.busy -= 1


class StatsJSON(TypedDict):
    received: int
    completed: int
    cancelled: int
    faulted: int
    in_flight: int
    waiting: int
    max_in_flight: int
    fault: str
    last_body: Any
    last_headers: dict[str, str]


@dataclass(slots=True)
class Stats:
    """What tests may assert on: counts per outcome and the last request seen."""

    received: int = 0
    completed: int = 0
    cancelled: int = 0
    faulted: int = 0
    last_body: Any = None
    last_headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Simulator:
    """Everything one simulated server shares between its requests."""

    settings: Settings
    room: WaitingRoom
    fault: Faults
    stats: Stats = field(default_factory=Stats)

    def snapshot(self) -> StatsJSON:
        return {
            "received": self.stats.received,
            "completed": self.stats.completed,
            "cancelled": self.stats.cancelled,
            "faulted": self.stats.faulted,
            "in_flight": self.room.busy,
            "waiting": self.room.waiting,
            "max_in_flight": self.room.peak,
            "fault": self.fault.spec,
            "last_body": self.stats.last_body,
            "last_headers": self.stats.last_headers,
        }


SIMULATOR = web.AppKey("simulator", Simulator)


# --- Errors ----------------------------------------------------------------


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(TypedDict):
    error: ErrorDetail


class Refused(Exception):
    """An answer with an error status; the middleware renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(status, message, code=code, param=param)
        self.headers = dict(headers or {})


def _invalid(message: str, param: str) -> Refused:
    return Refused(400, message, code="invalid_request", param=param)


def _error_body(status: int, message: str, *, code: str | int, param: str | None) -> ErrorBody:
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _fault_error(faults: Faults, status: int) -> Refused:
    headers = {}
    if faults.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(faults.retry_after)))
        headers["retry-after-ms"] = str(round(faults.retry_after * 1000))
    return Refused(status, f"simulated error {status}", code="simulated_fault", headers=headers)


def _error_event(status: int, message: str) -> bytes:
    body = _error_body(status, message, code=status, param=None)
    return b"event: error\ndata: " + _dumps(body) + b"\n\n"


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as e:
        return _json(e.body, status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        body = _error_body(e.status, e.reason, code=e.reason.lower().replace(" ", "_"), param=None)
        return _json(body, status=e.status)


# --- Reading requests ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """The timing, length and faults one request gets."""

    ttft: float
    tpot: float
    output_tokens: int
    faults: Faults


@dataclass(frozen=True, slots=True)
class Generation:
    """A chat or text completion request, as far as the simulator cares."""

    kind: Literal["chat", "text"]
    model: str
    stream: bool
    include_usage: bool
    choices: int
    prompt_tokens: int
    cap: int | None


@dataclass(frozen=True, slots=True)
class Embedding:
    """An embeddings request: one vector per input."""

    model: str
    inputs: tuple[bytes, ...]
    prompt_tokens: int
    dimensions: int
    base64: bool


async def _receive(request: web.Request, sim: Simulator) -> dict[str, Any]:
    """The JSON object in the body, recorded for ``/sim/stats``."""
    sim.stats.received += 1
    sim.stats.last_headers = {name.lower(): value for name, value in request.headers.items()}
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as e:
        sim.stats.last_body = raw.decode(errors="replace")
        raise Refused(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    sim.stats.last_body = body
    if not isinstance(body, dict):
        raise Refused(400, "request body must be a JSON object", code="invalid_json")
    return body


def _plan(request: web.Request, sim: Simulator) -> Plan:
    """The server's settings, overridden by the request's x-sim-* headers."""
    settings, fault = sim.settings, sim.fault
    ttft, tpot, output_tokens = settings.ttft, settings.tpot, settings.output_tokens
    for name, value in request.headers.items():
        name = name.lower()
        if not name.startswith("x-sim-"):
            continue
        try:
            if name == "x-sim-ttft":
                ttft = _seconds(value)
            elif name == "x-sim-tpot":
                tpot = _seconds(value)
            elif name == "x-sim-output-tokens":
                if not value.strip().isdigit():
                    raise ValueError(f"{value!r} is not a whole number")
                output_tokens = int(value)
            elif name == "x-sim-fault":
                fault = parse_faults(value)
        except ValueError as e:
            raise _invalid(f"header {name}: {e}", name) from None
    return Plan(ttft=ttft, tpot=tpot, output_tokens=output_tokens, faults=fault)


def _model(body: Mapping[str, Any], settings: Settings) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' must be a non-empty string", "model")
    if settings.models and model not in settings.models:
        raise Refused(
            404, f"The model {model!r} does not exist", code="model_not_found", param="model"
        )
    return model


def _whole(body: Mapping[str, Any], name: str, lowest: int, highest: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise _invalid(f"'{name}' must be an integer of at least {lowest}, got {value!r}", name)
    if highest is not None and value > highest:
        raise _invalid(f"'{name}' must be at most {highest}, got {value}", name)
    return value


def _streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether to stream, and whether the client asked for a usage chunk."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid(f"'stream' must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid(
            "'stream_options.include_usage' must be a boolean", "stream_options.include_usage"
        )
    return stream, include_usage


def _words(text: str) -> int:
    return len(text.split())


def _content_words(content: Any, where: str) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _words(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                raise _invalid(f"{where} parts must be objects", where)
            text = part.get("text")
            if isinstance(text, str):
                total += _words(text)
        return total
    raise _invalid(f"{where} must be a string, an array of parts or null", where)


def _read_chat(body: dict[str, Any], settings: Settings) -> Generation:
    model = _model(body, settings)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array", "messages")
    prompt_tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages[{i}] must be an object with a string 'role'", "messages")
        prompt_tokens += _content_words(message.get("content"), f"messages[{i}].content")
    cap = _whole(body, "max_completion_tokens", 1, None)
    if cap is None:
        cap = _whole(body, "max_tokens", 1, None)
    stream, include_usage = _streaming(body)
    return Generation(
        kind="chat",
        model=model,
        stream=stream,
        include_usage=include_usage,
        choices=_whole(body, "n", 1, _MAX_CHOICES) or 1,
        prompt_tokens=prompt_tokens,
        cap=cap,
    )


def _inputs(value: Any, name: str) -> list[tuple[bytes, int]]:
    """Each input's identity and its token count: a string, an array of strings,
    an array of token ids or an array of such arrays."""
    if isinstance(value, str):
        return [(value.encode(), _words(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [(json.dumps(value).encode(), len(value))]
        if all(isinstance(v, str) for v in value):
            return [(v.encode(), _words(v)) for v in value]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [(json.dumps(v).encode(), len(v)) for v in value]
    raise _invalid(f"'{name}' must be a string, an array of strings or an array of token ids", name)


def _read_completion(body: dict[str, Any], settings: Settings) -> Generation:
    model = _model(body, settings)
    prompts = _inputs(body.get("prompt"), "prompt")
    stream, include_usage = _streaming(body)
    n = _whole(body, "n", 1, _MAX_CHOICES) or 1
    if len(prompts) * n > _MAX_CHOICES:
        raise _invalid(f"prompts x n must be at most {_MAX_CHOICES}", "n")
    return Generation(
        kind="text",
        model=model,
        stream=stream,
        include_usage=include_usage,
        choices=len(prompts) * n,
        prompt_tokens=sum(tokens for _, tokens in prompts),
        cap=_whole(body, "max_tokens", 1, None),
    )


def _read_embedding(body: dict[str, Any], settings: Settings) -> Embedding:
    model = _model(body, settings)
    inputs = _inputs(body.get("input"), "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _invalid(
            f"'encoding_format' must be float or base64, got {encoding!r}", "encoding_format"
        )
    dimensions = _whole(body, "dimensions", 1, _MAX_DIMENSIONS)
    return Embedding(
        model=model,
        inputs=tuple(identity for identity, _ in inputs),
        prompt_tokens=sum(tokens for _, tokens in inputs),
        dimensions=dimensions or settings.embedding_dimensions,
        base64=encoding == "base64",
    )


# --- Answering -------------------------------------------------------------


Request = TypeVar("Request", Generation, Embedding)


async def _serve(
    request: web.Request,
    read: Callable[[dict[str, Any], Settings], Request],
    respond: Callable[[web.Request, Simulator, Request, Plan], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """The path every generating request takes: read, queue, misbehave, answer."""
    sim = request.app[SIMULATOR]
    body = await _receive(request, sim)
    parsed = read(body, sim.settings)
    plan = _plan(request, sim)
    faults = plan.faults

    # An error without a stall is a server refusing at the door, before any queue.
    if faults.error_status is not None and not faults.stall:
        sim.stats.faulted += 1
        raise _fault_error(faults, faults.error_status)

    try:
        async with sim.room.slot():
            if faults.stall:
                await asyncio.sleep(faults.stall)
            if faults.error_status is not None:
                sim.stats.faulted += 1
                raise _fault_error(faults, faults.error_status)
            return await respond(request, sim, parsed, plan)
    except asyncio.CancelledError:
        sim.stats.cancelled += 1
        raise


def _length(generation: Generation, plan: Plan) -> tuple[int, str]:
    """Tokens per choice and the finish reason."""
    if generation.cap is not None and generation.cap < plan.output_tokens:
        return generation.cap, "length"
    return plan.output_tokens, "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _drop(request: web.Request) -> None:
    """Close the connection under the client, mid-answer."""
    if request.transport is not None:
        request.transport.close()


async def _complete(
    request: web.Request, sim: Simulator, generation: Generation, plan: Plan
) -> web.StreamResponse:
    if generation.stream:
        return await _stream(request, sim, generation, plan)
    return await _answer(request, sim, generation, plan)


async def _answer(
    request: web.Request, sim: Simulator, generation: Generation, plan: Plan
) -> web.StreamResponse:
    """A whole (non-streaming) completion, after the time it takes to generate."""
    tokens, finish_reason = _length(generation, plan)
    faults = plan.faults
    if faults.error_event is not None:
        await asyncio.sleep(plan.ttft)
        sim.stats.faulted += 1
        raise _fault_error(faults, faults.error_event)

    cut = faults.cut_after
    steps = tokens if cut is None else min(tokens, cut)
    await asyncio.sleep(plan.ttft + max(0, steps - 1) * plan.tpot)
    if cut is not None:
        sim.stats.faulted += 1
        if faults.disconnect_after is not None:
            _drop(request)
            return web.Response()
        raise Refused(500, "simulated failure during generation", code="simulated_fault")

    text = "".join(_WORDS[i % len(_WORDS)] for i in range(tokens))
    choices: list[dict[str, Any]] = []
    for index in range(generation.choices):
        if generation.kind == "chat":
            output: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            output = {"text": text}
        choices.append({"index": index, **output, "logprobs": None, "finish_reason": finish_reason})
    answer: dict[str, Any] = {
        "id": _new_id(generation.kind),
        "object": "chat.completion" if generation.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": generation.model,
        "choices": choices,
    }
    if sim.settings.usage:
        answer["usage"] = _usage(generation.prompt_tokens, tokens * generation.choices)
    sim.stats.completed += 1
    return _json(answer)


@dataclass(frozen=True, slots=True)
class Frames:
    """The SSE bytes of one streamed answer, encoded once so that sending a
    token is a lookup, not a JSON encoding."""

    roles: bytes
    words: tuple[tuple[bytes, ...], ...]
    """For each word in ``_WORDS``, one ready chunk per choice."""
    envelope: dict[str, Any]

    def content(self, start: int, stop: int) -> list[bytes]:
        chunks: list[bytes] = []
        for step in range(start, stop):
            chunks.extend(self.words[step % len(self.words)])
        return chunks

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + _dumps({**self.envelope, "choices": choices, **extra}) + b"\n\n"


def _frames(generation: Generation) -> Frames:
    chat = generation.kind == "chat"
    envelope = {
        "id": _new_id(generation.kind),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": generation.model,
    }
    per_choice: list[tuple[bytes, bytes]] = []
    for index in range(generation.choices):
        output = {"delta": {"content": _MARK}} if chat else {"text": _MARK}
        choice = {"index": index, **output, "logprobs": None, "finish_reason": None}
        encoded = _dumps({**envelope, "choices": [choice]}).decode()
        # NB: rpartition, because a model name may itself contain the marker.
        head, _, tail = encoded.rpartition(_MARK_JSON)
        per_choice.append((b"data: " + head.encode(), tail.encode() + b"\n\n"))
    frames = Frames(
        roles=b"",
        words=tuple(tuple(head + word + tail for head, tail in per_choice) for word in _WORDS_JSON),
        envelope=envelope,
    )
    if not chat:
        return frames
    roles = b"".join(
        frames.event(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        for index in range(generation.choices)
    )
    return Frames(roles=roles, words=frames.words, envelope=envelope)


def _finishes(generation: Generation, frames: Frames, finish_reason: str) -> bytes:
    output: dict[str, Any] = {"delta": {}} if generation.kind == "chat" else {"text": ""}
    return b"".join(
        frames.event([{"index": i, **output, "logprobs": None, "finish_reason": finish_reason}])
        for i in range(generation.choices)
    )


async def _stream(
    request: web.Request, sim: Simulator, generation: Generation, plan: Plan
) -> web.StreamResponse:
    """A streamed completion: role, tokens on the TTFT/TPOT clock, finish, usage."""
    tokens, finish_reason = _length(generation, plan)
    faults = plan.faults
    frames = _frames(generation)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await response.prepare(request)
        if faults.error_event is not None:
            sim.stats.faulted += 1
            await response.write(_error_event(faults.error_event, "simulated error event"))
            await response.write_eof()
            return response

        cut = faults.cut_after
        await _send_tokens(response, frames, plan, tokens, cut)
        if cut is not None:
            sim.stats.faulted += 1
            if faults.disconnect_after is not None:
                _drop(request)
            else:
                await response.write(_error_event(500, "simulated failure during generation"))
                await response.write_eof()
            return response

        tail = [_finishes(generation, frames, finish_reason)]
        if generation.include_usage and sim.settings.usage:
            usage = _usage(generation.prompt_tokens, tokens * generation.choices)
            tail.append(frames.event([], usage=usage))
        tail.append(_DONE)
        await response.write(b"".join(tail))
        await response.write_eof()
    except ConnectionResetError:
        sim.stats.cancelled += 1
        return response
    sim.stats.completed += 1
    return response


async def _send_tokens(
    response: web.StreamResponse, frames: Frames, plan: Plan, tokens: int, cut: int | None
) -> None:
    """Write ``tokens`` steps (one chunk per choice each) on the TTFT/TPOT clock,
    stopping after ``cut`` content chunks.

    Steps are due at absolute times, and all the steps due by the time this
    task runs go out in one write: a loaded event loop sends fewer, larger
    writes instead of falling behind the clock.
    """
    loop = asyncio.get_running_loop()
    first = loop.time() + plan.ttft
    await asyncio.sleep(plan.ttft)
    pending = [frames.roles]
    step = written = 0
    while step < tokens and (cut is None or written < cut):
        now = loop.time()
        due = tokens if plan.tpot <= 0 else min(tokens, int((now - first) / plan.tpot) + 1)
        if due <= step:
            await asyncio.sleep(first + step * plan.tpot - now)
            continue
        batch = frames.content(step, due)
        if cut is not None:
            batch = batch[: cut - written]
        pending.extend(batch)
        written += len(batch)
        step = due
        await response.write(b"".join(pending))
        pending.clear()
    if pending and pending[0]:
        await response.write(b"".join(pending))


async def _embed(
    request: web.Request, sim: Simulator, embedding: Embedding, plan: Plan
) -> web.StreamResponse:
    """Deterministic unit vectors (the same input always gets the same one)."""
    faults = plan.faults
    await asyncio.sleep(plan.ttft)
    if faults.disconnect_after is not None:
        sim.stats.faulted += 1
        _drop(request)
        return web.Response()
    if faults.error_event is not None or faults.mid_error_after is not None:
        sim.stats.faulted += 1
        raise _fault_error(faults, faults.error_event or 500)

    data = []
    for index, identity in enumerate(embedding.inputs):
        vector = _vector(identity, embedding.dimensions)
        encoded: list[float] | str = vector
        if embedding.base64:
            packed = struct.pack(f"<{len(vector)}f", *vector)
            encoded = base64.b64encode(packed).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    answer: dict[str, Any] = {"object": "list", "data": data, "model": embedding.model}
    if sim.settings.usage:
        answer["usage"] = {
            "prompt_tokens": embedding.prompt_tokens,
            "total_tokens": embedding.prompt_tokens,
        }
    sim.stats.completed += 1
    return _json(answer)


def _vector(identity: bytes, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(identity).digest(2 * dimensions)
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dimensions}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _new_id(kind: str) -> str:
    prefix = {"chat": "chatcmpl", "text": "cmpl"}[kind]
    return f"{prefix}-{secrets.token_hex(12)}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json(
    value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_dumps(value), status=status, headers=headers, content_type="application/json"
    )


# --- Handlers and the app --------------------------------------------------


async def on_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _read_chat, _complete)


async def on_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _read_completion, _complete)


async def on_embeddings(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _read_embedding, _embed)


async def on_models(request: web.Request) -> web.StreamResponse:
    settings = request.app[SIMULATOR].settings
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "headway"}
        for name in settings.models or (_LISTED_MODEL,)
    ]
    return _json({"object": "list", "data": data})


async def on_health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


async def on_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[SIMULATOR].snapshot())


async def on_reset(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    sim.stats = Stats()
    sim.room.peak = sim.room.busy
    return _json(sim.snapshot())


async def on_fault(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    try:
        body = await request.json()
    except ValueError as e:
        raise Refused(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    spec = body.get("fault") if isinstance(body, dict) else None
    if spec is not None and not isinstance(spec, str):
        raise _invalid("'fault' must be a string or null", "fault")
    try:
        sim.fault = parse_faults(spec or "")
    except ValueError as e:
        raise _invalid(str(e), "fault") from None
    log.info("server-wide fault is now %r", sim.fault.spec or "none")
    return _json({"fault": sim.fault.spec})


def make_app(settings: Settings | None = None) -> web.Application:
    """The simulator as an aiohttp app. Serve it with handler cancellation on
    (aiohttp's test server does), so a client that hangs up frees its slot."""
    settings = settings or Settings()
    app = web.Application(middlewares=[_openai_errors], client_max_size=_MAX_BODY)
    app[SIMULATOR] = Simulator(
        settings=settings,
        room=WaitingRoom(settings.max_concurrency),
        fault=parse_faults(settings.fault),
    )
    app.router.add_post("/v1/chat/completions", on_chat_completions)
    app.router.add_post("/v1/completions", on_completions)
    app.router.add_post("/v1/embeddings", on_embeddings)
    app.router.add_get("/v1/models", on_models)
    app.router.add_get("/health", on_health)
    app.router.add_get("/sim/stats", on_stats)
    app.router.add_post("/sim/reset", on_reset)
    app.router.add_put("/sim/fault", on_fault)
    return app


def run(
    *,
    listen: tuple[str, int],
    ttft: float,
    tpot: float,
    output_tokens: int,
    max_concurrency: int,
    usage: bool,
) -> int:
    """Serve until SIGTERM or SIGINT; 0 then, 1 if the address is unusable, 2 on bad settings."""
    try:
        settings = Settings(
            ttft=ttft,
            tpot=tpot,
            output_tokens=output_tokens,
            max_concurrency=max_concurrency,
            usage=usage,
        )
    except ValueError as e:
        log.error("headway simulate: %s", e)
        return 2
    return asyncio.run(_listen(make_app(settings), listen))


async def _listen(app: web.Application, listen: tuple[str, int]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    # Handler cancellation is what frees a slot the moment a client hangs up.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=_DRAIN)
    await runner.setup()
    try:
        # A deep backlog, because benchmarks open a thousand streams at once.
        site = web.TCPSite(runner, listen[0], listen[1], backlog=4096)
        try:
            await site.start()
        except OSError as e:
            log.error("headway simulate: cannot listen on %s:%d: %s", *listen, e)
            return 1
        for address in runner.addresses:
            log.info("simulated model server listening on http://%s:%d", address[0], address[1])
        await stop.wait()
        log.info("stopping the simulated model server")
    finally:
        await runner.cleanup()
    return 0
