"""The admin port: metrics, health, readiness, the config in force, config pushes, and load.

``GET /load`` is what the operator's autoscaler reads: queue depth and in-flight
requests per class, capacity, and cumulative TTFT histogram buckets per class
(buckets, not percentiles, so the operator can merge pods and take differences
between scrapes). This port must be reachable only by the operator and Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from aiohttp import web
from headway_contract import CLASSES
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from headway_sidecar import configuring
from headway_sidecar.metrics import HistogramSnapshot, Metrics

# A readiness probe must answer well inside the kubelet's default 1 s timeout.
_UPSTREAM_PROBE_TIMEOUT = 0.5


class Load(TypedDict):
    pool: str
    version: str
    capacity: int  # upstream slots on this replica
    batchSlots: int  # slots batch may hold
    queueDepth: dict[str, int]  # waiting requests by class
    inflight: dict[str, int]  # requests holding a slot, by class
    ttft: dict[str, HistogramSnapshot]  # seconds, cumulative, by class


@dataclass(frozen=True, slots=True)
class Admin:
    """What the admin handlers read; the callables look at the live scheduler."""

    store: configuring.ConfigStore
    metrics: Metrics
    push_token_file: str | None
    depth: Callable[[str], int]
    inflight: Callable[[str], int]
    draining: Callable[[], bool]


ADMIN = web.AppKey("admin", Admin)


def make_app(admin: Admin) -> web.Application:
    # NB: a config document is at most a few MiB even with thousands of tenants.
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[ADMIN] = admin
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", get_config)
    app.router.add_put("/config", put_config)
    app.router.add_get("/load", load)
    return app


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ADMIN].metrics.registry)
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining and the local model server accepts connections."""
    admin = request.app[ADMIN]
    if admin.draining():
        return web.json_response({"status": "draining"}, status=503)
    server = admin.store.current.document.server
    try:
        async with asyncio.timeout(_UPSTREAM_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(server.host, server.port)
    except (OSError, TimeoutError):
        return web.json_response(
            {"status": f"model server {server.host}:{server.port} unreachable"}, status=503
        )
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return web.json_response({"status": "ok"})


async def get_config(request: web.Request) -> web.Response:
    document = request.app[ADMIN].store.current.document
    return web.json_response({"version": document.version, "generation": document.generation})


async def put_config(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    if admin.push_token_file is None:
        return _error(403, "config push is disabled: the sidecar runs without a push token")
    if not configuring.token_matches(
        admin.push_token_file, request.headers.get("authorization", "")
    ):
        return _error(401, "invalid push token")
    try:
        applied = admin.store.offer(await request.read(), source="push")
    except configuring.Refused as e:
        running = admin.store.current.document
        return web.json_response(
            {
                "error": {"message": e.message, "type": e.result},
                "version": running.version,
                "generation": running.generation,
            },
            status=e.status,
        )
    return web.json_response(applied)


async def load(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    document = admin.store.current.document
    report = Load(
        pool=document.pool,
        version=document.version,
        capacity=document.capacity.max_concurrency,
        batchSlots=document.capacity.batch_slots,
        queueDepth={c: admin.depth(c) for c in CLASSES},
        inflight={c: admin.inflight(c) for c in CLASSES},
        ttft={c: admin.metrics.ttft_snapshot(c) for c in CLASSES},
    )
    return web.json_response(report, dumps=json.dumps)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "admin_error"}}, status=status)
