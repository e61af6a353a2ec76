"""The web apps: marimo notebooks served by ``mapstorch app NAME [FILE]``.

* ``explore`` -- open a scan: its facts, integrated spectrum with element lines, any pixel's
  spectrum, total-counts and scaler images;
* ``guess`` -- which elements are present, on a periodic table with the evidence;
* ``optimize`` -- fit the shape parameters and amplitudes, show the fit, write an override file;
* ``maps`` -- fit every pixel (or open a results file) and look at the maps.

The apps hold widgets and layout; what they compute lives in :mod:`mapstorch.apps.session`
and :mod:`mapstorch.apps.figures` (tested without a browser). They need the ``apps`` extra
(``pip install 'mapstorch[apps]'``: marimo and plotly).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["APPS", "app_path", "marimo_command"]

#: App names and what each is for.
APPS = {
    "explore": "look at a scan: spectrum, pixels, images",
    "guess": "decide which elements are present",
    "optimize": "fit the parameters, write an override file",
    "maps": "fit every pixel and view the maps",
}


def app_path(name: str) -> Path:
    """The marimo notebook of app ``name``."""
    if name not in APPS:
        raise InputError(f"unknown app {name!r}; choose one of {', '.join(APPS)}")
    return Path(__file__).with_name(f"{name}_app.py")


def marimo_command(name: str, file: str | None = None, host: str = "127.0.0.1", port: int = 2718,
                   headless: bool = True) -> list[str]:
    """The command that serves app ``name`` (``marimo run``), with ``file`` as its start file."""
    cmd = [sys.executable, "-m", "marimo", "run", str(app_path(name)), "--host", host, "--port", str(int(port))]
    if headless:
        cmd.append("--headless")
    if file:
        cmd += ["--", "--file", str(Path(file).resolve())]
    return cmd
