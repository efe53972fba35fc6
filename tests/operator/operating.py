"""Helpers for the operator tests: CRDs, the chart's RBAC, a `headway operator` process, sidecars.

The operator always runs as a subprocess whose kubeconfig carries the token
of the chart's ServiceAccount, bound by the chart's own rbac.yaml rendered
with helm: a permission the chart lacks fails the tests. Each test works in a
namespace of its own and starts an operator that watches only that namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.fixtures.kube import ControlPlane, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
HEADWAY = str(Path(sys.executable).with_name("headway"))
RELEASE = "hw"
RELEASE_NAMESPACE = "headway-system"
ADMIN_PORT = 9090
MANAGED = "app.kubernetes.io/managed-by=headway-operator"

T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def install_crds(plane: ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("modelpools", "inferenceroutes", "tokenquotas"):
        plane.kubectl(
            "wait", "--for=condition=Established", f"crd/{crd}.headway.dev", "--timeout=60s"
        )


def render_rbac(plane: ControlPlane, *values: str, release: str = RELEASE) -> list[dict[str, Any]]:
    """The chart's rbac.yaml, rendered by helm exactly as an install would."""
    done = subprocess.run(
        [
            str(plane.bin_dir / "helm"),
            "template",
            release,
            str(ROOT / "helm" / "headway"),
            "--namespace",
            RELEASE_NAMESPACE,
            "--show-only",
            "templates/rbac.yaml",
            *(arg for value in values for arg in ("--set", value)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def operator_token(plane: ControlPlane, *values: str, release: str = RELEASE) -> str:
    """Install the chart's ServiceAccount and RBAC; a token bound to them only."""
    plane.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}})
    plane.apply(render_rbac(plane, *values, release=release))
    return plane.token_for_service_account(RELEASE_NAMESPACE, f"{release}-headway-operator")


class Operator:
    """A `headway operator` process for one namespace, logging to a file."""

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        token: str,
        workdir: Path,
        url: str | None = None,
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.workdir = workdir
        self.kubeconfig = workdir / "operator-kubeconfig"
        write_kubeconfig(self.kubeconfig, url or plane.url, plane.ca_file, token)
        self.log_path = workdir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *extra: str) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            self.process = subprocess.Popen(
                [
                    HEADWAY,
                    "operator",
                    "--namespace",
                    self.namespace,
                    "--",
                    "--log-format=plain",
                    "--sync-interval=1s",
                    "--push-timeout=2s",
                    *(["--verbose"] if os.environ.get("HEADWAY_TEST_VERBOSE") else []),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the operator exited ({self.process.returncode}):\n{self.log()}")


@dataclass
class Sidecar:
    """A real `headway sidecar` process standing in for one pod, bound to the pod's IP."""

    ip: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin(self) -> str:
        return f"http://{self.ip}:{ADMIN_PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def free_ip(plane: ControlPlane, namespace: str, pod: str) -> str:
    """Patch the pod to the next 127.0.2.N whose admin port nobody on this machine holds."""
    for _ in range(50):
        ip = plane.set_pod_ip(namespace, pod)
        with socket.socket() as probe:
            try:
                probe.bind((ip, ADMIN_PORT))
            except OSError:
                continue
            return ip
    raise AssertionError("no free loopback address for a sidecar")


def free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        port: int = probe.getsockname()[1]
        return port


def start_sidecar(
    ip: str, config: Path, key_file: Path, token_file: Path, workdir: Path
) -> Sidecar:
    port = free_port(ip)
    log_path = workdir / f"sidecar-{ip}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                HEADWAY,
                "sidecar",
                "--config",
                str(config),
                "--listen",
                f"{ip}:{port}",
                "--admin-listen",
                f"{ip}:{ADMIN_PORT}",
                "--key-file",
                str(key_file),
                "--push-token-file",
                str(token_file),
                "--grace",
                "1s",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sidecar = Sidecar(ip, port, process, log_path)
    poll(lambda: admin_get(sidecar, "/healthz") is not None or None, "sidecar up", 60, sidecar)
    return sidecar


def admin_get(sidecar: Sidecar, path: str) -> dict[str, Any] | None:
    import urllib.error
    import urllib.request

    if sidecar.process.poll() is not None:
        raise AssertionError(
            f"sidecar {sidecar.ip} exited:\n{sidecar.log_path.read_text(errors='replace')}"
        )
    try:
        with urllib.request.urlopen(sidecar.admin + path, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def poll(
    condition: Callable[[], T | None],
    what: str,
    timeout: float = 120.0,
    *alive: Operator | Sidecar,
) -> T:
    """Poll until ``condition`` returns something truthy; fail at once if a process died."""
    deadline = time.monotonic() + timeout
    while True:
        for process in alive:
            if isinstance(process, Operator):
                process.check_alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.log()[-4000:] for p in alive if isinstance(p, Operator))
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.25)


def managed(plane: ControlPlane, kind: str, namespace: str) -> dict[str, dict[str, Any]]:
    """The objects of ``kind`` the operator manages in ``namespace``, by name."""
    items = plane.get(kind, "-n", namespace, "-l", MANAGED)["items"]
    return {item["metadata"]["name"]: item for item in items}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for found in obj.get("status", {}).get("conditions", []):
        if found["type"] == kind:
            return dict(found)
    return {}


def examples(namespace: str) -> list[dict[str, Any]]:
    """Every resource in examples/, placed in ``namespace``."""
    objects = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body:
                body["metadata"]["namespace"] = namespace
                objects.append(body)
    return objects


@contextlib.contextmanager
def running(
    plane: ControlPlane, namespace: str, token: str, workdir: Path, *flags: str
) -> Iterator[Operator]:
    operator = Operator(plane, namespace, token, workdir)
    operator.start(*flags)
    try:
        yield operator
    finally:
        operator.stop()
