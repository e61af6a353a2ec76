"""The allocator settings the mapstorch command applies (mapstorch.allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = """
import threading, numpy as np
from mapstorch.allocator import tune_allocator
ok = tune_allocator()
out = {}
def work():  # a block larger than a thread arena's heap, allocated in another thread
    a = np.ones((300, 1 << 20), dtype=np.float32)
    out["sum"] = float(a[:, :8].sum())
t = threading.Thread(target=work); t.start(); t.join()
b = np.zeros(50_000_000, dtype=np.float32); b[-1] = 2.0
print(ok, out["sum"], float(b.sum()))
"""


def _run(env_extra: dict[str, str]) -> list[str]:
    env = {**os.environ, **env_extra}
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="mallopt is glibc's")
def test_tune_allocator_applies_and_large_blocks_still_work():
    assert _run({}) == ["True", "2400.0", "2.0"]
    assert _run({"MAPSTORCH_MALLOC": "default"})[0] == "False"
