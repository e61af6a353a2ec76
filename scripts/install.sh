#!/usr/bin/env bash
# Create ./.venv and install mapstorch into it (editable), with the local CPU build of PyTorch.
# Usage: scripts/install.sh [extra]      e.g. scripts/install.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first: on these machines `torch==2.13.0` is a local CPU wheel; a bare `torch`
# requirement would download a multi-GB CUDA build. pyproject.toml itself only asks torch>=2.2.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
extra="${1:-}"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extra:+[$extra]}"
