"""The CRDs on a real kube-apiserver: accepted, Established, and refusing bad specs.

Server-side dry runs exercise the whole validation stack (schema, list types,
CEL rules, cost limits) without storing anything. An invalid sample must be
refused by a default `kubectl apply` (strict field validation), and every
`# expect:` fragment must appear in what the API server says; unknown fields
stop a strict request before the schema is checked, so the schema's findings
are collected with `--validate=warn`, which reports unknown fields as warnings.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest

from tests.crds import crdschema

pytestmark = pytest.mark.kube

CRD_NAMES = [
    f"{crd['spec']['names']['plural']}.{crdschema.GROUP}" for crd in crdschema.load_crds().values()
]


class Kubectl(Protocol):
    def kubectl(self, *args: str, check: bool = ...) -> subprocess.CompletedProcess[str]: ...


def _id(sample: crdschema.Sample) -> str:
    return sample.path.stem


@pytest.fixture(scope="module")
def crds_installed(apiserver: Kubectl) -> Kubectl:
    for args in (
        ("apply", "--server-side", "--force-conflicts", "--field-manager=headway-crd-tests",
         "-f", str(crdschema.CRD_DIR)),
        ("wait", "--for=condition=Established", "--timeout=120s",
         *(f"crd/{name}" for name in CRD_NAMES)),
    ):  # fmt: skip
        done = apiserver.kubectl(*args, check=False)
        assert done.returncode == 0, done.stderr
    return apiserver


def _dry_run(api: Kubectl, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return api.kubectl("apply", "--dry-run=server", *flags, "-f", str(path), check=False)


@pytest.mark.parametrize(
    "path",
    [*(s.path for s in crdschema.samples("valid")), *crdschema.example_files()],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_apiserver_accepts_valid_sample(crds_installed: Kubectl, path: Path) -> None:
    done = _dry_run(crds_installed, path)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr


@pytest.mark.parametrize("sample", crdschema.samples("invalid"), ids=_id)
def test_apiserver_refuses_invalid_sample_naming_the_field(
    crds_installed: Kubectl, sample: crdschema.Sample
) -> None:
    strict = _dry_run(crds_installed, sample.path)
    assert strict.returncode != 0, f"accepted:\n{strict.stdout}"
    lenient = _dry_run(crds_installed, sample.path, "--validate=warn")
    said = strict.stderr + lenient.stderr
    missing = [fragment for fragment in sample.expects if fragment not in said]
    assert missing == [], said


def test_apiserver_applies_design_defaults_and_prunes_unknown_fields(
    crds_installed: Kubectl, scratch_namespace: Callable[[str], str], tmp_path: Path
) -> None:
    # Deleted after the test: an operator watching every namespace would run this pool.
    namespace = scratch_namespace("crds")
    pool = {
        "apiVersion": "headway.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "defaults", "namespace": namespace},
        "spec": {"models": ["m"], "server": {"template": {}}, "typo": 1},
    }
    manifest = tmp_path / "pool.json"
    manifest.write_text(json.dumps(pool))
    # Without strict validation the unknown field is pruned, not refused.
    crds_installed.kubectl("create", "--validate=false", "-f", str(manifest))

    got = json.loads(
        crds_installed.kubectl("get", "mp", "defaults", "-n", namespace, "-o", "json").stdout
    )
    spec = got["spec"]
    assert "typo" not in spec
    assert spec["server"]["port"] == 8000
    assert spec["capacity"]["maxConcurrency"] == 32
    assert spec["capacity"]["queues"]["batch"] == {"maxDepth": 4096, "timeout": "5m"}
    assert spec["scaling"]["minReplicas"] == 1 and spec["scaling"]["maxReplicas"] == 8
    assert spec["nodePool"] == {"gpusPerReplica": 1, "warmReplicas": 0}

    table = crds_installed.kubectl("get", "headway", "-n", namespace).stdout
    for header in ("MODELS", "READY", "DESIRED", "RT-QUEUE", "TTFT-P95", "AGE"):
        assert header in table
