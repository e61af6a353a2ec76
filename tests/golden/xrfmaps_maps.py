"""Write ``xrfmaps/nnls_<scan>.json.gz`` from XRF-Maps' own output for the 2-ID-E scans.

Usage::

    python tests/golden/xrfmaps_maps.py IMG_DAT_FOLDER XRF_MAPS_COMMIT [SCAN ...]

``IMG_DAT_FOLDER`` holds ``<scan>.mda.h5`` and ``.h50`` .. ``.h53`` written by XRF-Maps
(``xrf_maps --dir <copy of ../shared/data/xrfmaps-2ide> --files <scan>.mda --fit roi,nnls
--detectors 0,1,2,3 --generate-avg-h5``, see ``README.md``); scans default to ``2xfm_0010``
(a step scan, spectra in the MDA file) and ``2xfm_0011`` (a fly scan, spectra in
``flyXRF.h5/``). Kept: each file's NNLS
``Channel_Names``, ``Channel_Units`` and ``Counts_Per_Sec`` (as float32 values), NNLS's
``Fitted_Integrated_Spectra`` and ``FIT_Integrated_Background``, the ROI group's
``Channel_Names`` and ``Counts_Per_Sec`` where there is one, and the live times XRF-Maps divided
by (``/MAPS/Spectra/Elapsed_Livetime``). No spectra are kept.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import h5py
import numpy as np

SCANS = ("2xfm_0010", "2xfm_0011")
DETECTORS = ("0", "1", "2", "3")


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _values(array) -> dict:
    """float32 values, each written as its shortest decimal that reads back to the same float32."""
    a = np.asarray(array, np.float32)
    return {"shape": list(a.shape), "values": [float(str(v)) for v in a.ravel()]}


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        group = f["MAPS/XRF_Analyzed/NNLS"]
        out = {
            "channel_names": _strings(group["Channel_Names"][()]),
            "units": _strings(group["Channel_Units"][()]),
            "counts_per_sec": _values(group["Counts_Per_Sec"][()]),
            "live_time": _values(f["MAPS/Spectra/Elapsed_Livetime"][()]),
            "fitted_integrated": _values(group["Fitted_Integrated_Spectra"][()]),
            "background_integrated": _values(group["FIT_Integrated_Background"][()]),
        }
        if "MAPS/XRF_Analyzed/ROI" in f:  # XRF-Maps' ROI routine (--fit roi,nnls)
            roi = f["MAPS/XRF_Analyzed/ROI"]
            out["roi"] = {"channel_names": _strings(roi["Channel_Names"][()]),
                          "counts_per_sec": _values(roi["Counts_Per_Sec"][()])}
        return out


def write(folder: Path, commit: str, scan: str) -> None:
    name = f"{scan}.mda"
    files = {d: read(folder / f"{name}.h5{d}") for d in DETECTORS}
    average = read(folder / f"{name}.h5")

    # XRF-Maps' average file is the plain mean of the elements' maps: check before keeping it
    def array(entry: dict) -> np.ndarray:
        return np.asarray(entry["values"], np.float64).reshape(entry["shape"])

    mean = np.mean([array(files[d]["counts_per_sec"]) for d in DETECTORS], axis=0)
    if not np.allclose(array(average["counts_per_sec"]), mean, rtol=1e-5, atol=1e-6):
        raise SystemExit(f"{folder}: {name}.h5 is not the mean of the detectors' maps")
    out = Path(__file__).resolve().parent / "xrfmaps" / f"nnls_{scan}.json.gz"
    payload = {"xrfmaps_commit": commit, "scan": name, "routine": "NNLS", "detectors": files, "average": average}
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
        packed.write(json.dumps(payload, separators=(",", ":")).encode())  # the same bytes every time
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for scan in sys.argv[3:] or SCANS:
        write(Path(sys.argv[1]), sys.argv[2], scan)
