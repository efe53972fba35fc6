"""What the operator knows about the cluster: small frozen entries kept in kopf indexes.

kopf calls the ``*_entry`` functions on every watch event and keeps their
results in in-memory indexes keyed by namespace, so a reconcile reads
everything it needs from memory instead of listing the API. A
:class:`Snapshot` is one namespace's view at one moment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import headway_contract as contract

from headway_operator import children, specs
from headway_operator.specs import InferenceRoute, ModelPool, Problem, Secret, TokenQuota

Parsed = ModelPool | InferenceRoute | TokenQuota


@dataclass(frozen=True, slots=True)
class Entry:
    """One custom resource: parsed, or the problem that kept it from parsing."""

    kind: str
    name: str
    uid: str
    generation: int
    parsed: Parsed | None
    problem: Problem | None
    status: Mapping[str, Any]  # NB: compared: kopf keeps an equal entry and drops the new one


@dataclass(frozen=True, slots=True)
class SecretEntry:
    name: str
    secret: Secret | None  # None when its data is not base64 UTF-8
    owner_uid: str | None  # the controlling owner, for the pools' push-token Secrets


@dataclass(frozen=True, slots=True)
class ChildEntry:
    """A Deployment, Service or ConfigMap carrying the operator's managed-by label."""

    kind: str
    name: str
    resource_version: str
    owner_uid: str | None
    replicas: int | None = None  # Deployments: spec.replicas, the count the autoscaler set
    config: tuple[int, str] | None = None  # ConfigMaps: (generation, version) of the document


@dataclass(frozen=True, slots=True)
class PodEntry:
    name: str
    pool: str
    ip: str | None
    ready: bool
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    namespace: str
    pools: tuple[Entry, ...]
    routes: tuple[Entry, ...]
    quotas: tuple[Entry, ...]
    secrets: Mapping[str, SecretEntry]
    children: Mapping[tuple[str, str], ChildEntry]  # by (kind, name)
    pods: tuple[PodEntry, ...]


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def resource_entry(kind: str, body: Mapping[str, Any]) -> Entry:
    meta = _meta(body)
    parse: Callable[[object], Any] = specs.PARSERS[kind]
    parsed, problem = None, None
    try:
        parsed = parse(body)
    except specs.SpecError as e:
        problem = e.problem
    status = body.get("status")
    return Entry(
        kind=kind,
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        parsed=parsed,
        problem=problem,
        status=status if isinstance(status, Mapping) else {},
    )


def controller_uid(body: Mapping[str, Any]) -> str | None:
    for ref in _meta(body).get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def secret_entry(body: Mapping[str, Any]) -> SecretEntry:
    try:
        secret: Secret | None = specs.parse_secret(body)
    except specs.SpecError:
        secret = None
    return SecretEntry(
        name=str(_meta(body).get("name", "")), secret=secret, owner_uid=controller_uid(body)
    )


def child_entry(kind: str, body: Mapping[str, Any]) -> ChildEntry:
    meta = _meta(body)
    replicas = None
    config = None
    if kind == "Deployment":
        value = (body.get("spec") or {}).get("replicas")
        replicas = value if isinstance(value, int) else None
    if kind == "ConfigMap":
        text = (body.get("data") or {}).get(children.CONFIG_KEY)
        if isinstance(text, str):
            try:
                document = contract.loads(text)
                config = (document.generation, document.version)
            except contract.ContractError:
                config = None
    return ChildEntry(
        kind=kind,
        name=str(meta.get("name", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        owner_uid=controller_uid(body),
        replicas=replicas,
        config=config,
    )


def pod_entry(body: Mapping[str, Any]) -> PodEntry:
    meta = _meta(body)
    status = body.get("status") or {}
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    labels = meta.get("labels") or {}
    # A terminating pod may still answer, but it will not serve for long.
    terminating = meta.get("deletionTimestamp") is not None
    return PodEntry(
        name=str(meta.get("name", "")),
        pool=str(labels.get(children.POOL_LABEL, "")),
        ip=status.get("podIP") or None,
        ready=ready and not terminating,
        labels=dict(labels),
    )
