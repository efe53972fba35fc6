"""The three custom resources and the Secrets they name, parsed into frozen dataclasses.

The operator gets plain dicts from the API server and ``headway render`` gets raw
YAML that no API server has validated or defaulted, so every field is checked
here and an absent one takes the default of design section 3. An error names the
resource and the field: ``ModelPool default/llama-8b: spec.scaling.minReplicas: ...``.
"""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from headway_contract import (
    CLASSES,
    Backend,
    Capacity,
    Limits,
    Pricing,
    PriorityPolicy,
    QueueSettings,
    QuotaPriority,
    parse_duration,
)
from headway_contract.reading import Reader, shown

API_VERSION = "headway.dev/v1alpha1"
DEFAULT_NAMESPACE = "default"
SCALING_MODES = ("operator", "external")
ON_EXCEEDED = ("reject", "demote")


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one resource, as a user must read it."""

    kind: str
    namespace: str
    name: str
    field: str  # path inside the resource, e.g. "spec.backends[1].pool"
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.field}: {self.message}"


class SpecError(ValueError):
    """A resource that cannot be parsed; ``problem`` says which field and why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Scaling:
    mode: str  # "operator" (default) or "external": an HPA or KEDA owns replicas
    min_replicas: int  # default 1; at least 1, a pool with no sidecar sees no demand
    max_replicas: int  # default 8
    target_queue_per_replica: float  # waiting real-time requests per replica, default 4
    ttft_target: float  # seconds of real-time p95 TTFT before a step up, default 0.8
    scale_up_cooldown: float  # seconds between scale-ups, default 30
    scale_down_delay: float  # seconds of sustained low demand before scaling down, default 300


@dataclass(frozen=True, slots=True)
class NodePool:
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    gpus_per_replica: int  # nvidia.com/gpu limit on the server container, default 1
    warm_replicas: int  # placeholder pods keeping GPU nodes provisioned, default 0


@dataclass(frozen=True, slots=True)
class ModelPool:
    namespace: str
    name: str
    models: tuple[str, ...]
    port: int  # the model server's port inside the pod, default 8000
    template: Mapping[str, Any] | None  # PodTemplateSpec; None in resource files for render
    capacity: Capacity
    scaling: Scaling
    node_pool: NodePool
    pricing: Pricing | None


@dataclass(frozen=True, slots=True)
class InferenceRoute:
    namespace: str
    name: str
    model: str  # what clients send in "model"
    backends: tuple[Backend, ...]
    fallback: tuple[Backend, ...]  # tried in order; weights carry no meaning here
    priority: PriorityPolicy
    default_max_tokens: int  # default 512
    first_token_timeout: float  # seconds, default 30
    total_timeout: float  # seconds, default 600


@dataclass(frozen=True, slots=True)
class TokenQuota:
    namespace: str
    name: str
    tenant: str  # defaults to the quota's name
    secret_name: str | None  # Secret holding the tenant's API keys
    limits: Limits  # an absent limit is no limit
    routes: tuple[str, ...] | None  # InferenceRoute names or models; None: every route
    priority: QuotaPriority
    on_exceeded: str
    fair_share_weight: int

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Secret:
    namespace: str
    name: str
    # (data key, API key) pairs, stripped, empty ones left out; never printed.
    values: tuple[tuple[str, str], ...] = field(repr=False)


# -- reading fields --------------------------------------------------------------------------


class _Reader(Reader):
    """A reader that names the resource in its errors, and reads durations and money."""

    def __init__(self, where: tuple[str, str, str], data: object, path: str) -> None:
        self.where = where  # kind, namespace, name
        super().__init__(data, path)

    def child(self, data: object, path: str) -> _Reader:
        return _Reader(self.where, data, path)

    def fail(self, key: str, value: object, message: str, show: bool = True) -> NoReturn:
        kind, namespace, name = self.where
        path = self.at(key) if key else self.path
        if show:
            message = f"{message} (got {shown(value)})"
        raise SpecError(Problem(kind, namespace, name, path or "<resource>", message))

    def duration(self, key: str, default: str) -> float:
        value = self.raw(key, default)
        if not isinstance(value, str):
            self.fail(key, value, "expected a duration string like 500ms, 30s or 5m")
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = -1.0
        if seconds <= 0:
            self.fail(key, value, "expected a positive duration like 500ms, 30s or 5m")
        return seconds

    def money(self, key: str, default: object = ...) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        # NB: a YAML float has already lost the decimal the user wrote: refuse it.
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.fail(key, value, 'expected a decimal string, quoted in YAML ("0.20")')
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            amount = Decimal(-1)
        if not amount.is_finite() or amount < 0:
            self.fail(key, value, "expected a non-negative decimal amount")
        return amount


def _open(body: object, kind: str, api_version: str) -> tuple[_Reader, _Reader]:
    """The readers of a resource's top level and its ``spec``; checks identity first."""
    meta = body.get("metadata") if isinstance(body, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace") or DEFAULT_NAMESPACE
    where = (kind, str(namespace), str(name) if name else "<unnamed>")
    top = _Reader(where, body, "")
    if not isinstance(name, str) or not name:
        top.fail("metadata.name", name, "is required: a non-empty string")
    if not isinstance(namespace, str):
        top.fail("metadata.namespace", namespace, "expected a string")
    if top.raw("kind", kind) != kind:
        top.fail("kind", top.data["kind"], f"expected {kind}")
    if top.raw("apiVersion", api_version) != api_version:
        top.fail("apiVersion", top.data["apiVersion"], f"expected {api_version}")
    # NB: metadata and status are the API server's; only the spec is read strictly.
    top.seen.update(("metadata", "status"))
    spec = _Reader(where, top.raw("spec", {}), "spec")
    return top, spec


# -- ModelPool -------------------------------------------------------------------------------


def _queue(depth: int, timeout: str) -> Callable[[_Reader], QueueSettings]:
    def parse_one(r: _Reader) -> QueueSettings:
        return QueueSettings(
            max_depth=r.integer("maxDepth", depth, minimum=1),
            timeout=r.duration("timeout", timeout),
        )

    return parse_one


def _capacity(r: _Reader) -> Capacity:
    share = r.number("batchMaxShare", 0.75)
    if share > 1:
        r.fail("batchMaxShare", share, "must be in (0, 1]")
    queues = r.obj("queues")
    capacity = Capacity(
        max_concurrency=r.integer("maxConcurrency", 32, minimum=1),
        batch_max_share=share,
        realtime=queues.sub("realtime", _queue(256, "10s")),
        batch=queues.sub("batch", _queue(4096, "5m")),
    )
    queues.done()
    return capacity


def _scaling(r: _Reader) -> Scaling:
    scaling = Scaling(
        mode=r.text("mode", "operator", choices=SCALING_MODES),
        min_replicas=r.integer("minReplicas", 1, minimum=1),
        max_replicas=r.integer("maxReplicas", 8, minimum=1),
        target_queue_per_replica=r.number("targetQueuePerReplica", 4.0),
        ttft_target=r.duration("ttftTarget", "800ms"),
        scale_up_cooldown=r.duration("scaleUpCooldown", "30s"),
        scale_down_delay=r.duration("scaleDownDelay", "5m"),
    )
    if scaling.max_replicas < scaling.min_replicas:
        r.fail("maxReplicas", scaling.max_replicas, "must not be below minReplicas")
    return scaling


def _node_pool(r: _Reader) -> NodePool:
    selector = r.raw("nodeSelector", {})
    if not isinstance(selector, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        r.fail("nodeSelector", selector, "expected a map of strings to strings")
    tolerations = r.raw("tolerations", [])
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        r.fail("tolerations", tolerations, "expected a list of tolerations")
    return NodePool(
        node_selector=dict(selector),
        tolerations=tuple(copy.deepcopy(dict(t)) for t in tolerations),
        gpus_per_replica=r.integer("gpusPerReplica", 1, minimum=0),
        warm_replicas=r.integer("warmReplicas", 0, minimum=0),
    )


def _pricing(r: _Reader) -> Pricing:
    return Pricing(
        input_per_million=r.money("inputPerMillionTokens"),
        output_per_million=r.money("outputPerMillionTokens"),
        currency=r.text("currency", "USD"),
    )


def _server(r: _Reader) -> tuple[int, Mapping[str, Any] | None]:
    port = r.integer("port", 8000, minimum=1)
    if port > 65535:
        r.fail("port", port, "must be at most 65535")
    template = r.raw("template", None)
    if template is not None and not isinstance(template, Mapping):
        r.fail("template", template, "expected a PodTemplateSpec object")
    return port, None if template is None else copy.deepcopy(dict(template))


def parse_model_pool(body: object) -> ModelPool:
    top, spec = _open(body, "ModelPool", API_VERSION)
    models = spec.texts("models")
    if not models:
        spec.fail("models", [], "needs at least one model name")
    port, template = spec.sub("server", _server)
    pool = ModelPool(
        namespace=top.where[1],
        name=top.where[2],
        models=models,
        port=port,
        template=template,
        capacity=spec.sub("capacity", _capacity),
        scaling=spec.sub("scaling", _scaling),
        node_pool=spec.sub("nodePool", _node_pool),
        pricing=spec.optional("pricing", _pricing),
    )
    spec.done()
    top.done()
    return pool


# -- InferenceRoute --------------------------------------------------------------------------


def _backend(r: _Reader) -> Backend:
    return Backend(
        pool=r.text("pool"), weight=r.integer("weight", 1, minimum=0), model=r.text("model", None)
    )


def _fallback(r: _Reader) -> Backend:
    return Backend(pool=r.text("pool"), weight=1, model=r.text("model", None))


def _route_priority(r: _Reader) -> PriorityPolicy:
    return PriorityPolicy(
        default=r.text("default", "realtime", choices=CLASSES),
        allow_override=r.flag("allowOverride", True),
    )


def _timeouts(r: _Reader) -> tuple[float, float]:
    return r.duration("firstToken", "30s"), r.duration("total", "10m")


def parse_inference_route(body: object) -> InferenceRoute:
    top, spec = _open(body, "InferenceRoute", API_VERSION)
    backends = spec.objects("backends", _backend)
    if not backends:
        spec.fail("backends", [], "needs at least one backend")
    if sum(b.weight for b in backends) <= 0:
        spec.fail("backends", [b.weight for b in backends], "weights must not all be 0")
    first_token, total = spec.sub("timeouts", _timeouts)
    route = InferenceRoute(
        namespace=top.where[1],
        name=top.where[2],
        model=spec.text("model"),
        backends=backends,
        fallback=spec.objects("fallback", _fallback),
        priority=spec.sub("priority", _route_priority),
        default_max_tokens=spec.integer("defaultMaxTokens", 512, minimum=1),
        first_token_timeout=first_token,
        total_timeout=total,
    )
    spec.done()
    top.done()
    return route


# -- TokenQuota ------------------------------------------------------------------------------


def _limits(r: _Reader) -> Limits:
    return Limits(
        tokens_per_minute=r.integer("tokensPerMinute", None, minimum=1),
        requests_per_minute=r.integer("requestsPerMinute", None, minimum=1),
        tokens_per_day=r.integer("tokensPerDay", None, minimum=1),
        concurrent_requests=r.integer("concurrentRequests", None, minimum=1),
        cost_per_month=r.money("costPerMonth", None),
    )


def _quota_priority(r: _Reader) -> QuotaPriority:
    allowed = r.texts("allowed", CLASSES, choices=CLASSES)
    if not allowed:
        r.fail("allowed", [], "needs at least one class")
    default = r.text("default", None, choices=CLASSES)
    if default is not None and default not in allowed:
        r.fail("default", default, "is not one of the allowed classes")
    return QuotaPriority(default=default, allowed=tuple(sorted(set(allowed), key=CLASSES.index)))


def _secret_ref(r: _Reader) -> str:
    ref = r.child(r.raw("secretRef"), r.at("secretRef"))
    name: str = ref.text("name")
    ref.done()
    return name


def parse_token_quota(body: object) -> TokenQuota:
    top, spec = _open(body, "TokenQuota", API_VERSION)
    quota = TokenQuota(
        namespace=top.where[1],
        name=top.where[2],
        tenant=spec.text("tenant", top.where[2]),
        secret_name=spec.optional("apiKeys", _secret_ref),
        limits=spec.sub("limits", _limits),
        routes=spec.texts("routes", None),
        priority=spec.sub("priority", _quota_priority),
        on_exceeded=spec.text("onExceeded", "reject", choices=ON_EXCEEDED),
        fair_share_weight=spec.integer("fairShareWeight", 1, minimum=1),
    )
    spec.done()
    top.done()
    return quota


# -- Secret ----------------------------------------------------------------------------------


def _secret_values(r: _Reader, key: str, decode: bool) -> dict[str, str]:
    entries = r.raw(key, {})
    if not isinstance(entries, Mapping):
        r.fail(key, None, "expected a map of strings", show=False)
    values = {}
    for name, value in entries.items():
        # NB: the values are credentials: errors name the entry, never show it.
        if not isinstance(value, str):
            r.fail(f"{key}.{name}", None, "expected a string", show=False)
        if decode:
            try:
                value = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                r.fail(f"{key}.{name}", None, "is not base64-encoded UTF-8 text", show=False)
        values[str(name)] = value
    return values


def parse_secret(body: object) -> Secret:
    """A Secret whose every value is an API key; ``stringData`` wins over ``data``."""
    top, _ = _open(body, "Secret", "v1")
    values = _secret_values(top, "data", decode=True)
    values.update(_secret_values(top, "stringData", decode=False))
    # Everything else a Secret may carry (type, immutable, ...) says nothing about keys.
    top.seen.update(top.data)
    stripped = ((name, value.strip()) for name, value in sorted(values.items()))
    return Secret(
        namespace=top.where[1],
        name=top.where[2],
        values=tuple((name, value) for name, value in stripped if value),
    )


PARSERS: Mapping[str, Callable[[object], ModelPool | InferenceRoute | TokenQuota | Secret]] = {
    "ModelPool": parse_model_pool,
    "InferenceRoute": parse_inference_route,
    "TokenQuota": parse_token_quota,
    "Secret": parse_secret,
}
