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
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    """The operator's flags; the chart sets some of them through HEADWAY_* variables."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="headway operator", description=__doc__)
    p.add_argument("--standalone", action="store_true", help="no peering (the default)")
    p.add_argument("--peering", help="kopf peering name; enables a standby (default: standalone)")
    p.add_argument("--priority", type=int, help="this replica's peering priority, unique")
    p.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--log-format", choices=("json", "plain"), default="json")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--sidecar-image", default=env("HEADWAY_SIDECAR_IMAGE", children.DEFAULT_IMAGE))
    p.add_argument("--sidecar-pull-policy", default=children.DEFAULT_PULL_POLICY)
    p.add_argument(
        "--redis-url", default=env("HEADWAY_REDIS_URL"), help="Redis the sidecars share limits in"
    )
    p.add_argument(
        "--redis-password-secret",
        default=env("HEADWAY_REDIS_PASSWORD_SECRET"),
        help="Secret with the Redis password, in every pool's namespace",
    )
    p.add_argument(
        "--redis-password-key", default=env("HEADWAY_REDIS_PASSWORD_SECRET_KEY", "password")
    )
    p.add_argument(
        "--redis-password-file",
        default=env("HEADWAY_REDIS_PASSWORD_FILE"),
        help="the same password, for the operator's own usage reads",
    )
    p.add_argument(
        "--redis-tls-secret",
        default=env("HEADWAY_REDIS_TLS_SECRET"),
        help="Secret with ca.crt for a rediss:// URL, in every pool's namespace",
    )
    p.add_argument(
        "--placeholder-priority-class",
        help="PriorityClass of warm placeholder pods (the chart's negative one)",
    )
    p.add_argument(
        "--fail-mode", choices=("open", "closed"), default=env("HEADWAY_FAIL_MODE", "open")
    )
    p.add_argument(
        "--sync-interval", type=_duration, default=10.0, help="version check of every pod (10s)"
    )
    p.add_argument("--push-timeout", type=_duration, default=5.0, help="per GET/PUT /config (5s)")
    p.add_argument("--api-timeout", type=_duration, default=30.0, help="per API request (30s)")
    p.add_argument(
        "--usage-interval", type=_duration, default=15.0, help="TokenQuota usage refresh (15s)"
    )
    p.add_argument("--watch-server-timeout", type=_duration, default=SERVER_TIMEOUT)
    p.add_argument("--watch-client-timeout", type=_duration, default=CLIENT_TIMEOUT)
    return p


def parse(namespaces: Sequence[str], all_namespaces: bool, argv: Sequence[str]) -> Flags:
    args = parser().parse_args([a for a in argv if a != "--"])
    if args.peering and args.priority is None:
        parser().error("--peering needs --priority, distinct for every replica")
    if args.peering and args.standalone:
        parser().error("--standalone and --peering exclude each other")
    if args.watch_client_timeout <= args.watch_server_timeout:
        parser().error("--watch-client-timeout must exceed --watch-server-timeout")
    try:
        redis = redis_settings(args.redis_url)
    except ValueError as e:
        parser().error(str(e))
    usage_redis = redis
    if redis is not None:
        usage_redis = replace(redis, password_file=args.redis_password_file)
        redis = replace(
            redis,
            password_file=children.REDIS_PASSWORD_FILE if args.redis_password_secret else None,
            tls_ca_file=children.REDIS_CA_FILE if args.redis_tls_secret else None,
        )
    sidecar = SidecarSettings(
        image=args.sidecar_image,
        pull_policy=args.sidecar_pull_policy,
        redis_password_secret=args.redis_password_secret,
        redis_password_key=args.redis_password_key,
        redis_tls_secret=args.redis_tls_secret,
    )
    options = reconciling.Options(
        sidecar=sidecar,
        redis=redis,
        usage_redis=usage_redis,
        fail_mode=args.fail_mode,
        sync_interval=args.sync_interval,
        push_timeout=args.push_timeout,
        usage_interval=args.usage_interval,
        api_timeout=args.api_timeout,
        placeholder_priority_class=args.placeholder_priority_class,
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
