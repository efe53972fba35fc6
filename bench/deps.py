"""What the benchmark needs beyond the project's own venv, installed on first use.

nginx and wrk come from Debian; the LiteLLM proxy and the profilers each get a
virtualenv under ``~/.cache/headway-bench`` (``HEADWAY_BENCH_CACHE``), outside
the repository, so none of them is ever a dependency of Headway itself.
``make bench-deps`` (``python -m bench.run --setup-only``) runs this alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

LITELLM = "litellm[proxy]==1.108.7"
PROFILERS = ("py-spy==0.4.3", "pyinstrument==5.1.3")
_DEBIAN = {"nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"}


def cache() -> Path:
    return Path(os.environ.get("HEADWAY_BENCH_CACHE", Path.home() / ".cache" / "headway-bench"))


def apt_install(commands: tuple[str, ...]) -> None:
    """Install the Debian packages that provide ``commands``, where any is missing."""
    missing = [_DEBIAN[c] for c in commands if _which(c) is None]
    if not missing:
        return
    log.warning("installing Debian packages: %s", " ".join(missing))
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def _which(command: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin")


def nginx_binary() -> str:
    found = _which("nginx")
    if found is None:
        raise RuntimeError("nginx is missing: run `make bench-deps`")
    return found


def _venv(name: str, packages: tuple[str, ...]) -> Path:
    """A virtualenv under the cache holding exactly ``packages`` (reinstalled on change)."""
    venv = cache() / name
    stamp = venv / "installed.txt"
    wanted = "\n".join(packages)
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    log.warning("installing %s into %s", " ".join(packages), venv)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True
    )
    stamp.write_text(wanted)
    return venv


def litellm_binary() -> str:
    return str(_venv("litellm-venv", (LITELLM,)) / "bin" / "litellm")


def py_spy_binary() -> str:
    return str(_venv("tools-venv", PROFILERS) / "bin" / "py-spy")


def ensure(commands: tuple[str, ...], *, litellm: bool, profilers: bool) -> None:
    """Everything the chosen arms and steps need."""
    apt_install(commands)
    if litellm:
        litellm_binary()
    if profilers:
        py_spy_binary()
