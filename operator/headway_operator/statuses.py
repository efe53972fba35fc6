"""Conditions in the shape of metav1.Condition, and the status documents the operator applies.

A condition keeps its ``lastTransitionTime`` while its status stays the same,
so re-applying an unchanged status is a no-op and never bumps the object's
``resourceVersion``. The operator owns these status fields through its own
server-side-apply field manager; the autoscaler owns the others (replica
targets, queue, latency, ScalingLimited, CapacityPending).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from headway_operator.specs import API_VERSION

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
MESSAGE_LIMIT = 4096  # well under the schema's 32 KiB, and readable in `kubectl describe`


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # TRUE, FALSE or UNKNOWN
    reason: str  # CamelCase, for machines
    message: str  # for people; names what is wrong and never a credential


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def by_type(conditions: object) -> dict[object, Mapping[str, Any]]:
    """The conditions of a status as read from the API (any shape), by their type."""
    if not isinstance(conditions, list):
        return {}
    return {c.get("type"): c for c in conditions if isinstance(c, Mapping)}


def merge(
    wanted: Iterable[Condition], current: object, generation: int, at: str
) -> list[dict[str, Any]]:
    """The wanted conditions as dicts, keeping the transition time of those whose status holds."""
    previous = by_type(current)
    merged = []
    for condition in wanted:
        before = previous.get(condition.type)
        held = before is not None and before.get("status") == condition.status
        merged.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message[:MESSAGE_LIMIT],
                "lastTransitionTime": before["lastTransitionTime"] if held and before else at,
                "observedGeneration": generation,
            }
        )
    return merged


def newly_false(wanted: Sequence[Condition], current: object) -> list[Condition]:
    """Conditions that turn False (or change their reason while False): worth an Event."""
    previous = by_type(current)
    found = []
    for condition in wanted:
        if condition.status != FALSE:
            continue
        before = previous.get(condition.type) or {}
        if before.get("status") != FALSE or before.get("reason") != condition.reason:
            found.append(condition)
    return found


def document(kind: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
    """A server-side-apply body for the status subresource."""
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "status": status}


def event(
    kind: str,
    name: str,
    namespace: str,
    uid: str,
    *,
    type_: str,
    reason: str,
    message: str,
    component: str,
) -> dict[str, Any]:
    """An Event on one of our resources, for ``kubectl describe``; ``component`` says who acted."""
    at = now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": kind,
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "type": type_,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": os.environ.get("HOSTNAME", "headway-operator"),
        "firstTimestamp": at,
        "lastTimestamp": at,
        "count": 1,
    }


def differs(wanted: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether applying ``wanted`` would change anything in ``current`` (fields of ours only)."""
    for key, value in wanted.items():
        have = current.get(key)
        if isinstance(value, Mapping) and isinstance(have, Mapping):
            if differs(value, have):
                return True
        elif key == "conditions" and isinstance(value, list) and isinstance(have, list):
            mine = {c["type"]: c for c in value}
            theirs = {c.get("type"): c for c in have if isinstance(c, Mapping)}
            if any(dict(theirs.get(t) or {}) != c for t, c in mine.items()):
                return True
        elif have != value:
            return True
    return False
