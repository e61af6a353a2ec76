"""Spectra from NumPy ``.npy`` files and plain text.

Shapes, after moving ``channel_axis`` (default: the last axis) to the end:

* ``(C,)`` one spectrum;
* ``(D, C)`` one spectrum of D detectors (text files: each *column* is a detector, so a
  text file with one column is one spectrum and its channel axis is axis 0);
* ``(rows, cols, C)`` a map with one detector;
* ``(rows, cols, D, C)`` a map with D detectors.

Large ``.npy`` files are memory-mapped and read a block of rows at a time, so a file larger
than memory can be streamed. Counts must be finite and non-negative. The energy calibration is
not part of these formats: pass it (or an override file to :func:`mapstorch.io.open_dataset`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mapstorch.io.dataset import DataFileError, Dataset, check_counts

__all__ = ["read_array", "is_npy"]

log = logging.getLogger(__name__)

_IN_MEMORY_BYTES = 256 << 20  # smaller files are loaded at once (and validated in full)


def is_npy(head: bytes) -> bool:
    return head.startswith(b"\x93NUMPY")


def _is_npy_file(p: str) -> bool:
    with open(p, "rb") as fh:
        return is_npy(fh.read(6))


def _load(p: str) -> np.ndarray:
    path = Path(p)
    if not path.exists():
        raise DataFileError(f"file not found: {p}")
    if path.is_dir():
        raise DataFileError(f"{p} is a folder; give the path of a .npy or text file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise DataFileError(f"cannot read {p}: {exc.strerror or exc}") from None
    if is_npy(head):
        try:
            big = path.stat().st_size > _IN_MEMORY_BYTES
            return np.load(p, mmap_mode="r" if big else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataFileError(f"{p}: not a readable .npy file ({exc}); truncated?") from None
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{p}: neither .npy nor text (byte {exc.start} is not ASCII)") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in line.replace(",", " ").split()])
        except ValueError:
            raise DataFileError(f"{p}, line {lineno}: {line[:60]!r} is not a row of numbers") from None
        if len(rows[-1]) != len(rows[0]):
            raise DataFileError(f"{p}, line {lineno}: {len(rows[-1])} columns where earlier lines have {len(rows[0])}")
    if not rows:
        raise DataFileError(f"{p}: no numbers in the file")
    table = np.array(rows)
    return table[:, 0] if table.shape[1] == 1 else table.T  # columns are detectors


def read_array(
    path: str | os.PathLike[str],
    channel_axis: int | None = None,
    calibration: Sequence[float] = (0.0, 0.01, 0.0),
) -> Dataset:
    """A :class:`Dataset` from a ``.npy`` or text file (see module docstring for shapes).

    channel_axis : the axis holding channels (negative values count from the end);
    calibration : (offset, slope, quadratic) in keV for every detector.
    """
    p = os.fspath(path)
    arr = _load(p)
    if arr.dtype.kind not in "iuf":
        raise DataFileError(f"{p}: array of {arr.dtype} values; spectra must be integers or floats")
    if not 1 <= arr.ndim <= 4:
        raise DataFileError(f"{p}: {arr.ndim}-D array; expected 1-4 dimensions (see mapstorch.io.arrays)")
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise DataFileError(f"{p}: channel_axis {channel_axis} does not exist in a {arr.ndim}-D array {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, -1)
    if arr.shape[-1] < 8:
        raise DataFileError(
            f"{p}: only {arr.shape[-1]} channels along the channel axis (shape {arr.shape}); "
            "set channel_axis to the axis that holds the channels"
        )
    lead = arr.shape[:-1]
    shape4 = {0: (1, 1, 1), 1: (1, 1, *lead), 2: (*lead, 1), 3: lead}[len(lead)] + (arr.shape[-1],)
    view = arr.reshape(shape4) if arr.ndim != 4 else arr
    rows, cols, dets, chans = shape4
    notes: list[str] = []
    mapped = isinstance(arr, np.memmap) or isinstance(getattr(arr, "base", None), np.memmap)
    if not mapped:
        spectra = np.asarray(view, dtype=np.float32)
        check_counts(spectra, p)
        reader = None
    else:
        notes.append("memory-mapped: counts are checked as rows are read")

        def reader(start: int, stop: int, detectors: Sequence[int]) -> np.ndarray:
            block = np.asarray(view[start:stop], dtype=np.float32)[:, :, list(detectors)]
            return check_counts(block, p, start)

        spectra = None
    return Dataset(
        path=p,
        format="npy" if _is_npy_file(p) else "text",
        rows=rows,
        cols=cols,
        detectors=dets,
        channels=chans,
        calibration=np.asarray(calibration, dtype=np.float64),
        spectra=spectra,
        read_block=reader,
        provenance={"original_shape": "x".join(str(s) for s in arr.shape)},
        notes=notes,
    )
