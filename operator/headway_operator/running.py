"""``headway operator``: kopf embedded with Headway's settings, and the flags that change them.

Standalone by default: one replica, no peering, because the sidecars keep
serving their last config while the operator restarts. ``--peering NAME``
with a ``--priority`` per replica allows a standby; replicas that share a
priority would freeze each other, so a priority is then required.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import kopf
from headway_contract import parse_duration

from headway_operator import children, handlers, reconciling
from headway_operator.children import SidecarSettings
from headway_operator.cli import redis_settings

# Watch requests end after SERVER_TIMEOUT on the API server's side; a stream
# that delivers nothing, not even that end, is cut by the client after
# CLIENT_TIMEOUT. A dead watch (a half-open connection) is noticed within it.
SERVER_TIMEOUT = 600.0
CLIENT_TIMEOUT = 660.0
CONNECT_TIMEOUT = 30.0
ANNOTATION_PREFIX = "headway.dev"


@dataclass(frozen=True, slots=True)
class Flags:
    namespaces: tuple[str, ...]
    clusterwide: bool
    peering: str | None
    priority: int | None
    liveness: str | None
    log_format: str
    verbose: bool
    server_timeout: float
    client_timeout: float
    options: reconciling.Options


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headway operator", description=__doc__)
    p.add_argument("--peering", help="kopf peering name; enables a standby (default: standalone)")
    p.add_argument("--priority", type=int, help="this replica's peering priority, unique")
    p.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--log-format", choices=("json", "plain"), default="json")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--sidecar-image", default=children.DEFAULT_IMAGE)
    p.add_argument("--sidecar-pull-policy", default=children.DEFAULT_PULL_POLICY)
    p.add_argument("--redis-url", help="Redis the sidecars share limits through")
    p.add_argument("--fail-mode", choices=("open", "closed"), default="open")
    p.add_argument(
        "--sync-interval", type=_duration, default=10.0, help="version check of every pod (10s)"
    )
    p.add_argument("--push-timeout", type=_duration, default=5.0, help="per GET/PUT /config (5s)")
    p.add_argument("--watch-server-timeout", type=_duration, default=SERVER_TIMEOUT)
    p.add_argument("--watch-client-timeout", type=_duration, default=CLIENT_TIMEOUT)
    return p


def parse(namespaces: Sequence[str], all_namespaces: bool, argv: Sequence[str]) -> Flags:
    args = parser().parse_args([a for a in argv if a != "--"])
    if args.peering and args.priority is None:
        parser().error("--peering needs --priority, distinct for every replica")
    if args.watch_client_timeout <= args.watch_server_timeout:
        parser().error("--watch-client-timeout must exceed --watch-server-timeout")
    options = reconciling.Options(
        sidecar=SidecarSettings(image=args.sidecar_image, pull_policy=args.sidecar_pull_policy),
        redis=redis_settings(args.redis_url),
        fail_mode=args.fail_mode,
        sync_interval=args.sync_interval,
        push_timeout=args.push_timeout,
    )
    return Flags(
        namespaces=tuple(namespaces),
        clusterwide=all_namespaces or not namespaces,
        peering=args.peering,
        priority=args.priority,
        liveness=args.liveness,
        log_format=args.log_format,
        verbose=args.verbose,
        server_timeout=args.watch_server_timeout,
        client_timeout=args.watch_client_timeout,
        options=options,
    )


def settings(flags: Flags) -> kopf.OperatorSettings:
    result = kopf.OperatorSettings()
    # NB: kopf sends it as timeoutSeconds, which the API server parses as an integer.
    result.watching.server_timeout = round(flags.server_timeout)
    result.watching.client_timeout = flags.client_timeout
    result.watching.connect_timeout = CONNECT_TIMEOUT
    # NB: the CRDs' status schemas are strict; kopf must keep its state elsewhere.
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    result.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    result.persistence.finalizer = f"{ANNOTATION_PREFIX}/operator"
    # No CRD or namespace scanning: the operator serves what exists at start,
    # and needs no RBAC on CustomResourceDefinitions or Namespaces.
    result.scanning.disabled = True
    result.posting.reporting_component = "headway-operator"
    result.peering.standalone = flags.peering is None
    if flags.peering is not None:
        result.peering.name = flags.peering
        result.peering.priority = flags.priority or 0
        result.peering.clusterwide = flags.clusterwide
    handlers.configure(result)
    return result


def run(flags: Flags) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    kopf.configure(
        verbose=flags.verbose,
        log_format=kopf.LogFormat.JSON if flags.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    if not flags.verbose:
        # One line per watch event ("Handler ... succeeded") is noise at scale;
        # what users must act on goes to Events and conditions instead.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(
        kopf.operator(
            registry=handlers.build(flags.options),
            settings=settings(flags),
            standalone=flags.peering is None,
            priority=flags.priority,
            peering_name=flags.peering,
            clusterwide=flags.clusterwide,
            namespaces=list(flags.namespaces),
            liveness_endpoint=flags.liveness,
            memo=kopf.Memo(),
        )
    )
    return 0
