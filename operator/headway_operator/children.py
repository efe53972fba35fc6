"""The objects the operator owns, built as plain manifests from the parsed resources.

Per ModelPool: a Deployment (the pool's template with the sidecar injected),
a Service, a ConfigMap holding the contract document, and the Secret with the
push token. Per InferenceRoute: the Service clients call, which selects the
pods the operator labels as serving that route. Everything here is pure, so
the manifests are unit-tested without an API server; :mod:`reconciling` writes
them with server-side apply.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from headway_operator.specs import API_VERSION, ModelPool

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "headway-operator"
POOL_LABEL = "headway.dev/pool"
ROUTE_LABEL = "headway.dev/route"
# A pod carries route.headway.dev/<route>: "true" for every route that reaches its
# pool; the route's Service selects on it, since one selector cannot OR pools.
ROUTE_MEMBER_PREFIX = "route.headway.dev/"

SIDECAR = "headway-sidecar"
HASHING_SECRET = "headway-hashing-keys"  # per namespace; key HASHING_KEY holds "<id>:<secret>"
HASHING_KEY = "keys"
PUSH_TOKEN_KEY = "token"
CONFIG_KEY = "config.json"
PUBLIC_PORT = 8080
ADMIN_PORT = 9090
CONFIG_DIR = "/etc/headway/config"
KEYS_DIR = "/etc/headway/keys"
PUSH_DIR = "/etc/headway/push"
VOLUMES = {"headway-config": CONFIG_DIR, "headway-keys": KEYS_DIR, "headway-push": PUSH_DIR}


DEFAULT_IMAGE = "ghcr.io/headway-dev/headway:0.1.0"
DEFAULT_PULL_POLICY = "IfNotPresent"


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """How the injected sidecar runs; the chart sets these from its values."""

    image: str = DEFAULT_IMAGE
    pull_policy: str = DEFAULT_PULL_POLICY
    cpu_request: str = "250m"  # one core serves thousands of small requests a second
    memory_request: str = "128Mi"
    memory_limit: str = "512Mi"  # queued request bodies are bounded by the queue depths
    # Secrets in each pool's namespace for an external Redis; mounted into the sidecar.
    redis_password_secret: str | None = None
    redis_password_key: str = "password"
    redis_tls_secret: str | None = None  # holds ca.crt


REDIS_PASSWORD_FILE = "/etc/headway/redis/password"
REDIS_CA_FILE = "/etc/headway/redis-tls/ca.crt"


def config_map_name(pool: str) -> str:
    return f"{pool}-config"


def push_token_name(pool: str) -> str:
    return f"{pool}-push-token"


def owner(kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference that lets the garbage collector delete the child with its owner."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, namespace: str, owned_by: dict[str, Any], **labels: str) -> Any:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {MANAGED_BY: MANAGER, **labels},
        "ownerReferences": [owned_by],
    }


def _pool_metadata(name: str, pool: ModelPool, uid: str) -> Any:
    """Metadata of a child the pool owns and labels as its own."""
    return _metadata(
        name, pool.namespace, owner("ModelPool", pool.name, uid), **{POOL_LABEL: pool.name}
    )


# -- template checks -------------------------------------------------------------------------


def refusals(pool: ModelPool) -> list[str]:
    """Why the pool's template would escalate privileges or clash with the injection; [] if fine."""
    template = pool.template
    if not isinstance(template, Mapping) or not isinstance(template.get("spec"), Mapping):
        return ["spec.server.template.spec is required: a PodSpec with the model server"]
    spec = template["spec"]
    at = "spec.server.template.spec"
    found = [f"{at}.{key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    if account and account != pool.name:
        found.append(
            f"{at}.serviceAccountName {account!r} is not the pool's own ({pool.name!r} or unset)"
        )

    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        found.append(f"{at}.containers needs the model server container")
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(_list(spec.get(key))):
            where = f"{at}.{key}[{index}]"
            context = container.get("securityContext") or {}
            if isinstance(context, Mapping) and context.get("privileged"):
                found.append(f"{where}.securityContext.privileged is true")
            if container.get("name") == SIDECAR:
                found.append(f"{where}.name {SIDECAR!r} is reserved for the injected sidecar")
    for index, volume in enumerate(_list(spec.get("volumes"))):
        if "hostPath" in volume:
            found.append(f"{at}.volumes[{index}] mounts a hostPath")
        if str(volume.get("name", "")).startswith("headway-"):
            found.append(f"{at}.volumes[{index}].name {volume['name']!r}: headway-* is reserved")
    return found


def _list(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


# -- per pool --------------------------------------------------------------------------------


def deployment(
    pool: ModelPool, uid: str, settings: SidecarSettings, *, replicas: int | None
) -> dict[str, Any]:
    """The pool's Deployment; ``replicas`` only when creating it (the autoscaler owns it after).

    Call only with a template :func:`refusals` accepted.
    """
    assert pool.template is not None
    template = copy.deepcopy(dict(pool.template))
    meta = dict(template.get("metadata") or {})
    meta["labels"] = {**(meta.get("labels") or {}), POOL_LABEL: pool.name}
    spec = dict(template["spec"])

    containers = [dict(c) for c in spec["containers"]]
    # The first container is the model server: it gets the GPUs.
    if pool.node_pool.gpus_per_replica > 0:
        resources = dict(containers[0].get("resources") or {})
        limits = dict(resources.get("limits") or {})
        limits["nvidia.com/gpu"] = str(pool.node_pool.gpus_per_replica)
        resources["limits"] = limits
        containers[0]["resources"] = resources
    spec["containers"] = [*containers, _sidecar(settings)]
    spec["volumes"] = [*_list(spec.get("volumes")), *_volumes(pool.name, settings)]
    selector = {**(spec.get("nodeSelector") or {}), **pool.node_pool.node_selector}
    if selector:
        spec["nodeSelector"] = selector
    tolerations = [*_list(spec.get("tolerations")), *pool.node_pool.tolerations]
    if tolerations:
        spec["tolerations"] = tolerations
    # Neither container needs the API; a template may still ask for the token.
    spec.setdefault("automountServiceAccountToken", False)

    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _pool_metadata(pool.name, pool, uid),
        "spec": {
            "selector": {"matchLabels": {POOL_LABEL: pool.name}},
            "template": {"metadata": meta, "spec": spec},
        },
    }
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    return body


def _sidecar(settings: SidecarSettings) -> dict[str, Any]:
    def probe(path: str, period: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "admin"}, "periodSeconds": period}

    return {
        "name": SIDECAR,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "command": ["headway"],
        "args": [
            "sidecar",
            f"--config={CONFIG_DIR}/{CONFIG_KEY}",
            f"--listen=0.0.0.0:{PUBLIC_PORT}",
            f"--admin-listen=0.0.0.0:{ADMIN_PORT}",
            f"--key-file={KEYS_DIR}/{HASHING_KEY}",
            f"--push-token-file={PUSH_DIR}/{PUSH_TOKEN_KEY}",
        ],
        "ports": [
            {"name": "http", "containerPort": PUBLIC_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe("/readyz", 5),
        "livenessProbe": {**probe("/healthz", 10), "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"memory": settings.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # Whole directories, never subPath: a subPath mount never sees updates.
        "volumeMounts": [
            {"name": name, "mountPath": path, "readOnly": True}
            for name, path in _mounts(settings).items()
        ],
    }


def _mounts(settings: SidecarSettings) -> dict[str, str]:
    mounts = dict(VOLUMES)
    if settings.redis_password_secret:
        mounts["headway-redis"] = REDIS_PASSWORD_FILE.rpartition("/")[0]
    if settings.redis_tls_secret:
        mounts["headway-redis-tls"] = REDIS_CA_FILE.rpartition("/")[0]
    return mounts


def _volumes(pool: str, settings: SidecarSettings) -> list[dict[str, Any]]:
    extra = []
    if settings.redis_password_secret:
        password = REDIS_PASSWORD_FILE.rpartition("/")[2]
        items = [{"key": settings.redis_password_key, "path": password}]
        extra.append(
            {
                "name": "headway-redis",
                "secret": {"secretName": settings.redis_password_secret, "items": items},
            }
        )
    if settings.redis_tls_secret:
        extra.append(
            {"name": "headway-redis-tls", "secret": {"secretName": settings.redis_tls_secret}}
        )
    return [
        *extra,
        {"name": "headway-config", "configMap": {"name": config_map_name(pool)}},
        {"name": "headway-keys", "secret": {"secretName": HASHING_SECRET}},
        # Mounted into the sidecar only: the model server has no volumeMount for it.
        {"name": "headway-push", "secret": {"secretName": push_token_name(pool)}},
    ]


def pool_service(pool: ModelPool, uid: str) -> dict[str, Any]:
    """The Service other pools' sidecars reach this pool through (weighted splits, fallback)."""
    return _service(
        pool.name,
        pool.namespace,
        owner("ModelPool", pool.name, uid),
        {POOL_LABEL: pool.name},
        {POOL_LABEL: pool.name},
    )


def config_map(pool: ModelPool, uid: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _pool_metadata(config_map_name(pool.name), pool, uid),
        "data": {CONFIG_KEY: text},
    }


def push_token_secret(pool: ModelPool, uid: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _pool_metadata(push_token_name(pool.name), pool, uid),
        "stringData": {PUSH_TOKEN_KEY: token},
    }


def hashing_secret(namespace: str, key: str) -> dict[str, Any]:
    """The namespace's API-key hashing key; shared by every pool, so owned by none."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": HASHING_SECRET,
            "namespace": namespace,
            "labels": {MANAGED_BY: MANAGER},
        },
        "stringData": {HASHING_KEY: f"k1:{key}\n"},
    }


# -- per route -------------------------------------------------------------------------------


def route_service(namespace: str, route: str, uid: str) -> dict[str, Any]:
    return _service(
        route,
        namespace,
        owner("InferenceRoute", route, uid),
        {ROUTE_LABEL: route},
        {ROUTE_MEMBER_PREFIX + route: "true"},
    )


def route_labels(routes: Sequence[str]) -> dict[str, str]:
    return {ROUTE_MEMBER_PREFIX + route: "true" for route in routes}


def _service(
    name: str,
    namespace: str,
    owned_by: dict[str, Any],
    labels: dict[str, str],
    selector: dict[str, str],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, owned_by, **labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": PUBLIC_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
