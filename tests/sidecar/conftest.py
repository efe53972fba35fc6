"""Real servers on loopback for sidecar tests: simulators, scripted upstreams, sidecars.

In-process servers (aiohttp runners on 127.0.0.1, port 0) for most tests, and
real ``headway simulate`` / ``headway sidecar`` processes for the SDK tests.
Every server started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, web
from headway_sidecar import serving, simulator
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.sample import key_hash, sample

HEADWAY = Path(sys.executable).parent / "headway"
PUSH_TOKEN = "push-token-for-tests"
# The simulator's per-request knobs, passed through the sidecar in tests only.
SIM_HEADERS = ("x-sim-fault", "x-sim-ttft", "x-sim-tpot", "x-sim-output-tokens")
FAST = simulator.Settings(ttft=0.01, tpot=0.002, output_tokens=8)


# -- documents -------------------------------------------------------------------------------


def document(upstream_port: int, **top: Any) -> dict[str, Any]:
    """The sample contract document pointed at an upstream on 127.0.0.1:<port>."""
    data = sample()
    data["server"]["port"] = upstream_port
    data.update(top)
    return data


def tenant(name: str, api_key: str, **quota: Any) -> dict[str, Any]:
    """A tenant with one quota; ``quota`` overrides its fields (``limits`` etc.)."""
    spec: dict[str, Any] = {
        "id": f"default/{name}",
        "limits": {"tokensPerMinute": 100000, "requestsPerMinute": 600},
        "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
        "onExceeded": "reject",
        "fairShareWeight": 1,
    }
    spec.update(quota)
    return {"name": name, "keyHashes": [key_hash(api_key)], "quotas": [spec]}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    # Written beside and renamed, as a ConfigMap update swaps the file at once.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)
    return path


# -- in-process servers ----------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    app: web.Application
    runner: web.AppRunner


async def serve(app: web.Application) -> Server:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Server(f"http://127.0.0.1:{port}", port, app, runner)


@dataclass
class Sim(Server):
    def stats(self) -> simulator.StatsJSON:
        return self.app[simulator.SIMULATOR].snapshot()


@pytest.fixture
async def start_simulator() -> AsyncIterator[Callable[..., Awaitable[Sim]]]:
    started: list[Sim] = []

    async def start(settings: simulator.Settings = FAST) -> Sim:
        server = await serve(simulator.make_app(settings))
        sim = Sim(server.url, server.port, server.app, server.runner)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.runner.cleanup()


@pytest.fixture
async def sim(start_simulator: Callable[..., Awaitable[Sim]]) -> Sim:
    return await start_simulator()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted(Server):
    """An upstream whose answers the test writes; records each body it receives."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def start_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(handler: Handler) -> Scripted:
        scripted: Scripted

        async def record(request: web.Request) -> web.StreamResponse:
            scripted.bodies.append(json.loads(await request.read()))
            scripted.headers.append(dict(request.headers))
            return await handler(request)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/{endpoint:.*}", record)
        server = await serve(app)
        scripted = Scripted(server.url, server.port, server.app, server.runner)
        started.append(scripted)
        return scripted

    yield start
    for scripted in started:
        await scripted.runner.cleanup()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def start_sidecar(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[serving.Running]]]:
    """Start in-process sidecars from document dicts; each gets a fresh registry."""
    started: list[serving.Running] = []

    async def start(
        data: dict[str, Any],
        *,
        settings: serving.Settings | None = None,
        push_token: bool = True,
        name: str = "config",
    ) -> serving.Running:
        config = write_json(tmp_path / f"{name}.json", data)
        token_file = None
        if push_token:
            token_file = tmp_path / f"{name}.token"
            token_file.write_text(PUSH_TOKEN + "\n")
        running = await serving.start(
            config_path=str(config),
            listen=("127.0.0.1", 0),
            admin_listen=("127.0.0.1", 0),
            key_file=None,
            push_token_file=str(token_file) if token_file else None,
            registry=CollectorRegistry(),
            settings=settings
            or serving.Settings(poll_interval=0.2, grace=2.0, forward_headers=SIM_HEADERS),
        )
        started.append(running)
        return running

    yield start
    for running in started:
        await running.drain()


def metric(running: serving.Running, name: str, **labels: str) -> float:
    """A sample's current value (0 when the series does not exist yet)."""
    value = running.gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def eventually(check: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll until ``check()`` holds; generous deadline, no timing asserted."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached within the deadline")
        await asyncio.sleep(0.02)


# -- real processes --------------------------------------------------------------------------


@dataclass
class Process:
    process: asyncio.subprocess.Process
    urls: list[str]
    log: list[str]
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.urls[0]

    async def stop(self, within: float = 15.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader


async def spawn(args: list[str], ready: re.Pattern[str], within: float = 30.0) -> Process:
    """Run ``headway <args>`` and wait for the log line that names its address(es)."""
    process = await asyncio.create_subprocess_exec(
        str(HEADWAY),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(within):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise AssertionError(f"headway {args[0]} exited:\n" + "".join(log))
                log.append(line)
                match = ready.search(line)
                if match:
                    break
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise

    async def keep_reading() -> None:
        # The pipe must be drained or a chatty process would block on it.
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log.append(line.decode())

    spawned = Process(process, list(match.groups()), log)
    spawned._reader = asyncio.create_task(keep_reading())
    return spawned


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        await process.stop()


async def spawn_simulator(processes: list[Process], *flags: str) -> Process:
    sim = await spawn(
        ["simulate", "--listen", "127.0.0.1:0", *flags],
        re.compile(r"listening on (http://[\d.]+:\d+)"),
    )
    processes.append(sim)
    return sim


async def spawn_sidecar(
    processes: list[Process], config: Path, *, push_token_file: Path | None = None
) -> Process:
    args = ["sidecar", "--config", str(config), "--listen", "127.0.0.1:0"]
    args += ["--admin-listen", "127.0.0.1:0", "--grace", "10s"]
    if push_token_file is not None:
        args += ["--push-token-file", str(push_token_file)]
    sidecar = await spawn(
        args, re.compile(r" on (http://[\d.]+:\d+) \(admin (http://[\d.]+:\d+)\)")
    )
    processes.append(sidecar)
    return sidecar


@dataclass
class Stack:
    """A ``headway simulate`` process with a ``headway sidecar`` process in front of it."""

    sim: Process
    sidecar: Process
    config: Path  # the sidecar's config file (polled)
    document: dict[str, Any]  # what the config file holds

    @property
    def url(self) -> str:
        return self.sidecar.urls[0]

    @property
    def admin_url(self) -> str:
        return self.sidecar.urls[1]

    @property
    def sim_url(self) -> str:
        return self.sim.url


async def start_stack(
    processes: list[Process],
    tmp_path: Path,
    *sim_flags: str,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Stack:
    """Start a simulator with ``sim_flags``, then a sidecar on the sample document.

    ``edit`` changes the document (capacity, tenants...) before it is written.
    The sidecar's push token is :data:`PUSH_TOKEN`.
    """
    sim = await spawn_simulator(processes, *sim_flags)
    data = document(int(sim.url.rsplit(":", 1)[1]))
    if edit is not None:
        edit(data)
    config = write_json(tmp_path / "stack.json", data)
    token = tmp_path / "stack.token"
    token.write_text(PUSH_TOKEN + "\n")
    sidecar = await spawn_sidecar(processes, config, push_token_file=token)
    return Stack(sim, sidecar, config, data)


async def read_events(response: ClientResponse) -> list[Any]:
    """The data of every SSE event of a response: parsed JSON, or the raw text."""
    events: list[Any] = []
    async for line in response.content:
        text = line.decode().rstrip("\r\n")
        if text.startswith("data:"):
            data = text[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def content_of(events: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", ())
    )


def content_chunks(events: list[Any]) -> int:
    """How many chunks carried content (one token each from the simulator)."""
    return sum(
        1
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", ())
        if choice["delta"].get("content")
    )


async def scrape(http: ClientSession, admin_url: str) -> str:
    async with http.get(f"{admin_url}/metrics") as r:
        assert r.status == 200
        return await r.text()


def sample_value(text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics page (0 when absent), matched on exactly ``labels``."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return 0.0


async def wait_load(
    http: ClientSession,
    admin_url: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    within: float = 60.0,
) -> dict[str, Any]:
    """Poll the sidecar's ``GET /load`` until ``check`` holds; the last report."""
    async with asyncio.timeout(within):
        while True:
            async with http.get(f"{admin_url}/load") as r:
                load: dict[str, Any] = await r.json()
            if check(load):
                return load
            await asyncio.sleep(0.05)


async def until(check: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    """Poll an async ``check`` until it holds; generous deadline, no timing asserted."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)
