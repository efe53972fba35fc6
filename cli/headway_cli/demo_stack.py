"""The demo's data plane on loopback: rendered configs and the processes serving them.

Renders the example resources as the operator would, with every pool moved to
its own free 127.0.0.1 ports, and starts one ``headway simulate`` and one
``headway sidecar`` per pool. Each child runs in a process group of its own and
is stopped by PID, so Ctrl-C in the terminal reaches only the demo, which then
stops every child it started, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import headway_contract as contract
from headway_contract import Document, Pricing, load_hashing_keys
from headway_operator import cli as operator_cli

LOOPBACK = "127.0.0.1"
REDIS_ENV = "HEADWAY_REDIS_URL"
STARTUP_TIMEOUT = 60.0  # seconds for every process to answer; generous for a busy 2-core box
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
SIDECAR_GRACE = "2s"  # the sidecars' drain time: the demo has already finished its requests


class DemoError(Exception):
    """Something the person running the demo must know about; printed without traceback."""


@dataclass(frozen=True, slots=True)
class SimulatedGPU:
    """How ``headway simulate`` times one pool's replica."""

    max_concurrency: int  # sequences at once, and the sidecar's slots
    ttft: float  # seconds
    tpot: float  # seconds
    output_tokens: int  # tokens per answer when max_tokens allows


# One replica per pool at demo scale: a few slots, so that a minute of traffic
# from one laptop overloads it and the queues (not the model) decide latency.
GPUS = {
    "llama-8b": SimulatedGPU(max_concurrency=8, ttft=0.15, tpot=0.015, output_tokens=64),
    "llama-70b": SimulatedGPU(max_concurrency=4, ttft=0.3, tpot=0.03, output_tokens=64),
}
OTHER_GPU = SimulatedGPU(max_concurrency=4, ttft=0.25, tpot=0.025, output_tokens=64)


@dataclass(frozen=True, slots=True)
class Pool:
    """One pool as the demo runs it: its simulated GPU, its ports and its config file."""

    name: str
    models: tuple[str, ...]
    gpu: SimulatedGPU
    pricing: Pricing | None
    simulator_port: int
    public_port: int
    admin_port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def simulator_url(self) -> str:
        return f"http://{LOOPBACK}:{self.simulator_port}"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    api_key: str  # the first value of its Secret
    default_class: str  # its quota's default priority class


@dataclass(frozen=True, slots=True)
class Stack:
    """What was rendered: pools by name, tenants by name, and each route's entry pool."""

    pools: dict[str, Pool]
    tenants: dict[str, Tenant]
    entry: dict[str, Pool]  # route model -> the pool whose sidecar clients call
    redis_url: str | None


def examples_dir() -> Path:
    """``./examples`` when run from a checkout (``make demo``), else the package's own."""
    override = os.environ.get("HEADWAY_DEMO_EXAMPLES")
    if override:
        return Path(override)
    local = Path("examples")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "examples"


def render(examples: Path, out: Path) -> Stack:
    """Render ``examples`` for loopback and write the documents and the hashing key."""
    if not examples.is_dir():
        raise DemoError(
            f"no folder {examples}: run from a Headway checkout or set HEADWAY_DEMO_EXAMPLES"
        )
    redis_url = os.environ.get(REDIS_ENV) or None
    try:
        redis = operator_cli.redis_settings(redis_url)
    except ValueError as e:
        raise DemoError(f"{REDIS_ENV}: {e}") from None
    resources = operator_cli.load([str(examples)])
    if resources.problems:
        raise DemoError(_listed(f"cannot read {examples}", resources.problems))
    if not resources.pools:
        raise DemoError(f"{examples} declares no ModelPool")

    # A key of its own, so the sidecars run without the development-key warning.
    config_dir = out / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    key_file = config_dir / "hashing-keys"
    key_file.unlink(missing_ok=True)
    handle = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "w", encoding="utf-8") as keys:
        keys.write(f"demo:{secrets.token_hex(32)}\n")

    ports = iter(free_ports(3 * len(resources.pools)))
    pools = {
        p.name: Pool(
            name=p.name,
            models=p.models,
            gpu=GPUS.get(p.name, OTHER_GPU),
            pricing=p.pricing,
            simulator_port=next(ports),
            public_port=next(ports),
            admin_port=next(ports),
            config_path=config_dir / f"{p.namespace}.{p.name}.json",
        )
        for p in resources.pools
    }
    result, problems = operator_cli.render_files(
        [str(examples)],
        keys=load_hashing_keys(key_file),
        redis=redis,
        pool_address=lambda namespace, name: pools[name].url,
    )
    if problems:
        raise DemoError(_listed(f"cannot render {examples}", problems))
    for (_, name), document in result.documents.items():
        pool = pools[name]
        pool.config_path.write_text(contract.dumps(_on_loopback(document, pool)) + "\n")

    documents = list(result.documents.values())
    return Stack(
        pools=pools,
        tenants=_tenants(resources),
        entry=_entries(documents, pools),
        redis_url=redis_url,
    )


def _on_loopback(document: Document, pool: Pool) -> Document:
    """The pool's document with its simulator's port and slots (design: slots = batch size)."""
    return replace(
        document,
        server=replace(document.server, port=pool.simulator_port, host=LOOPBACK),
        capacity=replace(document.capacity, max_concurrency=pool.gpu.max_concurrency),
    )


def _tenants(resources: operator_cli.Resources) -> dict[str, Tenant]:
    secrets_by_name = {s.name: s for s in resources.secrets}
    tenants = {}
    for quota in sorted(resources.quotas, key=lambda q: q.name):
        secret = secrets_by_name.get(quota.secret_name or "")
        if secret is None or not secret.values or quota.tenant in tenants:
            continue
        tenants[quota.tenant] = Tenant(
            name=quota.tenant,
            api_key=secret.values[0][1],
            default_class=quota.priority.default or "realtime",
        )
    return tenants


def _entries(documents: Sequence[Document], pools: dict[str, Pool]) -> dict[str, Pool]:
    """Each route's heaviest backend pool, whose sidecar the clients call.

    On a cluster the route's Service spreads clients over every backend pool's
    pods; whichever sidecar they reach splits by weight, so one entry is enough.
    """
    entry = {}
    for document in documents:
        for route in document.routes:
            heaviest = max(route.backends, key=lambda b: b.weight)
            entry[route.model] = pools[heaviest.pool]
    return entry


def free_ports(count: int) -> list[int]:
    """Distinct free ports on loopback (all held open until every one is found)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _listed(title: str, lines: Sequence[str]) -> str:
    return "\n  ".join([f"{title}:", *lines])


# -- processes -------------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass(slots=True)
class Processes:
    """Every child the demo started, so that one call stops them all."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "headway_cli.main", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: the terminal's Ctrl-C reaches only the demo,
                # and killpg takes whatever the child itself spawned.
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise DemoError for the first child that has exited."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with status {code}; the end of {child.log_path}:\n"
                    + tail(child.log_path)
                )

    def usage(self) -> dict[str, dict[str, float]]:
        """Peak RSS (MiB) and CPU time (s) of each running child, from /proc (Linux)."""
        return {
            child.name: found
            for child in self.children
            if (found := process_usage(child.process.pid)) is not None
        }

    def stop_all(self) -> None:
        """SIGTERM every child's group, then SIGKILL what is left after the grace time."""
        for child in self.children:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()


def process_usage(pid: int) -> dict[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
    # NB: the command name in parentheses may hold spaces; fields count from after it.
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return {
        "peak_rss_mib": round(int(peak) / 1024, 1),
        "cpu_s": round(ticks / os.sysconf("SC_CLK_TCK"), 1),
    }


def own_usage() -> dict[str, float]:
    """The demo process's own peak RSS (MiB) and CPU time (s): the clients' cost."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # NB: only while unreaped: a reaped child's PID, its group's id, may be reused.
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def start_all(stack: Stack, processes: Processes) -> None:
    for pool in stack.pools.values():
        gpu = pool.gpu
        processes.start(
            f"simulate-{pool.name}",
            [
                "simulate",
                "--listen",
                f"{LOOPBACK}:{pool.simulator_port}",
                "--max-concurrency",
                str(gpu.max_concurrency),
                "--ttft",
                f"{gpu.ttft * 1000:g}ms",
                "--tpot",
                f"{gpu.tpot * 1000:g}ms",
                "--output-tokens",
                str(gpu.output_tokens),
            ],
        )
        processes.start(
            f"sidecar-{pool.name}",
            [
                "sidecar",
                "--config",
                str(pool.config_path),
                "--listen",
                f"{LOOPBACK}:{pool.public_port}",
                "--admin-listen",
                f"{LOOPBACK}:{pool.admin_port}",
                "--key-file",
                str(pool.config_path.parent / "hashing-keys"),
                "--grace",
                SIDECAR_GRACE,
            ],
        )


async def wait_ready(stack: Stack, processes: Processes, session: aiohttp.ClientSession) -> None:
    """Until every sidecar's /readyz says ok (which also reaches its simulator)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    waiting = {pool.name: f"{pool.admin_url}/readyz" for pool in stack.pools.values()}
    while waiting:
        processes.check()
        for name, url in list(waiting.items()):
            if await _answers(session, url):
                del waiting[name]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"not ready after {STARTUP_TIMEOUT:g} s: the sidecars of {', '.join(waiting)}; "
                f"see {processes.log_dir}"
            )
        await asyncio.sleep(0.2)


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def check_redis(url: str) -> None:
    """Refuse to start against an unreachable Redis: the sidecars would silently fail open."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        raise DemoError(f"{REDIS_ENV}={url}: Redis does not answer: {e}") from None
    finally:
        client.close()
