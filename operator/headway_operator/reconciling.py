"""The reconcile: one namespace at a time, from the indexes to children, config and status.

Level-triggered on purpose. kopf's handlers only mark a namespace dirty;
:meth:`Reconciler.run` is the one loop that renders every pool of a dirty
namespace with :func:`rendering.render`, applies the owned children with
server-side apply, pushes configs to ready pods, and applies statuses. Because
every step compares desired with observed state, a restart, a lost watch event
or a crash half-way through is repaired by the next pass, and nothing needs a
finalizer. :meth:`Reconciler.reconcile` is the orchestrator; each step is a
method of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import headway_contract as contract
from headway_contract import Document, HashingKeys, RedisSettings

from headway_operator import children, kubeapi, observing, pushing, rendering, statuses, usage
from headway_operator.children import SidecarSettings
from headway_operator.kubeapi import ApiError, Resource
from headway_operator.observing import Entry, Snapshot
from headway_operator.specs import InferenceRoute, ModelPool, Problem, TokenQuota
from headway_operator.statuses import FALSE, TRUE, UNKNOWN, Condition

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Options:
    """Operator settings beyond kopf's; ``headway operator`` flags and chart values set them."""

    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    redis: RedisSettings | None = None  # None: each sidecar limits in memory
    usage_redis: RedisSettings | None = None  # the same Redis, with the operator's file paths
    fail_mode: str = "open"  # what sidecars do while Redis is unreachable
    sync_interval: float = 10.0  # seconds between version checks of every ready pod
    push_timeout: float = 5.0  # seconds for one GET or PUT /config to one pod
    placeholder_priority_class: str | None = None  # for warm placeholders; None: autoscaler's
    api_timeout: float = 30.0  # seconds for one API request; a dead connection costs this much
    debounce: float = 0.2  # seconds to gather a burst of events (kubectl apply -f dir/)
    retry_delay: float = 5.0  # seconds before a failed namespace is tried again
    usage_interval: float = 15.0  # seconds between reads of TokenQuota usage from Redis


class Conflict(Exception):
    """An object with a child's name exists and belongs to someone else; never taken over."""


@dataclass
class _PoolResult:
    """What the pool step learned, for its status."""

    document: Document | None = None
    refused: list[str] = field(default_factory=list)
    conflict: str = ""
    rejected: str = ""  # the API server's refusal of a child, e.g. an invalid template field
    ready: int = 0
    total: int = 0
    synced: int = 0
    errors: list[str] = field(default_factory=list)


class Reconciler:
    """Holds what a pass cannot read from the cluster: write caches and push state."""

    def __init__(
        self,
        options: Options,
        api: kubeapi.Client,
        session: aiohttp.ClientSession,
        snapshot: Callable[[str], Snapshot],
    ) -> None:
        self.options = options
        self._api = api
        self._session = session
        self._snapshot = snapshot
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._known: set[str] = set()  # namespaces with pools: checked every sync_interval
        # (kind, namespace, name) -> (digest of what we applied, resourceVersion it produced)
        self._applied: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._written: dict[tuple[str, str], tuple[int, str]] = {}  # pool -> (generation, version)
        self._floors: dict[tuple[str, str], int] = {}  # pool -> lowest generation sidecars accept
        self._pods: dict[tuple[str, str], tuple[str, str, float]] = {}  # -> (ip, version, checked)
        # (namespace, uid) -> the last spec that parsed, for objects now invalid
        self._last_good: dict[tuple[str, str], Any] = {}
        self._warned: dict[tuple[str, str, str, str], str] = {}  # condition -> reason warned
        self._keys: dict[str, HashingKeys] = {}  # key file content -> parsed keys
        self._usage: dict[str, dict[str, Any]] = {}  # quota id -> status.usage
        self._usage_read: dict[str, float] = {}  # namespace -> when its usage was read
        self._redis = usage.Reader(options.usage_redis) if options.usage_redis else None
        self.passes = 0  # completed reconciles, for tests and the liveness probe

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    def mark(self, namespace: str) -> None:
        self._dirty.add(namespace)
        self._wake.set()

    async def run(self) -> None:
        """Reconcile dirty namespaces, and every known one each ``sync_interval``; never returns."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.options.sync_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_check - loop.time()))
            if loop.time() >= next_check:
                self._dirty |= self._known
                next_check = loop.time() + self.options.sync_interval
            self._wake.clear()
            await asyncio.sleep(self.options.debounce)
            batch, self._dirty = self._dirty, set()
            for namespace in sorted(batch):
                await self._reconcile_safely(namespace)

    async def _reconcile_safely(self, namespace: str) -> None:
        try:
            started = asyncio.get_running_loop().time()
            await self.reconcile(namespace)
            took = asyncio.get_running_loop().time() - started
            logger.debug("namespace %s reconciled in %.3fs", namespace, took)
        except (ApiError, aiohttp.ClientError, TimeoutError) as e:
            logger.warning("namespace %s: %s; retrying in %.0fs", namespace, e, self._delay)
            asyncio.get_running_loop().call_later(self._delay, self.mark, namespace)
        except Exception:
            logger.exception("namespace %s: reconcile failed; retrying", namespace)
            asyncio.get_running_loop().call_later(self._delay, self.mark, namespace)

    @property
    def _delay(self) -> float:
        return self.options.retry_delay

    # -- the orchestrator --------------------------------------------------------------------

    async def reconcile(self, namespace: str) -> None:
        snap = self._snapshot(namespace)
        at = statuses.now()

        # Invalid objects keep the last spec that parsed, so a bad edit that slipped
        # past the CRD schema does not change what the sidecars enforce.
        live = {e.uid for e in (*snap.pools, *snap.routes, *snap.quotas)}
        for key in [k for k in self._last_good if k[0] == namespace and k[1] not in live]:
            del self._last_good[key]
        pools = self._specs(namespace, snap.pools)
        routes = self._specs(namespace, snap.routes)
        quotas = self._specs(namespace, snap.quotas)
        if not pools and not routes and not quotas:
            self._known.discard(namespace)
            return
        self._known.add(namespace)

        keys, keys_problem = await self._hashing_keys(snap)
        documents: Mapping[tuple[str, str], Document] = {}
        problems: dict[tuple[str, str], list[Problem]] = defaultdict(list)
        if keys is not None:
            result = rendering.render(
                [p for p in pools if isinstance(p, ModelPool)],
                [r for r in routes if isinstance(r, InferenceRoute)],
                [q for q in quotas if isinstance(q, TokenQuota)],
                [s.secret for s in snap.secrets.values() if s.secret is not None],
                keys=keys,
                redis=self.options.redis,
                fail_mode=self.options.fail_mode,
                replicas=self._replicas(snap),
            )
            documents = result.documents
            for problem in result.problems:
                problems[problem.kind, problem.name].append(problem)

        reaching = _reaching(snap, documents)
        taken = {e.name for e in snap.pools}
        for entry in snap.pools:
            outcome = await self._pool(snap, entry, documents.get((namespace, entry.name)))
            if keys_problem:
                outcome.errors.insert(0, keys_problem)
            await self._pool_status(snap, entry, outcome, problems[entry.kind, entry.name], at)
        for entry in snap.routes:
            conflict = await self._route(snap, entry, taken)
            await self._route_status(snap, entry, conflict, problems[entry.kind, entry.name], at)
        await self._read_usage(namespace, quotas)
        for entry in snap.quotas:
            await self._quota_status(snap, entry, problems[entry.kind, entry.name], at)
        await self._label_pods(snap, reaching)
        self.passes += 1

    def _specs(self, namespace: str, entries: Sequence[Entry]) -> list[Any]:
        found = []
        for entry in entries:
            key = (namespace, entry.uid)
            if entry.parsed is not None:
                self._last_good[key] = entry.parsed
                found.append(entry.parsed)
            elif key in self._last_good:
                found.append(self._last_good[key])
        return found

    def _replicas(self, snap: Snapshot) -> dict[tuple[str, str], int]:
        counts = {}
        for (kind, name), child in snap.children.items():
            if kind == "Deployment" and child.replicas is not None:
                counts[snap.namespace, name] = max(1, child.replicas)
        return counts

    # -- hashing keys ------------------------------------------------------------------------

    async def _hashing_keys(self, snap: Snapshot) -> tuple[HashingKeys | None, str]:
        """The namespace's hashing keys, creating the Secret on first use; or why not."""
        entry = snap.secrets.get(children.HASHING_SECRET)
        text = None
        if entry is not None and entry.secret is not None:
            text = dict(entry.secret.values).get(children.HASHING_KEY)
        elif entry is None:
            body = children.hashing_secret(snap.namespace, secrets.token_hex(32))
            try:
                await self._api.create(kubeapi.SECRETS, snap.namespace, body)
                text = body["stringData"][children.HASHING_KEY]
            except ApiError as e:
                if e.status != 409:
                    raise
                name = children.HASHING_SECRET
                stored = await self._api.get(kubeapi.SECRETS, snap.namespace, name)
                found = observing.secret_entry(stored) if stored is not None else None
                if found is not None and found.secret is not None:
                    text = dict(found.secret.values).get(children.HASHING_KEY)
        where = f"Secret {snap.namespace}/{children.HASHING_SECRET} key {children.HASHING_KEY!r}"
        if not text:
            return None, f"{where} is missing or empty: no config can be rendered"
        try:
            return self._parse_keys(text), ""
        except contract.KeyFileError as e:
            return None, f"{where}: {e}"

    def _parse_keys(self, text: str) -> HashingKeys:
        if text not in self._keys:
            self._keys[text] = contract.parse_hashing_keys(text, "value")
        return self._keys[text]

    # -- pools -------------------------------------------------------------------------------

    async def _pool(self, snap: Snapshot, entry: Entry, rendered: Document | None) -> _PoolResult:
        outcome = _PoolResult()
        pool = entry.parsed
        pods = [p for p in snap.pods if p.pool == entry.name]
        outcome.total = len(pods)
        outcome.ready = sum(1 for p in pods if p.ready and p.ip)
        if not isinstance(pool, ModelPool):
            return outcome
        outcome.refused = children.refusals(pool)
        try:
            text = ""
            if rendered is not None:
                outcome.document = self._with_generation(snap, pool.name, rendered)
                text = contract.dumps(outcome.document)
                await self._ensure(
                    snap, kubeapi.CONFIGMAPS, children.config_map(pool, entry.uid, text), entry.uid
                )
            token = await self._push_token(snap, pool, entry.uid)
            if not outcome.refused:
                await self._deployment(snap, pool, entry.uid)
            await self._ensure(
                snap, kubeapi.SERVICES, children.pool_service(pool, entry.uid), entry.uid
            )
        except Conflict as e:
            outcome.conflict = str(e)
            return outcome
        except ApiError as e:
            if e.status not in (400, 422):
                raise
            # The API server refused a child built from this pool (a template field
            # it rejects, say): report it on the pool and go on with the others.
            outcome.rejected = e.message
            return outcome
        if outcome.document is not None and token:
            await self._push(snap, pool.name, outcome, text, token)
        return outcome

    def _with_generation(self, snap: Snapshot, pool: str, document: Document) -> Document:
        """Raise the generation exactly when the content changes; never lower it."""
        key = (snap.namespace, pool)
        child = snap.children.get(("ConfigMap", children.config_map_name(pool)))
        known = [c for c in (self._written.get(key), child.config if child else None) if c]
        generation, version = max(known) if known else (0, "")
        if version != document.version:
            generation += 1
        generation = max(generation, self._floors.get(key, 1))
        if self._written.get(key, (0, ""))[0] != generation:
            logger.info(
                "ModelPool %s/%s: config generation %d, version %s",
                snap.namespace, pool, generation, document.version,
            )  # fmt: skip
        self._written[key] = (generation, document.version)
        return replace(document, generation=generation)

    async def _push_token(self, snap: Snapshot, pool: ModelPool, uid: str) -> str:
        name = children.push_token_name(pool.name)
        entry = snap.secrets.get(name)
        if entry is not None and entry.owner_uid == uid and entry.secret is not None:
            return dict(entry.secret.values).get(children.PUSH_TOKEN_KEY, "")
        stored = await self._api.get(kubeapi.SECRETS, snap.namespace, name)
        if stored is not None:
            found = observing.secret_entry(stored)
            if found.owner_uid != uid:
                raise Conflict(f"Secret {name} exists and is not owned by this ModelPool")
            values = dict(found.secret.values) if found.secret is not None else {}
            return values.get(children.PUSH_TOKEN_KEY, "")
        # Created once, never rewritten: a new token on every pass would lock pushes out.
        token = secrets.token_urlsafe(32)
        await self._api.create(
            kubeapi.SECRETS, snap.namespace, children.push_token_secret(pool, uid, token)
        )
        return token

    async def _deployment(self, snap: Snapshot, pool: ModelPool, uid: str) -> None:
        settings = self.options.sidecar
        if ("Deployment", pool.name) not in snap.children and await self._absent(
            snap, kubeapi.DEPLOYMENTS, pool.name, uid
        ):
            created = children.deployment(pool, uid, settings, replicas=pool.scaling.min_replicas)
            await self._api.apply(kubeapi.DEPLOYMENTS, snap.namespace, created)
            # Hand spec.replicas to a second field manager, so the applies below,
            # which leave it out, do not remove it: it belongs to the autoscaler now.
            await self._api.apply(
                kubeapi.DEPLOYMENTS,
                snap.namespace,
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": pool.name},
                    "spec": {"replicas": pool.scaling.min_replicas},
                },
                manager=kubeapi.REPLICAS_MANAGER,
            )
        body = children.deployment(pool, uid, settings, replicas=None)
        await self._ensure(snap, kubeapi.DEPLOYMENTS, body, uid)

    async def _absent(self, snap: Snapshot, resource: Resource, name: str, uid: str) -> bool:
        """Whether no object has ``name``; raises Conflict when a foreign one does."""
        stored = await self._api.get(resource, snap.namespace, name)
        if stored is None:
            return True
        if observing.controller_uid(stored) != uid:
            kind = str(stored.get("kind") or resource.plural)
            raise Conflict(f"{kind} {name} exists and is not owned by this resource")
        return False

    async def _ensure(
        self, snap: Snapshot, resource: Resource, body: dict[str, Any], uid: str
    ) -> None:
        """Apply ``body`` unless it is what we last applied and nobody changed it since."""
        kind, name = body["kind"], body["metadata"]["name"]
        key = (kind, snap.namespace, name)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        child = snap.children.get((kind, name))
        if child is not None and self._applied.get(key) == (digest, child.resource_version):
            return
        if child is None or child.owner_uid != uid:
            await self._absent(snap, resource, name, uid)
        applied = await self._api.apply(resource, snap.namespace, body)
        version = str(applied.get("metadata", {}).get("resourceVersion"))
        logger.debug("applied %s %s/%s: resourceVersion %s", kind, snap.namespace, name, version)
        self._applied[key] = (digest, version)

    async def _push(
        self, snap: Snapshot, pool: str, outcome: _PoolResult, text: str, token: str
    ) -> None:
        """Bring every ready pod to the document's version; recently checked pods are skipped."""
        document = outcome.document
        assert document is not None
        now = asyncio.get_running_loop().time()
        pending = []
        for pod in snap.pods:
            if pod.pool != pool or not pod.ready or not pod.ip:
                continue
            state = self._pods.get((snap.namespace, pod.name))
            fresh = state is not None and now - state[2] < self.options.sync_interval
            if fresh and state is not None and state[:2] == (pod.ip, document.version):
                outcome.synced += 1
                continue
            pending.append(pod)
        results = await asyncio.gather(
            *(
                pushing.sync(
                    self._session,
                    f"{pod.ip}:{children.ADMIN_PORT}",
                    token=token,
                    text=text,
                    version=document.version,
                    seconds=self.options.push_timeout,
                )
                for pod in pending
            )
        )
        for pod, result in zip(pending, results, strict=True):
            key = (snap.namespace, pod.name)
            if result.synced:
                self._pods[key] = (str(pod.ip), document.version, now)
                outcome.synced += 1
                continue
            self._pods.pop(key, None)
            outcome.errors.append(result.error)
            running = result.running_generation
            if running is not None and running >= document.generation:
                # The sidecar runs a newer generation than we rendered (the ConfigMap
                # was recreated, say): render above it on the next pass.
                self._floors[snap.namespace, pool] = running + 1
                self.mark(snap.namespace)
        known = {(snap.namespace, p.name) for p in snap.pods}
        for key in [k for k in self._pods if k[0] == snap.namespace and k not in known]:
            del self._pods[key]

    async def _pool_status(
        self,
        snap: Snapshot,
        entry: Entry,
        outcome: _PoolResult,
        problems: Sequence[Problem],
        at: str,
    ) -> None:
        document = outcome.document
        ready, synced = outcome.ready, outcome.synced
        if entry.problem is not None:
            main = Condition("Ready", FALSE, "InvalidSpec", str(entry.problem))
        elif outcome.refused:
            message = "the server template is refused: " + "; ".join(outcome.refused)
            main = Condition("Ready", FALSE, "TemplateRefused", message)
        elif outcome.conflict:
            main = Condition("Ready", FALSE, "NameConflict", outcome.conflict)
        elif outcome.rejected:
            main = Condition("Ready", FALSE, "ChildRejected", outcome.rejected)
        elif document is None:
            reasons = [str(p) for p in problems] + outcome.errors
            main = Condition("Ready", FALSE, "RenderFailed", "; ".join(reasons) or "no config")
        elif ready == 0:
            main = Condition(
                "Ready", FALSE, "NoReadyReplicas", f"0 of {outcome.total} replicas are ready"
            )
        elif synced == 0:
            main = Condition(
                "Ready", FALSE, "ConfigNotSynced", f"no ready replica runs {document.version} yet"
            )
        else:
            main = Condition(
                "Ready",
                TRUE,
                "Serving",
                f"{ready} of {outcome.total} replicas ready, {synced} on {document.version}",
            )

        if document is None:
            sync = Condition("ConfigSynced", FALSE, "NoConfig", main.message)
        elif ready == 0:
            sync = Condition("ConfigSynced", UNKNOWN, "NoReadyReplicas", "no ready replica yet")
        elif synced == ready:
            sync = Condition(
                "ConfigSynced", TRUE, "Synced", f"all {ready} ready replicas run {document.version}"
            )
        else:
            details = "; ".join(outcome.errors[:3]) or "checking"
            sync = Condition(
                "ConfigSynced",
                FALSE,
                "PushFailed",
                f"{synced} of {ready} ready replicas run {document.version}: {details}",
            )

        status: dict[str, Any] = {"replicas": outcome.total, "readyReplicas": ready}
        if document is not None:
            status["config"] = {"version": document.version, "syncedReplicas": synced}
        # Only what a user must fix gets an Event: not a replica still starting.
        await self._status(
            snap,
            kubeapi.MODELPOOLS,
            entry,
            status,
            [main, sync],
            at,
            quiet={"NoReadyReplicas", "ConfigNotSynced", "PushFailed"},
        )

    # -- routes ------------------------------------------------------------------------------

    async def _route(self, snap: Snapshot, entry: Entry, pools: set[str]) -> str:
        """Apply the route's Service; the reason it cannot be applied, if any."""
        if not isinstance(entry.parsed, InferenceRoute):
            return ""
        if entry.name in pools:
            return f"ModelPool {entry.name} already has a Service of that name; rename the route"
        try:
            body = children.route_service(snap.namespace, entry.name, entry.uid)
            await self._ensure(snap, kubeapi.SERVICES, body, entry.uid)
        except Conflict as e:
            return str(e)
        return ""

    async def _route_status(
        self, snap: Snapshot, entry: Entry, conflict: str, problems: Sequence[Problem], at: str
    ) -> None:
        missing = [p for p in problems if p.field.endswith("].pool")]
        refused = [p for p in problems if p not in missing]
        if entry.problem is not None:
            accepted = Condition("Accepted", FALSE, "InvalidSpec", str(entry.problem))
            resolved = Condition("ResolvedRefs", UNKNOWN, "InvalidSpec", "the spec is invalid")
        else:
            if refused:
                reason = "ModelConflict" if refused[0].field == "spec.model" else "NoBackend"
                accepted = Condition("Accepted", FALSE, reason, _messages(refused))
            elif conflict:
                accepted = Condition("Accepted", FALSE, "NameConflict", conflict)
            else:
                accepted = Condition("Accepted", TRUE, "Accepted", "the route is served")
            if missing:
                resolved = Condition("ResolvedRefs", FALSE, "PoolNotFound", _messages(missing))
            else:
                resolved = Condition("ResolvedRefs", TRUE, "Resolved", "every named pool exists")
        await self._status(snap, kubeapi.INFERENCEROUTES, entry, {}, [accepted, resolved], at)

    async def _label_pods(self, snap: Snapshot, reaching: Mapping[str, list[str]]) -> None:
        """Label each pool pod with the routes that reach it, which their Services select."""
        for pod in snap.pods:
            want = children.route_labels(reaching.get(pod.pool, []))
            have = {
                k: v for k, v in pod.labels.items() if k.startswith(children.ROUTE_MEMBER_PREFIX)
            }
            if want == have:
                continue
            patch: dict[str, Any] = {k: None for k in have if k not in want}
            patch.update(want)
            try:
                await self._api.merge(
                    kubeapi.PODS, snap.namespace, pod.name, {"metadata": {"labels": patch}}
                )
            except ApiError as e:
                if e.status != 404:  # gone already
                    raise

    # -- quotas ------------------------------------------------------------------------------

    async def _read_usage(self, namespace: str, quotas: Sequence[Any]) -> None:
        """Refresh the namespace's usage counters, at most every ``usage_interval``."""
        now = asyncio.get_running_loop().time()
        last = self._usage_read.get(namespace)
        if self._redis is None or (last is not None and now - last < self.options.usage_interval):
            return
        self._usage_read[namespace] = now
        ids = [q.id for q in quotas if isinstance(q, TokenQuota)]
        self._usage.update(await self._redis.read(ids))

    async def _quota_status(
        self, snap: Snapshot, entry: Entry, problems: Sequence[Problem], at: str
    ) -> None:
        if entry.problem is not None:
            ready = Condition("Ready", FALSE, "InvalidSpec", str(entry.problem))
        elif problems:
            first = problems[0]
            if first.field == "spec.apiKeys.secretRef.name":
                reason = "KeyConflict" if "also lists" in first.message else "SecretNotFound"
            else:
                reason = "RouteNotFound"
            ready = Condition("Ready", FALSE, reason, _messages(problems))
        else:
            tenant = entry.parsed.tenant if isinstance(entry.parsed, TokenQuota) else entry.name
            ready = Condition("Ready", TRUE, "InForce", f"in force for tenant {tenant!r}")
        status: dict[str, Any] = {}
        if f"{snap.namespace}/{entry.name}" in self._usage:
            status["usage"] = self._usage[f"{snap.namespace}/{entry.name}"]
        await self._status(snap, kubeapi.TOKENQUOTAS, entry, status, [ready], at)

    # -- status and Events -------------------------------------------------------------------

    async def _status(
        self,
        snap: Snapshot,
        resource: Resource,
        entry: Entry,
        status: dict[str, Any],
        wanted: list[Condition],
        at: str,
        quiet: set[str] | None = None,
    ) -> None:
        status["conditions"] = statuses.merge(
            wanted, entry.status.get("conditions"), entry.generation, at
        )
        for condition in statuses.newly_false(wanted, entry.status.get("conditions")):
            key = (entry.kind, snap.namespace, entry.name, condition.type)
            if condition.reason in (quiet or set()) or self._warned.get(key) == condition.reason:
                continue
            self._warned[key] = condition.reason
            await self._event(snap.namespace, entry, condition)
        for condition in wanted:
            if condition.status != FALSE:
                self._warned.pop((entry.kind, snap.namespace, entry.name, condition.type), None)
        if not statuses.differs(status, entry.status):
            return
        logger.debug(
            "status of %s %s/%s: %s (was %s)",
            entry.kind, snap.namespace, entry.name, status, dict(entry.status),
        )  # fmt: skip
        try:
            await self._api.apply(
                resource, snap.namespace, statuses.document(entry.kind, entry.name, status),
                sub="status",
            )  # fmt: skip
        except ApiError as e:
            if e.status != 404:  # deleted meanwhile
                raise

    async def _event(self, namespace: str, entry: Entry, condition: Condition) -> None:
        """A Warning Event users see in ``kubectl describe``; losing one is not an error."""
        body = statuses.event(
            entry.kind,
            entry.name,
            namespace,
            entry.uid,
            type_="Warning",
            reason=condition.reason,
            message=condition.message,
            component=kubeapi.FIELD_MANAGER,
        )
        try:
            await self._api.create(kubeapi.EVENTS, namespace, body)
        except ApiError as e:
            logger.warning("cannot post an Event on %s %s: %s", entry.kind, entry.name, e)


def _messages(problems: Sequence[Problem]) -> str:
    return "; ".join(f"{p.field}: {p.message}" for p in problems)


def _reaching(
    snap: Snapshot, documents: Mapping[tuple[str, str], Document]
) -> dict[str, list[str]]:
    """Pool name -> the InferenceRoutes served through it, by route name."""
    served_by_model: dict[str, str] = {}
    for entry in sorted(snap.routes, key=lambda e: e.name):
        if isinstance(entry.parsed, InferenceRoute):
            served_by_model.setdefault(entry.parsed.model, entry.name)
    reaching: dict[str, list[str]] = defaultdict(list)
    for (_, pool), document in documents.items():
        for route in document.routes:
            name = served_by_model.get(route.model)
            if name is not None:
                reaching[pool].append(name)
    return reaching
