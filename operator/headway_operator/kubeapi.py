"""The operator's own writes to the Kubernetes API: server-side apply, creates, status, Events.

kopf watches and indexes; everything the reconcile writes goes through this
small aiohttp client instead, with the credentials kopf logged in with, so one
place decides field managers, timeouts and how API errors are classified.
Only bearer-token authentication is supported (a ServiceAccount in the pod, or
a kubeconfig with a token), which is what the operator runs with.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

FIELD_MANAGER = "headway-operator"
# Owns Deployment.spec.replicas from creation on, so the operator's own applies,
# which never carry replicas, leave the count to the autoscaler (design section 6).
REPLICAS_MANAGER = "headway-replicas"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    """A refused request; ``status`` is the HTTP status, ``reason`` the API's reason word."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Resource:
    """Where a kind lives in the API: ``/api/v1`` or ``/apis/<group>/<version>``."""

    prefix: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str, name: str = "", sub: str = "") -> str:
        scope = ["namespaces", namespace] if self.namespaced else []
        parts = [self.prefix, *scope, self.plural]
        if name:
            parts.append(quote(name, safe=""))
        if sub:
            parts.append(sub)
        return "/".join(parts)


DEPLOYMENTS = Resource("/apis/apps/v1", "deployments")
SERVICES = Resource("/api/v1", "services")
CONFIGMAPS = Resource("/api/v1", "configmaps")
SECRETS = Resource("/api/v1", "secrets")
PODS = Resource("/api/v1", "pods")
EVENTS = Resource("/api/v1", "events")
MODELPOOLS = Resource("/apis/headway.dev/v1alpha1", "modelpools")
INFERENCEROUTES = Resource("/apis/headway.dev/v1alpha1", "inferenceroutes")
TOKENQUOTAS = Resource("/apis/headway.dev/v1alpha1", "tokenquotas")


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    """TLS settings for the API server from kopf's login; False skips verification."""
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=str(info.ca_path))
    elif info.ca_data:
        data = info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data
        context.load_verify_locations(cadata=base64.b64decode(data).decode("ascii"))
    return context


class Client:
    """Requests to one API server with a bearer token; every call has the session's timeout.

    A ``login`` callable is called again after a 401, since a ServiceAccount's
    projected token is rotated by the kubelet while the operator runs; fixed
    credentials are used as they are.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        login: kopf.ConnectionInfo | Callable[[], kopf.ConnectionInfo],
    ) -> None:
        self._session = session
        self._login = login if callable(login) else None
        self._use(login() if callable(login) else login)

    def _use(self, info: kopf.ConnectionInfo) -> None:
        if not info.token:
            raise kopf.LoginError("the operator needs a bearer token (ServiceAccount, kubeconfig)")
        self._server = info.server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {info.token}", "Accept": "application/json"}
        self._ssl = ssl_context(info)

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            return await self._request(method, path, body, content_type, params)
        except ApiError as e:
            if e.status != 401 or self._login is None:
                raise
            self._use(self._login())
            return await self._request(method, path, body, content_type, params)

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        content_type: str,
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self._session.request(
            method, self._server + path, data=data, headers=headers, params=params, ssl=self._ssl
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise _error(response.status, text)
            parsed: dict[str, Any] = json.loads(text) if text else {}
            return parsed

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", resource.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, resource: Resource, namespace: str, body: Mapping[str, Any]) -> Any:
        return await self.request(
            "POST", resource.path(namespace), body, params={"fieldManager": FIELD_MANAGER}
        )

    async def apply(
        self,
        resource: Resource,
        namespace: str,
        body: Mapping[str, Any],
        *,
        sub: str = "",
        manager: str = FIELD_MANAGER,
    ) -> dict[str, Any]:
        """Server-side apply: we own exactly the fields in ``body``, taking them back if edited."""
        name = body["metadata"]["name"]
        return await self.request(
            "PATCH",
            resource.path(namespace, name, sub),
            body,
            content_type=APPLY,
            params={"fieldManager": manager, "force": "true"},
        )

    async def merge(
        self, resource: Resource, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            resource.path(namespace, name),
            patch,
            content_type=MERGE,
            params={"fieldManager": FIELD_MANAGER},
        )


def _error(status: int, text: str) -> ApiError:
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return ApiError(status, str(data.get("reason", "")), str(data.get("message", text[:200])))
