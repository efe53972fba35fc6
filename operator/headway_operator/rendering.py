"""Rendering: parsed resources in, one contract document per ModelPool out.

A pure function shared by the operator and ``headway render``. What cannot be
rendered (a route naming a missing pool, a quota naming a missing Secret, an API
key listed for two tenants) becomes a :class:`~headway_operator.specs.Problem`
and is left out, so the operator keeps serving everything that is valid.
Everything is sorted, so the same resources always give byte-identical JSON.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import headway_contract as contract
from headway_contract import Document, HashingKeys, RedisSettings

from headway_operator.specs import InferenceRoute, ModelPool, Problem, Secret, TokenQuota

# Every pool's sidecars serve on their public port behind the pool's Service.
DEFAULT_POOL_ADDRESS = "http://{pool}.{namespace}.svc.cluster.local:8080"
FAIL_MODES = ("open", "closed")

PoolKey = tuple[str, str]  # (namespace, pool)


@dataclass(frozen=True, slots=True)
class Rendering:
    documents: Mapping[PoolKey, Document]  # each with its version filled in
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class _Namespace:
    """One namespace's resources; documents never look across namespaces."""

    pools: dict[str, ModelPool]
    routes: list[InferenceRoute]
    quotas: list[TokenQuota]
    secrets: dict[str, Secret]


def render(
    pools: Iterable[ModelPool],
    routes: Iterable[InferenceRoute],
    quotas: Iterable[TokenQuota],
    secrets: Iterable[Secret],
    *,
    keys: HashingKeys | Callable[[str], HashingKeys],
    redis: RedisSettings | None = None,
    fail_mode: str = "open",
    generation: int | Callable[[str, str], int] = 1,
    replicas: Mapping[PoolKey, int] | None = None,
    pool_address: str | Callable[[str, str], str] = DEFAULT_POOL_ADDRESS,
) -> Rendering:
    """One document per pool, and the problems found on the way.

    ``keys`` hashes API keys (a callable gives each namespace its own);
    ``generation`` and ``pool_address`` are an int and a template with
    ``{namespace}`` and ``{pool}``, or callables of (namespace, pool).
    ``replicas`` gives live counts; a pool not in it counts ``minReplicas``.
    Raises ValueError for a ``fail_mode`` other than open or closed.
    """
    if fail_mode not in FAIL_MODES:
        raise ValueError(f"fail mode {fail_mode!r} is not one of {', '.join(FAIL_MODES)}")
    limiter = contract.Limiter(redis=redis, fail_mode=fail_mode)
    spaces: dict[str, _Namespace] = defaultdict(lambda: _Namespace({}, [], [], {}))
    for pool in pools:
        spaces[pool.namespace].pools[pool.name] = pool
    for route in routes:
        spaces[route.namespace].routes.append(route)
    for quota in quotas:
        spaces[quota.namespace].quotas.append(quota)
    for secret in secrets:
        spaces[secret.namespace].secrets[secret.name] = secret

    documents: dict[PoolKey, Document] = {}
    problems: list[Problem] = []
    for namespace in sorted(spaces):
        space = spaces[namespace]
        if not space.pools and not space.routes and not space.quotas:
            continue
        hashing = keys(namespace) if callable(keys) else keys
        served = _resolve_routes(space, problems)
        tenants = _resolve_tenants(space, served, hashing, problems)
        for name in sorted(space.pools):
            pool = space.pools[name]
            draft = Document(
                generation=generation(namespace, name) if callable(generation) else generation,
                namespace=namespace,
                pool=name,
                server=contract.Server(port=pool.port, models=pool.models),
                capacity=pool.capacity,
                replicas=(replicas or {}).get((namespace, name), pool.scaling.min_replicas),
                routes=(),
                pools=(),
                tenants=(),
                limiter=limiter,
                pricing=pool.pricing,
            )
            document = _fill(draft, space, served, tenants, pool_address, problems)
            if document is not None:
                documents[namespace, name] = document
    return Rendering(documents=documents, problems=tuple(problems))


def _fill(
    draft: Document,
    space: _Namespace,
    served: Mapping[str, contract.Route],
    tenants: list[contract.Tenant],
    pool_address: str | Callable[[str, str], str],
    problems: list[Problem],
) -> Document | None:
    """The routes reaching the pool, the pools they name, and the tenants using them."""
    reaching = (r for r in served.values() if draft.pool in _pools_of(r))
    routes = tuple(sorted(reaching, key=lambda r: r.model))
    models = {r.model for r in routes}
    named = sorted({pool for route in routes for pool in _pools_of(route)})
    refs = tuple(
        contract.PoolRef(
            name=name,
            address=_address(pool_address, draft.namespace, name),
            pricing=space.pools[name].pricing,
        )
        for name in named
    )
    relevant = []
    for tenant in tenants:
        applying = tuple(q for q in tenant.quotas if any(q.applies_to(m) for m in models))
        if applying:
            relevant.append(replace(tenant, quotas=applying))
    document = replace(draft, routes=routes, pools=refs, tenants=tuple(relevant))

    # The contract checks again what the specs allowed; a refusal here is a gap
    # between the two, reported on the pool instead of shipping a bad document.
    try:
        return contract.parse(contract.to_dict(document))
    except contract.ContractError as e:
        problems.append(
            Problem("ModelPool", draft.namespace, draft.pool, "spec", f"cannot be rendered: {e}")
        )
        return None


def _pools_of(route: contract.Route) -> set[str]:
    return {b.pool for b in route.backends} | {b.pool for b in route.fallback}


def _address(template: str | Callable[[str, str], str], namespace: str, pool: str) -> str:
    if callable(template):
        return template(namespace, pool)
    return template.format(namespace=namespace, pool=pool)


# -- routes ----------------------------------------------------------------------------------


def _resolve_routes(space: _Namespace, problems: list[Problem]) -> dict[str, contract.Route]:
    """Routes as served, by InferenceRoute name; missing pools and taken models left out."""
    by_model: dict[str, InferenceRoute] = {}
    served: dict[str, contract.Route] = {}
    for route in sorted(space.routes, key=lambda r: r.name):
        backends = _existing(route, "backends", route.backends, space, problems)
        fallback = _existing(route, "fallback", route.fallback, space, problems)
        if not backends or sum(b.weight for b in backends) <= 0:
            problems.append(
                _on(
                    route,
                    "spec.backends",
                    "no backend with weight is left; the route is not served",
                )
            )
            continue
        first = by_model.setdefault(route.model, route)
        if first is not route:
            problems.append(
                _on(
                    route,
                    "spec.model",
                    f"{route.model!r} is already served by InferenceRoute "
                    f"{first.namespace}/{first.name}; this route is not served",
                )
            )
            continue
        served[route.name] = contract.Route(
            model=route.model,
            backends=backends,
            fallback=fallback,
            priority=route.priority,
            default_max_tokens=route.default_max_tokens,
            first_token_timeout=route.first_token_timeout,
            total_timeout=route.total_timeout,
        )
    return served


def _existing(
    route: InferenceRoute,
    key: str,
    backends: tuple[contract.Backend, ...],
    space: _Namespace,
    problems: list[Problem],
) -> tuple[contract.Backend, ...]:
    kept = []
    for index, backend in enumerate(backends):
        if backend.pool in space.pools:
            kept.append(backend)
        else:
            problems.append(
                _on(
                    route,
                    f"spec.{key}[{index}].pool",
                    f"names ModelPool {backend.pool!r}, which does not exist in namespace "
                    f"{route.namespace}; left out",
                )
            )
    return tuple(kept)


def _on(resource: InferenceRoute | TokenQuota, path: str, message: str) -> Problem:
    kind = "InferenceRoute" if isinstance(resource, InferenceRoute) else "TokenQuota"
    return Problem(kind, resource.namespace, resource.name, path, message)


# -- tenants ---------------------------------------------------------------------------------


def _resolve_tenants(
    space: _Namespace,
    served: Mapping[str, contract.Route],
    hashing: HashingKeys,
    problems: list[Problem],
) -> list[contract.Tenant]:
    """Tenants by name with their quotas and the hashes of their API keys."""
    quotas = sorted(space.quotas, key=lambda q: q.name)
    keys_of = {q.name: _api_keys(q, space, problems) for q in quotas}
    refused = _shared_keys(quotas, keys_of, problems)

    by_tenant: dict[str, list[TokenQuota]] = defaultdict(list)
    for quota in quotas:
        by_tenant[quota.tenant].append(quota)
    tenants = []
    for name in sorted(by_tenant):
        api_keys = {
            api_key
            for quota in by_tenant[name]
            for _, api_key in keys_of[quota.name]
            if api_key not in refused
        }
        hashes = sorted(
            contract.hash_api_key(key_id, secret, api_key)
            for api_key in api_keys
            for key_id, secret in hashing.keys
        )
        tenants.append(
            contract.Tenant(
                name=name,
                key_hashes=tuple(hashes),
                quotas=tuple(_quota(q, served, problems) for q in by_tenant[name]),
            )
        )
    return tenants


def _api_keys(
    quota: TokenQuota, space: _Namespace, problems: list[Problem]
) -> tuple[tuple[str, str], ...]:
    """(Secret entry, API key) pairs of a quota; a missing Secret gives none."""
    if quota.secret_name is None:
        return ()
    secret = space.secrets.get(quota.secret_name)
    if secret is None:
        problems.append(
            _on(
                quota,
                "spec.apiKeys.secretRef.name",
                f"names Secret {quota.secret_name!r}, which does not exist in namespace "
                f"{quota.namespace}; tenant {quota.tenant!r} gets no API keys from this quota",
            )
        )
        return ()
    return secret.values


def _shared_keys(
    quotas: list[TokenQuota],
    keys_of: Mapping[str, tuple[tuple[str, str], ...]],
    problems: list[Problem],
) -> set[str]:
    """API keys listed for more than one tenant, each reported on every quota involved."""
    holders: dict[str, list[tuple[TokenQuota, str]]] = defaultdict(list)
    for quota in quotas:
        for entry, api_key in keys_of[quota.name]:
            holders[api_key].append((quota, entry))

    refused = set()
    reported: set[tuple[str, str, str]] = set()
    for api_key, held in holders.items():
        if len({quota.tenant for quota, _ in held}) < 2:
            continue
        refused.add(api_key)
        for quota, entry in held:
            for other, _ in held:
                if other.tenant == quota.tenant or (quota.name, other.name, entry) in reported:
                    continue
                reported.add((quota.name, other.name, entry))
                problems.append(
                    _on(
                        quota,
                        "spec.apiKeys.secretRef.name",
                        f"Secret {quota.secret_name!r} entry {entry!r} holds an API key that "
                        f"TokenQuota {other.namespace}/{other.name} (tenant {other.tenant!r}) "
                        f"also lists; refused for tenants {quota.tenant!r} and {other.tenant!r}",
                    )
                )
    return refused


def _quota(
    quota: TokenQuota, served: Mapping[str, contract.Route], problems: list[Problem]
) -> contract.Quota:
    """The contract quota; its routes are given by InferenceRoute name or by model."""
    routes = None
    if quota.routes is not None:
        models = {r.model for r in served.values()}
        matched = set()
        for index, ref in enumerate(quota.routes):
            route = served.get(ref)
            model = route.model if route is not None else ref if ref in models else None
            if model is None:
                problems.append(
                    _on(quota, f"spec.routes[{index}]", f"names no served route {ref!r}")
                )
            else:
                matched.add(model)
        routes = tuple(sorted(matched))
    return contract.Quota(
        id=quota.id,
        limits=quota.limits,
        routes=routes,
        priority=quota.priority,
        on_exceeded=quota.on_exceeded,
        fair_share_weight=quota.fair_share_weight,
    )
