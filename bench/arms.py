"""The arms: what each one starts, how it is configured, where its clients connect.

Every arm fronts the same simulator. The proxy under test runs on
``procs.PROXY_CORE``; the simulator, redis-server and the load generator on
``procs.LOAD_CORE``. The direct arm has no proxy: its measured process is the
simulator itself, the baseline the others are compared with.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import deps, procs

ARMS = ("direct", "nginx", "headway-bare", "headway-full", "litellm")
HEADWAY_ARMS = ("headway-bare", "headway-full")

API_KEY = "sk-bench-tenant-0001-not-a-real-key"
LITELLM_MASTER_KEY = "sk-bench-litellm-master-not-a-real-key"
MODEL = "bench"
HEADWAY = Path(sys.executable).parent / "headway"
# No limit is meant to be hit, only checked: these allow far more than any run sends.
_ROOMY_LIMITS = {
    "tokensPerMinute": 1_000_000_000,
    "requestsPerMinute": 10_000_000,
    "tokensPerDay": 1_000_000_000_000,
    "concurrentRequests": 100_000,
    "costPerMonth": "1000000.00",
}


@dataclass(frozen=True)
class Upstream:
    """How the simulator behaves in one stage of the run."""

    ttft: float
    tpot: float
    output_tokens: int
    max_concurrency: int


@dataclass(frozen=True)
class Capacity:
    """The sidecar's slots and queues in one stage."""

    max_concurrency: int
    batch_max_share: float = 0.75
    realtime_depth: int = 4096
    batch_depth: int = 8192
    timeout: str = "300s"


@dataclass
class Endpoint:
    """A started arm: where clients connect and which process is charged for it."""

    arm: str
    url: str
    key: str
    process: procs.Process
    admin_url: str | None = None
    config: Path | None = None  # Headway's rendered contract document
    owned: bool = True

    def stop(self) -> None:
        if self.owned:
            self.process.stop()


@dataclass
class Context:
    work: Path  # scratch files: configs, logs
    redis_url: str | None = None

    @property
    def logs(self) -> Path:
        path = self.work / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


@dataclass
class Simulator:
    process: procs.Process
    url: str

    def stop(self) -> None:
        self.process.stop()


def start_simulator(ctx: Context, upstream: Upstream, name: str = "simulator") -> Simulator:
    port = procs.free_port()
    process = procs.start(
        name,
        [
            str(HEADWAY),
            "--log-level",
            "WARNING",
            "simulate",
            "--listen",
            f"127.0.0.1:{port}",
            "--ttft",
            _ms(upstream.ttft),
            "--tpot",
            _ms(upstream.tpot),
            "--output-tokens",
            str(upstream.output_tokens),
            "--max-concurrency",
            str(upstream.max_concurrency),
        ],
        core=procs.LOAD_CORE,
        log_dir=ctx.logs,
    )
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(url + "/v1/models", process)
    return Simulator(process, url)


def start(arm: str, ctx: Context, simulator: Simulator, capacity: Capacity) -> Endpoint:
    sim_url = simulator.url
    if arm == "direct":
        # NB: stopping this endpoint must not stop the shared simulator.
        return Endpoint(arm, sim_url, API_KEY, simulator.process, owned=False)
    if arm == "nginx":
        return _start_nginx(ctx, sim_url)
    if arm in HEADWAY_ARMS:
        return _start_headway(arm, ctx, sim_url, capacity)
    if arm == "litellm":
        return _start_litellm(ctx, sim_url)
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


# -- nginx -----------------------------------------------------------------------------------


def _start_nginx(ctx: Context, sim_url: str) -> Endpoint:
    """A plain reverse proxy: one worker, keep-alive upstream, no buffering (for SSE)."""
    port = procs.free_port()
    prefix = ctx.work / f"nginx-{port}"
    prefix.mkdir(parents=True)
    upstream = sim_url.removeprefix("http://")
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            worker_processes 1;
            worker_rlimit_nofile 16384;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            events {{ worker_connections 8192; }}
            http {{
                access_log off;
                client_body_temp_path {prefix}/body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
                upstream simulator {{
                    server {upstream};
                    keepalive 512;
                }}
                server {{
                    listen 127.0.0.1:{port} backlog=4096;
                    keepalive_requests 1000000;
                    location / {{
                        proxy_pass http://simulator;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_buffering off;
                        proxy_read_timeout 600s;
                    }}
                }}
            }}
            """
        )
    )
    process = procs.start(
        f"nginx-{port}",
        [deps.nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        core=procs.PROXY_CORE,
        log_dir=ctx.logs,
    )
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(url + "/v1/models", process)
    return Endpoint("nginx", url, API_KEY, process)


# -- Headway ---------------------------------------------------------------------------------


def headway_resources(arm: str, sim_port: int, capacity: Capacity) -> list[dict[str, Any]]:
    """ModelPool, InferenceRoute, Secret and TokenQuota for one Headway arm."""
    meta = {"name": "bench", "namespace": "bench"}
    queue = {"timeout": capacity.timeout}
    pool = {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": meta,
        "spec": {
            "models": ["bench-model"],
            "server": {"port": sim_port},
            "capacity": {
                "maxConcurrency": capacity.max_concurrency,
                "batchMaxShare": capacity.batch_max_share,
                "queues": {
                    "realtime": {"maxDepth": capacity.realtime_depth, **queue},
                    "batch": {"maxDepth": capacity.batch_depth, **queue},
                },
            },
            "pricing": {"inputPerMillionTokens": "0.20", "outputPerMillionTokens": "0.60"},
        },
    }
    route = {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "InferenceRoute",
        "metadata": meta,
        "spec": {
            "model": MODEL,
            "backends": [{"pool": "bench", "model": "bench-model"}],
            "priority": {"default": "realtime", "allowOverride": True},
            "defaultMaxTokens": 64,
            "timeouts": {"firstToken": "300s", "total": "600s"},
        },
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bench-keys", "namespace": "bench"},
        "stringData": {"current": API_KEY},
    }
    limits = (
        _ROOMY_LIMITS
        if arm == "headway-full"
        else {"tokensPerMinute": _ROOMY_LIMITS["tokensPerMinute"]}
    )
    quota = {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "TokenQuota",
        "metadata": meta,
        "spec": {
            "tenant": "bench",
            "apiKeys": {"secretRef": {"name": "bench-keys"}},
            "limits": limits,
            "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
        },
    }
    return [pool, route, secret, quota]


def render_headway(arm: str, ctx: Context, sim_port: int, capacity: Capacity) -> Path:
    """Render the arm's resources with ``headway render``, as an operator would."""
    folder = ctx.work / f"{arm}-{sim_port}-{capacity.max_concurrency}"
    (folder / "resources").mkdir(parents=True, exist_ok=True)
    docs = headway_resources(arm, sim_port, capacity)
    (folder / "resources" / "bench.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    redis = ["--redis-url", ctx.redis_url] if arm == "headway-full" and ctx.redis_url else []
    subprocess.run(
        [
            str(HEADWAY),
            "--log-level",
            "ERROR",
            "render",
            "-f",
            str(folder / "resources"),
            "-o",
            str(folder / "config"),
            *redis,
        ],
        check=True,
        capture_output=True,
    )
    return folder / "config" / "bench.bench.json"


def _start_headway(arm: str, ctx: Context, sim_url: str, capacity: Capacity) -> Endpoint:
    sim_port = int(sim_url.rsplit(":", 1)[1])
    config = render_headway(arm, ctx, sim_port, capacity)
    if arm == "headway-full" and ctx.redis_url is None:
        raise RuntimeError("headway-full needs redis-server")
    port, admin = procs.free_port(), procs.free_port()
    process = procs.start(
        f"{arm}-{port}",
        [
            str(HEADWAY),
            "--log-level",
            "WARNING",
            "sidecar",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ],
        core=procs.PROXY_CORE,
        log_dir=ctx.logs,
    )
    admin_url = f"http://127.0.0.1:{admin}"
    procs.wait_http(admin_url + "/readyz", process)
    url = f"http://127.0.0.1:{port}"
    return Endpoint(arm, url, API_KEY, process, admin_url=admin_url, config=config)


# -- LiteLLM ---------------------------------------------------------------------------------


def _start_litellm(ctx: Context, sim_url: str) -> Endpoint:
    """LiteLLM's proxy, one worker, no database: master-key auth and deployment rpm/tpm.

    Per-tenant keys and budgets need its database, so the closest it comes
    without one is a single master key plus limits on the deployment.
    """
    port = procs.free_port()
    config = ctx.work / f"litellm-{port}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": "openai/bench-model",
                            "api_base": sim_url + "/v1",
                            "api_key": "sk-upstream-unused",
                            "rpm": _ROOMY_LIMITS["requestsPerMinute"],
                            "tpm": _ROOMY_LIMITS["tokensPerMinute"],
                        },
                    }
                ],
                "general_settings": {"master_key": LITELLM_MASTER_KEY},
                "litellm_settings": {"drop_params": True, "set_verbose": False},
            }
        )
    )
    env = {
        # No network here: use the cost map shipped in the package.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_ADMIN_UI": "True",
        "LITELLM_TELEMETRY": "False",
    }
    process = procs.start(
        f"litellm-{port}",
        [
            deps.litellm_binary(),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        core=procs.PROXY_CORE,
        log_dir=ctx.logs,
        env=env,
        cwd=ctx.work,
    )
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(url + "/health/liveliness", process, timeout=180)
    return Endpoint("litellm", url, LITELLM_MASTER_KEY, process)


def redis_commands(url: str) -> dict[str, int]:
    """Calls per command from INFO commandstats, to count round trips."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
