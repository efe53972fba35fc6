"""The whole operator scales a pool: `headway operator` with the chart's RBAC, real sidecars.

The operator's startup handler runs the autoscaler as its background task.
Each pool pod gets a loopback IP and a real `headway sidecar` process on it
(admin port 9090, as the operator expects), in front of a slow simulator;
streamed requests through the first sidecar fill the real-time queue. The
pool's delays are shortened; the autoscaler's own pass interval (5 s) is not.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.kube import ControlPlane
from tests.operator import operating
from tests.operator.autoscaling_nodes import GpuNode, gpu_node
from tests.operator.operating import Sidecar, condition, poll

pytestmark = pytest.mark.cluster

API_KEY = "sk-test-scale-0001"
PRIORITY_CLASS = "headway-warm-placeholder"  # the autoscaler's default name


def resources(namespace: str, server_port: int, node: GpuNode) -> list[dict[str, Any]]:
    template = {"spec": {"containers": [{"name": "server", "image": "example/server:1"}]}}
    return [
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "ModelPool",
            "metadata": {"name": "pool", "namespace": namespace},
            "spec": {
                "models": ["sim-model"],
                "server": {"port": server_port, "template": template},
                "capacity": {"maxConcurrency": 2},
                # 2 slots + 1 waiting per replica: 11 outstanding requests ask for 4.
                "scaling": {
                    "minReplicas": 1,
                    "maxReplicas": 3,
                    "targetQueuePerReplica": 1,
                    "ttftTarget": "30s",
                    "scaleUpCooldown": "1s",
                    "scaleDownDelay": "5s",
                },
                "nodePool": {
                    "nodeSelector": node.selector,
                    "gpusPerReplica": 1,
                    # Three replicas and one placeholder fill the 4-GPU node exactly.
                    "warmReplicas": 1,
                },
            },
        },
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "InferenceRoute",
            "metadata": {"name": "chat", "namespace": namespace},
            "spec": {"model": "chat", "backends": [{"pool": "pool", "model": "sim-model"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "team-keys", "namespace": namespace},
            "stringData": {"key": API_KEY},
        },
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "TokenQuota",
            "metadata": {"name": "team", "namespace": namespace},
            "spec": {"apiKeys": {"secretRef": {"name": "team-keys"}}},
        },
    ]


class Fleet:
    """Keeps a real sidecar on every running pod of the pool, from a thread."""

    def __init__(self, plane: ControlPlane, namespace: str, workdir: Path) -> None:
        self.plane, self.namespace, self.workdir = plane, namespace, workdir
        self.sidecars: dict[str, Sidecar] = {}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def _secret(self, name: str, key: str) -> bytes:
        return base64.b64decode(self.plane.get("secret", name, "-n", self.namespace)["data"][key])

    def _files(self) -> tuple[Path, Path, Path]:
        config_map = self.plane.get("configmap", "pool-config", "-n", self.namespace)
        config, keys, token = (self.workdir / n for n in ("config.json", "keys", "token"))
        config.write_text(config_map["data"]["config.json"])
        keys.write_bytes(self._secret("headway-hashing-keys", "keys"))
        token.write_bytes(self._secret("pool-push-token", "token"))
        return config, keys, token

    def _follow(self) -> None:
        try:
            files = poll(self._files_when_ready, "the pool's config and secrets", 120)
            while not self.stop.is_set():
                pods = self.plane.get("pods", "-n", self.namespace, "-l", "headway.dev/pool=pool")
                running = {
                    p["metadata"]["name"]
                    for p in pods["items"]
                    if p["status"].get("phase") == "Running"
                    and not p["metadata"].get("deletionTimestamp")
                }
                for name in [n for n in self.sidecars if n not in running]:
                    self.sidecars.pop(name).stop()
                for name in sorted(running - set(self.sidecars)):
                    ip = operating.free_ip(self.plane, self.namespace, name)
                    self.sidecars[name] = operating.start_sidecar(ip, *files, self.workdir)
                self.stop.wait(0.5)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def _files_when_ready(self) -> tuple[Path, Path, Path] | None:
        with contextlib.suppress(subprocess.CalledProcessError, KeyError):
            return self._files()
        return None

    def first(self) -> Sidecar | None:
        return next(iter(self.sidecars.values()), None)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        for sidecar in self.sidecars.values():
            sidecar.stop()


def keep_busy(url: str, concurrency: int, stop: threading.Event) -> list[threading.Thread]:
    """Threads that keep ``concurrency`` streamed requests outstanding until ``stop``."""
    body = json.dumps(
        {
            "model": "chat",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}],
        }
    ).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def worker() -> None:
        while not stop.is_set():
            request = urllib.request.Request(
                url + "/v1/chat/completions", data=body, headers=headers
            )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(request, timeout=60) as response,
            ):
                response.read()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture
def scaled_pool(cluster: ControlPlane, tmp_path: Path) -> Iterator[tuple[str, Fleet, Any, GpuNode]]:
    operating.install_crds(cluster)
    cluster.apply(
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": PRIORITY_CLASS},
            "value": -10,
            "preemptionPolicy": "Never",
        }
    )
    token = operating.operator_token(cluster)
    server_port = operating.free_port("127.0.0.1")
    # Two seconds to the first token keeps requests in flight long enough to queue.
    simulator = subprocess.Popen(
        [operating.HEADWAY, "simulate", "--listen", f"127.0.0.1:{server_port}",
         "--ttft", "2s", "--tpot", "10ms", "--output-tokens", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    # Exits in reverse: the operator stops, the namespace's pods go (kwok still
    # runs the node that holds them), then the node.
    with (
        gpu_node(cluster) as node,
        cluster.scratch_namespace("autoscale") as namespace,
        operating.running(cluster, namespace, token, tmp_path) as operator,
    ):
        fleet = Fleet(cluster, namespace, tmp_path)
        try:
            cluster.apply(resources(namespace, server_port, node))
            fleet.thread.start()
            yield namespace, fleet, operator, node
        finally:
            fleet.close()
            simulator.terminate()
            simulator.wait(timeout=20)


def test_operator_scales_a_pool_up_under_load_and_down_after_it(
    cluster: ControlPlane, scaled_pool: tuple[str, Fleet, Any, GpuNode]
) -> None:
    namespace, fleet, operator, node = scaled_pool

    def replicas() -> int:
        return int(cluster.get("deployment", "pool", "-n", namespace)["spec"]["replicas"])

    def alive() -> Sidecar | None:
        if fleet.errors:
            raise fleet.errors[0]
        return fleet.first()

    first = poll(alive, "a sidecar on the first pod", 180, operator)
    stop = threading.Event()
    started = time.monotonic()
    workers = keep_busy(first.url, 11, stop)
    try:
        poll(lambda: replicas() == 3, "the operator scaling to 3", 180, operator)
        up = time.monotonic() - started
        busy = cluster.get("modelpool", "pool", "-n", namespace)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    stopped = time.monotonic()
    poll(lambda: replicas() == 1, "the operator scaling back to 1", 180, operator)
    # Printed, not asserted: 5 s passes, a 1 s cooldown and a 5 s delay on a shared machine.
    print(f"scaled 1 -> 3 in {up:.1f}s under load; 3 -> 1 {time.monotonic() - stopped:.1f}s after")

    def settled() -> dict[str, Any] | None:
        pool: dict[str, Any] = cluster.get("modelpool", "pool", "-n", namespace)
        return pool if pool.get("status", {}).get("desiredReplicas") == 1 else None

    idle = poll(settled, "status desiredReplicas 1", 60, operator)
    events = cluster.get("events", "-n", namespace)["items"]
    reasons = {e["reason"] for e in events if e["source"].get("component") == "headway-autoscaler"}
    pods = cluster.get("pods", "-n", namespace, "-l", "headway.dev/pool=pool")["items"]

    assert busy["status"]["desiredReplicas"] == 3
    assert condition(busy, "ScalingLimited")["status"] == "True"
    assert condition(busy, "Ready")  # the reconcile's conditions survive the autoscaler's
    assert condition(idle, "ScalingLimited")["status"] == "False"
    assert {"ScaleUp", "ScaleDown"} <= reasons
    assert {p["spec"]["nodeName"] for p in pods} == {node.name}
    # The placeholder, written with the chart's RBAC, holds its GPU on the same node.
    warm = cluster.get("pods", "-n", namespace, "-l", "headway.dev/warm-for=pool")["items"]
    assert [p["spec"].get("nodeName") for p in warm] == [node.name]
    assert warm[0]["spec"]["priority"] == -10
