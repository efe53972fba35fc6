"""The installed ``headway`` console script: user-facing help, clear errors on bad
flags, and a quiet exit when its reader goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEADWAY = Path(sys.executable).parent / "headway"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HEADWAY), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_is_for_users() -> None:
    done = _run("--help")
    assert done.returncode == 0
    assert "Headway: a Kubernetes-native gateway for real-time AI inference." in done.stdout
    assert "Argument parsing" not in done.stdout  # the module's developer docstring
    for command in ("sidecar", "simulate", "render", "operator", "demo"):
        assert command in done.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("sidecar", ("127.0.0.1:8080", "127.0.0.1:9090")),
        ("simulate", ("127.0.0.1:8000",)),
        ("render", ("default open",)),
        ("operator", ("--namespace NAMESPACES", "namespace to watch")),
    ],
)
def test_subcommand_help_names_defaults(command: str, expected: tuple[str, ...]) -> None:
    done = _run(command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for part in expected:
        assert part in text, part


def test_log_level_is_checked_and_case_insensitive() -> None:
    bad = _run("--log-level", "LOUD", "render", "-f", str(EXAMPLES))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "invalid choice" in bad.stderr and "DEBUG" in bad.stderr
    good = _run("--log-level", "warning", "render", "-f", str(EXAMPLES))
    assert good.returncode == 0, good.stderr


def test_closed_stdout_exits_quietly() -> None:
    # As `headway render | head -c 100` once head has left: the reading end is
    # closed before the first write (the output fits a pipe buffer otherwise).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [str(HEADWAY), "render", "-f", str(EXAMPLES)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode in (0, 141), done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
