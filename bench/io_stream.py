"""Benchmark: streaming a large XRF-Maps HDF5 file a block of rows at a time vs loading it whole.

One run, same machine, same file, each reader in its own fresh process (so that peak memory is
its own):

* ``h5py-whole``: the naive way, ``f["/MAPS/Spectra/mca_arr"][()]`` then the integrated spectrum;
* ``mapstorch``: ``open_dataset(path).integrated("sum")``, which reads blocks of rows (about
  16 MB each, the default) and never holds the volume;
* ``mapstorch-256MB``: the same with 256 MB blocks.

The synthetic file has the XRF-Maps v10 layout (``mca_arr`` float32 ``(channels, rows, cols)``,
uncompressed unless ``--gzip``, chunked one row of pixels per chunk unless ``--xrfmaps-chunks``
asks for XRF-Maps' own one-pixel chunks) and is about ``--size-gb`` GB of spectra. Every reader's integrated spectrum must
agree exactly with the others (checked), so all did the same work. The file is in the page cache
for every reader (it was just written, and the readers alternate over ``--repeats`` rounds), so
the figures compare the readers, not the disk.

The LAST line printed is one JSON object:
``{"metric": "hdf5_stream", "ours_s", "baseline_s", "speed_ratio", "ours_peak_mb",
"baseline_peak_mb", "memory_ratio", ...}`` (ratios are baseline / ours).

Usage: ``.venv/bin/python bench/io_stream.py [--size-gb 2] [--repeats 2] [--xrfmaps-chunks] [--gzip] [--workdir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = 2048
COLS = 1000


def make_file(path: Path, size_gb: float, xrfmaps_chunks: bool, gzip: bool = False) -> tuple[int, int, int]:
    """A v10 file of ~size_gb GB of spectra: peaks on a smooth background, varying per pixel."""
    import h5py
    import numpy as np

    rows = max(1, int(size_gb * 1e9 / (CHANNELS * COLS * 4)))
    e = 0.0095 * np.arange(CHANNELS) - 0.004
    base = 40 * np.exp(-e / 4)
    for center, height in ((6.40, 900), (7.06, 120), (3.69, 300), (8.05, 400), (9.9, 2000)):
        base += height * np.exp(-0.5 * ((e - center) / 0.07) ** 2)
    rng = np.random.default_rng(0)
    chunks = (CHANNELS, 1, 1) if xrfmaps_chunks else (CHANNELS, 1, COLS)
    with h5py.File(path, "w") as f:
        mca = f.create_dataset("MAPS/Spectra/mca_arr", shape=(CHANNELS, rows, COLS), dtype="f4", chunks=chunks,
                               compression="gzip" if gzip else None)
        f["MAPS/Spectra/Energy_Calibration"] = np.array([-0.004, 0.0095, 0.0], "f4")
        f["MAPS/Spectra/Elapsed_Livetime"] = np.full((rows, COLS), 0.05, "f4")
        f["MAPS/version"] = np.array([10.0], "f4")
        block = 16
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            scale = rng.uniform(0.2, 1.0, (1, r1 - r0, COLS)).astype("f4")
            noise = rng.integers(0, 3, (CHANNELS, r1 - r0, COLS), dtype=np.int8)
            mca[:, r0:r1, :] = np.floor(base[:, None, None] * scale) + noise
    return CHANNELS, rows, COLS


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reader(method: str, path: str) -> dict:
    """Run in a child process: read, integrate, report time and peak memory."""
    import numpy as np

    if method == "h5py-whole":
        import h5py
    else:
        from mapstorch.io.open import open_dataset
    rss_after_imports = peak_rss_mb()
    t0 = time.perf_counter()
    if method == "h5py-whole":
        with h5py.File(path, "r") as f:
            volume = f["MAPS/Spectra/mca_arr"][()]
        total = volume.sum(axis=(1, 2), dtype=np.float64)
    else:
        with open_dataset(path) as ds:
            rows = max(1, (256 << 20) // ds.nbytes_per_row) if method.endswith("256MB") else None
            total = ds.integrated("sum", chunk_rows=rows)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {"method": method, "seconds": seconds, "peak_mb": peak, "imports_mb": rss_after_imports,
            "checksum": float(total.sum()), "first": float(total[0]), "argmax": int(total.argmax())}


def child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic file goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic file")
    ap.add_argument("--xrfmaps-chunks", action="store_true", help="one chunk per pixel, as XRF-Maps writes")
    ap.add_argument("--gzip", action="store_true", help="gzip-compressed chunks, as XRF-Maps and fly scans store them")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.child[0] == "make":
        dims = make_file(Path(args.child[1]), float(args.child[2]), args.child[3] == "1", args.child[4] == "1")
        print(json.dumps({"dims": dims}))
        return
    if args.child:
        print(json.dumps(run_reader(*args.child)))
        return

    work = Path(tempfile.mkdtemp(prefix="mapstorch-io-bench-", dir=args.workdir))
    path = work / "synthetic_v10.h5"
    try:
        t0 = time.perf_counter()
        # made in a child process too, so that no reader process inherits its memory
        channels, rows, cols = child("make", str(path), str(args.size_gb), "1" if args.xrfmaps_chunks else "0",
                                     "1" if args.gzip else "0")["dims"]
        file_gb = os.path.getsize(path) / 1e9
        gb = rows * cols * channels * 4 / 1e9  # of spectra (the rates below): the file is smaller when compressed
        print(f"file: {rows} rows x {cols} cols x {channels} channels, {gb:.2f} GB of spectra, {file_gb:.2f} GB "
              f"on disk, written in {time.perf_counter() - t0:.1f} s", flush=True)
        methods = ["h5py-whole", "mapstorch", "mapstorch-256MB"]
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for m in (methods if rep % 2 == 0 else methods[::-1]):
                r = child(m, str(path))
                results[m].append(r)
                print(f"  round {rep + 1} {m:<15} {r['seconds']:6.2f} s  peak {r['peak_mb']:7.0f} MB "
                      f"(after imports {r['imports_mb']:.0f} MB)", flush=True)
        sums = {(r["checksum"], r["first"], r["argmax"]) for rs in results.values() for r in rs}
        if len(sums) != 1:
            raise SystemExit(f"readers disagree on the integrated spectrum: {sums}")
        med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
        peak = {m: max(r["peak_mb"] for r in rs) for m, rs in results.items()}
        extra = {m: max(r["peak_mb"] - r["imports_mb"] for r in rs) for m, rs in results.items()}
        print()
        print("| reader | median time | GB/s | peak RSS | peak RSS above imports |")
        print("|---|---|---|---|---|")
        for m in methods:
            print(f"| {m} | {med[m]:.2f} s | {gb / med[m]:.2f} | {peak[m]:.0f} MB | {extra[m]:.0f} MB |")
        print()
        print(json.dumps({
            "metric": "hdf5_stream", "file_gb": round(file_gb, 3), "spectra_gb": round(gb, 3), "rows": rows, "cols": cols, "channels": channels,
            "xrfmaps_chunks": args.xrfmaps_chunks, "gzip": args.gzip,
            "ours_s": med["mapstorch"], "ours_256mb_s": med["mapstorch-256MB"], "baseline_s": med["h5py-whole"],
            "speed_ratio": med["h5py-whole"] / med["mapstorch"],
            "ours_peak_mb": peak["mapstorch"], "ours_256mb_peak_mb": peak["mapstorch-256MB"],
            "baseline_peak_mb": peak["h5py-whole"],
            "memory_ratio": peak["h5py-whole"] / peak["mapstorch"],
            "memory_ratio_above_imports": extra["h5py-whole"] / max(extra["mapstorch"], 1.0),
            "repeats": args.repeats, "cpu": platform.machine(), "cores": os.cpu_count(),
        }))
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
