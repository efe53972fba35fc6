"""The kopf side: indexes of what the reconcile reads, and event handlers that mark namespaces.

Nothing here writes to the cluster. Every watched kind feeds an index and,
on any event, marks its namespace dirty for :class:`reconciling.Reconciler`;
the startup activity starts that loop and the autoscaler's task (issue 5).
Only event handlers are used (no create/update/delete handlers, timers or
daemons), so kopf never adds a finalizer and deleting any resource never waits
for the operator. The handlers live in a registry built per run, not kopf's
global one, so a test can run several operators in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import kopf

from headway_operator import autoscaling, children, kubeapi, observing, reconciling
from headway_operator.observing import Snapshot

logger = logging.getLogger(__name__)

GROUP_VERSION = "headway.dev/v1alpha1"
POOLS = (GROUP_VERSION, "modelpools")
ROUTES = (GROUP_VERSION, "inferenceroutes")
QUOTAS = (GROUP_VERSION, "tokenquotas")
SECRETS = ("v1", "secrets")
PODS = ("v1", "pods")
DEPLOYMENTS = ("apps/v1", "deployments")
SERVICES = ("v1", "services")
CONFIGMAPS = ("v1", "configmaps")
CHILD_KINDS = {DEPLOYMENTS: "Deployment", SERVICES: "Service", CONFIGMAPS: "ConfigMap"}
CR_KINDS = {POOLS: "ModelPool", ROUTES: "InferenceRoute", QUOTAS: "TokenQuota"}


def configure(settings: kopf.OperatorSettings) -> None:
    """Filter the watches on the server, so only objects the operator may care about arrive."""
    managed = f"{children.MANAGED_BY}={children.MANAGER}"
    for selector in CHILD_KINDS:
        settings.watching.label_selectors[selector] = managed
    settings.watching.label_selectors[PODS] = children.POOL_LABEL
    # API keys and hashing keys are Opaque; service-account tokens, TLS and Helm
    # release Secrets never reach the operator's memory.
    settings.watching.field_selectors[SECRETS] = "type=Opaque"


def credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In a pod the ServiceAccount, elsewhere the kubeconfig; both kopf and our client use it."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no ServiceAccount token and no kubeconfig found")
    return info


def build(options: reconciling.Options) -> kopf.OperatorRegistry:
    """A registry with one index and one marking handler per watched kind, and the activities."""
    registry = kopf.OperatorRegistry()

    def index(selector: tuple[str, str], entry: Callable[[Mapping[str, Any]], object]) -> None:
        def by_namespace(body: kopf.Body, namespace: str | None, **_: Any) -> object:
            return {namespace: entry(body)} if namespace else None

        name = selector[1]
        kopf.index(*selector, id=name, registry=registry)(by_namespace)
        kopf.on.event(*selector, id=f"{name}-changed", registry=registry)(_mark)

    for selector, kind in CR_KINDS.items():
        index(selector, functools.partial(observing.resource_entry, kind))
    for selector, kind in CHILD_KINDS.items():
        index(selector, functools.partial(observing.child_entry, kind))
    index(SECRETS, observing.secret_entry)
    index(PODS, observing.pod_entry)

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return credentials(settings)

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=options.api_timeout))
        try:
            api = kubeapi.Client(session, functools.partial(credentials, settings))
        except (OSError, ValueError, kopf.LoginError) as e:
            await session.close()
            # Retrying cannot create a kubeconfig: stop instead of waiting forever.
            raise kopf.PermanentError(f"no usable credentials: {e}") from e
        reconciler = reconciling.Reconciler(options, api, session, _snapshots(kwargs))
        memo.session = session
        memo.reconciler = reconciler
        memo.stop = asyncio.Event()
        memo.tasks = [asyncio.create_task(reconciler.run(), name="reconcile")]
        pools = kwargs["modelpools"]
        every_pool = lambda: [e for store in pools.values() for e in store]  # noqa: E731
        scaling = autoscaling.Settings()
        if options.placeholder_priority_class:
            scaling = replace(scaling, priority_class=options.placeholder_priority_class)
        memo.tasks.append(
            asyncio.create_task(
                autoscaling.run(api, every_pool, stop=memo.stop, settings=scaling, session=session),
                name="autoscale",
            )
        )

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        if "stop" in memo:
            memo.stop.set()  # the autoscaler finishes its pass
        for task in memo.get("tasks", []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if "reconciler" in memo:
            await memo.reconciler.aclose()
        if "session" in memo:
            await memo.session.close()

    @kopf.on.probe(id="reconciles", registry=registry)
    def reconciles(memo: kopf.Memo, **_: Any) -> int:
        reconciler: reconciling.Reconciler | None = memo.get("reconciler")
        return reconciler.passes if reconciler is not None else 0

    return registry


def _mark(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    reconciler: reconciling.Reconciler | None = memo.get("reconciler")
    if namespace and reconciler is not None:
        reconciler.mark(namespace)


def _snapshots(indexes: Mapping[str, Any]) -> Callable[[str], Snapshot]:
    """A reader of one namespace's entries across the live kopf indexes."""

    def entries(name: str, namespace: str) -> tuple[Any, ...]:
        store = indexes[name].get(namespace)
        return tuple(store) if store is not None else ()

    def snapshot(namespace: str) -> Snapshot:
        found = {}
        for selector in CHILD_KINDS:
            for child in entries(selector[1], namespace):
                found[child.kind, child.name] = child
        return Snapshot(
            namespace=namespace,
            pools=entries("modelpools", namespace),
            routes=entries("inferenceroutes", namespace),
            quotas=entries("tokenquotas", namespace),
            secrets={s.name: s for s in entries("secrets", namespace)},
            children=found,
            pods=entries("pods", namespace),
        )

    return snapshot
