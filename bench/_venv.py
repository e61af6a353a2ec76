"""Separate virtual environments for baseline packages, and running scripts inside them.

Baselines (upstream MapsTorch ``mapstorch==0.0.2``, PyMca5, ...) are installed into
``bench/.venv-<name>`` (git-ignored), never into the project's environment. Upstream MapsTorch has
the same import name as this project, so its scripts run in isolated mode from a temporary
directory where this repository's ``mapstorch`` cannot be imported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

__all__ = ["ensure_venv", "run_json"]

log = logging.getLogger("bench")
BENCH = Path(__file__).resolve().parent


def ensure_venv(name: str, packages: list[str]) -> Path:
    """Create (or reuse) ``bench/.venv-<name>`` with torch==2.13.0 and ``packages``; its python.

    torch is installed first and pinned: on our machines ``torch==2.13.0`` is a local CPU wheel,
    while a bare ``torch`` requirement would pull a multi-GB CUDA build.
    """
    root = BENCH / f".venv-{name}"
    python = root / "bin" / "python"
    marker = root / "installed.json"
    wanted = ["torch==2.13.0", *packages]
    if marker.exists() and json.loads(marker.read_text()) == wanted and python.exists():
        return python
    log.info("creating %s with %s", root, ", ".join(wanted))
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    for spec in (wanted[:1], wanted):
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *spec],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(spec)} into {root} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    marker.write_text(json.dumps(wanted))
    return python


def run_json(python: Path, script: Path, args: list[str], timeout: float, threads: int = 2,
             unset: tuple[str, ...] = ()) -> dict:
    """Run ``script`` with ``python`` (isolated, from a temporary directory, without the
    environment variables ``unset``); parse its last stdout line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k not in unset}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(python), "-I", str(Path(script).resolve()), *args], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RuntimeError(f"{script.name}: last line is not JSON: {lines[-1][:200]}") from None


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    print(ensure_venv(sys.argv[1], sys.argv[2:]))
