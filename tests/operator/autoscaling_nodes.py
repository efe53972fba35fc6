"""A fake GPU node of the autoscaling tests' own.

The session's shared GPU node may be full of other tests' pods (pools left
behind, a 4-GPU replica); placeholders and preemption need a node whose GPUs
only the test that made it can take. kwok runs it like the shared ones.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from tests.fixtures.kube import ControlPlane

GPUS = 4


@dataclass(frozen=True)
class GpuNode:
    name: str
    selector: dict[str, str]  # the nodeSelector that reaches this node only


def _ready(plane: ControlPlane, name: str) -> bool:
    conditions = plane.get("node", name).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.contextmanager
def gpu_node(plane: ControlPlane) -> Iterator[GpuNode]:
    name = f"kwok-gpu-{secrets.token_hex(3)}"
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(GPUS)}
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "headway.dev/node-pool": name,
    }
    plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": labels,
            },
            "status": {"capacity": resources, "allocatable": resources},
        }
    )
    try:
        plane.wait_for(lambda: _ready(plane, name), f"node {name} Ready")
        yield GpuNode(name, {"headway.dev/node-pool": name})
    finally:
        # The pod garbage collector removes whatever was still bound to it.
        plane.kubectl("delete", "node", name, "--wait=false")
