"""``import mapstorch`` stays light: no plotting, SciPy or HDF5 at import time."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import time, sys; import torch; t = time.perf_counter();"
        "import mapstorch; from mapstorch import SpectrumModel, build_line_table, ParameterSet, snip_background;"
        "dt = time.perf_counter() - t;"
        "heavy = [m for m in ('matplotlib', 'scipy', 'h5py', 'xraylib') if m in sys.modules];"
        "print(dt, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert float(out[0]) < 1.0
    assert out[1].strip() == "[]"
