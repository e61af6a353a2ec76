"""The OpenMP spin setting the mapstorch command applies before PyTorch loads (mapstorch.openmp)."""

from __future__ import annotations

import os
import subprocess
import sys

# records GOMP_SPINCOUNT at the moment torch is first imported (when GNU OpenMP reads it)
CODE = """
import os, sys
class Hook:
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("at-import", os.environ.get("GOMP_SPINCOUNT", "unset"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Hook())
from mapstorch.cli.main import main
rc = main(["lines", "Fe"])
import torch
print("rc", rc)
"""


def _run(env_extra: dict[str, str], drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MAPSTORCH_OPENMP",
                                                           *drop)}
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("at-import", "rc")))


def test_the_command_sets_the_spin_count_before_torch_loads():
    from mapstorch.openmp import SPIN_COUNT

    assert _run({}) == {"at-import": str(SPIN_COUNT), "rc": "0"}


def test_a_users_setting_is_kept():
    assert _run({"GOMP_SPINCOUNT": "5"})["at-import"] == "5"
    assert _run({"OMP_WAIT_POLICY": "PASSIVE"})["at-import"] == "unset"
    assert _run({"MAPSTORCH_OPENMP": "default"})["at-import"] == "unset"


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401 -- loaded, as in this test process

    from mapstorch.openmp import tune_openmp

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MAPSTORCH_OPENMP", raising=False)
    assert tune_openmp() is False and "GOMP_SPINCOUNT" not in os.environ
