"""Who is calling: tenants from API keys, and the signed hop header between sidecars.

A presented key is hashed with every hashing key this sidecar holds and looked
up among the configured digests, so a rotated hashing key keeps working while
the renderer still emits both. A request forwarded to another pool carries
``x-headway-hop``, signed with the namespace key, naming the pool it is for,
the route, tenant and class, a digest of the body and an expiry; the receiving
sidecar trusts it instead of authenticating again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from headway_contract import CLASSES, Document, HashingKeys, Tenant, hash_api_key, sign, verify

from headway_sidecar import errors

HOP_HEADER = "x-headway-hop"
# Seconds a hop header stays valid: covers the forwarding itself plus clock
# skew between pods; the body digest stops it being reused for another request.
HOP_LIFETIME = 60.0


class Authenticator:
    """Maps presented API keys to the tenants of one config document."""

    def __init__(self, document: Document, keys: HashingKeys) -> None:
        self._keys = keys
        self._tenants = {h: t for t in document.tenants for h in t.key_hashes}

    def tenant(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant whose key the request carries, or raise 401."""
        presented = presented_key(headers)
        if presented is None:
            raise errors.Unauthenticated(
                "No API key provided: pass it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        for key_id, secret in self._keys.keys:
            tenant = self._tenants.get(hash_api_key(key_id, secret, presented))
            if tenant is not None:
                return tenant
        raise errors.Unauthenticated("Incorrect API key provided.")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer``, else ``api-key``, else ``x-api-key``."""
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for name in ("api-key", "x-api-key"):
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Hop:
    """What the forwarding sidecar already decided about a request."""

    pool: str  # the pool the request is addressed to
    route: str
    tenant: str
    priority: str
    body_sha256: str
    expires: float  # unix time


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def make_hop(keys: HashingKeys, hop: Hop) -> str:
    """The header value: ``<base64url JSON payload>.<key id>.<hex signature>``."""
    payload = json.dumps(
        {
            "pool": hop.pool,
            "route": hop.route,
            "tenant": hop.tenant,
            "priority": hop.priority,
            "body": hop.body_sha256,
            "exp": round(hop.expires, 3),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    encoded = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    return f"{encoded}.{sign(keys, encoded)}"


def new_hop(
    keys: HashingKeys, *, pool: str, route: str, tenant: str, priority: str, body: bytes
) -> str:
    hop = Hop(pool, route, tenant, priority, body_digest(body), time.time() + HOP_LIFETIME)
    return make_hop(keys, hop)


def read_hop(keys: HashingKeys, value: str, *, pool: str, body: bytes) -> Hop:
    """Verify a hop header addressed to ``pool`` for exactly ``body``, or raise 401.

    Every failure reads the same to the client, so a forger learns nothing.
    """
    refused = errors.Unauthenticated("Invalid internal hop header.", code="invalid_hop")
    encoded, _, signature = value.strip().partition(".")
    if not encoded or not signature or not verify(keys, encoded, signature):
        raise refused
    try:
        padded = encoded + "=" * (-len(encoded) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        hop = Hop(
            pool=str(data["pool"]),
            route=str(data["route"]),
            tenant=str(data["tenant"]),
            priority=str(data["priority"]),
            body_sha256=str(data["body"]),
            expires=float(data["exp"]),
        )
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise refused from None
    if (
        hop.pool != pool
        or hop.priority not in CLASSES
        or hop.expires < time.time()
        or hop.body_sha256 != body_digest(body)
    ):
        raise refused
    return hop
