"""Running the real helm against the chart, for the tests in this folder.

helm comes from hack/cluster-tools.sh, like the control plane (the fixtures
build it on first use). Its config, cache and data go to a temporary home so
tests never read or write the user's own Helm setup.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.kube import tools_bin_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "headway"

# Values sets every rendering test runs with: the default and one for each
# optional part of the chart.
VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "redis": {"redis": {"enabled": True}, "failMode": "closed"},
    "external-redis": {
        "redis": {
            "url": "rediss://redis.example.internal:6380/0",
            "passwordSecret": {"name": "redis-auth", "key": "password"},
            "tlsSecret": {"name": "redis-tls"},
        }
    },
    "standby": {"operator": {"standby": {"enabled": True}}},
    "namespaced": {
        "operator": {"watchNamespaces": ["team-a", "team-b"], "standby": {"enabled": True}}
    },
    "monitoring": {"monitoring": {"podMonitor": {"interval": "30s", "labels": {"release": "kps"}}}},
    "minimal": {
        "networkPolicy": {"enabled": False},
        "dashboard": {"enabled": False},
        "placeholderPriorityClass": {"create": False},
    },
}


@dataclass(frozen=True)
class Helm:
    """The helm binary with an isolated home and, optionally, a kubeconfig."""

    binary: Path
    home: Path
    kubeconfig: Path | None = None

    def environment(self) -> dict[str, str]:
        """Where helm keeps its config, cache and plugins: under `home`."""
        return {
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.environment()}
        env.pop("KUBECONFIG", None)
        argv = [str(self.binary), *args]
        if self.kubeconfig is not None:
            argv.append(f"--kubeconfig={self.kubeconfig}")
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def with_kubeconfig(self, kubeconfig: Path) -> Helm:
        return Helm(self.binary, self.home, kubeconfig)

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *args: str,
        release: str = "headway",
        namespace: str = "headway-system",
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        with values_file(values or {}) as path:
            return self.run(
                "template", release, str(CHART), "--namespace", namespace, "-f", str(path),
                *args, check=check,
            )  # fmt: skip

    def render(
        self, values: Mapping[str, Any] | None = None, *args: str, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """`helm template` parsed into objects (empty documents dropped)."""
        text = self.template(values, *args, **kwargs).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]


@contextlib.contextmanager
def values_file(values: Mapping[str, Any]) -> Iterator[Path]:
    """A temporary YAML values file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "values.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        yield path


def make_helm(home: Path) -> Helm:
    """helm from the cluster tools (built on first use, like the fixtures do)."""
    return Helm(tools_bin_dir() / "helm", home)


def objects_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects_of(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def iter_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects_of(objects, "Deployment"):
        for container in o["spec"]["template"]["spec"]["containers"]:
            yield o["metadata"]["name"], container
