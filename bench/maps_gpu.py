"""Benchmark: map fitting on a CUDA GPU -- correctness against the CPU, and pixels per second.

Run where a GPU is (it exits with a message where none is)::

    python bench/maps_gpu.py [--pixels 262144,1048576] [--nonlinear-pixels 16384,65536,262144]
                             [--file-rows 256] [--budget-s 420] [--json OUT.json]

The spectra come from ``mapstorch.synthetic.simulate_map`` (the demo sample's 16 components at
10 keV, 2048 channels): a 64 x 64 simulated map, its noise-free expectation tiled to the wanted
number of pixels and sampled afresh (Poisson) on the GPU.

1. **Same numbers as the CPU.** The 64 x 64 map is fitted by ``fit_map`` on the CPU and on CUDA
   (float32) with each method (nonlinear: 8 x 64); the largest relative difference of the major
   elements' counts is reported. The SNIP background of the Triton kernel (one thread per
   spectrum, XRF-Maps' sequential sweep) is compared with the CPU's blocked sweep and with the
   pointer-jumping fallback.
2. **Spectra already on the GPU** (``--pixels``): the chunk fit that ``fit_map`` runs per chunk
   (SNIP, NNLS, standard errors, reduced chi-square, results to the host; the Poisson method's
   EM too), timed with the GPU synchronised, best of two or three after a warm-up; the SNIP and
   the NNLS solve alone. At the largest size each step of the nnls chunk is timed alone, the
   standard errors' small-matrix routines side by side (:mod:`spd_lanes` in float32 and float64,
   LAPACK's batched Cholesky) with their largest differences, and the whole chunk again with
   LAPACK's routine.
3. **Nonlinear** (``--nonlinear-pixels``): ``fit_map(method="nonlinear", device="cuda")`` with the
   default parameter maps; at the smallest size also with :mod:`spd_lanes` for the
   Levenberg-Marquardt steps, at the second size also on this machine's CPUs (``--cpu-threads``).
4. **From a file** (``--file-rows`` x 512 pixels, uncompressed HDF5 float32 on local disk, in
   chunks of ``--file-chunk-rows``): ``fit_map(..., device="cuda")`` end to end (reading,
   transfers, everything; the better of two runs, the first paying one-time costs), next to
   ``fit_map`` on this machine's CPUs on the same file (``--file-cpu 0``: skipped): a side-by-side
   ratio. ``--skip-check`` skips section 1.

Sections start only while less than ``--budget-s`` seconds have passed (the rest are listed
under ``skipped``); ``--json`` receives the results so far after each section. The LAST line
printed is JSON (``metric``: ``gpu_map_pixels_per_second``; ``ours`` is the nnls chunk fit with
the spectra on the GPU at the largest ``--pixels``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mapstorch.io.dataset import Dataset
from mapstorch.maps import fit_map, solvers, spd_lanes
from mapstorch.maps.fit import _chunk_output, _fit_chunk
from mapstorch.physics.model import SpectrumModel
from mapstorch.physics.snip import snip_window
from mapstorch.synthetic import simulate_map

log = logging.getLogger("bench")
MAJORS = ("Fe", "Ca", "K", "Zn")


def _timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``fn()`` over ``repeat`` runs, the GPU synchronised (after one warm-up)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _stages(yg, design, per_unit, cal, window) -> dict[str, object]:
    """Seconds of each step of the nnls chunk fit (as ``_fit_chunk`` runs them), each timed
    alone on its own inputs with the GPU synchronised; the standard errors' small-matrix
    routines side by side, and the host transfer against a pinned copy of the same bytes."""
    off, slope, quad, width = cal
    win = (window.first, window.last)
    st: dict[str, object] = {}
    keep: dict[str, torch.Tensor] = {}

    def snip():
        keep["bg"], keep["yw"] = snip_window(yg, off, slope, quad, width, win, with_window=True)

    st["snip_with_window"] = _timed(snip, repeat=2)

    def layout():
        keep["bg_t"], keep["yw_t"] = keep["bg"].T.contiguous().T, keep["yw"].T.contiguous().T

    st["channel_major_copies"] = _timed(layout, repeat=2)
    bg, yw = keep.pop("bg_t"), keep.pop("yw_t")
    del keep["bg"], keep["yw"]

    def solve():
        keep["a"] = solvers.nnls(design, (yw - bg).clamp_(min=0.0))[0]

    st["target_and_nnls"] = _timed(solve, repeat=2)
    a = keep["a"]

    def model():
        keep["m"] = torch.addmm(bg.T, design, a.T).T if bg.T.is_contiguous() else a @ design.T + bg
        keep["w"] = keep["m"].clamp(min=1.0).reciprocal_()

    st["model_and_weights"] = _timed(model, repeat=2)
    m, w = keep["m"], keep["w"]
    errs = {}
    for engine in ("lanes", "lapack"):
        st[f"stderr_{engine}"] = _timed(
            lambda: errs.__setitem__(engine, solvers.poisson_stderr(design, m, a, weights=w, engine=engine)), repeat=2)
    k = design.shape[1]
    iu = torch.triu_indices(k, k, device=design.device)
    pairs = design[:, iu[0]] * design[:, iu[1]]
    st["stderr_part_fisher_product"] = _timed(lambda: keep.__setitem__("u", pairs.T @ w.T), repeat=2)
    st["stderr_part_lanes"] = _timed(lambda: spd_lanes.packed_stderr(keep["u"], a > 0), repeat=2)
    st["stderr_part_lanes_float64"] = _timed(
        lambda: errs.__setitem__("f64", spd_lanes.packed_stderr(keep["u"], a > 0, work=torch.float64)[0]), repeat=2)
    ref = errs["lanes"]
    fin = torch.isfinite(ref) & torch.isfinite(errs["lapack"]) & torch.isfinite(errs["f64"])
    for other in ("lapack", "f64"):
        rel = ((errs[other] - ref).abs() / ref.abs().clamp(min=1e-30))[fin]
        st[f"stderr_{other}_vs_lanes"] = {"max_rel": float(rel.max()), "p99_rel": float(rel.float().quantile(0.99))
                                          if rel.numel() < 2 ** 24 else float(rel[:2 ** 23].quantile(0.99)),
                                          "nan_mismatch": int((torch.isnan(errs[other]) != torch.isnan(ref)).sum())}
    st["chi2"] = _timed(lambda: solvers.pearson_chi2(yw, m, weights=w), repeat=2)
    se = errs["lanes"]
    chi = solvers.pearson_chi2(yw, m, weights=w)
    it = torch.zeros(len(a), dtype=torch.long, device=a.device)
    code = torch.zeros(len(a), dtype=torch.int8, device=a.device)
    st["host_output"] = _timed(lambda: _chunk_output(yg, a, se, a * per_unit, se * per_unit, chi, it, code, m, bg),
                               repeat=2)
    blob = torch.cat([a, se, a * per_unit, se * per_unit], 1)
    if blob.device.type == "cuda":
        pinned = torch.empty(blob.shape, dtype=blob.dtype, pin_memory=True)
        st["host_copy_pinned_same_bytes"] = _timed(lambda: pinned.copy_(blob), repeat=2)
        st["host_copy_pageable_same_bytes"] = _timed(lambda: blob.cpu(), repeat=2)
    return st


def _npy_dataset(counts: np.ndarray, calibration: np.ndarray, name: str) -> Dataset:
    rows, cols, chans = counts.shape
    return Dataset(path=name, format="npy", rows=rows, cols=cols, detectors=1, channels=chans,
                   calibration=calibration, spectra=counts[:, :, None, :].astype(np.float32))


def _h5_dataset(path: Path, calibration: np.ndarray) -> Dataset:
    f = h5py.File(path, "r")
    d = f["spectra"]
    rows, cols, chans = d.shape
    return Dataset(path=str(path), format="hdf5-bench", rows=rows, cols=cols, detectors=1, channels=chans,
                   calibration=calibration, read_block=lambda a, b, dets: d[a:b][:, :, None, :], close_fn=f.close)


def _rel_diff(a, b, names) -> float:
    worst = 0.0
    for n in names:
        x, y = a.element(n), b.element(n)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1.0))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", default="262144,1048576", help="chunk sizes for the spectra-on-GPU timing")
    ap.add_argument("--nonlinear-pixels", default="16384,65536,262144",
                    help="pixels of the nonlinear timings (0: skip)")
    ap.add_argument("--file-rows", type=int, default=256, help="rows of 512 pixels in the file run (0: skip)")
    ap.add_argument("--cpu-threads", type=int, default=0, help="threads for the CPU side (default: all cores)")
    ap.add_argument("--pointer-pixels", type=int, default=65536, help="pixels for the pointer-jumping SNIP timing")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script without a GPU")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining sections once this many seconds have passed")
    ap.add_argument("--json", default="", help="also write the results (so far) to this file after each section")
    ap.add_argument("--file-chunk-rows", type=int, default=0,
                    help="rows per chunk in the file run (0: fit_map's default)")
    ap.add_argument("--file-cpu", type=int, default=1, help="0: skip the CPU fit of the file")
    ap.add_argument("--skip-check", action="store_true", help="skip section 1 (the same numbers as the CPU)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table of the largest nnls chunk")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device here: this benchmark needs one")
        sys.exit(2)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    dev = torch.device(args.device)
    t_start = time.perf_counter()

    def over(section: str) -> bool:
        """Past the time budget: say so and skip ``section``."""
        spent = time.perf_counter() - t_start
        if spent > args.budget_s:
            log.warning("%.0f s spent (budget %.0f s): skipping %s", spent, args.budget_s, section)
            out.setdefault("skipped", []).append(section)
            return True
        return False

    def save() -> None:
        out["seconds"] = round(time.perf_counter() - t_start, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else None
    out: dict[str, object] = {"metric": "gpu_map_pixels_per_second", "gpu": gpu,
                              "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None

    sim = simulate_map(64, 64, seed=0)
    ps, window = sim.params, sim.window
    off, slope, quad, width = (float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC",
                                                          "SNIP_WIDTH"))
    cal = np.array([[off, slope, quad]])
    chans = sim.counts.shape[-1]
    majors = [n for n in MAJORS if n in sim.lines.names]

    # ---- 1. the same numbers as the CPU
    small = _npy_dataset(sim.counts, cal, "<64x64>")
    check = {}
    for method in ("nnls", "poisson", "nonlinear") if not args.skip_check else ():
        sub = small if method != "nonlinear" else _npy_dataset(sim.counts[:8], cal, "<8x64>")
        rc = fit_map(sub, ps, method=method)
        rg = fit_map(sub, ps, method=method, device=dev)
        check[method] = {"max_rel_diff_majors": round(_rel_diff(rg, rc, majors), 6),
                         "status_nonzero_cpu": int((rc.status != 0).sum()),
                         "status_nonzero_gpu": int((rg.status != 0).sum())}
        if method == "nonlinear":
            check[method]["max_abs_diff_parameters"] = float(np.nanmax(np.abs(rg.parameters - rc.parameters)))
        log.info("cpu vs cuda, %s: %s", method, check[method])
    y = torch.as_tensor(sim.counts.reshape(-1, chans), dtype=torch.float32)
    win = (window.first, window.last)
    ref = snip_window(y, off, slope, quad, width, win, engine="blocked")
    for engine in ("kernel", "pointer") if dev.type == "cuda" else ("pointer",):
        got = snip_window(y.to(dev), off, slope, quad, width, win, engine=engine).cpu()
        d = float(((got - ref).abs() / ref.abs().clamp(min=1.0)).max())
        check[f"snip_{engine}_vs_cpu_max_rel_diff"] = d
        log.info("SNIP %s vs the CPU's blocked sweep: max relative difference %.3g", engine, d)
    out["check"] = check
    save()

    # ---- 2. spectra already on the GPU
    model = SpectrumModel(sim.lines, window, dtype=torch.float32, device=dev)
    theta = ps.shape_values().to(device=dev, dtype=torch.float32)
    with torch.no_grad():
        design = model.design_matrix(theta)
    per_unit = design.sum(0)
    expected = torch.as_tensor(sim.expected.reshape(-1, chans), dtype=torch.float32, device=dev)
    resident = {}
    for p in [int(v) for v in args.pixels.split(",") if v]:
        if over(f"resident {p}"):
            continue
        reps = -(-p // expected.shape[0])
        lam = expected.repeat(reps, 1)[:p]
        yg = torch.poisson(lam)
        del lam
        row: dict[str, float] = {}
        engine = "kernel" if dev.type == "cuda" else "blocked"
        t_kernel = _timed(lambda: snip_window(yg, off, slope, quad, width, win, engine=engine))
        row[f"snip_{engine}_pixels_per_second"] = p / t_kernel
        bg = snip_window(yg, off, slope, quad, width, win)
        target = (yg[:, window.slice()] - bg).clamp(min=0.0)
        from mapstorch.maps import solvers

        res = {}

        def solve():
            res["r"] = solvers.nnls(design, target)

        t_nnls = _timed(solve)
        row["nnls_solve_pixels_per_second"] = p / t_nnls
        row["nnls_iterations_median"] = float(res["r"][1].float().median())
        row["nnls_iterations_max"] = int(res["r"][1].max())
        target = bg = None  # free the GPU memory
        for method in ("nnls", "poisson"):
            part = {}

            def chunk():
                part["r"] = _fit_chunk(yg, design, per_unit, (off, slope, quad, width), window, method, None)

            t = _timed(chunk, repeat=2)
            row[f"{method}_chunk_pixels_per_second"] = p / t
            if method == "nnls":  # the last whole tile: far into the chunk (64-bit offsets)
                tile = expected.shape[0]
                whole = p // tile
                last = part["r"]["counts"][:, (whole - 1) * tile:whole * tile] if whole else part["r"]["counts"]
                truth = np.stack([sim.truth_counts[n].reshape(-1) for n in model.column_names])[:, :last.shape[1]]
                err = {n: float(np.median(np.abs(last[i] - truth[i]) / truth[i]))
                       for i, n in enumerate(model.column_names) if n in majors}
                row["nnls_median_rel_error_last_tile"] = {k: round(v, 4) for k, v in err.items()}
                if p == max(int(v) for v in args.pixels.split(",") if v) and not over("stages"):
                    row["stages_seconds"] = _stages(yg, design, per_unit, (off, slope, quad, width), window)
                    log.info("stages of the nnls chunk, %d pixels: %s", p, row["stages_seconds"])
                    save()

                    def lapack(engine, data, elsewhere="lapack"):
                        return "lapack" if engine == "auto" else original(engine, data)

                    original, solvers._engine = solvers._engine, lapack
                    try:
                        row["nnls_chunk_lapack_stderr_pixels_per_second"] = p / _timed(chunk, repeat=2)
                    finally:
                        solvers._engine = original
                if args.profile and p == max(int(v) for v in args.pixels.split(",") if v) and dev.type == "cuda":
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        chunk()
                        torch.cuda.synchronize()
                    log.info("%s", prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                             max_name_column_width=60))
                    import mapstorch.physics.snip_gpu as sg

                    plain = sg.snip
                    for blk in (64, 256):
                        sg.snip = functools.partial(plain, block=blk)
                        tb = _timed(lambda: snip_window(yg, off, slope, quad, width, win, engine="kernel"))
                        row[f"snip_kernel_block{blk}_pixels_per_second"] = p / tb
                    sg.snip = plain
        yg = None
        if dev.type == "cuda":
            row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident[str(p)] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
        log.info("%d pixels on the GPU: %s", p, resident[str(p)])
        out["resident"] = resident
        save()
    pp = min(args.pointer_pixels, expected.shape[0] * 16) if not over("pointer") else 0
    yp = torch.poisson(expected.repeat(-(-pp // expected.shape[0]), 1)[:pp])
    if pp:
        t_ptr = _timed(lambda: snip_window(yp, off, slope, quad, width, win, engine="pointer"), repeat=1)
        out["snip_pointer_pixels_per_second"] = round(pp / t_ptr, 1)
        log.info("SNIP by pointer jumping (%d pixels): %.0f pixels/s", pp, pp / t_ptr)
    yp = None
    out["resident"] = resident
    largest = resident[max(resident, key=int)] if resident else {}
    out["ours"] = largest.get("nnls_chunk_pixels_per_second")
    out["ours_poisson"] = largest.get("poisson_chunk_pixels_per_second")

    save()

    # ---- 3. nonlinear
    sizes = [int(v) for v in args.nonlinear_pixels.split(",") if v and int(v)]
    if sizes and not over("nonlinear"):
        out["nonlinear"] = {}
        lam = torch.as_tensor(sim.expected.reshape(-1, chans))
        warm = torch.poisson(lam[:64]).reshape(1, 64, chans).numpy()
        fit_map(_npy_dataset(warm, cal, "<warm>"), ps, method="nonlinear", device=dev)
        for size in sizes:
            if over(f"nonlinear {size}"):
                continue
            rows = max(1, size // 512)
            counts = torch.poisson(lam.repeat(-(-rows * 512 // lam.shape[0]), 1)[:rows * 512])
            sub = _npy_dataset(counts.reshape(rows, 512, chans).numpy(), cal, "<nonlinear>")
            t = time.perf_counter()
            rn = fit_map(sub, ps, method="nonlinear", device=dev)
            t_nl = time.perf_counter() - t
            entry = {"pixels": rows * 512, "pixels_per_second": round(rows * 512 / t_nl, 1),
                     "free": list(rn.parameter_names), "status_nonzero": int((rn.status != 0).sum()),
                     "iterations_median": float(np.median(rn.iterations)),
                     "parameters_median": [float(v) for v in
                                           np.median(rn.parameters.reshape(len(rn.parameter_names), -1), 1)]}
            if size == sizes[0]:  # the LM steps and errors by spd_lanes instead of LAPACK
                def lanes(engine, data, elsewhere="lapack"):
                    return "lanes" if engine == "auto" else original(engine, data)

                original, solvers._engine = solvers._engine, lanes
                try:
                    t = time.perf_counter()
                    rl = fit_map(sub, ps, method="nonlinear", device=dev)
                    entry["lanes_pixels_per_second"] = round(rows * 512 / (time.perf_counter() - t), 1)
                    entry["lanes_max_abs_diff_parameters"] = float(np.nanmax(np.abs(rl.parameters - rn.parameters)))
                finally:
                    solvers._engine = original
            if size == sizes[min(1, len(sizes) - 1)] and not over("nonlinear on the CPU"):
                torch.set_num_threads(args.cpu_threads or torch.get_num_threads())
                t = time.perf_counter()
                rc = fit_map(sub, ps, method="nonlinear")
                entry["cpu_pixels_per_second"] = round(rows * 512 / (time.perf_counter() - t), 1)
                entry["cpu_max_abs_diff_parameters"] = float(np.nanmax(np.abs(rc.parameters - rn.parameters)))
                entry["cpu_max_rel_diff_majors"] = round(_rel_diff(rn, rc, majors), 6)
            out["nonlinear"][str(size)] = entry
            log.info("nonlinear on the GPU: %s", entry)
            save()

    # ---- 4. from a file, GPU and CPU side by side
    if args.file_rows and not over("file"):
        rows, cols = args.file_rows, 512
        reps = -(-rows * cols // (64 * 64))
        rng = np.random.default_rng(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "map.h5"
            with h5py.File(path, "w") as f:
                d = f.create_dataset("spectra", shape=(rows, cols, chans), dtype=np.float32)
                tile = sim.expected.reshape(-1, chans)
                for r in range(rows):
                    idx = (np.arange(r * cols, (r + 1) * cols)) % tile.shape[0]
                    d[r] = rng.poisson(tile[idx]).astype(np.float32)
            file_gb = path.stat().st_size / 1e9
            ds = _h5_dataset(path, cal)
            chunk_rows = args.file_chunk_rows or None
            try:
                times: list[float] = []
                for _ in range(2 if dev.type == "cuda" else 1):  # the first includes one-time costs
                    t = time.perf_counter()
                    rg = fit_map(ds, ps, method="nnls", device=dev, chunk_rows=chunk_rows)
                    times.append(time.perf_counter() - t)
                t_gpu = min(times)
                rc, t_cpu = None, float("nan")
                if args.file_cpu:
                    t = time.perf_counter()
                    rc = fit_map(ds, ps, method="nnls", chunk_rows=chunk_rows)
                    t_cpu = time.perf_counter() - t
            finally:
                ds.close_fn()
            out["file"] = {"pixels": rows * cols, "file_gb": round(file_gb, 2), "reps": reps,
                           "chunk_rows": chunk_rows, "chunks": -(-rows // (chunk_rows or rows)) if chunk_rows else None,
                           "gpu_pixels_per_second": round(rows * cols / t_gpu, 1),
                           "gpu_all_pixels_per_second": [round(rows * cols / v, 1) for v in times],
                           "gpu_fit_loop_pixels_per_second": round(rg.pixels_per_second, 1),
                           "cpu_pixels_per_second": round(rows * cols / t_cpu, 1),
                           "gpu_over_cpu": round(t_cpu / t_gpu, 2),
                           "max_rel_diff_majors": round(_rel_diff(rg, rc, majors), 6) if rc is not None else None}
            log.info("from a %.1f GB file: %s", file_gb, out["file"])

    save()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
