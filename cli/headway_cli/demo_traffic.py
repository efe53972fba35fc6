"""The demo's clients: the example tenants calling the sidecars with the official OpenAI SDK.

Three shapes of traffic, one per example tenant: ``search-app`` streams
real-time chat at a steady rate, ``analytics`` floods batch work from many
workers at once, and ``intern-team`` sends bursts of long prompts that exceed
its per-minute and concurrency limits. Every request leaves a
:class:`Record` with what the client saw; the SDK does not retry, so each 429
is counted as it happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from headway_cli.demo_stack import DemoError, Stack, Tenant

if TYPE_CHECKING:
    from openai import AsyncOpenAI

# Sized against the demo's pools (demo_stack.GPUS): search-app alone keeps about
# a third of llama-8b's slots busy, and the flood wants far more than the rest.
REALTIME_RATE = 3.0  # search-app requests per second to "chat"
LARGE_RATE = 0.25  # search-app requests per second to "chat-large"
FLOOD_WORKERS = 16  # analytics requests in flight at any time
BURST_SIZE = 6  # intern-team requests sent at once ...
BURST_EVERY = 5.0  # ... this often (seconds): over its concurrency and per-minute limits
DRAIN_TIMEOUT = 30.0  # seconds the last requests get to finish before they are cancelled
REQUEST_TIMEOUT = 120.0

# Prompt words; the simulator counts one token per word.
WORDS = ("latency", "tokens", "gateway", "replica", "queue", "batch", "tenant", "quota")


@dataclass(slots=True)
class Record:
    """One request as the client saw it; times in seconds from the start of traffic."""

    tenant: str
    route: str
    start: float
    outcome: str = "pending"  # ok, rate_limited, error, cancelled
    status: int | None = None  # HTTP status of a refusal
    code: str = ""  # the error body's code, or the exception's name
    ttft: float | None = None  # to the first content delta
    duration: float | None = None
    model: str = ""  # the model that answered: tells which pool served it
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class Traffic:
    """Every request so far, and the tasks of those still running."""

    started: float = field(default_factory=time.monotonic)
    records: list[Record] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def now(self) -> float:
        return time.monotonic() - self.started

    @property
    def in_flight(self) -> int:
        return sum(1 for r in self.records if r.outcome == "pending")

    def launch(self, request: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(request)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Clients:
    """One SDK client per tenant and route, each pointed at the route's entry sidecar.

    Built before the traffic starts: importing the SDK and building its first
    client takes seconds of CPU that would otherwise delay the first requests.
    """

    def __init__(self, stack: Stack) -> None:
        from openai import AsyncOpenAI

        self._open = {
            (tenant.name, route): AsyncOpenAI(
                base_url=f"{pool.url}/v1",
                api_key=tenant.api_key,
                max_retries=0,  # count every 429 as it happened
                timeout=REQUEST_TIMEOUT,
            )
            for tenant in stack.tenants.values()
            for route, pool in stack.entry.items()
        }
        for client in self._open.values():
            client.chat.completions  # noqa: B018 - builds the resource objects now

    def get(self, tenant: Tenant, route: str) -> AsyncOpenAI:
        client = self._open.get((tenant.name, route))
        if client is None:
            raise DemoError(f"examples/ has no route {route!r}, which the demo traffic calls")
        return client

    async def aclose(self) -> None:
        for client in self._open.values():
            await client.close()


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _chat(client: AsyncOpenAI, record: Record, prompt: str, max_tokens: int) -> None:
    import openai

    began = time.monotonic()
    try:
        stream = await client.chat.completions.create(
            model=record.route,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=max_tokens,
        )
        async for chunk in stream:
            if record.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                record.ttft = time.monotonic() - began
            record.model = chunk.model or record.model
            if chunk.usage is not None:
                record.input_tokens = chunk.usage.prompt_tokens
                record.output_tokens = chunk.usage.completion_tokens
        record.outcome = "ok"
    except openai.APIStatusError as e:
        record.outcome = "rate_limited" if e.status_code == 429 else "error"
        record.status = e.status_code
        record.code = _code(e.body)
    except asyncio.CancelledError:
        record.outcome = "cancelled"
        raise
    except Exception as e:  # any failure is this one request's outcome, kept in its record
        record.outcome, record.code = "error", type(e).__name__
    finally:
        record.duration = time.monotonic() - began


def _code(body: object) -> str:
    detail: Any = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("code") or detail.get("type") or "")
    return ""


@dataclass(frozen=True, slots=True)
class _Sender:
    """Sends one tenant's requests on one route, recording each."""

    traffic: Traffic
    client: AsyncOpenAI
    tenant: str
    route: str

    def send(self, prompt: str, max_tokens: int) -> asyncio.Task[None]:
        record = Record(tenant=self.tenant, route=self.route, start=self.traffic.now())
        self.traffic.records.append(record)
        return self.traffic.launch(_chat(self.client, record, prompt, max_tokens))


async def _steady(sender: _Sender, rate: float, until: float) -> None:
    """Poisson arrivals at ``rate`` per second: users, not a metronome."""
    rng = random.Random(f"{sender.tenant}/{sender.route}")
    while sender.traffic.now() < until:
        sender.send("Search: " + _prompt(rng, 20), 48)
        await asyncio.sleep(rng.expovariate(rate))


async def _flood(sender: _Sender, until: float) -> None:
    """``FLOOD_WORKERS`` loops, each sending its next request as soon as one ends."""
    rng = random.Random(sender.tenant)

    async def worker() -> None:
        while (now := sender.traffic.now()) < until:
            task = sender.send("Summarise this record: " + _prompt(rng, 150), 256)
            # Past the end the request is left to the drain, not waited for here.
            await asyncio.wait({task}, timeout=until - now)

    await asyncio.gather(*(worker() for _ in range(FLOOD_WORKERS)))


async def _bursts(sender: _Sender, until: float) -> None:
    """``BURST_SIZE`` long prompts at once every ``BURST_EVERY`` seconds."""
    rng = random.Random(sender.tenant)
    while sender.traffic.now() < until:
        for _ in range(BURST_SIZE):
            sender.send("Review this document: " + _prompt(rng, 350), 400)
        await asyncio.sleep(BURST_EVERY)


async def drive(stack: Stack, clients: Clients, traffic: Traffic, duration: float) -> None:
    """Send the three tenants' traffic for ``duration`` seconds, then let it finish."""
    search, analytics, interns = (
        _tenant(stack, name) for name in ("search-app", "analytics", "intern-team")
    )

    def sender(tenant: Tenant, route: str) -> _Sender:
        return _Sender(traffic, clients.get(tenant, route), tenant.name, route)

    try:
        await asyncio.gather(
            _steady(sender(search, "chat"), REALTIME_RATE, duration),
            _steady(sender(search, "chat-large"), LARGE_RATE, duration),
            _flood(sender(analytics, "chat"), duration),
            _bursts(sender(interns, "chat"), duration),
        )
        # What still runs gets a bounded drain; what outlasts it is cancelled below.
        if traffic.tasks:
            await asyncio.wait(set(traffic.tasks), timeout=DRAIN_TIMEOUT)
    finally:
        for task in traffic.tasks:
            task.cancel()
        if traffic.tasks:
            await asyncio.wait(set(traffic.tasks))


def _tenant(stack: Stack, name: str) -> Tenant:
    tenant = stack.tenants.get(name)
    if tenant is None:
        raise DemoError(f"examples/ has no TokenQuota with a key for tenant {name!r}")
    return tenant
