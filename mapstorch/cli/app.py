"""``mapstorch app NAME [FILE]``: serve one of the marimo web apps on this machine."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["add_app_parser", "run_app"]


def add_app_parser(sub) -> None:
    from mapstorch.apps import APPS

    p = sub.add_parser("app", help="serve a web app: " + "; ".join(f"{k}: {v}" for k, v in APPS.items()),
                       description="Serve a marimo web app on this machine and print its address.")
    p.add_argument("name", choices=tuple(APPS), help="which app")
    p.add_argument("file", nargs="?", help="a scan to open first (any format mapstorch reads)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=2718, help="port (default 2718)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    p.set_defaults(func=run_app)


def run_app(args: argparse.Namespace) -> int:
    from mapstorch.apps import marimo_command

    for module in ("marimo", "plotly"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"the web apps need {module}: pip install 'mapstorch[apps]' (marimo and plotly)") from None
    if args.file and not Path(args.file).exists():
        raise InputError(f"{args.file}: no such file")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: give a port between 1 and 65535")
    cmd = marimo_command(args.name, args.file, host=args.host, port=args.port, headless=args.no_browser)
    sys.stderr.write(f"mapstorch: serving the {args.name} app at http://{args.host}:{args.port}  (Ctrl-C stops it)\n")
    sys.stderr.flush()
    env = {**os.environ, "MAPSTORCH_APP_FILE": str(Path(args.file).resolve()) if args.file else ""}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
