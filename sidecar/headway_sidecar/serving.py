"""The sidecar process: builds the parts, serves the public and admin ports, drains on SIGTERM.

:func:`start` wires one config store, limiter, scheduler and metrics registry
into two aiohttp applications and returns a :class:`Running` handle, which the
tests use in-process; :func:`run` is what ``headway sidecar`` calls. The one
``aiohttp.ClientSession`` of the process lives in the public app's cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from headway_contract import load_hashing_keys
from prometheus_client import CollectorRegistry

from headway_sidecar import accesslog, admin, configuring, limiting, proxying, queueing
from headway_sidecar.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings that are not part of the contract document."""

    poll_interval: float = 5.0  # seconds between reads of the mounted config and key files
    keepalive_interval: float = 5.0  # seconds between ": queued" comments to waiting streams
    grace: float = 30.0  # seconds in-flight requests may take to finish after SIGTERM
    # Extra request headers passed upstream beside the built-in allow-list
    # (tests pass the simulator's fault header through).
    forward_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Running:
    """A started sidecar; ``url`` and ``admin_url`` carry the ports actually bound."""

    url: str
    admin_url: str
    gateway: proxying.Gateway
    public: web.AppRunner
    admin: web.AppRunner
    settings: Settings

    async def drain(self) -> None:
        """Stop accepting, refuse the queued, let in-flight requests finish, then stop."""
        self.gateway.begin_drain()
        # The runner stops listening, then waits up to its shutdown timeout
        # (the grace period) for running handlers before cancelling them.
        await self.public.cleanup()
        await self.admin.cleanup()


async def start(
    *,
    config_path: str,
    listen: tuple[str, int],
    admin_listen: tuple[str, int],
    key_file: str | None,
    push_token_file: str | None,
    registry: CollectorRegistry,
    settings: Settings = Settings(),
) -> Running:
    """Load the config, build both apps and listen; raises OSError or ValueError (ContractError,
    KeyFileError, Redis settings the limiter refuses)."""
    metrics = Metrics(registry)
    document = configuring.read_document(config_path)
    keys = load_hashing_keys(key_file)
    store = configuring.ConfigStore(configuring.Config.build(document, keys), metrics=metrics)

    scheduler = queueing.Scheduler(document.capacity)
    limiter = limiting.Limiter(document.limiter, document.replicas)
    store.add_listener(lambda d: limiter.reconfigure(d.limiter, d.replicas))
    store.add_listener(lambda d: scheduler.reconfigure(d.capacity))
    metrics.watch_scheduler(scheduler.depth, scheduler.inflight, lambda: scheduler.capacity)
    metrics.watch_limiter(lambda: limiter.degraded)

    gateway = proxying.Gateway(
        store=store,
        metrics=metrics,
        scheduler=scheduler,
        limiter=limiter,
        keepalive_interval=settings.keepalive_interval,
        forward_headers=frozenset(h.lower() for h in settings.forward_headers),
    )
    public_app = proxying.make_app(gateway)
    public_app.cleanup_ctx.append(_client_session)
    public_app.cleanup_ctx.append(_closing(limiter))
    admin_app = admin.make_app(
        admin.Admin(
            store=store,
            metrics=metrics,
            push_token_file=push_token_file,
            depth=scheduler.depth,
            inflight=scheduler.inflight,
            draining=gateway.is_draining,
        )
    )
    admin_app.cleanup_ctx.append(_watching(store, config_path, key_file, settings.poll_interval))

    public = web.AppRunner(
        public_app,
        handler_cancellation=True,  # a client that hangs up cancels its handler
        shutdown_timeout=settings.grace,
        access_log=None,  # accesslog writes one richer line per request
    )
    admin_runner = web.AppRunner(admin_app, access_log=None)
    await public.setup()
    await admin_runner.setup()
    try:
        url = await _listen(public, listen)
        admin_url = await _listen(admin_runner, admin_listen)
    except OSError:
        await public.cleanup()
        await admin_runner.cleanup()
        raise
    return Running(url, admin_url, gateway, public, admin_runner, settings)


async def _listen(runner: web.AppRunner, address: tuple[str, int]) -> str:
    site = web.TCPSite(runner, address[0], address[1])
    await site.start()
    host, port = runner.addresses[-1][:2]
    return f"http://{host}:{port}"


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # No overall timeout here: each call sets its own from the route's timeouts.
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
    ) as session:
        app[proxying.SESSION] = session
        yield


def _closing(limiter: limiting.Limiter) -> proxying.CleanupContext:
    async def close(app: web.Application) -> AsyncIterator[None]:
        yield
        await limiter.aclose()

    return close


def _watching(
    store: configuring.ConfigStore, config_path: str, key_file: str | None, interval: float
) -> proxying.CleanupContext:
    async def watch(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(
            configuring.watch_files(
                store, config_path=config_path, key_file=key_file, interval=interval
            )
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return watch


def run(
    *,
    config_path: str,
    listen: tuple[str, int],
    admin_listen: tuple[str, int],
    key_file: str | None,
    push_token_file: str | None,
    grace: float,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain; 0 on a clean stop, 2 when it cannot start."""
    accesslog.install_redaction()
    accesslog.install_handler(sys.stderr)
    settings = Settings(grace=grace)
    try:
        return asyncio.run(
            _serve(
                config_path=config_path,
                listen=listen,
                admin_listen=admin_listen,
                key_file=key_file,
                push_token_file=push_token_file,
                settings=settings,
            )
        )
    except (OSError, ValueError) as e:  # ContractError, KeyFileError, bad Redis settings
        logger.error("cannot start the sidecar: %s", e)
        return 2


async def _serve(
    *,
    config_path: str,
    listen: tuple[str, int],
    admin_listen: tuple[str, int],
    key_file: str | None,
    push_token_file: str | None,
    settings: Settings,
) -> int:
    running = await start(
        config_path=config_path,
        listen=listen,
        admin_listen=admin_listen,
        key_file=key_file,
        push_token_file=push_token_file,
        registry=CollectorRegistry(),
        settings=settings,
    )
    document = running.gateway.store.current.document
    logger.info(
        "serving pool %s/%s on %s (admin %s), config version %s",
        document.namespace,
        document.pool,
        running.url,
        running.admin_url,
        document.version,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("stopping: draining for up to %.0f s", settings.grace)
    await running.drain()
    logger.info("stopped")
    return 0
