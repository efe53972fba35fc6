"""The benchmark harness works end to end: a tiny run through real processes, no timings asserted.

It starts the simulator, a bare and a fully-on sidecar (real redis-server) and
the aiohttp load generator, as ``make bench`` does, and checks that every arm
served requests and streams and that the results were written.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.redis


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_bench_quick_run_records_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--rounds",
            "1",
            "--arms",
            "direct,headway-bare,headway-full",
            "--loadgen",
            "aiohttp",
            "--scenarios",
            "latency,limiter,streaming",
            "--streams",
            "4",
            "--out",
            str(out),
            "--no-plots",
            "--keep",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    sweep = summary["medians"]["sweep"]
    streaming = summary["medians"]["streaming"]
    for arm in ("direct", "headway-bare", "headway-full"):
        assert sweep[arm]["1"]["ok"] > 0, arm
        assert sweep[arm]["1"]["non2xx"] == 0, arm
        assert streaming[arm]["4"]["ok"] > 0, arm
        assert streaming[arm]["4"]["failed"] == 0, arm
        assert streaming[arm]["4"]["stalled_streams"] is not None, arm

    limiter = summary["medians"]["limiter"]
    assert limiter["headway-full"]["redis"]["round_trips_per_request"] > 0
    assert limiter["headway-bare"]["decision"]["decisions"] > 0

    with (out / "sweep.csv").open() as f:
        arms = {row["arm"] for row in csv.DictReader(f)}
    assert arms == {"direct", "headway-bare", "headway-full"}
    assert "| headway-full |" in done.stdout
