"""Relaying an upstream OpenAI answer to the client while accounting its tokens.

``prepare_upstream_body`` asks the upstream for usage; ``Relay`` turns the
upstream's SSE bytes into the client's (one usage chunk if asked for, one
``[DONE]``, errors typed before the first byte and as a terminal event after)
and keeps the ``Accounting`` the handler settles and records; ``account_response``
does the same for a non-streaming body. Its class docstring shows the handler's calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from headway_sidecar import errors, estimating, sse

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "truncated", "upstream_error", "client_cancelled"]
# The `kind` label of headway_stream_errors_total.
StreamErrorKind = Literal[
    "disconnect",  # reading the upstream failed (reset, payload error)
    "incomplete",  # the upstream closed before every choice finished
    "upstream_error",  # the upstream sent an error event
    "timeout",  # first-token or total deadline passed
    "oversized_event",  # one event exceeded max_event_bytes
    "client_disconnect",  # the handler stopped reading the relay
]

HOLD_BYTES = 8 * 1024  # held back until the first token, so an early error can be a status
# Without usage, a delta counts one token per this many UTF-8 bytes, and at
# least one: model servers send one token per delta, and longer deltas
# (batched tokens, whole tool-call arguments) count by the usual English average.
BYTES_PER_TOKEN = 4
_JSON_ERRORS = (ValueError, RecursionError)

# Error types seen in OpenAI, Anthropic and vLLM bodies, for bodies whose
# `code` is not an HTTP status.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "BadRequestError": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "overloaded_error": 503,
    "ServiceUnavailableError": 503,
    "api_error": 502,
    "server_error": 502,
    "InternalServerError": 502,
}


@dataclass(frozen=True, slots=True)
class Accounting:
    """What one answer cost and how it went; settle with ``total_tokens``."""

    input_tokens: int  # the upstream's prompt_tokens, else the request's estimate
    output_tokens: int  # the upstream's completion_tokens, else counted deltas
    usage_reported: bool  # both counts came from the upstream's usage
    outcome: Outcome
    stream_error: StreamErrorKind | None = None
    finish_reasons: tuple[tuple[int, str], ...] = ()  # (choice index, reason), by index
    first_token_at: float | None = None  # clock time the first token went to the client
    last_token_at: float | None = None
    parse_errors: int = 0  # data events that were not JSON

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def ttft(self, arrival: float) -> float | None:
        """Seconds from the request's arrival (same clock) to its first token."""
        return None if self.first_token_at is None else self.first_token_at - arrival

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (design section 5, Metrics)."""
        if self.first_token_at is None or self.last_token_at is None or self.output_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.output_tokens - 1)


class UpstreamErrorResponse(errors.UpstreamError):
    """The upstream's own error: a 4xx/5xx answer, or an error event in a 200 stream.

    Keeps the upstream's status, message, type and code, so a client sees the
    error the model server meant (case 7: 400 ``invalid_request_error``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None,
        code: str | None,
        param: str | None,
        payload: object,
    ) -> None:
        super().__init__(message, param=param)
        self.status = status
        if type is not None:
            self.type = type
        elif status == 429:
            self.type = "rate_limit_error"
        elif status < 500:
            self.type = "invalid_request_error"
        if code is not None:
            self.code = code
        self.payload = payload  # the parsed error body, for logs


def upstream_error(status: int | None, payload: object) -> UpstreamErrorResponse:
    """The error an upstream body describes; ``status`` None for an in-stream event.

    ``payload`` is the body (bytes, or already parsed): ``{"error": {...}}``,
    vLLM's ``{"object": "error", ...}``, or anything else.
    """
    if isinstance(payload, bytes | bytearray):
        raw = bytes(payload)
        try:
            payload = json.loads(raw)
        except (*_JSON_ERRORS, UnicodeDecodeError):
            # An HTML page from some proxy says nothing a client can use.
            logger.info("non-JSON error body from the model server: %r", raw[:200])
            payload = None
    detail: Any = payload
    if isinstance(payload, dict) and payload.get("error") is not None:
        detail = payload["error"]
    if isinstance(detail, str):
        detail = {"message": detail}
    if not isinstance(detail, dict):
        detail = {}

    message, kind, code = detail.get("message"), detail.get("type"), detail.get("code")
    if status is None or status < 400:
        status = _status_of(code, kind)
    return UpstreamErrorResponse(
        status,
        message if isinstance(message, str) and message else f"The model server failed ({status}).",
        type=kind if isinstance(kind, str) else None,
        code=code if isinstance(code, str) else None,
        param=detail.get("param") if isinstance(detail.get("param"), str) else None,
        payload=payload,
    )


def _status_of(code: object, kind: object) -> int:
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return 503 if code == 529 else code  # 529: Anthropic's "overloaded"
    return _STATUS_BY_TYPE.get(kind, 502) if isinstance(kind, str) else 502


def may_fail_over(error: errors.HeadwayError) -> bool:
    """Whether another backend may be tried, given that no byte reached the client.

    Connection failures and upstream 5xx (``overloaded_error`` included) may;
    an upstream 4xx would fail the same way anywhere, and a first-token
    timeout already cost a model server its work.
    """
    if isinstance(error, UpstreamErrorResponse):
        return error.status >= 500
    return isinstance(error, errors.UpstreamError) and not isinstance(error, errors.UpstreamTimeout)


def prepare_upstream_body(
    body: Mapping[str, Any], raw: bytes | None = None, *, model: str | None = None
) -> bytes:
    """The body to send upstream: a stream always asks for usage (case 4a).

    ``model`` replaces the client's model name (a backend's own). Without a
    change, ``raw`` (the client's bytes) goes as it came.
    """
    changes: dict[str, Any] = {}
    if model is not None and body.get("model") != model:
        changes["model"] = model
    if body.get("stream") is True:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            changes["stream_options"] = {**options, "include_usage": True}
    if raw is not None and not changes:
        return raw
    return _dumps({**body, **changes})


def account_response(raw: bytes, *, input_estimate: int) -> Accounting:
    """The accounting of a whole (non-streaming) JSON answer."""
    try:
        payload = json.loads(raw)
    except (*_JSON_ERRORS, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        logger.warning("the model server's answer is not a JSON object (%d bytes)", len(raw))
        return Accounting(input_estimate, 0, False, "ok", parse_errors=1)

    choices = [c for c in payload.get("choices") or () if isinstance(c, dict)]
    finished = {
        _index(c): c["finish_reason"] for c in choices if isinstance(c.get("finish_reason"), str)
    }
    usage = _usage_of(payload.get("usage"))
    return Accounting(
        input_tokens=usage[0] if usage else input_estimate,
        output_tokens=usage[1] if usage else sum(_output_tokens(c) for c in choices),
        usage_reported=usage is not None,
        outcome="truncated" if "length" in finished.values() else "ok",
        finish_reasons=tuple(sorted(finished.items())),
    )


class Relay:
    """One upstream SSE answer on its way to the client.

    The handler's part::

        relay = streaming.Relay(body, input_estimate=estimate.input_tokens,
                                first_token_deadline=..., deadline=...)
        try:
            head = await relay.start(upstream.content.iter_any())
        except errors.HeadwayError as e:  # nothing reached the client yet
            ...fail over if streaming.may_fail_over(e), else answer e
        ...prepare the SSE response, write head
        async for piece in relay.rest():
            await response.write(piece)
        ...relay.accounting(), also after an exception or a disconnect

    ``start`` holds the answer until the first token, finish, usage or error
    (or ``hold_bytes`` of role-only chunks): an error before that raises
    ``UpstreamErrorResponse``, ``UpstreamTimeout`` or ``UpstreamError``. After
    it, any failure ends the client's stream with ``data: {"error": ...}`` and
    no ``[DONE]``. Deadlines are ``clock`` times, enforced on every upstream
    read; the first-token one lapses with the first token. Upstream comments
    are forwarded once the answer is released. The caller owns the upstream
    response and closes it.

    Policy: an upstream that closes cleanly after usage or after every
    choice's finish_reason but without ``[DONE]`` gets one appended; the
    usage chunk a client asked for carries the upstream's usage or, when the
    upstream sent none, what is charged (the estimate and counted deltas).
    """

    def __init__(
        self,
        body: Mapping[str, Any],
        *,
        input_estimate: int,
        choices: int | None = None,
        first_token_deadline: float | None = None,
        deadline: float | None = None,
        max_event_bytes: int = sse.DEFAULT_MAX_EVENT_BYTES,
        hold_bytes: int = HOLD_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        options = body.get("stream_options")
        self._include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._choices = max(1, estimating.choice_count(body) if choices is None else choices)
        self._input_estimate = input_estimate
        self._first_token_deadline = first_token_deadline
        self._deadline = deadline
        self._hold_bytes = hold_bytes
        self._clock = clock
        self._decoder = sse.Decoder(max_event_bytes)
        self._upstream: AsyncIterator[bytes] | None = None

        self._out: list[bytes] = []
        self._held = 0
        self._released = False
        self._ended = False
        self._error: StreamErrorKind | None = None
        self._usage: dict[str, Any] | None = None  # the upstream's usage object, as sent
        self._usage_template: dict[str, Any] = {}  # id, model...: for our usage chunk
        self._counted = 0
        self._finished: dict[int, str] = {}
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._parse_errors = 0

    async def start(self, upstream: AsyncIterable[bytes]) -> bytes:
        """The first bytes for the client; raises if the upstream failed before them."""
        if self._upstream is not None:
            raise RuntimeError("a relay starts once")
        self._upstream = aiter(upstream)
        while not (self._released or self._ended):
            await self._pump()
        self._released = True
        return self._take()

    async def rest(self) -> AsyncIterator[bytes]:
        """The remaining bytes, one piece per upstream read, until the stream ends."""
        if not self._released:
            raise RuntimeError("start() the relay first")
        while not self._ended:
            await self._pump()
            if self._out:
                yield self._take()

    def accounting(self) -> Accounting:
        usage = _usage_of(self._usage)
        outcome: Outcome = "ok"
        error = self._error
        if not self._ended:
            outcome, error = "client_cancelled", "client_disconnect"
        elif error is not None:
            outcome = "upstream_error"
        elif "length" in self._finished.values():
            outcome = "truncated"
        return Accounting(
            input_tokens=usage[0] if usage else self._input_estimate,
            output_tokens=usage[1] if usage else self._counted,
            usage_reported=usage is not None,
            outcome=outcome,
            stream_error=error,
            finish_reasons=tuple(sorted(self._finished.items())),
            first_token_at=self._first_token_at,
            last_token_at=self._last_token_at,
            parse_errors=self._parse_errors,
        )

    # -- reading -----------------------------------------------------------------------------

    async def _pump(self) -> None:
        """One upstream read, and everything it completes."""
        assert self._upstream is not None
        limit, first_token = self._next_deadline()
        scope = asyncio.timeout(None if limit is None else max(0.0, limit - self._clock()))
        try:
            async with scope:
                chunk = await anext(self._upstream)
        except StopAsyncIteration:
            self._on_eof()
            return
        except Exception as e:  # any failure to read the upstream ends its stream
            if scope.expired():
                self._fail("timeout", _timed_out(first_token))
            else:
                logger.warning("reading the model server's stream failed: %r", e)
                self._fail(
                    "disconnect",
                    errors.UpstreamError(
                        "The connection to the model server failed mid-answer.",
                        code="upstream_disconnected",
                    ),
                )
            return

        try:
            events = self._decoder.feed(chunk)
        except sse.EventTooLarge as e:
            self._fail("oversized_event", _oversized(e))
            return
        for event in events:
            if self._ended:
                break
            self._on_event(event)

    def _next_deadline(self) -> tuple[float | None, bool]:
        """The deadline of the next read, and whether it is the first-token one."""
        first = self._first_token_deadline
        if (
            self._first_token_at is None
            and first is not None
            and (self._deadline is None or first < self._deadline)
        ):
            return first, True
        return self._deadline, False

    def _on_eof(self) -> None:
        try:
            events = self._decoder.flush()
        except sse.EventTooLarge as e:
            self._fail("oversized_event", _oversized(e))
            return
        for event in events:
            if self._ended:
                return
            # An event cut off by the close is dropped, not forwarded half-written.
            if event.data is not None and not _is_done(event.data) and not _parses(event.data):
                self._parse_errors += 1
                continue
            self._on_event(event)
        if self._ended:
            return
        if self._usage is not None or len(self._finished) >= self._choices:
            self._finish()
            return
        self._fail(
            "incomplete",
            errors.UpstreamError(
                "The model server closed the stream before the answer was complete.",
                code="upstream_incomplete",
            ),
        )

    # -- translating -------------------------------------------------------------------------

    def _on_event(self, event: sse.Event) -> None:
        if event.data is None:
            if self._released:
                self._out.append(sse.encode_event(event))
            return
        if _is_done(event.data):
            self._finish()
            return
        try:
            chunk = json.loads(event.data)
        except _JSON_ERRORS:
            chunk = None
            if event.event != "error":
                self._parse_errors += 1
                logger.warning("the model server sent a data event that is not JSON")
                self._emit(sse.encode_event(event), substantive=True)
                return
        if event.event == "error" or (
            isinstance(chunk, dict)
            and (chunk.get("error") is not None or chunk.get("object") == "error")
        ):
            self._fail("upstream_error", upstream_error(None, chunk or event.data))
        elif isinstance(chunk, dict):
            self._on_chunk(chunk, event)
        else:
            self._parse_errors += 1
            self._emit(sse.encode_event(event), substantive=True)

    def _on_chunk(self, chunk: dict[str, Any], event: sse.Event) -> None:
        changed = substantive = False
        if "usage" in chunk:
            usage = chunk["usage"]
            if _usage_of(usage) is not None:
                self._usage = usage
                self._usage_template = chunk
                substantive = True
            # Exactly one usage chunk reaches a client that asked (case 3), none
            # one that did not (case 4b).
            if not self._include_usage:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
                changed = True
            elif usage is not None:
                chunk = {**chunk, "usage": None}
                changed = True
            if usage is not None and not chunk.get("choices"):
                self._release_if(substantive)
                return

        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            tokens = _output_tokens(choice)
            if tokens:
                self._last_token_at = self._clock()
                if self._first_token_at is None:
                    self._first_token_at = self._last_token_at
                self._counted += tokens
                substantive = True
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finished[_index(choice)] = reason
                substantive = True
        if not self._usage_template:
            self._usage_template = chunk
        data = sse.encode_json(chunk, event=event.event, id=event.id) if changed else None
        self._emit(data or sse.encode_event(event), substantive=substantive)

    def _emit(self, data: bytes, *, substantive: bool) -> None:
        self._out.append(data)
        self._held += len(data)
        self._release_if(substantive)

    def _release_if(self, substantive: bool) -> None:
        if substantive or self._held > self._hold_bytes:
            self._released = True

    def _finish(self) -> None:
        if self._include_usage:
            usage = self._usage
            if _usage_of(usage) is None:
                usage = {
                    "prompt_tokens": self._input_estimate,
                    "completion_tokens": self._counted,
                    "total_tokens": self._input_estimate + self._counted,
                }
            head = {k: v for k, v in self._usage_template.items() if k not in ("choices", "usage")}
            self._out.append(sse.encode_json({**head, "choices": [], "usage": usage}))
        self._out.append(sse.DONE)
        self._ended = True

    def _fail(self, kind: StreamErrorKind, error: errors.HeadwayError) -> None:
        self._error = kind
        self._ended = True
        if not self._released:
            self._out.clear()
            raise error
        logger.warning("the stream to the client ended early (%s): %s", kind, error.message)
        self._out.append(sse.encode_json(error.body()))

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data


def _output_tokens(choice: Mapping[str, Any]) -> int:
    """Tokens a choice (or its delta) carries, by the BYTES_PER_TOKEN rule."""
    texts = [choice["text"]] if _is_text(choice.get("text")) else []
    calls = False
    for key in ("delta", "message"):
        part = choice.get(key)
        if not isinstance(part, dict):
            continue
        texts += [
            part[f] for f in ("content", "reasoning_content", "reasoning") if _is_text(part.get(f))
        ]
        functions = [c.get("function") for c in part.get("tool_calls") or () if isinstance(c, dict)]
        functions.append(part.get("function_call"))
        for function in functions:
            if isinstance(function, dict):
                # A tool call is output even while its name and arguments are empty.
                calls = True
                texts += [function[f] for f in ("name", "arguments") if _is_text(function.get(f))]
    if not texts and not calls:
        return 0
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return max(1, math.ceil(size / BYTES_PER_TOKEN))


def _usage_of(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a usage object, or None if it has no counts."""
    if not isinstance(usage, dict) or not _is_count(usage.get("prompt_tokens")):
        return None
    prompt: int = usage["prompt_tokens"]
    completion, total = usage.get("completion_tokens"), usage.get("total_tokens")
    if _is_count(completion):
        return prompt, completion
    # Embeddings report no completion_tokens; others may give only the total.
    return prompt, max(0, total - prompt) if _is_count(total) else 0


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _index(choice: Mapping[str, Any]) -> int:
    index = choice.get("index")
    return index if _is_count(index) else 0


def _is_done(data: str) -> bool:
    return data.strip() == "[DONE]"


def _parses(data: str) -> bool:
    try:
        json.loads(data)
    except _JSON_ERRORS:
        return False
    return True


def _timed_out(first_token: bool) -> errors.UpstreamTimeout:
    if first_token:
        return errors.UpstreamTimeout(
            "The model server sent no token within the route's first-token timeout."
        )
    return errors.UpstreamTimeout("The request did not finish within the route's total timeout.")


def _oversized(error: sse.EventTooLarge) -> errors.UpstreamError:
    return errors.UpstreamError(
        f"The model server sent an event larger than {error.limit} bytes.",
        code="upstream_protocol_error",
    )


def _dumps(payload: object) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload).encode()
