"""Config push to real sidecars standing in for a pool's two pods.

Each pod is patched to a loopback IP where a real `headway sidecar` listens,
started from the pod's ConfigMap, Secrets and hashing key. The sidecars' config
files are never rewritten, so anything new they run arrived by push.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from headway_contract import loads

from tests.fixtures.kube import ControlPlane, Scratch
from tests.fixtures.redis import RedisServer
from tests.operator import operating
from tests.operator.operating import Sidecar, admin_get, poll

pytestmark = pytest.mark.cluster

API_KEY = "sk-test-push-0001"


@dataclass
class Pool:
    plane: ControlPlane
    namespace: str
    operator: operating.Operator
    sidecars: list[Sidecar]
    files: dict[str, Path]
    workdir: Path

    def document(self) -> Any:
        config_map = self.plane.get("configmap", "pool-config", "-n", self.namespace)
        return loads(config_map["data"]["config.json"])

    def versions(self) -> list[str | None]:
        return [(admin_get(s, "/config") or {}).get("version") for s in self.sidecars]

    def converged(self) -> Any:
        """The desired document, once every sidecar runs it."""
        try:
            document = self.document()
        except subprocess.CalledProcessError:  # the ConfigMap is not (yet) there
            return None
        return document if self.versions() == [document.version] * len(self.sidecars) else None


def _resources(namespace: str, server_port: int, tokens_per_minute: int) -> list[dict[str, Any]]:
    template = {"spec": {"containers": [{"name": "server", "image": "example/server:1"}]}}
    return [
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "ModelPool",
            "metadata": {"name": "pool", "namespace": namespace},
            "spec": {
                "models": ["sim-model"],
                "server": {"port": server_port, "template": template},
                # external: no autoscaler decision changes the two pods under the test.
                "scaling": {"mode": "external", "minReplicas": 2, "maxReplicas": 2},
                "nodePool": {"gpusPerReplica": 0},
            },
        },
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "InferenceRoute",
            "metadata": {"name": "chat", "namespace": namespace},
            "spec": {"model": "chat", "backends": [{"pool": "pool", "model": "sim-model"}]},
        },
        # A second route keeps the tenant in the config when "chat" is deleted.
        {
            "apiVersion": "headway.dev/v1alpha1",
            "kind": "InferenceRoute",
            "metadata": {"name": "other", "namespace": namespace},
            "spec": {"model": "other", "backends": [{"pool": "pool", "model": "sim-model"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "team-keys", "namespace": namespace},
            "stringData": {"key": API_KEY},
        },
        _quota(namespace, tokens_per_minute),
    ]


def _quota(namespace: str, tokens_per_minute: int) -> dict[str, Any]:
    return {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "TokenQuota",
        "metadata": {"name": "team", "namespace": namespace},
        "spec": {
            "apiKeys": {"secretRef": {"name": "team-keys"}},
            # A daily limit too, so the limiter keeps the day's counters for status.usage.
            "limits": {"tokensPerMinute": tokens_per_minute, "tokensPerDay": 10_000_000},
        },
    }


def _secret_value(plane: ControlPlane, namespace: str, name: str, key: str) -> bytes:
    return base64.b64decode(plane.get("secret", name, "-n", namespace)["data"][key])


@pytest.fixture
def pool(cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path) -> Iterator[Pool]:
    with _running_pool(cluster, scratch_namespace("push"), tmp_path) as running:
        yield running


@contextlib.contextmanager
def _running_pool(
    cluster: ControlPlane, namespace: str, tmp_path: Path, *flags: str
) -> Iterator[Pool]:
    operating.install_crds(cluster)
    token = operating.operator_token(cluster)

    server_port = operating.free_port("127.0.0.1")
    simulator = subprocess.Popen(
        [operating.HEADWAY, "simulate", "--listen", f"127.0.0.1:{server_port}",
         "--ttft", "10ms", "--tpot", "1ms", "--output-tokens", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    sidecars: list[Sidecar] = []
    with operating.running(cluster, namespace, token, tmp_path, *flags) as operator:
        try:
            cluster.apply(_resources(namespace, server_port, 100_000))
            pods = poll(
                lambda: (
                    [
                        p["metadata"]["name"]
                        for p in cluster.get(
                            "pods", "-n", namespace, "-l", "headway.dev/pool=pool"
                        )["items"]
                        if p.get("status", {}).get("phase") == "Running"
                    ]
                    if len(
                        cluster.get("pods", "-n", namespace, "-l", "headway.dev/pool=pool")["items"]
                    )
                    == 2
                    else None
                ),
                "two pool pods Running",
                180,
                operator,
            )
            assert len(pods) == 2
            ips = [operating.free_ip(cluster, namespace, pod) for pod in pods]

            files = {
                "config": tmp_path / "config.json",
                "keys": tmp_path / "keys",
                "token": tmp_path / "token",
            }
            config_map = poll(
                lambda: cluster.get("configmap", "pool-config", "-n", namespace),
                "pool ConfigMap",
                60,
                operator,
            )
            files["config"].write_text(config_map["data"]["config.json"])
            files["keys"].write_bytes(
                _secret_value(cluster, namespace, "headway-hashing-keys", "keys")
            )
            files["token"].write_bytes(
                _secret_value(cluster, namespace, "pool-push-token", "token")
            )
            for ip in ips:
                sidecars.append(
                    operating.start_sidecar(
                        ip, files["config"], files["keys"], files["token"], tmp_path
                    )
                )
            yield Pool(cluster, namespace, operator, sidecars, files, tmp_path)
        finally:
            for sidecar in sidecars:
                sidecar.stop()
            simulator.terminate()
            simulator.wait(timeout=20)


def _chat(sidecar: Sidecar, max_tokens: int) -> tuple[int, dict[str, Any]]:
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        sidecar.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"{}")


def _change_quota(pool: Pool, tokens_per_minute: int) -> float:
    """Seconds from the apply until both sidecars run the new document (printed, not asserted)."""
    before = pool.document().version
    started = time.monotonic()
    pool.plane.apply(_quota(pool.namespace, tokens_per_minute))
    poll(
        lambda: (d := pool.converged()) is not None and d.version != before,
        f"tokensPerMinute {tokens_per_minute} on both sidecars",
        60,
        pool.operator,
    )
    took = time.monotonic() - started
    print(f"tokensPerMinute -> {tokens_per_minute}: both sidecars in {took:.2f} s")
    return took


def test_quota_changes_reach_both_sidecars_by_push(pool: Pool) -> None:
    first = poll(pool.converged, "initial push", 120, pool.operator)
    status = poll(
        lambda: (
            (s := pool.plane.get("modelpool", "pool", "-n", pool.namespace).get("status", {}))
            .get("config", {})
            .get("syncedReplicas")
            == 2
            and s
        ),
        "syncedReplicas 2",
        60,
        pool.operator,
    )
    assert status["config"]["version"] == first.version
    assert (
        operating.condition(
            pool.plane.get("modelpool", "pool", "-n", pool.namespace), "ConfigSynced"
        )["status"]
        == "True"
    )
    for sidecar in pool.sidecars:
        code, _ = _chat(sidecar, 50)
        assert code == 200

    # Lowering: a request whose reservation exceeds the new limit is refused by both.
    _change_quota(pool, 40)
    for sidecar in pool.sidecars:
        code, body = _chat(sidecar, 50)
        assert code == 429, body
        assert "token" in json.dumps(body).lower()

    # Raising: the same request fits again.
    _change_quota(pool, 100_000)
    for sidecar in pool.sidecars:
        code, _ = _chat(sidecar, 50)
        assert code == 200


def test_a_sidecar_restarted_with_a_stale_config_converges_by_push(pool: Pool) -> None:
    stale = poll(pool.converged, "initial push", 120, pool.operator)
    _change_quota(pool, 5_000)
    fresh = pool.document()
    assert fresh.generation > stale.generation

    # The restarted sidecar reads the old file again: only a push can fix it.
    victim = pool.sidecars[0]
    victim.stop()
    pool.sidecars[0] = operating.start_sidecar(
        victim.ip, pool.files["config"], pool.files["keys"], pool.files["token"], pool.workdir
    )
    assert (admin_get(pool.sidecars[0], "/config") or {}).get("version") in (
        stale.version,
        fresh.version,  # the operator may have been quicker than this read
    )
    converged = poll(pool.converged, "restarted sidecar converged", 60, pool.operator)
    assert converged.version == fresh.version


def test_deleting_a_route_removes_it_from_both_sidecars(pool: Pool) -> None:
    poll(pool.converged, "initial push", 120, pool.operator)
    for sidecar in pool.sidecars:
        assert _chat(sidecar, 10)[0] == 200

    pool.plane.kubectl("delete", "inferenceroute", "chat", "-n", pool.namespace)
    document = poll(
        lambda: (d := pool.converged()) is not None and d.route("chat") is None and d,
        "route gone from both sidecars",
        60,
        pool.operator,
    )
    assert [r.model for r in document.routes] == ["other"]
    for sidecar in pool.sidecars:
        code, body = _chat(sidecar, 10)
        assert code == 404, body
        assert "chat" in body["error"]["message"]


@pytest.mark.redis
def test_quota_usage_is_read_from_the_shared_limiter(
    cluster: ControlPlane, redis: RedisServer, scratch_namespace: Scratch, tmp_path: Path
) -> None:
    flags = (f"--redis-url={redis.url}", "--usage-interval=1s")
    with _running_pool(cluster, scratch_namespace("push"), tmp_path, *flags) as pool:
        document = poll(pool.converged, "initial push", 120, pool.operator)
        assert document.limiter.redis is not None
        for sidecar in pool.sidecars:
            assert _chat(sidecar, 20)[0] == 200

        def counted() -> dict[str, Any] | None:
            quota = pool.plane.get("tokenquota", "team", "-n", pool.namespace)
            found: dict[str, Any] = quota.get("status", {}).get("usage", {})
            return found if found.get("requestsToday") == 2 else None

        found = poll(counted, "usage in the TokenQuota status", 90, pool.operator)
        assert found["tokensToday"] > 0
        # The bucket of a 100k tokens/minute quota drains these few tokens in
        # milliseconds; test_operator_units checks the arithmetic.
        assert isinstance(found["tokensThisMinute"], int)
        assert found["costThisMonth"] == "0"  # the pool has no pricing


def test_a_lost_configmap_does_not_lock_the_sidecars_out(pool: Pool) -> None:
    poll(pool.converged, "initial push", 120, pool.operator)
    _change_quota(pool, 5_000)
    _change_quota(pool, 6_000)
    running = pool.document().generation
    assert running >= 3

    # Deleted while no operator runs: the next one starts over at generation 1,
    # below what the sidecars run, and they refuse a lower generation.
    pool.operator.stop()
    pool.plane.kubectl("delete", "configmap", "pool-config", "-n", pool.namespace)
    pool.operator.start()
    poll(lambda: pool.converged(), "same content again", 120, pool.operator)
    assert pool.document().generation < running

    # A change is refused as stale at first; the sidecars report their
    # generation and the operator renders above it.
    _change_quota(pool, 7_000)
    document = pool.document()
    assert document.generation > running
    assert pool.versions() == [document.version] * 2
