"""Every error the sidecar answers a client with, and how it looks on the wire.

    HeadwayError                    OpenAI-shaped body; status, type, code
    ├── InvalidRequest              400 malformed JSON, bad field
    │   └── BodyTooLarge            413 request_too_large
    ├── Unauthenticated             401 invalid_api_key
    ├── NotFound                    404 unknown model / route
    ├── RateLimited                 429 rate_limit_exceeded, retry-after
    │   └── NeverFits               429 request_too_large, x-should-retry: false
    ├── Unavailable                 503 (retry-after where known)
    │   ├── QueueFull               503 queue_full
    │   ├── QueueTimeout            503 queue_timeout
    │   ├── ShuttingDown            503 shutting_down
    │   └── LimiterUnavailable      503 rate_limiter_unavailable
    └── UpstreamError               502 upstream_error (or the upstream's own 4xx/5xx)
        └── UpstreamTimeout         504 upstream_timeout

Lower layers raise these; one middleware turns them into responses, so no
traceback ever reaches a client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping


class HeadwayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.extra_headers = dict(headers or {})
        self.param = param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def to_json(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(HeadwayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class Unauthenticated(HeadwayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class RateLimited(HeadwayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    # Which limit refused (tokens_per_minute, ...): a bounded metric label.
    limit = "unknown"


class NeverFits(RateLimited):
    code = "request_too_large"

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        headers.pop("retry-after", None)
        headers["x-should-retry"] = "false"
        return headers


class Unavailable(HeadwayError):
    status = 503
    type = "server_error"
    code = "unavailable"


class QueueFull(Unavailable):
    code = "queue_full"


class QueueTimeout(Unavailable):
    code = "queue_timeout"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class LimiterUnavailable(Unavailable):
    code = "rate_limiter_unavailable"


class UpstreamError(HeadwayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
