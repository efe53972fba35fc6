"""The autoscaler: one background task that sizes every ModelPool from its sidecars' load.

Every few seconds :func:`run` walks the pools the operator indexes, reads
``GET /load`` from each ready pod's admin port, asks :func:`scaling.decide`
for a replica count, writes it to the Deployment's scale subresource (only in
``scaling.mode: operator``), applies the autoscaler's share of the pool's
status (desiredReplicas, queue, ttftP95Seconds, lastScaleTime, ScalingLimited,
CapacityPending) and posts an Event for each change. It also keeps the pool's
warm placeholder Deployment. One task rather than a kopf timer per pool, which
would add finalizers (design section 6).

The operator's startup handler (handlers.py) starts it once::

    pools = lambda: [entry for store in modelpools_index.values() for entry in store]
    task = asyncio.create_task(
        autoscaling.run(api, pools, stop=stop, session=session, settings=settings)
    )
    # on cleanup: stop.set(), and the task ends after its current pass

``api`` is the operator's :class:`kubeapi.Client`; ``pools`` returns the
current ModelPool entries (the kopf index, read anew each pass); ``session``
is the process's aiohttp session (one of its own if None). The status is
written with server-side apply under its own field manager, so the
reconcile's status applies and this task's never remove each other's fields.
:meth:`Autoscaler.pool` is the orchestrator of one pool's pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from headway_operator import children, kubeapi, observing, scaling, statuses
from headway_operator.kubeapi import ApiError
from headway_operator.observing import Entry
from headway_operator.specs import ModelPool
from headway_operator.statuses import FALSE, TRUE, Condition

logger = logging.getLogger(__name__)

MANAGER = "headway-autoscaler"  # field manager of the status fields and placeholders it writes
WARM_LABEL = "headway.dev/warm-for"  # placeholder pods; never the pool label the Service selects
GPU = "nvidia.com/gpu"


@dataclass(frozen=True, slots=True)
class Settings:
    """How the autoscaler runs; the operator's flags and chart values set them."""

    interval: float = 5.0  # seconds between passes; a few, so a burst is seen within one
    load_timeout: float = 1.0  # seconds for one GET /load; a busy sidecar still answers fast
    admin_port: int = children.ADMIN_PORT  # the sidecars' admin port (9090)
    concurrency: int = 16  # pools handled at once, bounding the API and /load requests
    priority_class: str = "headway-warm-placeholder"  # the chart's negative PriorityClass
    placeholder_image: str = "registry.k8s.io/pause:3.10"  # does nothing, pulls in a second
    placeholder_check: float = 60.0  # seconds between checks that placeholders are in place


@dataclass
class PoolState:
    """What one pool's passes carry over; dropped when the pool goes away."""

    history: scaling.History
    ttft_seen: dict[str, scaling.Histogram] = field(default_factory=dict)  # pod -> cumulative
    ttft: deque[tuple[float, scaling.Histogram]] = field(default_factory=deque)
    last_scale_time: str | None = None  # RFC 3339, for status.lastScaleTime
    placeholder: tuple[str, float] | None = None  # (digest applied, monotonic time checked)
    warned: dict[str, str] = field(default_factory=dict)  # condition type -> reason posted


@dataclass(frozen=True, slots=True)
class Pods:
    """The pool's pods as the autoscaler sees them."""

    ready: tuple[tuple[str, str], ...]  # (name, IP) of ready, not terminating pods
    total: int
    unschedulable: tuple[str, ...]  # the scheduler's message for each pod it could not place


async def run(
    api: kubeapi.Client,
    pools: Callable[[], Iterable[Entry]],
    *,
    stop: asyncio.Event,
    settings: Settings = Settings(),
    session: aiohttp.ClientSession | None = None,
    active: Callable[[], bool] | None = None,
) -> None:
    """Scale every pool each ``settings.interval`` until ``stop`` is set; never raises.

    ``active`` says whether this operator may act; a standby paused by its
    peer passes False and the autoscaler then only waits.
    """
    own = session is None
    http = session or aiohttp.ClientSession()
    autoscaler = Autoscaler(api, http, settings)
    try:
        while not stop.is_set():
            if active is not None and not active():
                # What it remembered is stale by the time it takes over.
                autoscaler.forget()
            else:
                try:
                    await autoscaler.pass_over(list(pools()))
                except Exception:  # the next pass tries again; the task must not end
                    logger.exception("autoscaling pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.interval)
    finally:
        if own:
            await http.close()


class Autoscaler:
    """The passes over the pools, and what each pool's passes remember."""

    def __init__(
        self,
        api: kubeapi.Client,
        session: aiohttp.ClientSession,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._session = session
        self.settings = settings
        self._clock = clock
        self._states: dict[str, PoolState] = {}  # by the pool's uid

    def forget(self) -> None:
        """Drop every pool's memory: the next pass starts as after a restart."""
        self._states.clear()

    async def pass_over(self, entries: Sequence[Entry]) -> None:
        """One pass over every pool; a pool that fails is retried on the next pass."""
        live = {e.uid for e in entries}
        for uid in [u for u in self._states if u not in live]:
            del self._states[uid]
        limit = asyncio.Semaphore(self.settings.concurrency)

        async def one(entry: Entry) -> None:
            async with limit:
                try:
                    await self.pool(entry)
                except (ApiError, aiohttp.ClientError, TimeoutError) as e:
                    logger.warning("autoscaling ModelPool %s: %s", entry.name, e)
                except Exception:
                    logger.exception("autoscaling ModelPool %s failed", entry.name)

        await asyncio.gather(*(one(e) for e in entries if isinstance(e.parsed, ModelPool)))

    # -- the orchestrator --------------------------------------------------------------------

    async def pool(self, entry: Entry) -> None:
        pool = entry.parsed
        assert isinstance(pool, ModelPool)
        now = self._clock()
        state = self._states.get(entry.uid)
        if state is None:
            state = self._states[entry.uid] = _start(entry.status, now)

        # Placeholders first: they matter most while the Deployment cannot grow.
        await self._placeholders(pool, entry.uid, state, now)

        scale = await self._scale(pool)
        if scale is None:
            return  # the reconcile has not created the Deployment yet
        current, selector = scale
        pods = await self._pods(pool.namespace, selector)
        loads = await self._loads(pool, pods)
        signals = self._signals(state, loads, now)

        # Decide; in external mode the HPA or KEDA decided, and we only report.
        decision: scaling.Decision | None = None
        desired = current
        p95, _ = scaling.realtime_p95(signals, state.history, now)
        if pool.scaling.mode == "operator":
            decision, history = scaling.decide(pool.scaling, signals, current, state.history, now)
            desired = decision.replicas
            if desired != current:
                await self._write_scale(pool, desired)
                state.last_scale_time = statuses.now()
                await self._event(pool, entry.uid, "Normal", decision.reason, decision.message)
                logger.info("ModelPool %s/%s: %s", pool.namespace, pool.name, decision.message)
            # Only now: a scale that failed to write is decided again next pass.
            state.history = history

        await self._status(entry, pool, state, signals, desired, p95, decision, pods)

    # -- reading the cluster -----------------------------------------------------------------

    async def _scale(self, pool: ModelPool) -> tuple[int, str] | None:
        """The Deployment's replica count and pod selector, or None while it does not exist."""
        path = kubeapi.DEPLOYMENTS.path(pool.namespace, pool.name, "scale")
        try:
            scale = await self._api.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        replicas = (scale.get("spec") or {}).get("replicas")
        selector = (scale.get("status") or {}).get(
            "selector"
        ) or f"{children.POOL_LABEL}={pool.name}"
        return (replicas if isinstance(replicas, int) else 1), str(selector)

    async def _pods(self, namespace: str, selector: str) -> Pods:
        listed = await self._api.request(
            "GET", kubeapi.PODS.path(namespace), params={"labelSelector": selector}
        )
        ready, unschedulable = [], []
        # A terminating pod may still answer, but it is no longer capacity.
        items = [
            p
            for p in listed.get("items") or ()
            if isinstance(p, Mapping) and not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        for pod in items:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            conditions = statuses.by_type(status.get("conditions"))
            scheduled = conditions.get("PodScheduled") or {}
            if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
                unschedulable.append(str(scheduled.get("message") or "no node fits"))
            elif (conditions.get("Ready") or {}).get("status") == "True" and status.get("podIP"):
                ready.append((str(meta.get("name")), str(status["podIP"])))
        return Pods(tuple(ready), len(items), tuple(unschedulable))

    async def _loads(self, pool: ModelPool, pods: Pods) -> dict[str, scaling.Load | None]:
        """Each ready pod's ``/load`` by pod name; None where it could not be read."""
        port, within = self.settings.admin_port, self.settings.load_timeout
        answers = await asyncio.gather(
            *(read_load(self._session, ip, port, within) for _, ip in pods.ready)
        )
        loads = dict(zip((name for name, _ in pods.ready), answers, strict=True))
        for name, load in loads.items():
            # An IP handed to another pod since the list (or another cluster's
            # sidecar on a reused address) must not count as this pool's load.
            if load is not None and load.pool not in (None, pool.name):
                logger.debug("pod %s answers for pool %s, not %s", name, load.pool, pool.name)
                loads[name] = None
        return loads

    def _signals(
        self, state: PoolState, loads: Mapping[str, scaling.Load | None], now: float
    ) -> scaling.Signals:
        """The pods' loads summed, with this interval's first tokens added to the window."""
        read = {name: load for name, load in loads.items() if load is not None}
        realtime = {
            name: load.ttft["realtime"] for name, load in read.items() if "realtime" in load.ttft
        }
        state.ttft.append((now, scaling.ttft_interval(state.ttft_seen, realtime)))
        state.ttft_seen = realtime
        while state.ttft and state.ttft[0][0] <= now - scaling.TTFT_WINDOW:
            state.ttft.popleft()
        return scaling.Signals.of(
            list(read.values()), unreported=len(loads) - len(read), ttft=tuple(state.ttft)
        )

    # -- writing -----------------------------------------------------------------------------

    async def _write_scale(self, pool: ModelPool, replicas: int) -> None:
        # The same field manager the reconcile handed spec.replicas to at creation.
        await self._api.request(
            "PATCH",
            kubeapi.DEPLOYMENTS.path(pool.namespace, pool.name, "scale"),
            {"spec": {"replicas": replicas}},
            content_type=kubeapi.MERGE,
            params={"fieldManager": kubeapi.REPLICAS_MANAGER},
        )

    async def _status(
        self,
        entry: Entry,
        pool: ModelPool,
        state: PoolState,
        signals: scaling.Signals,
        desired: int,
        p95: float | None,
        decision: scaling.Decision | None,
        pods: Pods,
    ) -> None:
        status: dict[str, Any] = {
            "desiredReplicas": desired,
            "queue": {c: signals.waiting.get(c, 0) for c in ("realtime", "batch")},
        }
        if p95 is not None:
            status["ttftP95Seconds"] = round(p95, 3)
        if state.last_scale_time:
            status["lastScaleTime"] = state.last_scale_time

        wanted = [capacity_condition(pods, pool)]
        if decision is not None:
            wanted.insert(0, limited_condition(decision, pool))
        previous = entry.status.get("conditions")
        for condition in wanted:
            await self._warn_on_change(pool, entry.uid, state, condition, previous)
        status["conditions"] = statuses.merge(wanted, previous, entry.generation, statuses.now())

        # NB: a field left out of an apply is dropped only if we applied it before.
        dropped = p95 is None and "ttftP95Seconds" in entry.status
        if not dropped and not statuses.differs(status, entry.status):
            return
        body = statuses.document("ModelPool", pool.name, status)
        try:
            await self._api.apply(
                kubeapi.MODELPOOLS, pool.namespace, body, sub="status", manager=MANAGER
            )
        except ApiError as e:
            if e.status != 404:  # deleted meanwhile
                raise

    async def _warn_on_change(
        self,
        pool: ModelPool,
        uid: str,
        state: PoolState,
        condition: Condition,
        previous: object,
    ) -> None:
        """A Warning Event when ScalingLimited or CapacityPending turns True, once."""
        if condition.status != TRUE:
            state.warned.pop(condition.type, None)
            return
        before = statuses.by_type(previous).get(condition.type) or {}
        if before.get("status") == TRUE or state.warned.get(condition.type):
            return
        state.warned[condition.type] = condition.reason
        await self._event(pool, uid, "Warning", condition.reason, condition.message)

    async def _event(self, pool: ModelPool, uid: str, kind: str, reason: str, text: str) -> None:
        """An Event for ``kubectl describe``; losing one is not an error."""
        body = statuses.event(
            "ModelPool",
            pool.name,
            pool.namespace,
            uid,
            type_=kind,
            reason=reason,
            message=text,
            component=MANAGER,
        )
        try:
            await self._api.create(kubeapi.EVENTS, pool.namespace, body)
        except ApiError as e:
            logger.warning("cannot post an Event on ModelPool %s: %s", pool.name, e)

    # -- warm placeholders -------------------------------------------------------------------

    async def _placeholders(self, pool: ModelPool, uid: str, state: PoolState, now: float) -> None:
        """Keep ``warmReplicas`` placeholders; check now and then that nobody removed them."""
        body = placeholder_deployment(pool, uid, self.settings)
        digest = _digest(body)
        if state.placeholder is not None:
            applied, checked = state.placeholder
            if applied == digest and now - checked < self.settings.placeholder_check:
                return
        name = placeholder_name(pool.name)
        stored = await self._api.get(kubeapi.DEPLOYMENTS, pool.namespace, name)
        owner = observing.controller_uid(stored) if stored is not None else None
        if stored is not None and owner != uid:
            logger.warning(
                "ModelPool %s/%s: Deployment %s exists and is not ours; no warm placeholders",
                pool.namespace, pool.name, name,
            )  # fmt: skip
        elif body is not None:
            await self._api.apply(kubeapi.DEPLOYMENTS, pool.namespace, body, manager=MANAGER)
        elif stored is not None:
            with contextlib.suppress(ApiError):
                await self._api.request("DELETE", kubeapi.DEPLOYMENTS.path(pool.namespace, name))
        state.placeholder = (digest, now)


async def read_load(
    session: aiohttp.ClientSession, ip: str, port: int, within: float
) -> scaling.Load | None:
    """One sidecar's ``GET /load`` within ``within`` seconds; None if unreachable or unreadable."""
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{port}/load"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=within)) as response:
            if response.status != 200:
                raise scaling.LoadError(f"HTTP {response.status}")
            return scaling.parse_load(json.loads(await response.read()))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        # LoadError is a ValueError, as is a body that is not JSON.
        logger.debug("GET %s: %s", url, e)
        return None


# -- pure parts -----------------------------------------------------------------------------


def placeholder_name(pool: str) -> str:
    return f"{pool}-warm"


def placeholder_deployment(pool: ModelPool, uid: str, settings: Settings) -> dict[str, Any] | None:
    """The Deployment of ``warmReplicas`` placeholder pods, or None when the pool wants none.

    Each placeholder asks for what a replica's model server asks for (GPUs,
    CPU and memory requests) on the same nodes, at the chart's negative
    priority: it holds a provisioned node, and a real replica preempts it.
    """
    if pool.node_pool.warm_replicas <= 0:
        return None
    template = pool.template or {}
    spec = template.get("spec") or {}
    server = (spec.get("containers") or [{}])[0]
    requests = dict((server.get("resources") or {}).get("requests") or {})
    resources: dict[str, Any] = {"requests": requests}
    if pool.node_pool.gpus_per_replica > 0:
        # An extended resource's request defaults to its limit.
        resources["limits"] = {GPU: str(pool.node_pool.gpus_per_replica)}
        requests.pop(GPU, None)
    pod_spec: dict[str, Any] = {
        "priorityClassName": settings.priority_class,
        "terminationGracePeriodSeconds": 0,  # nothing to finish: make way at once
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "placeholder",
                "image": settings.placeholder_image,
                "resources": resources,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "runAsNonRoot": True,
                    "runAsUser": 65535,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    selector = {**(spec.get("nodeSelector") or {}), **pool.node_pool.node_selector}
    if selector:
        pod_spec["nodeSelector"] = selector
    tolerations = [*(spec.get("tolerations") or ()), *pool.node_pool.tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.get("affinity"):
        pod_spec["affinity"] = spec["affinity"]
    labels = {WARM_LABEL: pool.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": placeholder_name(pool.name),
            "namespace": pool.namespace,
            "labels": {children.MANAGED_BY: children.MANAGER, **labels},
            "ownerReferences": [children.owner("ModelPool", pool.name, uid)],
        },
        "spec": {
            "replicas": pool.node_pool.warm_replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def limited_condition(decision: scaling.Decision, pool: ModelPool) -> Condition:
    high = pool.scaling.max_replicas
    if decision.wanted > high:
        message = f"demand asks for {decision.wanted} replicas; maxReplicas is {high}"
        return Condition("ScalingLimited", TRUE, "MaxReplicas", message)
    message = f"demand asks for {decision.wanted} replicas, within maxReplicas {high}"
    return Condition("ScalingLimited", FALSE, "WithinLimits", message)


def capacity_condition(pods: Pods, pool: ModelPool) -> Condition:
    if not pods.unschedulable:
        return Condition("CapacityPending", FALSE, "Scheduled", "every replica has a node")
    gpus = pool.node_pool.gpus_per_replica
    asks = f" asking for {gpus} GPU(s) each" if gpus else ""
    message = (
        f"{len(pods.unschedulable)} of {pods.total} replicas{asks} wait for a node: "
        f"{pods.unschedulable[0]}"
    )
    return Condition("CapacityPending", TRUE, "Unschedulable", message)


def _start(status: Mapping[str, Any], now: float) -> PoolState:
    """A pool's first pass: a scale-up shortly before a restart still counts for the cooldown."""
    last = status.get("lastScaleTime")
    history = scaling.History()
    if isinstance(last, str):
        with contextlib.suppress(ValueError):
            wall = datetime.datetime.fromisoformat(last.replace("Z", "+00:00"))
            ago = datetime.datetime.now(datetime.UTC) - wall
            history = scaling.History(last_scale_up=now - max(0.0, ago.total_seconds()))
    return PoolState(history=history, last_scale_time=last if isinstance(last, str) else None)


def _digest(body: object) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
