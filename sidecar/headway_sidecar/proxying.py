"""The public port: every OpenAI call through the sidecar, in the order of design section 5.

:func:`proxy` is the orchestrator: bound and parse the body, authenticate (or
trust a signed hop from another sidecar), resolve route, class and backend,
reserve quota, queue, dispatch with fallbacks, relay, settle, record. Each step
is a small function beside it. A request forwarded here by another pool's
sidecar is served from the local queue only; the forwarding sidecar keeps the
tenant's accounting (requests, tokens, cost), this one the pool's (queue wait, TTFT).
Where an attempt goes is a :class:`Target`, built by :func:`resolve_target`
alone, so a new kind of upstream leaves the queue and the limiter as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import aiohttp
from aiohttp import web
from headway_contract import CLASSES, Backend, Document, Pricing, Quota, Route, Tenant
from multidict import CIMultiDict

from headway_sidecar import (
    accesslog,
    auth,
    configuring,
    errors,
    estimating,
    limiting,
    queueing,
    sse,
    streaming,
)
from headway_sidecar.metrics import (
    NO_ROUTE,
    UNKNOWN_TENANT,
    UNMATCHED_ROUTE,
    Labels,
    Metrics,
    bounded,
)

logger = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

PRIORITY_HEADER = "x-headway-priority"
# Request headers that may reach a model server; credentials never do.
FORWARDED_REQUEST_HEADERS = frozenset(
    {"accept", "user-agent", "x-request-id", "traceparent", "tracestate", "openai-beta"}
)
# Upstream response headers a client may see, besides our own x-ratelimit-*.
FORWARDED_RESPONSE_HEADERS = frozenset(
    {"content-type", "retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms"}
)
_READ_CHUNK = 64 * 1024
# Seconds to open a connection upstream; an unreachable pool must fail over fast.
_CONNECT_TIMEOUT = 3.0
# An upstream error body is relayed, not trusted: read this much of it at most.
_ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Gateway:
    """The long-lived parts the request path uses; one per process."""

    store: configuring.ConfigStore
    metrics: Metrics
    scheduler: queueing.Scheduler
    limiter: limiting.Limiter
    keepalive_interval: float = 5.0  # seconds between ": queued" comments
    forward_headers: frozenset[str] = frozenset()  # extra request headers sent upstream
    _draining: asyncio.Event = field(default_factory=asyncio.Event)

    def begin_drain(self) -> None:
        """Refuse new requests and every queued one (503, retry elsewhere)."""
        self._draining.set()
        self.scheduler.close()

    def is_draining(self) -> bool:
        return self._draining.is_set()


GATEWAY = web.AppKey("gateway", Gateway)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(gateway: Gateway) -> web.Application:
    # NB: bodies are read by read_body under the config's own limit, so
    # aiohttp's client_max_size (1 MiB by default) never applies to them.
    app = web.Application(middlewares=[openai_errors])
    app[GATEWAY] = gateway
    for path in estimating.ENDPOINTS:
        app.router.add_post(path, proxy)
    app.router.add_get("/v1/models", list_models)
    return app


# -- errors ----------------------------------------------------------------------------------


def error_response(error: errors.HeadwayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.to_json(),
        content_type="application/json",
        headers=error.headers(),
    )


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place errors become OpenAI-shaped responses; no traceback reaches a client.

    It also opens the request's :class:`Exchange` and records it once, whatever
    happened, so every request (unknown paths included) gets its access-log line.
    """
    exchange = request[EXCHANGE] = Exchange(
        arrival=time.monotonic(),
        method=request.method,
        path=request.path if request.match_info.route.resource else UNMATCHED_PATH,
        request_id=request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex,
    )
    try:
        return await handler(request)
    except errors.HeadwayError as e:
        exchange.fail(e)
        return error_response(e)
    except ClientGone as gone:
        # Nothing can reach the client any more; aiohttp closes the connection.
        exchange.hung_up()
        return gone.response
    except asyncio.CancelledError:
        exchange.hung_up()
        raise
    except web.HTTPException as e:
        if e.status < 400:
            raise
        failure = _http_error(request, e)
        exchange.fail(failure)
        return error_response(failure)
    except Exception:
        logger.exception("unexpected error serving %s %s", request.method, exchange.path)
        internal = errors.HeadwayError("The sidecar failed to serve this request.")
        exchange.fail(internal)
        return error_response(internal)
    finally:
        record(request.app[GATEWAY].metrics, exchange)


def _http_error(request: web.Request, error: web.HTTPException) -> errors.HeadwayError:
    """aiohttp's routing answers (404, 405...) in OpenAI's words, naming the real path
    (shortened: it is only echoed, never a label)."""
    path = request.path[:_SHOWN_PATH]
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = " or ".join(sorted(error.allowed_methods))
        message = f"{allowed} is required on {path}"
        code = "method_not_allowed"
    elif isinstance(error, web.HTTPNotFound):
        message, code = f"Invalid URL ({request.method} {path})", "unknown_url"
    else:
        message, code = f"{error.reason} ({request.method} {path})", None
    failure = errors.InvalidRequest(message, code=code or error.reason.lower().replace(" ", "_"))
    failure.status = error.status
    return failure


_SHOWN_PATH = 200


# -- the record of one request ---------------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """What one request did, filled in along the way and recorded once at the end."""

    arrival: float
    method: str
    path: str
    request_id: str
    labels: Labels = field(default_factory=Labels)
    hop: bool = False
    stream: bool = False
    status: int = 200
    outcome: str = "ok"
    backend: str | None = None
    local: bool = False  # served from this sidecar's own queue
    input_tokens: int = 0
    output_tokens: int = 0
    queue_wait: float | None = None
    ttft: float | None = None
    tpot: float | None = None
    # The whole answer, its terminal event included, was written to the client.
    delivered: bool = False

    def hung_up(self) -> None:
        """The client left; once it had the whole answer, leaving is no cancel
        (``curl -N`` closes right after ``[DONE]``, before the chunked end)."""
        if not self.delivered:
            self.status, self.outcome = 499, "client_cancelled"

    def fail(self, error: errors.HeadwayError) -> None:
        self.status = error.status
        self.outcome = _outcome(error)


EXCHANGE = web.RequestKey("exchange", Exchange)
# The path logged for requests to no known endpoint: scanners' paths are not kept.
UNMATCHED_PATH = "unmatched"


def _outcome(error: errors.HeadwayError) -> str:
    for kind, outcome in (
        (errors.RateLimited, "rate_limited"),
        (errors.QueueFull, "queue_full"),
        (errors.QueueTimeout, "queue_timeout"),
        (errors.UpstreamTimeout, "upstream_timeout"),
        (errors.UpstreamError, "upstream_error"),
        (errors.Unauthenticated, "unauthenticated"),
        (errors.InvalidRequest, "invalid_request"),
    ):
        if isinstance(error, kind):
            return outcome
    return "unavailable"


def record(metrics: Metrics, exchange: Exchange) -> None:
    labels = exchange.labels
    elapsed = time.monotonic() - exchange.arrival
    if not exchange.hop:
        metrics.requests.labels(
            labels.route, labels.tenant, labels.priority, exchange.outcome
        ).inc()
        metrics.duration.labels(labels.route, labels.priority).observe(elapsed)
    if exchange.queue_wait is not None:
        metrics.queue_wait.labels(labels.priority).observe(exchange.queue_wait)
    # TTFT and TPOT describe this pool, so only requests served from its own queue count.
    if exchange.local and exchange.ttft is not None:
        metrics.ttft.labels(labels.route, labels.priority).observe(exchange.ttft)
    if exchange.local and exchange.tpot is not None:
        metrics.tpot.labels(labels.route, labels.priority).observe(exchange.tpot)
    accesslog.write(
        accesslog.AccessRecord(
            method=exchange.method,
            path=exchange.path,
            route=labels.route,
            tenant=labels.tenant,
            priority=labels.priority,
            status=exchange.status,
            outcome=exchange.outcome,
            stream=exchange.stream,
            input_tokens=exchange.input_tokens,
            output_tokens=exchange.output_tokens,
            queue_ms=None if exchange.queue_wait is None else exchange.queue_wait * 1000,
            ttft_ms=None if exchange.ttft is None else exchange.ttft * 1000,
            duration_ms=elapsed * 1000,
            backend=exchange.backend,
            hop=exchange.hop,
            request_id=exchange.request_id,
        )
    )


# -- the handler -----------------------------------------------------------------------------


async def proxy(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions and /v1/embeddings."""
    return await _proxy(request.app[GATEWAY], request, request[EXCHANGE])


async def _proxy(gateway: Gateway, request: web.Request, exchange: Exchange) -> web.StreamResponse:
    # The config of the moment of arrival serves this request to its end.
    config = gateway.store.current
    document = config.document
    if gateway.is_draining():
        raise errors.ShuttingDown("the sidecar is shutting down", retry_after=1.0)

    # Bound and parse the body before anything else looks at the request.
    raw = await read_body(request, document.max_body_bytes)
    body = parse_body(raw)
    endpoint = estimating.ENDPOINTS[request.path]
    estimating.validate(body, endpoint)
    exchange.stream = endpoint != "embeddings" and body.get("stream") is True
    route = document.route(body["model"])
    exchange.labels = Labels(route=route.model if route else UNMATCHED_ROUTE)

    hop_header = request.headers.get(auth.HOP_HEADER)
    arrival = Arrival(gateway, request, exchange, config, body, raw)
    if hop_header is not None:
        hop = auth.read_hop(config.keys, hop_header, pool=document.pool, body=raw)
        return await _serve_hop(arrival, hop)

    tenant = config.authenticator.tenant(request.headers)
    exchange.labels = Labels(route=exchange.labels.route, tenant=tenant.name)
    quotas = tuple(q for q in tenant.quotas if route is not None and q.applies_to(route.model))
    if route is None or not quotas:
        raise errors.NotFound(
            f"The model {_shown(body['model'])} does not exist or you do not have access to it.",
            param="model",
        )
    priority = choose_class(route, quotas, request.headers.get(PRIORITY_HEADER))
    exchange.labels = Labels(route=route.model, tenant=tenant.name, priority=priority)

    candidates = plan_backends(route)
    estimate = estimating.estimate_input_tokens(body)
    output = estimating.output_cap(body, route.default_max_tokens, endpoint)
    pricing = _pricing(document, candidates[0].pool)
    admission = await _reserve(
        gateway, exchange, tenant, quotas, priority, estimate, output, pricing
    )
    if admission.demoted:
        priority = "batch"
        exchange.labels = Labels(route=route.model, tenant=tenant.name, priority=priority)
        gateway.metrics.demotions.labels(tenant.name).inc()

    call = Call(
        arrival,
        route,
        tenant=tenant.name,
        weight=min(q.fair_share_weight for q in quotas),
        priority=priority,
        estimate=estimate,
        response_headers=dict(admission.headers),
    )
    try:
        return await _run(call, candidates)
    except errors.HeadwayError as e:
        e.extra_headers.update(admission.headers)
        raise
    finally:
        await asyncio.shield(_settle(gateway, admission, call))


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the model names this client may call, one per route."""
    config = request.app[GATEWAY].store.current
    tenant = config.authenticator.tenant(request.headers)
    request[EXCHANGE].labels = Labels(route=NO_ROUTE, tenant=tenant.name)
    # The same routes a request would be served on: no quota, no model.
    data = [
        {"id": route.model, "object": "model", "created": 0, "owned_by": "headway"}
        for route in config.document.routes
        if any(q.applies_to(route.model) for q in tenant.quotas)
    ]
    return web.json_response({"object": "list", "data": data})


# -- steps before dispatch -------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing past ``limit`` bytes without buffering the rest."""
    too_large = errors.BodyTooLarge(
        f"The request body is larger than this gateway accepts ({limit} bytes)."
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in the body, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise errors.InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise errors.InvalidRequest(
            f"The request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})."
        ) from None
    except UnicodeDecodeError:
        raise errors.InvalidRequest("The request body is not valid UTF-8 JSON.") from None
    except (ValueError, RecursionError):
        # NB: json raises a bare ValueError for an integer past Python's digit limit.
        raise errors.InvalidRequest(
            "The request body is not valid JSON: it nests too deeply or holds a number too long."
        ) from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest(
            f"The request body must be a JSON object, not {_json_kind(body)}."
        )
    return body


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _shown(value: object) -> str:
    # Client text goes into messages quoted and cut short, never raw.
    text = json.dumps(value)
    return text if len(text) <= 64 else text[:61] + '..."'


def choose_class(route: Route, quotas: Sequence[Quota], requested: str | None) -> str:
    """The priority class: an allowed override, else the quotas' default, else the route's."""
    if requested is not None:
        wanted = requested.strip().lower()
        if wanted not in CLASSES:
            raise errors.InvalidRequest(
                f"{PRIORITY_HEADER} must be 'realtime' or 'batch', not {_shown(requested)}.",
                param=PRIORITY_HEADER,
            )
        if route.priority.allow_override and all(wanted in q.priority.allowed for q in quotas):
            return wanted

    defaults = {q.priority.default for q in quotas if q.priority.default is not None}
    if len(defaults) > 1:
        chosen = "batch"
    else:
        chosen = defaults.pop() if defaults else route.priority.default
    for quota in quotas:
        if chosen not in quota.priority.allowed:
            raise errors.InvalidRequest(
                f"Priority class '{chosen}' is not allowed by quota {quota.id} "
                f"(allowed: {', '.join(quota.priority.allowed)}).",
                code="priority_not_allowed",
                param=PRIORITY_HEADER,
            )
    return chosen


def plan_backends(route: Route, rng: random.Random | None = None) -> list[Backend]:
    """One backend drawn by weight, then the route's fallbacks in order (each pool once)."""
    chosen = (rng or random).choices(route.backends, [b.weight for b in route.backends])[0]
    plan = [chosen]
    for backend in route.fallback:
        if all(backend.pool != b.pool for b in plan):
            plan.append(backend)
    return plan


def _pricing(document: Document, pool: str) -> Pricing | None:
    ref = document.pool_ref(pool)
    if ref is not None and ref.pricing is not None:
        return ref.pricing
    return document.pricing


async def _reserve(
    gateway: Gateway,
    exchange: Exchange,
    tenant: Tenant,
    quotas: Sequence[Quota],
    priority: str,
    input_tokens: int,
    output_tokens: int,
    pricing: Pricing | None,
) -> limiting.Admission:
    cost = pricing.cost(input_tokens, output_tokens) if pricing else Decimal(0)
    try:
        return await gateway.limiter.reserve(
            quotas, tokens=input_tokens + output_tokens, cost=cost, priority=priority
        )
    except errors.RateLimited as e:
        gateway.metrics.rate_limited.labels(tenant.name, e.limit).inc()
        raise


# -- dispatch --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request as it was read: the same for a client's request and a forwarded one."""

    gateway: Gateway
    request: web.Request
    exchange: Exchange
    config: configuring.Config  # the config of the moment of arrival, to the end
    body: dict[str, Any]
    raw: bytes


@dataclass(slots=True)
class Call:
    """One request on its way upstream: what was decided, and what happened so far."""

    arrival: Arrival
    route: Route
    tenant: str
    weight: int
    priority: str
    estimate: int  # input tokens estimated from the body
    response_headers: dict[str, str]  # x-ratelimit-* from the admission
    hop: bool = False  # forwarded here by another sidecar: local queue only
    reached_upstream: bool = False  # a model server (or sidecar) answered the request
    sent: bool = False  # went to the local model server, answered or not (charged its input)
    client: ClientStream | None = None  # the client's SSE response, once begun

    @property
    def gateway(self) -> Gateway:
        return self.arrival.gateway

    @property
    def exchange(self) -> Exchange:
        return self.arrival.exchange

    @property
    def document(self) -> Document:
        return self.arrival.config.document

    @property
    def deadline(self) -> float:
        """Monotonic time by which the whole request must be over (route ``total``)."""
        return self.exchange.arrival + self.route.total_timeout


@dataclass(frozen=True, slots=True)
class Target:
    """Where one attempt sends the request: URL, body and headers, and whether it queues here.

    The queue and the limiter never look at a target. Another kind of
    upstream (a hosted provider with its own URL, key and model names) is
    one more branch of :func:`resolve_target`; one with another wire format
    also brings its own relay in place of :mod:`streaming`'s.
    """

    pool: str
    url: str
    body: bytes
    headers: dict[str, str]
    local: bool  # served through this sidecar's own queue and model server


class _Failover(Exception):
    """The backend could not take the request and nothing reached the client yet."""

    def __init__(self, reason: str, *, error: errors.HeadwayError, answer: web.Response | None):
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.answer = answer  # the upstream's own answer, relayed if no backend is left


class ClientGone(Exception):
    """Writing to the client failed: it hung up. Nothing more can be sent."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client closed the connection")
        self.response = response


async def _dispatch(call: Call, candidates: Sequence[Backend]) -> web.StreamResponse:
    """Try the chosen backend, then each fallback, until one answers."""
    failure: _Failover | None = None
    for backend in candidates:
        try:
            return await _attempt(call, backend)
        except _Failover as f:
            logger.info("backend %s refused %s: %s", backend.pool, call.exchange.path, f.reason)
            failure = f
    assert failure is not None
    if failure.answer is None:
        raise failure.error
    call.exchange.status, call.exchange.outcome = failure.answer.status, "upstream_error"
    return await _answer_late(call, failure.answer)


def resolve_target(call: Call, backend: Backend) -> Target:
    """The upstream of one backend: the local model server, or another pool's sidecars."""
    document, path = call.document, call.arrival.request.path
    if backend.pool == document.pool:
        server = document.server
        body = streaming.prepare_upstream_body(
            call.arrival.body, call.arrival.raw, model=backend.model
        )
        return Target(
            pool=backend.pool,
            url=f"http://{server.host}:{server.port}{path}",
            body=body,
            headers=_upstream_headers(call, hop=None),
            local=True,
        )

    ref = document.pool_ref(backend.pool)
    if ref is None:  # the contract checks references; a stale config could still miss one
        raise _Failover(
            "pool has no address",
            error=errors.UpstreamError(f"pool {backend.pool} has no address"),
            answer=None,
        )
    # The next sidecar swaps in its own model name; the hop signs these exact bytes.
    body = streaming.prepare_upstream_body(call.arrival.body, call.arrival.raw, model=None)
    hop = auth.new_hop(
        call.arrival.config.keys,
        pool=backend.pool,
        route=call.route.model,
        tenant=call.tenant,
        priority=call.priority,
        body=body,
    )
    return Target(
        pool=backend.pool,
        url=ref.address.rstrip("/") + path,
        body=body,
        headers=_upstream_headers(call, hop=hop),
        local=False,
    )


async def _attempt(call: Call, backend: Backend) -> web.StreamResponse:
    target = resolve_target(call, backend)
    call.exchange.backend = target.pool
    call.exchange.local = target.local
    if not target.local:
        return await _forward(call, target)
    slot = await _acquire(call)
    try:
        return await _forward(call, target)
    finally:
        # NB: also on cancellation, so a client that hangs up frees its slot at once.
        slot.release()


async def _acquire(call: Call) -> queueing.Slot:
    """A local slot; a waiting stream gets ``: queued`` comments meanwhile."""
    gateway, exchange = call.gateway, call.exchange
    queue_deadline = exchange.arrival + call.document.capacity.queue(call.priority).timeout
    acquiring = asyncio.ensure_future(
        gateway.scheduler.acquire(
            priority=call.priority,
            tenant=call.tenant,
            weight=call.weight,
            tokens=call.estimate,
            deadline=min(queue_deadline, call.deadline),
        )
    )
    try:
        while True:
            done, _ = await asyncio.wait({acquiring}, timeout=gateway.keepalive_interval)
            if done:
                slot = acquiring.result()
                break
            if exchange.stream:
                await _begin_stream(call).send_comment("queued")
    except errors.QueueFull as e:
        raise _Failover("queue full", error=e, answer=None) from None
    except BaseException:
        # Cancelled while waiting, or the client hung up: leave the queue now.
        # Handed a slot in the same instant: give it back.
        if not acquiring.done():
            acquiring.cancel()
        elif not acquiring.cancelled() and acquiring.exception() is None:
            acquiring.result().release()
        raise
    exchange.queue_wait = slot.waited
    return slot


def _upstream_headers(call: Call, hop: str | None) -> dict[str, str]:
    allowed = FORWARDED_REQUEST_HEADERS | call.gateway.forward_headers
    headers = {k: v for k, v in call.arrival.request.headers.items() if k.lower() in allowed}
    headers["content-type"] = "application/json"
    headers["accept-encoding"] = "identity"
    headers["x-request-id"] = call.exchange.request_id
    if hop is not None:
        headers[auth.HOP_HEADER] = hop
    return headers


def _response_headers(call: Call, upstream: Mapping[str, str]) -> CIMultiDict[str]:
    headers = CIMultiDict(
        (k, v) for k, v in upstream.items() if k.lower() in FORWARDED_RESPONSE_HEADERS
    )
    headers.update(call.response_headers)
    return headers


def _total_timeout(call: Call) -> errors.UpstreamTimeout:
    return errors.UpstreamTimeout(
        f"The request did not finish within the route's total timeout "
        f"({call.route.total_timeout:g} s)."
    )


async def _forward(call: Call, target: Target) -> web.StreamResponse:
    """Send the request to one upstream and relay its answer, or raise _Failover.

    aiohttp's client errors are translated here and only here.
    """
    dispatched = time.monotonic()
    if dispatched >= call.deadline:
        raise _total_timeout(call)
    # A streaming server answers its headers before the first token, so a
    # server that sends none within the first-token timeout is stuck (a
    # non-streaming one sends them with the whole answer: only `total` applies).
    first_token = dispatched + call.route.first_token_timeout
    headers_by = min(first_token, call.deadline) if call.exchange.stream else call.deadline
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT)
    # NB: loop.time() is time.monotonic(), the clock of every deadline here.
    scope = asyncio.timeout_at(headers_by)
    call.sent = call.sent or target.local
    try:
        async with (
            scope,
            # NB: a BytesIO, not bytes: aiohttp writes it in pieces, yielding to the
            # loop, where bytes over 1 MiB go in one blocking write (and warn).
            call.arrival.request.app[SESSION].post(
                target.url, data=io.BytesIO(target.body), headers=target.headers, timeout=timeout
            ) as upstream,
        ):
            call.reached_upstream = True
            scope.reschedule(call.deadline)
            return await _relay(call, upstream, first_token)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        call.sent = False  # nothing left this sidecar
        raise _Failover(
            f"unreachable: {e}",
            error=errors.UpstreamError("The model server is unreachable."),
            answer=None,
        ) from None
    except TimeoutError:
        if not scope.expired():
            raise
        if not call.reached_upstream and headers_by < call.deadline:
            raise errors.UpstreamTimeout(
                f"The model server sent nothing within the route's first-token timeout "
                f"({call.route.first_token_timeout:g} s)."
            ) from None
        raise _total_timeout(call) from None
    except aiohttp.ClientError as e:
        raise _Failover(
            f"failed: {type(e).__name__}",
            error=errors.UpstreamError("The model server closed the connection."),
            answer=None,
        ) from None


async def _relay(
    call: Call, upstream: aiohttp.ClientResponse, first_token: float
) -> web.StreamResponse:
    if upstream.status >= 400:
        answer = await _relayed_error(call, upstream)
        if upstream.status >= 500 or upstream.status == 429:
            reason = f"answered {upstream.status}"
            raise _Failover(reason, error=_status_error(answer), answer=answer)
        call.exchange.status, call.exchange.outcome = answer.status, "upstream_error"
        return await _answer_late(call, answer)
    if call.exchange.stream:
        return await _relay_stream(call, upstream, first_token)
    return await _relay_whole(call, upstream)


async def _relay_whole(call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
    try:
        raw = await upstream.read()
    except BaseException:
        # The model server read the prompt at least; a later attempt overwrites this.
        call.exchange.input_tokens = call.estimate
        raise
    _account(call, streaming.account_response(raw, input_estimate=call.estimate))
    headers = _response_headers(call, upstream.headers)
    return web.Response(status=upstream.status, body=raw, headers=headers)


async def _relay_stream(
    call: Call, upstream: aiohttp.ClientResponse, first_token: float
) -> web.StreamResponse:
    """Relay an SSE answer; an error before its first token is still a status."""
    relay = streaming.Relay(
        call.arrival.body,
        input_estimate=call.estimate,
        first_token_deadline=first_token,
        deadline=call.deadline,
    )
    finished = False
    try:
        try:
            head = await relay.start(upstream.content.iter_any())
        except errors.HeadwayError as e:
            if streaming.may_fail_over(e):
                raise _Failover(f"stream failed: {e.message}", error=e, answer=None) from None
            raise
        client = _begin_stream(call)
        await client.send(head)
        # NB: closed at once if the client leaves, not whenever it is collected.
        rest = cast(AsyncGenerator[bytes, None], relay.rest())
        async with contextlib.aclosing(rest):
            async for piece in rest:
                await client.send(piece)
        call.exchange.delivered = True
        await client.finish()
        finished = True
        return client.response
    finally:
        _account(call, relay.accounting())
        if not finished:
            # Closing (not releasing) the connection is what makes the model
            # server notice and stop generating for a client that left.
            upstream.close()


def _account(call: Call, accounting: streaming.Accounting) -> None:
    """Copy what the relay measured into the request's record."""
    exchange, metrics = call.exchange, call.gateway.metrics
    exchange.input_tokens = accounting.input_tokens
    exchange.output_tokens = accounting.output_tokens
    exchange.outcome = accounting.outcome
    if accounting.outcome == "client_cancelled":
        exchange.status = 499
    exchange.ttft = accounting.ttft(exchange.arrival)
    exchange.tpot = accounting.tpot
    if accounting.stream_error is not None:
        metrics.stream_errors.labels(accounting.stream_error).inc()
    if accounting.parse_errors:
        metrics.stream_errors.labels("parse_error").inc(accounting.parse_errors)


def _status_error(answer: web.Response) -> errors.HeadwayError:
    error = errors.UpstreamError(f"The model server answered {answer.status}.")
    error.status = answer.status
    return error


async def _relayed_error(call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
    """The upstream's error answer as ours: status and retry headers unchanged, and the
    body too when it is OpenAI-shaped."""
    body = await upstream.content.read(_ERROR_BODY_LIMIT)
    headers = _response_headers(call, upstream.headers)
    error = streaming.upstream_error(upstream.status, body)
    if not (isinstance(error.payload, dict) and isinstance(error.payload.get("error"), dict)):
        # NB: another shape is rebuilt from what it says: a plain-text or HTML
        # body may be the model server's traceback.
        body = error.to_json()
        headers["content-type"] = "application/json"
    return web.Response(status=upstream.status, body=body, headers=headers)


# -- answering the client --------------------------------------------------------------------


class ClientStream:
    """The client's SSE response, begun early when a queued stream needs keep-alives.

    Every write failure becomes :class:`ClientGone`, never an aiohttp client
    error, so it cannot be mistaken for an upstream failure.
    """

    def __init__(self, request: web.Request, headers: Mapping[str, str]) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers=headers)
        self.response.content_type = "text/event-stream"
        self.response.headers["cache-control"] = "no-cache"
        self.sent_data = False  # an event (not only comments) reached the client

    async def _write(self, data: bytes) -> None:
        try:
            if not self.response.prepared:
                await self.response.prepare(self.request)
            if data:
                await self.response.write(data)
        except (ConnectionError, RuntimeError):
            # RuntimeError: aiohttp's "cannot write to closing transport".
            raise ClientGone(self.response) from None

    async def send_comment(self, text: str) -> None:
        await self._write(sse.encode_comment(text))

    async def send(self, data: bytes) -> None:
        await self._write(data)
        if data:
            self.sent_data = True

    async def fail(self, error: errors.HeadwayError) -> None:
        """End the stream with an OpenAI-shaped error event (clients raise on it)."""
        await self.send(sse.encode_json(error.body()))
        await self.finish()

    async def finish(self) -> None:
        await self._write(b"")
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            raise ClientGone(self.response) from None


def _begin_stream(call: Call) -> ClientStream:
    if call.client is None:
        call.client = ClientStream(call.arrival.request, call.response_headers)
    return call.client


async def _answer_late(call: Call, answer: web.Response) -> web.StreamResponse:
    """An error answer as it is, or as an error event if the stream has begun."""
    if call.client is None:
        return answer
    # The status line went out with the first keep-alive comment.
    call.exchange.status = 200
    await call.client.fail(streaming.upstream_error(answer.status, answer.body))
    return call.client.response


async def _run(call: Call, candidates: Sequence[Backend]) -> web.StreamResponse:
    """Dispatch; once the client's stream has begun, failures end it with an error event."""
    try:
        return await _dispatch(call, candidates)
    except errors.HeadwayError as e:
        if call.client is None:
            raise
        call.exchange.fail(e)
        call.exchange.status = 200
        await call.client.fail(e)
        return call.client.response


async def _settle(gateway: Gateway, admission: limiting.Admission, call: Call) -> None:
    """Charge what was used, or refund a request no model server ever saw."""
    exchange = call.exchange
    try:
        if not call.reached_upstream and not call.sent:
            await gateway.limiter.refund(admission)
            return
        if not call.reached_upstream:
            # Sent but never answered (a hang-up, a timeout): a model server
            # answering without streaming sends nothing until it is done, and
            # it read the prompt, so the prompt is charged.
            exchange.input_tokens = call.estimate
        pricing = _pricing(call.document, exchange.backend or call.document.pool)
        cost = pricing.cost(exchange.input_tokens, exchange.output_tokens) if pricing else None
        await gateway.limiter.settle(
            admission,
            tokens=exchange.input_tokens + exchange.output_tokens,
            cost=cost or Decimal(0),
        )
        gateway.metrics.count_tokens(
            exchange.labels,
            input_tokens=exchange.input_tokens,
            output_tokens=exchange.output_tokens,
            cost=cost,
            currency=pricing.currency if pricing else None,
        )
    except Exception:
        # A quota store failure must not turn a served answer into an error.
        logger.exception("settling quota for request %s failed", exchange.request_id)


async def _serve_hop(arrival: Arrival, hop: auth.Hop) -> web.StreamResponse:
    """A request another pool's sidecar authenticated and charged: local queue only."""
    exchange, document = arrival.exchange, arrival.config.document
    route = document.route(hop.route)
    backend = None
    if route is not None:
        backend = next(
            (b for b in (*route.backends, *route.fallback) if b.pool == document.pool), None
        )
    if route is None or backend is None:
        raise errors.NotFound(f"Route {_shown(hop.route)} does not reach this pool.")
    tenant = bounded(hop.tenant, {t.name for t in document.tenants}, UNKNOWN_TENANT)
    exchange.hop = True
    exchange.labels = Labels(route=route.model, tenant=tenant, priority=hop.priority)
    weights = [
        q.fair_share_weight
        for t in document.tenants
        if t.name == hop.tenant
        for q in t.quotas
        if q.applies_to(route.model)
    ]
    call = Call(
        arrival,
        route,
        tenant=tenant,
        weight=min(weights, default=1),
        priority=hop.priority,
        estimate=estimating.estimate_input_tokens(arrival.body),
        response_headers={},
        hop=True,
    )
    return await _run(call, [backend])
