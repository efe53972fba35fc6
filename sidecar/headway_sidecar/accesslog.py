"""One JSON line per request on the ``headway.access`` logger, and credential redaction.

The line carries only bounded, configured names (route, tenant, class) and
numbers; :class:`RedactingFilter` is a second line of defence that masks
anything shaped like a credential in every record it sees.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from typing import TextIO

logger = logging.getLogger("headway.access")

_MASK = "[REDACTED]"
_CREDENTIALS = (
    # Bearer tokens and basic credentials in header-like text.
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"),
    # "api-key: x", "x-api-key=x", "password": "x", "token": x ...
    re.compile(
        r"(?i)\b(x-api-key|api[-_]?key|authorization|password|passwd|secret|token)"
        r"(\"?'?\s*[:=]\s*\"?'?)(?!\[REDACTED\])[^\s\"',;}]+"
    ),
    # OpenAI-style keys and HMAC digests, wherever they stand.
    re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"),
    re.compile(r"\bhmac-sha256:[A-Za-z0-9_-]+:[0-9a-f]{16,}"),
)


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by a mask."""
    text = _CREDENTIALS[0].sub(lambda m: f"{m.group(1)} {_MASK}", text)
    text = _CREDENTIALS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
    for pattern in _CREDENTIALS[2:]:
        text = pattern.sub(_MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's rendered message; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # NB: access records meet this filter twice (their logger's and their
        # handler's); masking costs ~20 µs a line, so it is done once.
        if getattr(record, "redacted", False):
            return True
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        record.redacted = True
        return True


def install_redaction() -> None:
    """Attach the filter to every root handler, so propagated records pass it too."""
    redacting = RedactingFilter()
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(redacting)


class _AccessHandler(logging.StreamHandler[TextIO]):
    """Writes each access record's message alone: one bare JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(RedactingFilter())


def install_handler(stream: TextIO) -> None:
    """Write access lines to ``stream`` without the root logger's timestamp and level,
    so that a log shipper can parse each line as it is."""
    if any(isinstance(h, _AccessHandler) for h in logger.handlers):
        return
    logger.addHandler(_AccessHandler(stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False


@dataclass(frozen=True, slots=True)
class AccessRecord:
    method: str
    path: str
    route: str
    tenant: str
    priority: str
    status: int
    outcome: str
    stream: bool
    input_tokens: int
    output_tokens: int
    queue_ms: float | None
    ttft_ms: float | None
    duration_ms: float
    backend: str | None  # pool that served, None if never dispatched
    hop: bool  # forwarded here by another pool's sidecar
    request_id: str


_FIELDS = tuple(f.name for f in fields(AccessRecord))


def write(record: AccessRecord) -> None:
    """Log one request; the message is the JSON line, the fields also ride in ``extra``."""
    # Not dataclasses.asdict: it deep-copies every field, 10 µs a request.
    line = {name: getattr(record, name) for name in _FIELDS}
    line["class"] = line.pop("priority")
    for key in ("queue_ms", "ttft_ms", "duration_ms"):
        if line[key] is not None:
            line[key] = round(line[key], 1)
    logger.info("%s", json.dumps(line, sort_keys=True), extra={"access": line})
