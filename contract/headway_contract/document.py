"""The contract document: frozen dataclasses, parsing and canonical JSON.

Parsing walks the JSON by hand instead of splatting it into constructors, so
an unknown key or a wrong type is refused with the field path and the value.
Durations are seconds (floats), money is a decimal string, tokens are ints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from headway_contract.reading import ContractError, Reader

SCHEMA_VERSION = 1
CLASSES = ("realtime", "batch")
FAIL_MODES = ("open", "closed")
ON_EXCEEDED = ("reject", "demote")


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_depth: int  # waiting requests of this class per replica
    timeout: float  # seconds a request may wait, from arrival


@dataclass(frozen=True, slots=True)
class Capacity:
    max_concurrency: int  # requests in flight to the local model server
    batch_max_share: float  # in (0, 1]: share of slots batch may hold
    realtime: QueueSettings
    batch: QueueSettings

    @property
    def batch_slots(self) -> int:
        return max(1, int(self.max_concurrency * self.batch_max_share))

    def queue(self, priority: str) -> QueueSettings:
        return self.realtime if priority == "realtime" else self.batch


@dataclass(frozen=True, slots=True)
class Server:
    port: int  # the model server's port on localhost
    models: tuple[str, ...]  # names the server accepts in "model"
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Pricing:
    input_per_million: Decimal
    output_per_million: Decimal
    currency: str

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (
            self.input_per_million * input_tokens + self.output_per_million * output_tokens
        ) / 1_000_000


@dataclass(frozen=True, slots=True)
class PoolRef:
    """A pool a route can reach: its Service address and its prices."""

    name: str
    address: str  # base URL of the pool's sidecars, e.g. http://pool.ns.svc:8080
    pricing: Pricing | None


@dataclass(frozen=True, slots=True)
class Backend:
    pool: str
    weight: int
    model: str | None  # model name sent upstream; None keeps the client's


@dataclass(frozen=True, slots=True)
class PriorityPolicy:
    default: str
    allow_override: bool


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    backends: tuple[Backend, ...]
    fallback: tuple[Backend, ...]
    priority: PriorityPolicy
    default_max_tokens: int
    first_token_timeout: float  # seconds from dispatch to the first token
    total_timeout: float  # seconds from arrival to the end


@dataclass(frozen=True, slots=True)
class Limits:
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent_requests: int | None = None
    cost_per_month: Decimal | None = None


@dataclass(frozen=True, slots=True)
class QuotaPriority:
    default: str | None
    allowed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Quota:
    id: str  # "<namespace>/<name>", the Redis hash tag
    limits: Limits
    routes: tuple[str, ...] | None  # None: every route
    priority: QuotaPriority
    on_exceeded: str
    fair_share_weight: int

    def applies_to(self, route: str) -> bool:
        return self.routes is None or route in self.routes


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_hashes: tuple[str, ...]
    quotas: tuple[Quota, ...]


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    password_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


@dataclass(frozen=True, slots=True)
class Limiter:
    redis: RedisSettings | None  # None: in-memory limits on this replica
    fail_mode: str = "open"
    # NB: tens of milliseconds at most, or a frozen Redis delays every request.
    redis_timeout: float = 0.05


@dataclass(frozen=True, slots=True)
class Document:
    generation: int
    namespace: str
    pool: str
    server: Server
    capacity: Capacity
    replicas: int
    routes: tuple[Route, ...]
    pools: tuple[PoolRef, ...]
    tenants: tuple[Tenant, ...]
    limiter: Limiter
    pricing: Pricing | None
    max_body_bytes: int = 34 * 1024 * 1024
    version: str = field(default="", compare=False)

    def route(self, model: str) -> Route | None:
        for route in self.routes:
            if route.model == model:
                return route
        return None

    def pool_ref(self, name: str) -> PoolRef | None:
        for ref in self.pools:
            if ref.name == name:
                return ref
        return None


# -- parsing ---------------------------------------------------------------------------------


class _Reader(Reader):
    def amount(self, key: str, default: object = ...) -> Any:
        """A non-negative decimal written as a string, so no float rounding crept in."""
        value = self.raw(key, default)
        if value is default:
            return value
        try:
            if not isinstance(value, str):
                raise InvalidOperation
            amount = Decimal(value)
        except InvalidOperation:
            self.fail(key, value, "expected a decimal string")
        if not amount.is_finite() or amount < 0:
            self.fail(key, value, "expected a non-negative amount")
        return amount


def _queue(r: _Reader) -> QueueSettings:
    return QueueSettings(max_depth=r.integer("maxDepth", minimum=1), timeout=r.number("timeout"))


def _capacity(r: _Reader) -> Capacity:
    share = r.number("batchMaxShare")
    if share > 1:
        raise ContractError(f"{r.path}.batchMaxShare", share, "must be in (0, 1]")
    queues = r.obj("queues")
    capacity = Capacity(
        max_concurrency=r.integer("maxConcurrency", minimum=1),
        batch_max_share=share,
        realtime=queues.sub("realtime", _queue),
        batch=queues.sub("batch", _queue),
    )
    queues.done()
    return capacity


def _server(r: _Reader) -> Server:
    models = r.texts("models")
    if not models:
        raise ContractError(f"{r.path}.models", [], "needs at least one model")
    return Server(
        port=r.integer("port", minimum=1), models=models, host=r.text("host", default="127.0.0.1")
    )


def _pricing(r: _Reader) -> Pricing:
    return Pricing(
        input_per_million=r.amount("inputPerMillionTokens"),
        output_per_million=r.amount("outputPerMillionTokens"),
        currency=r.text("currency", default="USD"),
    )


def _pool_ref(r: _Reader) -> PoolRef:
    return PoolRef(
        name=r.text("name"), address=r.text("address"), pricing=r.optional("pricing", _pricing)
    )


def _backend(r: _Reader) -> Backend:
    return Backend(
        pool=r.text("pool"),
        weight=r.integer("weight", default=1),
        model=r.text("model", default=None),
    )


def _route(r: _Reader) -> Route:
    backends = r.objects("backends", _backend)
    if not backends:
        raise ContractError(f"{r.path}.backends", [], "needs at least one backend")
    if sum(b.weight for b in backends) <= 0:
        raise ContractError(f"{r.path}.backends", [b.weight for b in backends], "weights sum to 0")
    priority = r.obj("priority")
    policy = PriorityPolicy(
        default=priority.text("default", default="realtime", choices=CLASSES),
        allow_override=priority.flag("allowOverride", default=True),
    )
    priority.done()
    timeouts = r.obj("timeouts")
    route = Route(
        model=r.text("model"),
        backends=backends,
        fallback=r.objects("fallback", _backend),
        priority=policy,
        default_max_tokens=r.integer("defaultMaxTokens", default=512, minimum=1),
        first_token_timeout=timeouts.number("firstToken", default=30.0),
        total_timeout=timeouts.number("total", default=600.0),
    )
    timeouts.done()
    return route


def _limits(r: _Reader) -> Limits:
    return Limits(
        tokens_per_minute=r.integer("tokensPerMinute", default=None, minimum=1),
        requests_per_minute=r.integer("requestsPerMinute", default=None, minimum=1),
        tokens_per_day=r.integer("tokensPerDay", default=None, minimum=1),
        concurrent_requests=r.integer("concurrentRequests", default=None, minimum=1),
        cost_per_month=r.amount("costPerMonth", default=None),
    )


def _quota(r: _Reader) -> Quota:
    priority = r.obj("priority")
    allowed = priority.texts("allowed", default=CLASSES, choices=CLASSES)
    default = priority.text("default", default=None, choices=CLASSES)
    priority.done()
    if default is not None and default not in allowed:
        raise ContractError(f"{r.path}.priority.default", default, "is not an allowed class")
    return Quota(
        id=r.text("id"),
        limits=r.sub("limits", _limits),
        routes=r.texts("routes", default=None),
        priority=QuotaPriority(default=default, allowed=allowed),
        on_exceeded=r.text("onExceeded", default="reject", choices=ON_EXCEEDED),
        fair_share_weight=r.integer("fairShareWeight", default=1, minimum=1),
    )


def _tenant(r: _Reader) -> Tenant:
    return Tenant(
        name=r.text("name"), key_hashes=r.texts("keyHashes"), quotas=r.objects("quotas", _quota)
    )


def _redis(r: _Reader) -> RedisSettings:
    return RedisSettings(
        url=r.text("url"),
        password_file=r.text("passwordFile", default=None),
        tls_ca_file=r.text("tlsCaFile", default=None),
        tls_cert_file=r.text("tlsCertFile", default=None),
        tls_key_file=r.text("tlsKeyFile", default=None),
    )


def _limiter(r: _Reader) -> Limiter:
    return Limiter(
        redis=r.optional("redis", _redis),
        fail_mode=r.text("failMode", default="open", choices=FAIL_MODES),
        redis_timeout=r.number("redisTimeout", default=0.05),
    )


def parse(data: object) -> Document:
    """Build a :class:`Document` from decoded JSON, or raise :class:`ContractError`."""
    r = _Reader(data, "")
    schema = r.raw("schemaVersion")
    if schema != SCHEMA_VERSION:
        raise ContractError(
            "schemaVersion", schema, f"unsupported; this build reads {SCHEMA_VERSION}"
        )
    doc = Document(
        generation=r.integer("generation"),
        namespace=r.text("namespace"),
        pool=r.text("pool"),
        server=r.sub("server", _server),
        capacity=r.sub("capacity", _capacity),
        replicas=r.integer("replicas", default=1, minimum=1),
        routes=r.objects("routes", _route),
        pools=r.objects("pools", _pool_ref),
        tenants=r.objects("tenants", _tenant),
        limiter=r.sub("limiter", _limiter),
        pricing=r.optional("pricing", _pricing),
        max_body_bytes=r.integer("maxBodyBytes", default=34 * 1024 * 1024, minimum=1024),
        version=r.text("version", default=""),
    )
    r.done()
    _check_references(doc)
    expected = version_of(to_dict(doc))
    if doc.version and doc.version != expected:
        raise ContractError("version", doc.version, f"does not match the content ({expected})")
    return _with_version(doc, expected)


def _check_references(doc: Document) -> None:
    known = {ref.name for ref in doc.pools} | {doc.pool}
    for i, route in enumerate(doc.routes):
        for key, backends in (("backends", route.backends), ("fallback", route.fallback)):
            for j, backend in enumerate(backends):
                if backend.pool not in known:
                    path = f"routes[{i}].{key}[{j}].pool"
                    raise ContractError(path, backend.pool, "names no pool in 'pools'")
    seen: dict[str, str] = {}
    for tenant in doc.tenants:
        for key_hash in tenant.key_hashes:
            if seen.setdefault(key_hash, tenant.name) != tenant.name:
                raise ContractError("tenants", tenant.name, "shares an API key with another tenant")


def _with_version(doc: Document, version: str) -> Document:
    from dataclasses import replace

    return replace(doc, version=version)


def loads(text: str | bytes) -> Document:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ContractError("", str(e), "is not valid JSON") from None
    return parse(data)


# -- serialising -----------------------------------------------------------------------------


def _money(amount: Decimal) -> str:
    return format(amount.normalize(), "f") if amount else "0"


def _pricing_dict(p: Pricing | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "inputPerMillionTokens": _money(p.input_per_million),
        "outputPerMillionTokens": _money(p.output_per_million),
        "currency": p.currency,
    }


def _backend_dict(b: Backend) -> dict[str, Any]:
    return {"pool": b.pool, "weight": b.weight, "model": b.model}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def to_dict(doc: Document) -> dict[str, Any]:
    """The JSON form of a document, without its ``version`` field."""
    cap = doc.capacity
    data = {
        "schemaVersion": SCHEMA_VERSION,
        "generation": doc.generation,
        "namespace": doc.namespace,
        "pool": doc.pool,
        "server": {"port": doc.server.port, "models": doc.server.models, "host": doc.server.host},
        "capacity": {
            "maxConcurrency": cap.max_concurrency,
            "batchMaxShare": cap.batch_max_share,
            "queues": {
                c: {"maxDepth": q.max_depth, "timeout": q.timeout}
                for c, q in (("realtime", cap.realtime), ("batch", cap.batch))
            },
        },
        "replicas": doc.replicas,
        "routes": [
            {
                "model": r.model,
                "backends": [_backend_dict(b) for b in r.backends],
                "fallback": [_backend_dict(b) for b in r.fallback],
                "priority": {
                    "default": r.priority.default,
                    "allowOverride": r.priority.allow_override,
                },
                "defaultMaxTokens": r.default_max_tokens,
                "timeouts": {"firstToken": r.first_token_timeout, "total": r.total_timeout},
            }
            for r in doc.routes
        ],
        "pools": [
            {"name": p.name, "address": p.address, "pricing": _pricing_dict(p.pricing)}
            for p in doc.pools
        ],
        "tenants": [
            {
                "name": t.name,
                "keyHashes": sorted(t.key_hashes),
                "quotas": [
                    {
                        "id": q.id,
                        "limits": {
                            "tokensPerMinute": q.limits.tokens_per_minute,
                            "requestsPerMinute": q.limits.requests_per_minute,
                            "tokensPerDay": q.limits.tokens_per_day,
                            "concurrentRequests": q.limits.concurrent_requests,
                            "costPerMonth": _money(q.limits.cost_per_month)
                            if q.limits.cost_per_month is not None
                            else None,
                        },
                        "routes": q.routes,
                        "priority": {"default": q.priority.default, "allowed": q.priority.allowed},
                        "onExceeded": q.on_exceeded,
                        "fairShareWeight": q.fair_share_weight,
                    }
                    for q in t.quotas
                ],
            }
            for t in doc.tenants
        ],
        "limiter": {
            "redis": None
            if doc.limiter.redis is None
            else {
                "url": doc.limiter.redis.url,
                "passwordFile": doc.limiter.redis.password_file,
                "tlsCaFile": doc.limiter.redis.tls_ca_file,
                "tlsCertFile": doc.limiter.redis.tls_cert_file,
                "tlsKeyFile": doc.limiter.redis.tls_key_file,
            },
            "failMode": doc.limiter.fail_mode,
            "redisTimeout": doc.limiter.redis_timeout,
        },
        "pricing": _pricing_dict(doc.pricing),
        "maxBodyBytes": doc.max_body_bytes,
    }
    result: dict[str, Any] = _drop_none(data)
    return result


def _canonical(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def version_of(data: Mapping[str, Any]) -> str:
    """The content hash both sides compare; ignores ``version`` and ``generation``."""
    content = {k: v for k, v in data.items() if k not in ("version", "generation")}
    return "sha256:" + hashlib.sha256(_canonical(content).encode("utf-8")).hexdigest()[:32]


def dumps(doc: Document) -> str:
    """Canonical JSON with the version filled in: sorted keys, no extra whitespace."""
    data = to_dict(doc)
    data["version"] = version_of(data)
    return _canonical(data)
