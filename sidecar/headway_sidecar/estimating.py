"""What a request may cost in tokens, judged from its body alone, before admission.

``estimate()`` is the handler's one call: it validates the fields the limiter
relies on (``InvalidRequest`` naming the field) and returns the input estimate
and the output cap that together make the reservation (design section 5,
"Token-aware limits"). No tokenizer and no network: text counts one token per
UTF-8 byte, an upper bound for byte-level BPE vocabularies in any script.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from headway_sidecar import errors

Endpoint = Literal["chat", "completions", "embeddings"]
ENDPOINTS: Mapping[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}

# Chat templates add tokens the client never wrote. Sized for the templates of
# common open models (Llama 3.x inserts a dated system block, Qwen 2.5 a
# default system prompt, tool use a preamble around the schemas).
REQUEST_OVERHEAD = 64  # BOS, default system text, the assistant header
MESSAGE_OVERHEAD = 8  # role header and end-of-turn markers, per message
TOOLS_OVERHEAD = 256  # tool-use instructions around the JSON schemas
PROMPT_OVERHEAD = 4  # BOS/EOS around each completions prompt or embeddings input
# TODO(#2): a per-pool media token cost in the contract; until then one image,
# audio or file part counts this much, whatever its size (base64 bytes would
# over-count a 100 KB image as 133k tokens, a model may still exceed 4096).
MEDIA_TOKENS = 4096
MAX_CHOICES = 128  # OpenAI's own bound on n


@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int  # upper bound of the prompt, template included
    output_cap: int  # most output tokens the request may produce, all choices
    choices: int  # choices the response carries: n, times prompts for completions

    @property
    def reservation(self) -> int:
        return self.input_tokens + self.output_cap


def estimate(body: object, endpoint: Endpoint, default_max_tokens: int) -> Estimate:
    """Validate ``body`` for ``endpoint`` and size its reservation."""
    checked = validate(body, endpoint)
    return Estimate(
        input_tokens=estimate_input_tokens(checked),
        output_cap=output_cap(checked, default_max_tokens, endpoint),
        choices=choice_count(checked, endpoint),
    )


def estimate_input_tokens(body: Mapping[str, object]) -> int:
    """An upper bound of the input tokens; counts every input field present."""
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        total += REQUEST_OVERHEAD + sum(_message_tokens(m) for m in messages)
    for field in ("tools", "functions"):
        if body.get(field):
            total += TOOLS_OVERHEAD + _json_bytes(body[field])
    for field in ("prompt", "input"):
        if field in body:
            total += sum(PROMPT_OVERHEAD + _prompt_tokens(p) for p in _prompts(body[field]))
    if isinstance(body.get("suffix"), str):
        total += _utf8_len(str(body["suffix"]))
    return total


def output_cap(
    body: Mapping[str, object], default_max_tokens: int, endpoint: Endpoint | None = None
) -> int:
    """Output tokens to reserve, n (and prompts) included; 0 for embeddings.

    Without ``endpoint`` the body's own fields tell (``messages``, ``prompt``,
    ``input``).
    """
    endpoint = endpoint or endpoint_of(body)
    if endpoint == "embeddings":
        return 0
    caps = [body.get("max_tokens"), body.get("max_completion_tokens")]
    per_choice = max((c for c in caps if isinstance(c, int)), default=default_max_tokens)
    # best_of candidates are generated (and billed) even though n are returned.
    best_of = body.get("best_of") if endpoint == "completions" else None
    sequences = max(_int_or(body.get("n"), 1), _int_or(best_of, 1))
    return per_choice * sequences * _prompt_count(body, endpoint)


def choice_count(body: Mapping[str, object], endpoint: Endpoint | None = None) -> int:
    """How many choices the response carries, each with its own finish_reason."""
    endpoint = endpoint or endpoint_of(body)
    if endpoint == "embeddings":
        return 0
    return _int_or(body.get("n"), 1) * _prompt_count(body, endpoint)


def endpoint_of(body: Mapping[str, object]) -> Endpoint:
    """The endpoint a validated body was meant for, judged by its input field."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    return "embeddings" if "input" in body else "chat"


def validate(body: object, endpoint: Endpoint) -> dict[str, object]:
    """The body as a dict, or ``InvalidRequest`` naming the first bad field."""
    if not isinstance(body, dict):
        raise _invalid("", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "'model' must be a non-empty string")
    if endpoint == "chat":
        _check_messages(body.get("messages"))
    elif endpoint == "completions":
        _check_prompt(body.get("prompt"), "prompt")
    else:
        _check_prompt(body.get("input"), "input")

    for field in ("n", "max_tokens", "max_completion_tokens", "best_of"):
        value = body.get(field)
        if value is not None and _int_or(value, 0) < 1:
            raise _invalid(field, f"'{field}' must be a positive integer, got {_shown(value)}")
    if _int_or(body.get("n"), 1) > MAX_CHOICES:
        raise _invalid("n", f"'n' must be at most {MAX_CHOICES}, got {body['n']}")
    if body.get("stream") not in (None, True, False):
        raise _invalid("stream", f"'stream' must be a boolean, got {_shown(body['stream'])}")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid("stream_options", "'stream_options' must be an object")
        if options.get("include_usage") not in (None, True, False):
            raise _invalid(
                "stream_options.include_usage", "'stream_options.include_usage' must be a boolean"
            )
    for field in ("tools", "functions"):
        items = body.get(field)
        if items is not None and (
            not isinstance(items, list) or not all(isinstance(t, dict) for t in items)
        ):
            raise _invalid(field, f"'{field}' must be an array of objects")
    return body


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty array of message objects")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, f"'{where}' must be an object, got {_shown(message)}")
        if not isinstance(message.get("role"), str):
            raise _invalid(f"{where}.role", f"'{where}.role' must be a string")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        ):
            raise _invalid(
                f"{where}.content",
                f"'{where}.content' must be a string or an array of typed content parts",
            )


def _check_prompt(prompt: object, field: str) -> None:
    if prompt is None:
        raise _invalid(field, f"'{field}' is required")
    shapes = "a string, an array of strings, or token arrays"
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise _invalid(field, f"'{field}' must be {shapes}")
    if all(_is_int(t) for t in prompt) or all(isinstance(p, str) for p in prompt):
        return
    if not all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        raise _invalid(field, f"'{field}' must be {shapes}")


def _message_tokens(message: object) -> int:
    if not isinstance(message, dict):
        return MESSAGE_OVERHEAD + _json_bytes(message)
    total = MESSAGE_OVERHEAD
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(value)
        elif key != "role":  # name, tool_calls, tool_call_id...: rendered as text
            total += _json_bytes(value)
    return total


def _content_tokens(content: object) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _utf8_len(content)
    if not isinstance(content, list):
        return _json_bytes(content)
    total = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
            total += _utf8_len(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file", "video_url"):
            total += MEDIA_TOKENS
        else:
            total += _json_bytes(part)
    return total


def _prompts(prompt: object) -> list[object]:
    """One entry per prompt: a string, or a token array."""
    if isinstance(prompt, list) and prompt and not all(_is_int(t) for t in prompt):
        return list(prompt)
    return [prompt]


def _prompt_count(body: Mapping[str, object], endpoint: Endpoint) -> int:
    return len(_prompts(body.get("prompt"))) if endpoint == "completions" else 1


def _prompt_tokens(prompt: object) -> int:
    if isinstance(prompt, str):
        return _utf8_len(prompt)
    if isinstance(prompt, list):
        return len(prompt)  # token ids, counted exactly
    return _json_bytes(prompt)


def _json_bytes(value: object) -> int:
    if isinstance(value, str):
        return _utf8_len(value)
    return _utf8_len(json.dumps(value, ensure_ascii=False))


def _utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _shown(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _invalid(param: str, message: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param or None)
