"""The autoscaler's loop against a real control plane, scheduler and kwok GPU node.

Real sidecars (in-process ``serving.start``) answer ``/load`` on the pods'
kwok loopback IPs, in front of a slow simulator; streamed requests build the
real-time queue. The loop runs with a ServiceAccount token held to the Role
below, so a missing permission fails here. The pool's Deployment is built with
the operator's own ``children.deployment``; the tests create it themselves
instead of running the kopf handlers, so only the autoscaler is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from headway_operator import autoscaling, children, kubeapi, observing, specs
from headway_operator.observing import Entry
from headway_sidecar import serving, simulator
from prometheus_client import CollectorRegistry

from tests.fixtures.kube import ControlPlane, Scratch, free_port
from tests.operator.autoscaling_nodes import GpuNode, gpu_node
from tests.sidecar.conftest import document, serve, write_json

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
PRIORITY_CLASS = "headway-warm-placeholder"
# What the autoscaler needs, no more; docs/autoscaling.md lists the same rules.
RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": ["headway.dev"], "resources": ["modelpools/status"], "verbs": ["patch"]},
]
API_KEY = {"authorization": "Bearer sk-team-a"}


# -- the cluster side ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds(cluster: ControlPlane) -> ControlPlane:
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_for(
        lambda: _established(cluster, "modelpools.headway.dev"), "ModelPool CRD Established"
    )
    # As the chart installs it: below every workload, and never evicting one.
    cluster.apply(
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": PRIORITY_CLASS},
            "value": -10,
            "preemptionPolicy": "Never",
            "globalDefault": False,
            "description": "Headway warm placeholders: hold GPU nodes, yield to any pod.",
        }
    )
    return cluster


@pytest.fixture(scope="module")
def node(crds: ControlPlane) -> Iterator[GpuNode]:
    with gpu_node(crds) as made:
        yield made


def _established(plane: ControlPlane, name: str) -> bool:
    conditions = plane.get("crd", name).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture
def namespace(crds: ControlPlane, scratch_namespace: Scratch) -> str:
    name = scratch_namespace("scale")
    crds.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "autoscaler", "namespace": name},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "autoscaler", "namespace": name},
                "rules": RULES,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "autoscaler", "namespace": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "autoscaler",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "autoscaler", "namespace": name}],
            },
        ]
    )
    return name


def pool_body(
    namespace: str, name: str, node: GpuNode, *, gpus: int = 1, warm: int = 0, **scaling: Any
) -> dict[str, Any]:
    server = {"name": "server", "image": "registry.invalid/model-server:0"}
    server["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    return {
        "apiVersion": specs.API_VERSION,
        "kind": "ModelPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "models": ["llama-3.1-8b-instruct"],
            "server": {"port": 8000, "template": {"spec": {"containers": [server]}}},
            "capacity": {"maxConcurrency": 2},
            "scaling": scaling,
            "nodePool": {
                "nodeSelector": node.selector,
                "gpusPerReplica": gpus,
                "warmReplicas": warm,
            },
        },
    }


@dataclass
class Cluster:
    """The test's view: the admin plane, an admin API client and the pool entries."""

    plane: ControlPlane
    admin: kubeapi.Client
    namespace: str
    entries: dict[str, Entry] = field(default_factory=dict)

    async def create_pool(self, body: dict[str, Any], replicas: int | None = 1) -> Entry:
        """The ModelPool, and its Deployment as the operator builds it (unless replicas is None)."""
        await asyncio.to_thread(self.plane.apply, body)
        name = body["metadata"]["name"]
        stored = await self.admin.get(kubeapi.MODELPOOLS, self.namespace, name)
        assert stored is not None
        entry = observing.resource_entry("ModelPool", stored)
        assert isinstance(entry.parsed, specs.ModelPool), entry.problem
        self.entries[name] = entry
        if replicas is not None:
            await self.create_deployment(entry, replicas)
        return entry

    async def create_deployment(self, entry: Entry, replicas: int) -> None:
        assert isinstance(entry.parsed, specs.ModelPool)
        body = children.deployment(
            entry.parsed, entry.uid, children.SidecarSettings(), replicas=replicas
        )
        await self.admin.apply(kubeapi.DEPLOYMENTS, self.namespace, body)

    async def refresh(self) -> None:
        """Re-read the pools, as the operator's kopf index would see them."""
        for name in list(self.entries):
            stored = await self.admin.get(kubeapi.MODELPOOLS, self.namespace, name)
            if stored is not None:
                self.entries[name] = observing.resource_entry("ModelPool", stored)

    async def pool(self, name: str) -> dict[str, Any]:
        stored = await self.admin.get(kubeapi.MODELPOOLS, self.namespace, name)
        assert stored is not None
        return stored

    async def replicas(self, name: str) -> int:
        path = kubeapi.DEPLOYMENTS.path(self.namespace, name, "scale")
        scale = await self.admin.request("GET", path)
        return int(scale["spec"]["replicas"])

    async def pods(self, selector: str) -> list[dict[str, Any]]:
        listed = await self.admin.request(
            "GET", kubeapi.PODS.path(self.namespace), params={"labelSelector": selector}
        )
        return [p for p in listed["items"] if not p["metadata"].get("deletionTimestamp")]

    async def events(self, reason: str) -> list[dict[str, Any]]:
        listed = await self.admin.request("GET", kubeapi.EVENTS.path(self.namespace))
        return [e for e in listed["items"] if e.get("reason") == reason]


def condition(pool: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [c for c in pool.get("status", {}).get("conditions") or () if c["type"] == kind]
    return found[0] if found else {}


async def eventually(
    check: Callable[[], Any], what: str, within: float = 120.0, every: float = 0.5
) -> Any:
    """Poll an async ``check`` until it returns something truthy; generous deadline."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
async def kube(namespace: str, crds: ControlPlane) -> AsyncIterator[Cluster]:
    info = kopf.ConnectionInfo(server=crds.url, ca_path=str(crds.ca_file), token=crds.admin_token)
    async with aiohttp.ClientSession() as session:
        yield Cluster(crds, kubeapi.Client(session, info), namespace)


@pytest.fixture
async def autoscaler(kube: Cluster) -> AsyncIterator[autoscaling.Settings]:
    """The loop under the autoscaler ServiceAccount; the pools refreshed as an index would be."""
    token = await asyncio.to_thread(
        kube.plane.token_for_service_account, kube.namespace, "autoscaler"
    )
    info = kopf.ConnectionInfo(server=kube.plane.url, ca_path=str(kube.plane.ca_file), token=token)
    settings = autoscaling.Settings(interval=0.5, admin_port=free_port(), placeholder_check=2.0)
    stop = asyncio.Event()

    async def index() -> None:
        while not stop.is_set():
            await kube.refresh()
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession() as session:
        api = kubeapi.Client(session, info)
        tasks = [
            asyncio.create_task(index()),
            asyncio.create_task(
                autoscaling.run(
                    api, lambda: list(kube.entries.values()), stop=stop, settings=settings
                )
            ),
        ]
        yield settings
        stop.set()
        await asyncio.gather(*tasks)


# -- sidecars on the pods' loopback IPs ------------------------------------------------------


@dataclass
class Sidecars:
    """A real sidecar for every running pod of a pool, bound to the pod's IP."""

    kube: Cluster
    pool: str
    admin_port: int
    config: Path
    running: dict[str, serving.Running] = field(default_factory=dict)  # by pod name

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pods = await self.kube.pods(f"{children.POOL_LABEL}={self.pool}")
            live = {p["metadata"]["name"]: p for p in pods if p["status"].get("podIP")}
            # Gone pods first: kwok may hand their IP to a new pod.
            for name in [n for n in self.running if n not in live]:
                await self.running.pop(name).drain()
            for name, pod in live.items():
                if name not in self.running:
                    self.running[name] = await serving.start(
                        config_path=str(self.config),
                        listen=(pod["status"]["podIP"], 0),
                        admin_listen=(pod["status"]["podIP"], self.admin_port),
                        key_file=None,
                        push_token_file=None,
                        registry=CollectorRegistry(),
                        settings=serving.Settings(poll_interval=5.0, grace=1.0),
                    )
            await asyncio.sleep(0.3)

    async def close(self) -> None:
        for running in self.running.values():
            await running.drain()


@contextlib.asynccontextmanager
async def sidecars(kube: Cluster, pool: str, admin_port: int, tmp: Path) -> AsyncIterator[Sidecars]:
    # Two seconds to the first token: requests stay in flight long enough to queue.
    sim = await serve(simulator.make_app(simulator.Settings(ttft=2.0, tpot=0.01, output_tokens=4)))
    # The sample document, renamed to the pool: the autoscaler checks whose load it reads.
    data = json.loads(json.dumps(document(sim.port)).replace('"small"', json.dumps(pool)))
    data["capacity"]["maxConcurrency"] = 2
    config = write_json(tmp / f"{pool}.json", data)
    fleet = Sidecars(kube, pool, admin_port, config)
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.follow(stop))
    try:
        yield fleet
    finally:
        stop.set()
        await task
        await fleet.close()
        await sim.runner.cleanup()


async def keep_busy(url: str, concurrency: int, stop: asyncio.Event) -> int:
    """Keep ``concurrency`` streamed real-time requests outstanding until ``stop``."""
    body = {
        "model": "chat",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    answered = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal answered
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(f"{url}/v1/chat/completions", json=body, headers=API_KEY) as r:
                    await r.read()
                    answered += r.status == 200

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return answered


# -- the tests -------------------------------------------------------------------------------


async def test_loop_scales_up_under_queued_load_and_back_down_after_it(
    kube: Cluster, autoscaler: autoscaling.Settings, node: GpuNode, tmp_path: Path
) -> None:
    # 2 slots + 1 waiting per replica: 11 outstanding requests ask for 4, over the maximum.
    scaling = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetQueuePerReplica": 1,
        "ttftTarget": "30s",
        "scaleUpCooldown": "1s",
        "scaleDownDelay": "3s",
    }
    await kube.create_pool(pool_body(kube.namespace, "chat", node, **scaling))

    async with sidecars(kube, "chat", autoscaler.admin_port, tmp_path) as fleet:
        first = await eventually(lambda: _first(fleet), "a sidecar on the first pod")
        stop = asyncio.Event()
        load = asyncio.create_task(keep_busy(first.url, 11, stop))
        try:
            await eventually(lambda: _replicas_are(kube, "chat", 3), "scale-up to 3 replicas")
            busy = await kube.pool("chat")
            await eventually(lambda: _all_ready(kube, "chat", 3), "3 ready pods")
        finally:
            stop.set()
        answered = await load

        await eventually(lambda: _replicas_are(kube, "chat", 1), "scale-down to 1 replica")
        idle = await eventually(lambda: _status_is(kube, "chat", 1), "status desiredReplicas 1")

    # The pods went where the pool's nodePool sends them: the GPU node.
    pods = await kube.pods(f"{children.POOL_LABEL}=chat")
    assert {p["spec"]["nodeName"] for p in pods} == {node.name}
    assert pods[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    assert answered > 0
    assert busy["status"]["desiredReplicas"] == 3
    assert busy["status"]["queue"]["realtime"] >= 1
    assert busy["status"]["lastScaleTime"]
    assert condition(busy, "ScalingLimited")["status"] == "True"  # 11 asks for 4
    assert condition(idle, "ScalingLimited")["status"] == "False"
    assert idle["status"]["queue"] == {"realtime": 0, "batch": 0}

    ups, downs = await kube.events("ScaleUp"), await kube.events("ScaleDown")
    assert ups and downs
    assert any(" -> 3: real-time " in e["message"] for e in ups), [e["message"] for e in ups]
    # Down in one step or several as the queue drains, ending at minReplicas.
    assert any(" -> 1: " in e["message"] for e in downs), [e["message"] for e in downs]
    assert ups[0]["involvedObject"]["kind"] == "ModelPool"
    assert await kube.events("MaxReplicas")  # the Warning when ScalingLimited turned True


async def test_pool_asking_for_more_gpus_than_any_node_reports_capacity_pending(
    kube: Cluster, autoscaler: autoscaling.Settings, node: GpuNode
) -> None:
    # Every GPU node of the session has 4.
    await kube.create_pool(pool_body(kube.namespace, "huge", node, gpus=8))

    pending = await eventually(
        lambda: _condition_is(kube, "huge", "CapacityPending", "True"), "CapacityPending True"
    )

    assert "1 of 1 replicas asking for 8 GPU(s) each" in pending["message"]
    assert "nvidia.com/gpu" in pending["message"]  # the scheduler's own words
    warnings = await kube.events("Unschedulable")
    assert any(e["involvedObject"]["name"] == "huge" for e in warnings)
    stored = await kube.pool("huge")
    assert stored["status"]["desiredReplicas"] == 1  # no load reports: nothing to act on


async def test_warm_placeholders_hold_the_gpus_and_yield_to_real_replicas(
    kube: Cluster, autoscaler: autoscaling.Settings, node: GpuNode
) -> None:
    # Two placeholders of 2 GPUs fill the 4-GPU node; an HPA (mode external) owns replicas.
    scaling = {"mode": "external", "minReplicas": 1, "maxReplicas": 2}
    body = pool_body(kube.namespace, "warm", node, gpus=2, warm=2, **scaling)
    entry = await kube.create_pool(body, replicas=None)
    warm = f"{autoscaling.WARM_LABEL}=warm"
    await eventually(lambda: _running(kube, warm, 2), "2 placeholders running")

    # A real replica arrives: the scheduler preempts a placeholder for it.
    await kube.create_deployment(entry, replicas=1)
    real = f"{children.POOL_LABEL}=warm"
    await eventually(lambda: _running(kube, real, 1), "the real replica running")
    # As an HPA would: a second replica, which takes the other placeholder's GPUs.
    await kube.admin.request(
        "PATCH",
        kubeapi.DEPLOYMENTS.path(kube.namespace, "warm", "scale"),
        {"spec": {"replicas": 2}},
        content_type=kubeapi.MERGE,
    )
    await eventually(lambda: _running(kube, real, 2), "both real replicas running")

    placeholders = await kube.pods(warm)
    preempted = await kube.events("Preempted")
    stored = await eventually(lambda: _status_is(kube, "warm", 2), "status desiredReplicas 2")

    assert {p["spec"]["nodeName"] for p in await kube.pods(real)} == {node.name}
    assert len(preempted) >= 2
    # The placeholders were recreated and now wait for a node: that is the signal
    # a cluster autoscaler acts on, and it is not the pool's CapacityPending.
    assert len(placeholders) == 2
    assert all(p["status"].get("phase") == "Pending" for p in placeholders)
    assert placeholders[0]["spec"]["priority"] == -10
    assert placeholders[0]["metadata"]["ownerReferences"][0]["controller"] is True
    assert condition(stored, "CapacityPending")["status"] == "False"
    assert "ScalingLimited" not in {c["type"] for c in stored["status"]["conditions"]}
    assert await kube.replicas("warm") == 2  # external mode: the loop never wrote replicas


# -- conditions polled above -----------------------------------------------------------------


async def _first(fleet: Sidecars) -> serving.Running | None:
    return next(iter(fleet.running.values()), None)


async def _replicas_are(kube: Cluster, name: str, count: int) -> bool:
    return await kube.replicas(name) == count


async def _all_ready(kube: Cluster, name: str, count: int) -> bool:
    pods = await kube.pods(f"{children.POOL_LABEL}={name}")
    return len(pods) == count and all(p["status"].get("phase") == "Running" for p in pods)


async def _running(kube: Cluster, selector: str, count: int) -> bool:
    pods = await kube.pods(selector)
    return sum(p["status"].get("phase") == "Running" for p in pods) == count


async def _status_is(kube: Cluster, name: str, desired: int) -> dict[str, Any] | None:
    pool = await kube.pool(name)
    return pool if pool.get("status", {}).get("desiredReplicas") == desired else None


async def _condition_is(kube: Cluster, name: str, kind: str, status: str) -> dict[str, Any]:
    found = condition(await kube.pool(name), kind)
    return found if found.get("status") == status else {}
