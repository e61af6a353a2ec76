"""HDF5 files of XRF-Maps: analyzed output (version 10 and 9 layouts), raw fly scans, and our
writer of the version-10 layout.

Layouts (see ``../shared/docs/formats/*.txt`` for complete dumps of real files):

* **v10** - ``/MAPS/Spectra/mca_arr`` float32 ``(channels, rows, cols)``, ``Energy_Calibration``,
  ``Elapsed_Livetime``/``Elapsed_Realtime``/``Input_Counts``/``Output_Counts`` ``(rows, cols)``,
  ``Integrated_Spectra/``, ``/MAPS/Scalers/{Names, Units, Values}``, ``/MAPS/Scan/...``,
  ``/MAPS/XRF_Analyzed/<routine>/...``, ``/MAPS/Fit_Parameters_Override/...``.
* **v9** - ``/MAPS/mca_arr``, ``/MAPS/energy_calib``, ``/MAPS/scalers`` with
  ``/MAPS/scaler_names``/``scaler_units``, ``/MAPS/x_axis``, ``/MAPS/XRF_fits`` ...
* **fly scan** - ``/MAPS_RAW/data_a..data_d`` int16 ``(channels, rows, cols)``, one per detector
  element, and ``livetime``/``realtime``/``inputcounts``/``ouputcounts`` (sic)
  ``(detectors, rows, cols)``; scalers and positions are in the scan's MDA file.

One XRF-Maps file holds one detector element (``.h50``..``.h53``) or all of them (``.h5``: the
elements' spectra summed, their times and count rates averaged, their maps averaged);
:func:`read_xrfmaps_h5_detectors` stacks per-element files. Spectra are read a block of rows at
a time. :func:`write_xrfmaps_h5` streams a :class:`~mapstorch.io.dataset.Dataset` into the v10
layout, each file through a temporary name and an atomic rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapstorch.errors import MapstorchError
from mapstorch.io.atomic import check_target, temporary_beside
from mapstorch.io.dataset import DataFileError, Dataset, check_counts, stack_detectors, xrfmaps_live_time
from mapstorch.io.h5chunks import read_block as read_selection
from mapstorch.io.h5chunks import usable_cores, write_spectra_rows
from mapstorch.io.max_channels import max_channel_sums as top_channel_sums

__all__ = [
    "read_xrfmaps_h5",
    "read_xrfmaps_h5_detectors",
    "read_xrfmaps_results",
    "read_flyscan",
    "flyscan_mda_path",
    "flyscan_h5_path",
    "write_xrfmaps_h5",
    "is_hdf5",
]

log = logging.getLogger(__name__)

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SUMMED_ATTR = "mapstorch_detectors_averaged"  # on /MAPS/Spectra of a summed file we write: N elements
_ROLE_NAMES = {"US_IC": "US_IC", "DS_IC": "DS_IC", "US_FM": "US_FM", "SR_current": "SR_Current",
               "DPC1_IC": "DPC1_IC", "DPC2_IC": "DPC2_IC"}


def is_hdf5(head: bytes) -> bool:
    """Whether the first bytes carry the HDF5 signature (at 0, or after a user block)."""
    return any(head[o:o + 8] == _SIGNATURE for o in (0, 512, 1024, 2048) if len(head) >= o + 8)


def _open(path: str | os.PathLike[str]):
    import h5py

    p = os.fspath(path)
    if not os.path.exists(p):
        raise DataFileError(f"HDF5 file not found: {p}")
    if os.path.isdir(p):
        raise DataFileError(f"{p} is a folder; give the path of an .h5 file")
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise DataFileError(f"{p}: cannot be opened as HDF5 (not HDF5, truncated or corrupt): {exc}") from None


_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # what h5py raises on damaged metadata


def guarded_hdf5(path: str | os.PathLike[str], build, *args):
    """Open ``path`` and run ``build(file, *args)``; the file is closed on any error, and errors
    from damaged HDF5 metadata become a DataFileError naming the file."""
    f = _open(path)
    try:
        return build(f, *args)
    except MapstorchError:
        f.close()
        raise
    except _H5_ERRORS as exc:
        f.close()
        raise DataFileError(f"{os.fspath(path)}: damaged HDF5 file; its structure cannot be read "
                            f"({type(exc).__name__}: {exc})") from None
    except BaseException:
        f.close()
        raise


_KINDS = {"dataset": "Dataset", "group": "Group"}


def _get(f, path: str, required: bool = True, kind: str = "dataset"):
    """The object at ``path``, which must be a ``kind`` (``"dataset"``, ``"group"`` or ``"any"``):
    another kind of object there (a group, a named datatype) is a DataFileError, as a missing
    required one is."""
    try:
        obj = f[path]
    except KeyError:
        if required:
            raise DataFileError(f"{f.filename}: {kind if kind != 'any' else 'object'} {path} is missing") from None
        return None
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataFileError(f"{f.filename}: {path} cannot be read ({exc})") from None
    if kind != "any":
        import h5py

        if not isinstance(obj, getattr(h5py, _KINDS[kind])):
            raise DataFileError(f"{f.filename}: {path} is an HDF5 {type(obj).__name__.lower()}, not a {kind}; "
                                "the file does not have the expected layout (damaged, or another program's file)")
    return obj


def _read(f, path: str, required: bool = True) -> np.ndarray | None:
    obj = _get(f, path, required)
    if obj is None:
        return None
    try:
        return obj[()]
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DataFileError(f"{f.filename}: dataset {path} cannot be read ({exc})") from None


def _strings(arr) -> list[str]:
    if arr is None:
        return []
    return [a.decode("latin-1").rstrip("\x00").strip() if isinstance(a, bytes) else str(a).strip()
            for a in np.ravel(arr)]


def _axis(arr: np.ndarray | None, along: int) -> np.ndarray | None:
    """A 1-D axis from XRF-Maps' (rows, cols) position arrays (or a 1-D one)."""
    if arr is None:
        return None
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 2:
        return a[0, :] if along == 1 else a[:, 0]
    return a.ravel()


# ---------------------------------------------------------------------- XRF-Maps analyzed files


def read_xrfmaps_h5(path: str | os.PathLike[str]) -> Dataset:
    """An XRF-Maps analyzed HDF5 file (v10 or v9 layout) as a one-detector Dataset.

    Spectra stay in the file and are read a block of rows at a time; call ``close()`` (or use
    ``with``) when done.
    """
    return guarded_hdf5(path, _xrfmaps_dataset)


def _xrfmaps_dataset(f) -> Dataset:
    p = f.filename
    if _get(f, "MAPS/Spectra/mca_arr", required=False) is not None:
        layout, mca_path = "v10", "MAPS/Spectra/mca_arr"
    elif _get(f, "MAPS/mca_arr", required=False) is not None:
        layout, mca_path = "v9", "MAPS/mca_arr"
    else:
        raise DataFileError(f"{p}: not XRF-Maps output: neither /MAPS/Spectra/mca_arr (v10) nor /MAPS/mca_arr (v9)")
    mca = _get(f, mca_path)
    if mca.ndim != 3:
        raise DataFileError(f"{p}: {mca_path} has shape {mca.shape}; expected (channels, rows, cols)")
    channels, rows, cols = (int(v) for v in mca.shape)
    notes: list[str] = []
    if layout == "v10":
        cal = _read(f, "MAPS/Spectra/Energy_Calibration", required=False)
        times = {k: _read(f, f"MAPS/Spectra/{k}", required=False)
                 for k in ("Elapsed_Livetime", "Elapsed_Realtime", "Input_Counts", "Output_Counts")}
        names = _strings(_read(f, "MAPS/Scalers/Names", required=False))
        units = _strings(_read(f, "MAPS/Scalers/Units", required=False))
        values = _read(f, "MAPS/Scalers/Values", required=False)
        x, y = _read(f, "MAPS/Scan/x_axis", required=False), _read(f, "MAPS/Scan/y_axis", required=False)
        stamp = _strings(_read(f, "MAPS/Scan/scan_time_stamp", required=False))
        scan_name = _strings(_read(f, "MAPS/Scan/name", required=False))
        extra = _extra_pvs(f, "MAPS/Scan/Extra_PVs")
    else:
        cal = _read(f, "MAPS/energy_calib", required=False)
        names = _strings(_read(f, "MAPS/scaler_names", required=False))
        units = _strings(_read(f, "MAPS/scaler_units", required=False))
        values = _read(f, "MAPS/scalers", required=False)
        x, y = _read(f, "MAPS/x_axis", required=False), _read(f, "MAPS/y_axis", required=False)
        stamp = _strings(_read(f, "MAPS/scan_time_stamp", required=False))
        scan_name = []
        times = {}
        extra = _extra_pvs(f, "MAPS/extra_pvs")
    scalers: dict[str, np.ndarray] = {}
    scaler_units: dict[str, str] = {}
    if values is not None and len(names):
        values = np.asarray(values)
        if values.shape[1:] != (rows, cols) or values.shape[0] < len(names):
            notes.append(f"scalers have shape {values.shape}, not (n, {rows}, {cols}); left out")
        else:
            for i, name in enumerate(names):
                if name and name not in scalers:
                    scalers[name] = values[i].astype(np.float64)
                    scaler_units[name] = units[i] if i < len(units) else ""
    if layout == "v9":  # live time etc. are scalers in v9 files
        det = _detector_suffix(p)
        for key, names_ in (("Elapsed_Livetime", ("ELT",)), ("Elapsed_Realtime", ("ERT",)),
                            ("Input_Counts", ("ICR",)), ("Output_Counts", ("OCR",))):
            for n in names_:
                cand = f"{n}{det + 1}" if det is not None else n
                if cand in scalers:
                    times[key] = scalers[cand]
    if cal is None or np.size(cal) < 2:
        cal = np.array([0.0, 1.0, 0.0])
        notes.append("no energy calibration in the file: energies are channel numbers")
    cal = np.asarray(cal, dtype=np.float64).ravel()
    cal = np.concatenate([cal, np.zeros(3 - cal.size)]) if cal.size < 3 else cal[:3]

    def per_pixel(key: str) -> np.ndarray | None:
        v = times.get(key)
        if v is None or np.shape(v) != (rows, cols):
            return None
        return np.asarray(v, dtype=np.float64)[..., None]

    def read_block(start: int, stop: int, detectors: Sequence[int]) -> np.ndarray:
        # one detector per file, so ``detectors`` is [0]; the block is returned as a transposed
        # view of the (channels, rows, cols) array read, without a copy
        try:
            block = read_selection(mca, (slice(None), slice(start, stop), slice(None)))  # gzip: inflated on every core
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataFileError(f"{p}: rows {start}-{stop - 1} of {mca_path} cannot be read ({exc})") from None
        out = np.transpose(np.asarray(block, dtype=np.float32), (1, 2, 0))[:, :, None, :]
        return check_counts(out, p, start)

    roles = {role: name for role, name in _ROLE_NAMES.items() if name in scalers}
    roles.update({name: name for name in scalers if re.fullmatch(r"CFG_\d+", name)})
    incident = None
    fit_names = _strings(_read(f, "MAPS/Fit_Parameters_Override/Fit_Parameters_Names", required=False))
    fit_values = _read(f, "MAPS/Fit_Parameters_Override/Fit_Parameters_Values", required=False)
    if "COHERENT_SCT_ENERGY" in fit_names and fit_values is not None:
        incident = float(np.asarray(fit_values)[fit_names.index("COHERENT_SCT_ENERGY")].ravel()[0])
    provenance: dict[str, object] = {"layout": layout}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        provenance.update(json.loads(_get(f, "MAPS", kind="any").attrs["mapstorch_provenance"]))
    if stamp:
        provenance["scan_time_stamp"] = stamp[0]
    if scan_name:
        provenance["scan_name"] = scan_name[0]
    analyzed = _get(f, "MAPS/XRF_Analyzed", required=False, kind="group")
    routines = sorted(analyzed.keys()) if analyzed is not None else []
    if routines:
        provenance["analyzed_routines"] = ", ".join(routines)
    if incident is not None:
        provenance["incident_energy_source"] = "Fit_Parameters_Override COHERENT_SCT_ENERGY"
    det = _detector_suffix(p)
    live = per_pixel("Elapsed_Livetime")
    if layout == "v10" and det is None and live is not None:
        # XRF-Maps' average of N elements: summed spectra, mean live times; N from the element
        # files beside it, or from the count our writer records
        n_avg = _averaged_elements(p, live[..., 0])
        where = f"{Path(p).name}0 .. {n_avg - 1} beside it"
        if not n_avg:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                n_avg = int(_get(f, "MAPS/Spectra", kind="any").attrs[_SUMMED_ATTR])
            n_avg = n_avg if n_avg > 1 else 0
            where = "as its writer recorded"
        if n_avg:
            live = live * n_avg
            notes.append(f"an average file of {n_avg} detector elements ({where}): its spectra are their sum and its "
                         f"live times their mean, so the live time used is {n_avg} x the file's (counts/s on one "
                         "element's scale, as XRF-Maps' average maps)")
            provenance["live_time"] = f"Elapsed_Livetime x {n_avg} (an average of {n_avg} detector elements)"
    return Dataset(
        path=p,
        format=f"xrfmaps-hdf5-{layout}",
        rows=rows,
        cols=cols,
        detectors=1,
        channels=channels,
        calibration=cal,
        read_block=read_block,
        live_time=live,
        real_time=per_pixel("Elapsed_Realtime"),
        input_counts=per_pixel("Input_Counts"),
        output_counts=per_pixel("Output_Counts"),
        count_units="counts",
        scalers=scalers,
        scaler_units=scaler_units,
        scaler_roles=roles,
        x_axis=_axis(x, 1),
        y_axis=_axis(y, 0),
        incident_energy=incident,
        extra_pvs=extra,
        detector_names=[f"detector {det}" if det is not None else "sum"],
        provenance=provenance,
        notes=notes,
        close_fn=f.close,
    )


def _extra_pvs(f, group: str) -> dict[str, dict]:
    """``{name: {"value", "unit", "description"}}`` from XRF-Maps' Extra_PVs (values as text)."""
    if group == "MAPS/extra_pvs":  # v9: (4, n) strings: names, values, descriptions, units
        arr = _read(f, group, required=False)
        if arr is None or np.ndim(arr) != 2 or np.shape(arr)[0] < 2:
            return {}
        rows = [_strings(r) for r in arr]
        names, values = rows[0], rows[1]
        desc = rows[2] if len(rows) > 2 else [""] * len(names)
        unit = rows[3] if len(rows) > 3 else [""] * len(names)
    else:
        names = _strings(_read(f, f"{group}/Names", required=False))
        values = _strings(_read(f, f"{group}/Values", required=False))
        unit = _strings(_read(f, f"{group}/Unit", required=False))
        desc = _strings(_read(f, f"{group}/Description", required=False))
    out = {}
    for i, name in enumerate(names):
        if name and i < len(values):
            out[name] = {"value": values[i], "unit": unit[i] if i < len(unit) else "",
                         "description": desc[i] if i < len(desc) else ""}
    return out


def _averaged_elements(path: str, live: np.ndarray) -> int:
    """How many detector elements an XRF-Maps average file ``<scan>.h5`` averages: the number of
    per-element files ``<scan>.h50``, ``.h51``, ... beside it, when there are at least two and the
    mean of their live times is this file's (``HDF5_IO::generate_avg``); else 0."""
    import h5py

    lives = []
    for d in range(64):
        sibling = Path(f"{path}{d}")
        if not sibling.is_file():
            break
        try:
            with h5py.File(sibling, "r") as f:
                v = np.asarray(f["MAPS/Spectra/Elapsed_Livetime"][()], dtype=np.float64)
        except (OSError, KeyError, ValueError, TypeError):
            return 0
        if v.shape != live.shape:
            return 0
        lives.append(v)
    if len(lives) < 2:
        return 0
    return len(lives) if np.allclose(np.mean(lives, axis=0), live, rtol=1e-5, atol=1e-9) else 0


def _detector_suffix(path: str) -> int | None:
    m = re.search(r"\.h5(\d+)$", path)
    return int(m.group(1)) if m else None


def read_xrfmaps_h5_detectors(paths: Sequence[str | os.PathLike[str]]) -> Dataset:
    """Per-element XRF-Maps files (``.h50``, ``.h51``, ...) stacked into one multi-detector Dataset."""
    if not paths:
        raise DataFileError("no files given")
    parts = [read_xrfmaps_h5(p) for p in paths]
    first = parts[0]
    for ds in parts[1:]:
        if (ds.rows, ds.cols, ds.channels) != (first.rows, first.cols, first.channels):
            shapes = ", ".join(f"{Path(d.path).name}: {d.rows}x{d.cols}x{d.channels}" for d in parts)
            for d in parts:
                d.close()
            raise DataFileError(f"per-detector files do not match (rows x cols x channels): {shapes}")

    def stack(name: str) -> np.ndarray | None:
        arrs = [getattr(d, name) for d in parts]
        return None if any(a is None for a in arrs) else np.concatenate(arrs, -1)

    def read_rows(start: int, stop: int, detectors: Sequence[int]) -> np.ndarray:
        return stack_detectors([parts[d].read(slice(start, stop)) for d in detectors])

    def close() -> None:
        for d in parts:
            d.close()

    return Dataset(
        path=os.fspath(paths[0]), format=first.format, rows=first.rows, cols=first.cols, detectors=len(parts),
        channels=first.channels, calibration=np.concatenate([d.calibration for d in parts]),
        read_block=read_rows, live_time=stack("live_time"), real_time=stack("real_time"),
        input_counts=stack("input_counts"), output_counts=stack("output_counts"), count_units=first.count_units,
        scalers=first.scalers, scaler_units=first.scaler_units, scaler_roles=first.scaler_roles,
        x_axis=first.x_axis, y_axis=first.y_axis, incident_energy=first.incident_energy, extra_pvs=first.extra_pvs,
        detector_names=[Path(d.path).name for d in parts], provenance=dict(first.provenance),
        notes=[n for d in parts for n in d.notes], close_fn=close,
    )


_RESULT_KEYS = ("Channel_Names", "Channel_Units", "Counts_Per_Sec")


def read_xrfmaps_results(path: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """``{routine: {"channel_names", "units", "counts_per_sec" (N, rows, cols), "extra"}}`` of a
    v10 file.

    extra : ``{name: (..., rows, cols)}``, every other map of the routine's group, as stored (our
    writer's ``Counts``, ``Counts_Stderr``, ``Counts_Per_Sec_Stderr``, ``Reduced_Chi2``,
    ``Iterations``, ``Status``, ``Parameter_*``; empty for XRF-Maps' own files, whose other
    datasets are integrated spectra, not maps).
    """
    def results(f) -> dict[str, dict[str, object]]:
        group = _get(f, "MAPS/XRF_Analyzed", required=False, kind="group")
        if group is None:
            raise DataFileError(f"{f.filename}: no /MAPS/XRF_Analyzed group (no fitted maps in this file)")
        out = {}
        for routine in group:
            base = f"MAPS/XRF_Analyzed/{routine}"
            cps = np.asarray(_read(f, f"{base}/Counts_Per_Sec"), dtype=np.float64)
            extra = {}
            for key in group[routine]:
                obj = _get(f, f"{base}/{key}", kind="any")
                if key in _RESULT_KEYS or not hasattr(obj, "shape") or cps.ndim < 2:
                    continue
                if len(obj.shape) >= 2 and tuple(obj.shape[-2:]) == cps.shape[-2:]:
                    extra[key] = np.asarray(_read(f, f"{base}/{key}"))
            out[routine] = {
                "channel_names": _strings(_read(f, f"{base}/Channel_Names")),
                "units": _strings(_read(f, f"{base}/Channel_Units", required=False)),
                "counts_per_sec": cps,
                "extra": extra,
            }
        f.close()
        return out

    return guarded_hdf5(path, results)


# ---------------------------------------------------------------------- raw fly scans


def flyscan_mda_path(h5_path: str | os.PathLike[str]) -> Path | None:
    """The MDA file of a fly scan: ``<dir>/flyXRF.h5/<scan>_<...>.h5`` -> ``<dir>/mda/<scan>.mda``."""
    p = Path(h5_path)
    m = re.match(r"^(.+?_\d+)_", p.name)
    if not m:
        return None
    for folder in (p.parent.parent / "mda", p.parent / "mda", p.parent):
        cand = folder / f"{m.group(1)}.mda"
        if cand.is_file():
            return cand
    return None


#: Where XRF-Maps looks for a fly scan's spectra, relative to the data set folder (the parent of
#: ``mda/``), and the end of their names; XRF-Maps' netCDF fly scans (``_0.nc``) are not read here
FLYSCAN_FOLDERS = (("flyXRF.h5", "_0.h5"), ("flyXRF", "_0.h5"), ("flyXRF", "_0.hdf5"))


def flyscan_h5_path(mda_path: str | os.PathLike[str]) -> tuple[Path | None, list[Path]]:
    """The raw fly-scan HDF5 file of a fly scan's MDA file, as XRF-Maps finds it:
    ``<dir>/mda/<scan>.mda`` -> ``<dir>/flyXRF.h5/<scan>_<...>_0.h5`` (also ``flyXRF/``, and the
    MDA file's own folder). Returns ``(path or None, the folders searched)``; more than one
    candidate in the first folder that has any is an error (the name says which to open)."""
    p = Path(mda_path)
    scan = p.name[:-4] if p.name.lower().endswith(".mda") else p.stem
    searched: list[Path] = []
    for base in (p.parent.parent, p.parent):
        for folder, ending in FLYSCAN_FOLDERS:
            where = base / folder
            if where not in searched:
                searched.append(where)
            if not where.is_dir():
                continue
            found = sorted(c for c in where.iterdir()
                           if c.name.startswith(f"{scan}_") and c.name.endswith(ending) and c.is_file())
            if len(found) > 1:
                raise DataFileError(f"{p}: holds no spectra, and {where} has {len(found)} fly-scan files of this "
                                    f"scan ({', '.join(c.name for c in found)}): open the one to fit")
            if found:
                return found[0], searched
    return None, searched


def read_flyscan(h5_path: str | os.PathLike[str], scalers=None,
                 calibration: Sequence[float] | None = None) -> Dataset:
    """A raw fly scan (``/MAPS_RAW``) as a Dataset; ``scalers`` from the scan's MDA file.

    scalers : an object like :class:`mapstorch.io.mda.MdaScalers` (rows, cols, scalers,
        scaler_units, x_axis, y_axis, axis_names, axis_units, notes, provenance), or None.
    calibration : (offset, slope, quadratic); raw fly scans record none.
    """
    return guarded_hdf5(h5_path, _flyscan_dataset, scalers, calibration)


def _fit_length(axis, n: int) -> np.ndarray | None:
    """An MDA position axis cut or NaN-padded to the HDF5 file's ``n`` points."""
    if axis is None:
        return None
    a = np.asarray(axis, dtype=np.float64)[:n]
    return np.concatenate([a, np.full(n - a.size, np.nan)]) if a.size < n else a


def _flyscan_dataset(f, scalers, calibration) -> Dataset:
    p = f.filename
    raw = _get(f, "MAPS_RAW", required=False, kind="group")
    if raw is None:
        raise DataFileError(f"{p}: no /MAPS_RAW group; not a raw fly-scan file")
    names = sorted(k for k in raw.keys() if re.fullmatch(r"data_[a-z]", k))
    if not names:
        raise DataFileError(f"{p}: /MAPS_RAW has no data_a..data_d datasets")
    dsets = [_get(f, f"MAPS_RAW/{n}") for n in names]
    shapes = {d.shape for d in dsets}
    if len(shapes) != 1 or len(dsets[0].shape) != 3:
        raise DataFileError(f"{p}: detector arrays {', '.join(names)} have shapes {sorted(shapes)}; they must match")
    channels, rows, cols = (int(v) for v in dsets[0].shape)
    n_det = len(dsets)
    notes: list[str] = []

    def per_pixel(key: str) -> np.ndarray | None:
        v = _read(f, f"MAPS_RAW/{key}", required=False)
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (n_det, rows, cols):
            notes.append(f"/MAPS_RAW/{key} has shape {v.shape}, expected {(n_det, rows, cols)}; left out")
            return None
        return np.transpose(v, (1, 2, 0))

    live, real = per_pixel("livetime"), per_pixel("realtime")
    icr, ocr = per_pixel("inputcounts"), per_pixel("ouputcounts")
    if ocr is None:
        ocr = per_pixel("outputcounts")
    if real is not None and icr is not None and ocr is not None:
        # as XRF-Maps (Spectra::recalc_elapsed_livetime): real x OCR / ICR, not the file's livetime
        live = xrfmaps_live_time(real, icr, ocr)
        notes.append("live time computed as real time x OCR / ICR (as XRF-Maps)")

    def read_block(start: int, stop: int, detectors: Sequence[int]) -> np.ndarray:
        try:
            parts = [np.asarray(read_selection(dsets[d], (slice(None), slice(start, stop), slice(None))), dtype=np.float32)
                     for d in detectors]
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataFileError(f"{p}: rows {start}-{stop - 1} cannot be read ({exc})") from None
        block = np.transpose(np.stack(parts), (2, 3, 0, 1))  # (D, C, r, cols) -> (r, cols, D, C)
        return check_counts(block, p, start)

    if calibration is None:
        calibration = (0.0, 1.0, 0.0)
        notes.append("raw fly scans record no energy calibration: pass one (or an override file)")
    ds_kwargs: dict[str, object] = {}
    provenance: dict[str, object] = {"detector_datasets": ", ".join(names)}
    if scalers is not None:
        r, c = min(rows, scalers.rows), min(cols, scalers.cols)
        if (scalers.rows, scalers.cols) != (rows, cols):
            notes.append(f"the MDA file has {scalers.rows} x {scalers.cols} points, the HDF5 file {rows} x {cols}: "
                         f"scalers and positions of the first {r} x {c} are used")
        maps = {}
        for name, v in scalers.scalers.items():
            full = np.full((rows, cols), np.nan)
            full[:r, :c] = np.asarray(v)[:r, :c]
            maps[name] = full
        ds_kwargs.update(
            scalers=maps, scaler_units=dict(scalers.scaler_units),
            x_axis=_fit_length(scalers.x_axis, cols), y_axis=_fit_length(scalers.y_axis, rows),
            axis_names=tuple(scalers.axis_names), axis_units=tuple(scalers.axis_units),
            extra_pvs=dict(scalers.extra_pvs), scaler_roles=dict(scalers.scaler_roles),
        )
        notes.extend(scalers.notes)
        provenance.update({f"mda_{k}": v for k, v in scalers.provenance.items()})
    return Dataset(
        path=p, format="flyscan-hdf5", rows=rows, cols=cols, detectors=n_det, channels=channels,
        calibration=np.asarray(calibration, dtype=np.float64), read_block=read_block, live_time=live,
        real_time=real, input_counts=icr, output_counts=ocr, count_units="counts",
        detector_names=names, provenance=provenance, notes=notes, close_fn=f.close, **ds_kwargs,
    )


# ---------------------------------------------------------------------- writing (v10 layout)


def _fixed(strings: Sequence[str], width: int) -> np.ndarray:
    return np.array([s.encode("latin-1", "replace")[:width] for s in strings], dtype=f"|S{width}")


def _ds(group, name: str, data, **kw) -> None:
    group.create_dataset(name, data=data, **kw)


def _scaler_table(ds: Dataset, detector: int | None) -> tuple[list[str], list[str], np.ndarray]:
    """Scaler names, units and values ``(S, rows, cols)``: the file's scalers, the role names
    XRF-Maps uses (US_IC, DS_IC, SR_Current, ...) and ELT/ERT/ICR/OCR per detector."""
    names, units, values = [], [], []
    for name, v in ds.scalers.items():
        names.append(name)
        units.append(ds.scaler_units.get(name, ""))
        values.append(v)
    for role, name in ds.scaler_roles.items():
        label = _ROLE_NAMES.get(role, role)
        if label not in names:
            names.append(label)
            units.append(ds.scaler_units.get(name, ""))
            values.append(ds.scalers[name])
    dets = range(ds.detectors) if detector is None else [detector]
    for key, arr, unit in (("ELT", ds.live_time, "seconds"), ("ERT", ds.real_time, "seconds"),
                           ("ICR", ds.input_counts, "cts/s"), ("OCR", ds.output_counts, "cts/s")):
        if arr is None:
            continue
        for d in dets:
            label = f"{key}{d + 1}"
            if label not in names:
                names.append(label)
                units.append(unit)
                values.append(arr[..., d])
    stack = np.stack(values).astype(np.float32) if values else np.zeros((0, ds.rows, ds.cols), np.float32)
    return names, units, stack


def _pv_text(value) -> str:
    if isinstance(value, np.ndarray):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value.tolist())
    return f"{value:g}" if isinstance(value, float) else str(value)


def _theta(ds: Dataset, override) -> float:
    """The sample rotation: the extra PV that the override's THETA_PV names, else 0 (as XRF-Maps)."""
    names = [e.value.strip() for e in override.get("THETA_PV")] if override is not None else []
    for name in names:
        pv = ds.extra_pvs.get(name)
        if pv is not None:
            with contextlib.suppress(TypeError, ValueError):
                return float(np.ravel(pv.get("value"))[0])
    return 0.0


def _amplifier(override, side: str) -> tuple[float, str, list[float]] | None:
    """(sensitivity number, unit, [number code, unit code, number]) from an override file."""
    if override is None:
        return None
    num_code = override.settings.get(f"{side}_AMP_SENS_NUM")
    unit_code = override.settings.get(f"{side}_AMP_SENS_UNIT")
    if num_code is None or unit_code is None:
        return None
    numbers = (1, 2, 5, 10, 20, 50, 100, 200, 500)
    units = ("pA/V", "nA/V", "uA/V", "mA/V")
    if not (0 <= num_code < len(numbers) and 0 <= unit_code < len(units)):
        return None
    number = float(numbers[int(num_code)])
    return number, units[int(unit_code)], [float(int(num_code)), float(int(unit_code)), number]


#: The most bytes of spectra in one chunk of ``mca_arr`` we write: half of HDF5's default chunk
#: cache (1 MiB), so that a reader going pixel by pixel along a row, as XRF-Maps does, inflates
#: each chunk once (a chunk larger than the cache is inflated again for every pixel)
MCA_CHUNK_BYTES = 1 << 19


def mca_chunks(channels: int, cols: int) -> tuple[int, int, int]:
    """The chunk shape of a written ``mca_arr (channels, rows, cols)``: whole spectra, one row,
    as many columns as fit in :data:`MCA_CHUNK_BYTES` (64 of 2048 float32 channels)."""
    return channels, 1, max(1, min(cols, MCA_CHUNK_BYTES // (4 * max(channels, 1))))


def _write_file(h5, ds: Dataset, detector: int | None, override, results, compression) -> dict:
    """Create every dataset of one output file; returns the datasets spectra are streamed into."""
    comp = {"compression": compression} if compression else {}
    rows, cols, chans = ds.rows, ds.cols, ds.channels
    maps = h5.create_group("MAPS")
    spec = maps.create_group("Spectra")
    mca = spec.create_dataset("mca_arr", shape=(chans, rows, cols), dtype=np.float32,
                              chunks=mca_chunks(chans, cols), **comp)
    d0 = 0 if detector is None else detector
    cal = ds.calibration[d0]
    if override is not None and "ENERGY_SLOPE" in override.parameters:
        cal = np.array([override.parameters.get("ENERGY_OFFSET", 0.0), override.parameters["ENERGY_SLOPE"],
                        override.parameters.get("ENERGY_QUADRATIC", 0.0)])
    c = np.arange(chans, dtype=np.float64)
    _ds(spec, "Energy", (cal[0] + cal[1] * c + cal[2] * c * c).astype(np.float32))
    _ds(spec, "Energy_Calibration", np.asarray(cal, dtype=np.float32))
    per_pixel = {}
    for name, arr in (("Elapsed_Livetime", ds.live_time), ("Elapsed_Realtime", ds.real_time),
                      ("Input_Counts", ds.input_counts), ("Output_Counts", ds.output_counts)):
        if arr is None:
            v = np.zeros((rows, cols), np.float32)
        else:  # the summed file: the detectors' mean, as XRF-Maps' average file (its spectra are summed)
            v = (arr.mean(-1) if detector is None else arr[..., detector]).astype(np.float32)
        per_pixel[name] = v
        _ds(spec, name, v, chunks=(rows, 1), **comp)
    integ = spec.create_group("Integrated_Spectra")
    for name, v in per_pixel.items():
        _ds(integ, name, np.array([v.sum(dtype=np.float64)], dtype=np.float32))
    scal = maps.create_group("Scalers")
    names, units, values = _scaler_table(ds, detector)
    _ds(scal, "Names", _fixed(names, 256))
    _ds(scal, "Units", _fixed(units, 256))
    _ds(scal, "Values", values, chunks=(1, rows, cols) if len(names) else None, **(comp if len(names) else {}))
    for side in ("US", "DS"):
        amp = _amplifier(override, side)
        if amp is not None:
            _ds(scal, f"{side.lower()}_amp", np.asarray(amp[2], dtype=np.float32))
            _ds(scal, f"{side.lower()}_amp_num", np.array([amp[0]], dtype=np.float32))
            _ds(scal, f"{side.lower()}_amp_unit", _fixed([amp[1]], 256))
    scan = maps.create_group("Scan")
    x = ds.x_axis if ds.x_axis is not None else np.arange(cols, dtype=np.float64)
    y = ds.y_axis if ds.y_axis is not None else np.arange(rows, dtype=np.float64)
    _ds(scan, "x_axis", np.broadcast_to(np.asarray(x, np.float32)[None, :], (rows, cols)).copy())
    _ds(scan, "y_axis", np.broadcast_to(np.asarray(y, np.float32)[:, None], (rows, cols)).copy())
    _ds(scan, "requested_rows", np.array([rows], dtype=np.int32))
    _ds(scan, "requested_cols", np.array([cols], dtype=np.int32))
    _ds(scan, "scan_time_stamp", _fixed([str(ds.provenance.get("time_stamp", ds.provenance.get("scan_time_stamp", "")))], 256))
    _ds(scan, "name", _fixed([str(ds.provenance.get("scan_name", Path(ds.path).name))], 256))
    _ds(scan, "scan_type", _fixed(["XRF_MAPS"], 256))
    _ds(scan, "POLARITY_PATTERN", _fixed([""], 256))
    _ds(scan, "theta", np.array([_theta(ds, override)], dtype=np.float32))
    extra = scan.create_group("Extra_PVs")
    pvs = ds.extra_pvs
    _ds(extra, "Names", _fixed(list(pvs), 255))
    _ds(extra, "Values", _fixed([_pv_text(pv.get("value")) for pv in pvs.values()], 255))
    _ds(extra, "Unit", _fixed([str(pv.get("unit", "")) for pv in pvs.values()], 255))
    _ds(extra, "Description", _fixed([str(pv.get("description", "")) for pv in pvs.values()], 255))
    maps.attrs["mapstorch_provenance"] = json.dumps({str(k): _pv_text(v) for k, v in ds.provenance.items()})
    if detector is None and ds.detectors > 1:  # the summed file: how many elements its times average
        spec.attrs[_SUMMED_ATTR] = np.int32(ds.detectors)
    _ds(maps, "version", np.array([10.0], dtype=np.float32))
    if override is not None:
        _write_override(maps, override)
    for routine, res in (results or {}).items():
        _write_results(maps, routine, res, rows, cols, chans, comp)
    return {"mca": mca, "integrated": integ}


def _write_override(maps, override) -> None:
    from mapstorch.parameters.table import spec

    group = maps.create_group("Fit_Parameters_Override")
    names = list(override.parameters)
    vals = np.zeros((len(names), 4), dtype=np.float32)
    for i, n in enumerate(names):
        p = spec(n)
        vals[i] = (override.parameters[n], override.lower.get(n, p.lower), override.upper.get(n, p.upper), 0.0)
    _ds(group, "Fit_Parameters_Names", _fixed(names, 50))
    _ds(group, "Fit_Parameters_Values", vals)


def _write_results(maps, routine: str, res: Mapping[str, object], rows: int, cols: int, chans: int, comp) -> None:
    g = maps.require_group("XRF_Analyzed").create_group(routine)
    names = list(res["channel_names"])  # type: ignore[arg-type]
    cps = np.asarray(res["counts_per_sec"], dtype=np.float32)
    if cps.shape != (len(names), rows, cols):
        raise DataFileError(f"results of {routine}: Counts_Per_Sec has shape {cps.shape}, expected "
                            f"{(len(names), rows, cols)}")
    _ds(g, "Channel_Names", _fixed(names, 256))
    _ds(g, "Channel_Units", _fixed(list(res.get("units", ["cts/s"] * len(names))), 256))  # type: ignore[arg-type]
    _ds(g, "Counts_Per_Sec", cps, **comp)
    for key in ("Fitted_Integrated_Spectra", "FIT_Integrated_Background") if res.get("integrated", True) else ():
        v = res.get(key)
        _ds(g, key, np.zeros(chans, np.float32) if v is None else np.asarray(v, dtype=np.float32))
    for key, v in dict(res.get("extra") or {}).items():  # type: ignore[call-overload]
        arr = np.asarray(v, dtype=np.float32)
        if arr.shape[-2:] != (rows, cols):
            raise DataFileError(f"results of {routine}: {key} has shape {arr.shape}, expected (..., {rows}, {cols})")
        _ds(g, key, arr, **comp)


def write_xrfmaps_h5(
    path: str | os.PathLike[str],
    dataset: Dataset,
    *,
    override=None,
    per_detector: bool = False,
    detector_overrides: Sequence | None = None,
    results: Mapping[str, Mapping[str, object]] | None = None,
    chunk_rows: int | None = None,
    compression: str | None = "gzip",
    detector_results: Sequence[Mapping[str, Mapping[str, object]] | None] | None = None,
) -> list[Path]:
    """Write ``dataset`` in the XRF-Maps version-10 layout; returns the files written.

    path : the summed file, as XRF-Maps' average file ``<scan>.h5``: the detectors' spectra
        added, their live and real times and count rates averaged.
    per_detector : also write ``<path>0``, ``<path>1``, ... one per detector element.
    override : an :class:`~mapstorch.io.override.OverrideFile`; its calibration is written as the
        energy calibration and its parameters under ``/MAPS/Fit_Parameters_Override``.
    detector_overrides : one override file (or None) per detector for the per-detector files, as
        XRF-Maps uses ``maps_fit_parameters_override.txt<N>`` for element N; None entries (or no
        list) fall back to ``override``.
    results : ``{routine: {"channel_names", "counts_per_sec" (N, rows, cols), "units",
        "Fitted_Integrated_Spectra", "FIT_Integrated_Background", "extra": {name: (..., rows, cols)}}}``
        for ``/MAPS/XRF_Analyzed`` (``extra`` maps are written under their own names; with
        ``"integrated": False`` no integrated spectra, as XRF-Maps' ROI group).
    chunk_rows : rows read and written at a time (default: about 16 MB of spectra).
    detector_results : with ``per_detector``, one ``results`` (or None) per detector file.

    Spectra are streamed block by block. Every file is written to a temporary name in the
    target folder and renamed when complete, so an interrupted write leaves no file under the
    final names (and removes its temporaries).
    """
    import h5py

    target = check_target(path, "HDF5 output", DataFileError)
    finals = [target] + ([Path(f"{target}{d}") for d in range(dataset.detectors)] if per_detector else [])
    temps: list[str] = []
    files = []
    try:
        for final in finals:
            tmp = temporary_beside(final)
            temps.append(tmp)
            files.append(h5py.File(tmp, "w"))
        per = list(detector_overrides or [])
        if per and len(per) != dataset.detectors:
            raise DataFileError(f"detector_overrides has {len(per)} entries for {dataset.detectors} detectors")

        def override_of(i: int):
            return per[i - 1] if i > 0 and per and per[i - 1] is not None else override

        det_res = list(detector_results or [])
        if det_res and len(det_res) != dataset.detectors:
            raise DataFileError(f"detector_results has {len(det_res)} entries for {dataset.detectors} detectors")

        def results_of(i: int):
            return results if i == 0 else (det_res[i - 1] if det_res else None)

        sinks = [_write_file(h5, dataset, None if i == 0 else i - 1, override_of(i), results_of(i), compression)
                 for i, h5 in enumerate(files)]
        n = len(sinks)
        totals = np.zeros((n, dataset.channels), dtype=np.float64)
        top1 = np.zeros((n, dataset.channels), dtype=np.float64)
        top10 = np.zeros((n, dataset.channels), dtype=np.float64)
        for rows, block in dataset.iter_rows(chunk_rows):
            for i, sink in enumerate(sinks):
                part = block.sum(2) if i == 0 else block[:, :, i - 1]
                write_spectra_rows(sink["mca"], rows.start, part)
                totals[i] += part.sum(axis=(0, 1), dtype=np.float64)
                one, ten = top_channel_sums(part, 10, n_threads=usable_cores())
                top1[i] += one
                top10[i] += ten
                del part
            del block  # one block in memory at a time
        for i, sink in enumerate(sinks):
            _ds(sink["integrated"], "Spectra", totals[i].astype(np.float32))
            _ds(sink["integrated"], "Max_Channels_Integrated_Spectra", top1[i].astype(np.float32))
            _ds(sink["integrated"], "Max_10_Channels_Integrated_Spectra", top10[i].astype(np.float32))
        for h5 in files:
            h5.close()
        files = []
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        temps = []
        return finals
    finally:
        for h5 in files:
            with contextlib.suppress(Exception):
                h5.close()
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
