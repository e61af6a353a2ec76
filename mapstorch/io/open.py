"""Open any supported file as a :class:`~mapstorch.io.dataset.Dataset`, choosing the reader by
content (the file name's suffix is only a tie-breaker).

=====================  ================================================================
format                 recognised by
=====================  ================================================================
``xrfmaps-hdf5-v10``   HDF5 signature and ``/MAPS/Spectra/mca_arr``
``xrfmaps-hdf5-v9``    HDF5 signature and ``/MAPS/mca_arr``
``flyscan-hdf5``       HDF5 signature and ``/MAPS_RAW`` (scalers from the matching MDA file)
``mda``                XDR header: a version number near 1.x, a scan number and a rank 1-4
``gse-mca``            text starting with ``VERSION:`` / holding ``ELEMENTS:`` and ``DATA:``
``npy``                NumPy magic ``\\x93NUMPY``
``text``               any other text of numbers (one spectrum per column)
=====================  ================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from mapstorch.errors import OverrideFileError
from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.files import read_bytes
from mapstorch.io.hdf5 import is_hdf5
from mapstorch.io.mda import is_mda
from mapstorch.io.override import OverrideFile, find_override, read_override
from mapstorch.io.scalers import apply_override_scalers

__all__ = ["detect_format", "open_dataset", "override_beside", "FORMATS"]

FORMATS = ("xrfmaps-hdf5-v10", "xrfmaps-hdf5-v9", "flyscan-hdf5", "mda", "gse-mca", "npy", "text")


def _hdf5_kind(path: Path) -> str:
    from mapstorch.io.hdf5 import guarded_hdf5

    def kind(f) -> str | None:
        with f:
            for name, fmt in (("MAPS_RAW", "flyscan-hdf5"), ("MAPS/Spectra/mca_arr", "xrfmaps-hdf5-v10"),
                              ("MAPS/mca_arr", "xrfmaps-hdf5-v9")):
                if name in f:
                    return fmt
        return None

    found = guarded_hdf5(path, kind)
    if found is not None:
        return found
    raise DataFileError(
        f"{path}: an HDF5 file, but neither XRF-Maps output (/MAPS/Spectra/mca_arr or /MAPS/mca_arr) "
        "nor a raw fly scan (/MAPS_RAW)"
    )


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format name of a file (see module docstring); DataFileError if none fits."""
    p = Path(path)
    head = read_bytes(p, "data file", limit=4096)
    if not head:
        raise DataFileError(f"{p} is empty")
    if is_hdf5(head):
        return _hdf5_kind(p)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if is_mda(head):
        return "mda"
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise DataFileError(
            f"{p}: unknown binary format; supported: XRF-Maps HDF5, raw fly-scan HDF5, EPICS MDA, "
            "GSE MCA text, NumPy .npy and plain text"
        ) from None
    stripped = text.lstrip()
    if stripped.startswith("VERSION:") or ("ELEMENTS:" in text and ("DATA:" in text or "CHANNELS:" in text)):
        return "gse-mca"
    if "ELEMENTS_TO_FIT" in text or "DETECTOR_ELEMENTS:" in text:
        raise DataFileError(f"{p} is a maps_fit_parameters_override file, not data; pass it with --override "
                            "(Python: override=...)")
    return "text"


def override_beside(path: str | os.PathLike[str]) -> Path | None:
    """The ``maps_fit_parameters_override.txt`` of a data file's dataset folder, if any.

    XRF-Maps keeps it in the dataset folder, with raw data in sub-folders (``mda/``,
    ``flyXRF.h5/``), so the file's own folder is searched first, then its parent.
    """
    folder = Path(path).resolve().parent
    for candidate in (folder, folder.parent):
        try:
            return find_override(candidate)
        except OverrideFileError:
            continue
    return None


def open_dataset(
    path: str | os.PathLike[str],
    format: str | None = None,
    override: str | os.PathLike[str] | OverrideFile | Literal["auto"] | None = None,
    channel_axis: int | None = None,
    calibration: tuple[float, float, float] | None = None,
) -> Dataset:
    """Open ``path`` as a Dataset.

    format : force a reader (one of :data:`FORMATS`) instead of detecting it.
    override : an override file (path or parsed) whose scaler mapping names the roles of the
        scalers (US_IC, DS_IC, ELT1 ...), and whose calibration is used for files that record none
        (raw fly scans, NumPy and text arrays); ``"auto"`` uses :func:`override_beside` when it
        finds one (and says so in the dataset's notes).
    channel_axis : for NumPy / text arrays, the axis that holds channels.
    calibration : (offset, slope, quadratic) for files that record none; overrides ``override``.
    """
    p = Path(path)
    fmt = format or detect_format(p)
    if fmt not in FORMATS:
        raise DataFileError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    found = None
    if isinstance(override, str) and override == "auto":
        found = override = override_beside(p)
    ov = read_override(override) if isinstance(override, (str, os.PathLike)) else override
    try:
        ds = _open(p, fmt, ov, channel_axis, calibration)
    except DataFileError as exc:
        if format is None:
            raise
        try:
            detected = detect_format(p)
        except DataFileError:
            raise exc from None
        if detected == format:
            raise
        raise DataFileError(f"{exc} (read as {format!r} because it was asked for; its content looks like "
                            f"{detected!r}: leave the format out to detect it)") from None
    if ov is not None:
        apply_override_scalers(ds, ov)
    if found is not None:
        ds.notes.append(f"using the override file found beside the data: {found}")
        ds.provenance["override_file"] = str(found)
    return ds


def _open_flyscan(h5: Path, mda: Path | None, roles: dict[str, str] | None,
                  cal: tuple[float, float, float] | None) -> Dataset:
    """A raw fly scan's spectra (``h5``) with the scalers and positions of its MDA file."""
    from mapstorch.io.hdf5 import read_flyscan
    from mapstorch.io.mda import read_mda_scalers

    scalers = read_mda_scalers(mda, roles=roles) if mda is not None else None
    ds = read_flyscan(h5, scalers=scalers, calibration=cal)
    if mda is None:
        ds.notes.append("no matching MDA file found next to the fly scan: no scalers or positions")
    return ds


def _open(p: Path, fmt: str, ov: OverrideFile | None, channel_axis: int | None,
          calibration: tuple[float, float, float] | None) -> Dataset:
    roles = dict(ov.scaler_pvs) if ov is not None else None
    cal = calibration
    if cal is None and ov is not None and "ENERGY_SLOPE" in ov.parameters:
        cal = (ov.parameters.get("ENERGY_OFFSET", 0.0), ov.parameters["ENERGY_SLOPE"],
               ov.parameters.get("ENERGY_QUADRATIC", 0.0))
    if fmt in ("xrfmaps-hdf5-v10", "xrfmaps-hdf5-v9"):
        from mapstorch.io.hdf5 import read_xrfmaps_h5

        return read_xrfmaps_h5(p)
    if fmt == "flyscan-hdf5":
        from mapstorch.io.hdf5 import flyscan_mda_path

        return _open_flyscan(p, flyscan_mda_path(p), roles, cal)
    if fmt == "mda":
        from mapstorch.io.hdf5 import flyscan_h5_path
        from mapstorch.io.mda import MdaWithoutSpectra, read_mda_dataset

        try:
            return read_mda_dataset(p, roles=roles)
        except MdaWithoutSpectra as exc:  # a fly scan: its spectra where XRF-Maps finds them
            h5, searched = flyscan_h5_path(p)
            if h5 is None:
                raise DataFileError(f"{exc}; no fly-scan file <scan>_..._0.h5 was found in "
                                    f"{', '.join(str(s) for s in searched)}") from None
            ds = _open_flyscan(h5, p, roles, cal)
            ds.notes.append(f"{p.name} holds no spectra: they come from the fly scan's file {h5} (as XRF-Maps finds it)")
            return ds
    if fmt == "gse-mca":
        from mapstorch.io.mca import read_gse_mca

        return read_gse_mca(p)
    from mapstorch.io.arrays import read_array

    return read_array(p, channel_axis=channel_axis, calibration=cal or (0.0, 0.01, 0.0))
