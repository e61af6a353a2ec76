"""One abstraction for a scan, whatever file it came from.

A :class:`Dataset` is a map of ``rows x cols`` pixels, each with ``detectors`` spectra of
``channels`` channels (a single spectrum is a 1 x 1 map). Spectra are read lazily, a block of
rows at a time (:meth:`Dataset.read`, :meth:`Dataset.iter_rows`); everything small (calibration,
live/real time, count rates, scalers, positions) is held in memory.

Readers (``mapstorch.io.mda``, ``.mca``, ``.hdf5``, ``.arrays``) build a Dataset from a file; a
reader whose spectra are already in memory passes them as an array, one that streams passes a
``read_block`` callable. :func:`mapstorch.io.open_dataset` picks the reader by content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mapstorch.errors import InputError

__all__ = ["Dataset", "SCALER_ROLES", "DataFileError", "check_counts", "calibration_spread", "aligned_sum",
           "stack_detectors", "xrfmaps_live_time"]

log = logging.getLogger(__name__)

#: Roles a scaler can play, as XRF-Maps names them in override files and HDF5 output.
SCALER_ROLES = ("US_IC", "DS_IC", "US_FM", "SR_current", "DPC1_IC", "DPC2_IC", "ELT", "ERT", "ICR", "OCR")


class DataFileError(InputError):
    """A data file is missing, unreadable, truncated or not in the expected format."""


def check_counts(block: np.ndarray, path: str, first_row: int = 0) -> np.ndarray:
    """``block`` ``(rows, cols, detectors, channels)`` if every count is finite and >= 0.

    Otherwise a DataFileError naming the first bad value and its (row, col, detector, channel),
    rows counted from ``first_row``. Clean blocks cost two reductions and no temporary arrays.
    """
    if block.size == 0:
        return block
    if np.min(block) >= 0 and np.isfinite(np.max(block)):  # (a NaN makes the first test false)
        return block
    bad = ~np.isfinite(block) | (block < 0)
    idx = tuple(int(v) for v in np.argwhere(bad)[0])
    where = (idx[0] + first_row,) + idx[1:]
    raise DataFileError(f"{path}: count {block[idx]} at (row, col, detector, channel) {where}; "
                        "counts must be finite and >= 0")


def stack_detectors(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One-detector blocks ``[rows, cols, 1, C]`` side by side as ``[rows, cols, D, C]``. Blocks
    that are views of channel-major memory (``[C, rows, cols]``, as XRF-Maps files hold them)
    give a view of channel-major memory too, filled by plain copies: concatenating them along
    the detector axis would transpose every value into a pixel-major array, which cost several
    times more than the fit."""
    if len(blocks) == 1:
        return blocks[0]
    if all(b.ndim == 4 and b.shape[2] == 1 and b[:, :, 0].transpose(2, 0, 1).flags.c_contiguous for b in blocks):
        rows, cols, _, chans = blocks[0].shape
        if all(b.shape == blocks[0].shape for b in blocks):
            out = np.empty((len(blocks), chans, rows, cols), dtype=np.result_type(*blocks))
            for i, b in enumerate(blocks):
                out[i] = b[:, :, 0].transpose(2, 0, 1)
            return out.transpose(2, 3, 0, 1)
    return np.concatenate(blocks, 2)


def xrfmaps_live_time(real: np.ndarray, icr: np.ndarray, ocr: np.ndarray) -> np.ndarray:
    """The live time XRF-Maps divides by: ``real x OCR / ICR``, or the real time where either
    count rate is zero (``Spectra::recalc_elapsed_livetime``, applied to MDA scans and raw fly
    scans alike, whatever live time the file records). Arrays of one shape, float64."""
    real, icr, ocr = (np.asarray(a, dtype=np.float64) for a in (real, icr, ocr))
    ok = (icr != 0) & (ocr != 0)
    return np.where(ok, real * ocr / np.where(ok, icr, 1.0), real)


def calibration_spread(calibration, channels: int) -> float:
    """The largest disagreement, in channels of detector 0, between the detector elements'
    energy calibrations ``[detectors, 3]`` over the spectrum."""
    cal = np.asarray(calibration, dtype=np.float64)
    c = np.arange(channels, dtype=np.float64)
    energies = cal[:, :1] + cal[:, 1:2] * c + cal[:, 2:3] * c * c
    return float(np.abs(energies - energies[:1]).max() / cal[0, 1]) if len(cal) > 1 and cal[0, 1] > 0 else 0.0


def aligned_sum(spectra: np.ndarray, calibration) -> np.ndarray:
    """Sum per-detector spectra ``[detectors, C]`` on detector 0's energy scale: each detector's
    counts are redistributed onto detector 0's channels by the overlap of the channels' energy
    intervals (cumulative counts interpolated at detector 0's channel edges), so the total is
    kept and peaks do not broaden when the elements' calibrations differ."""
    spectra = np.asarray(spectra, dtype=np.float64)
    cal = np.asarray(calibration, dtype=np.float64)
    n = spectra.shape[-1]
    edges = np.arange(n + 1, dtype=np.float64) - 0.5

    def energy(c: np.ndarray, k: int) -> np.ndarray:
        return cal[k, 0] + cal[k, 1] * c + cal[k, 2] * c * c

    target = energy(edges, 0)
    total = spectra[0].copy()
    for k in range(1, spectra.shape[0]):
        e_k = energy(edges, k)
        if not np.all(np.diff(e_k) > 0):
            raise InputError(f"detector {k}'s energy calibration {cal[k].tolist()} is not increasing over the channels")
        cum = np.concatenate([[0.0], np.cumsum(spectra[k])])
        moved = np.interp(target, e_k, cum, left=0.0, right=cum[-1])
        total += np.diff(moved)
    return total


ReadBlock = Callable[[int, int, Sequence[int]], np.ndarray]


@dataclass
class Dataset:
    """A scan: spectra ``[rows, cols, detectors, channels]`` plus everything measured alongside.

    Attributes
    ----------
    path, format : the file and the format name (``"mda"``, ``"xrfmaps-hdf5-v10"``, ...).
    rows, cols, detectors, channels : sizes.
    calibration : ``(detectors, 3)`` float64 energy calibration per detector: offset (keV),
        slope (keV/channel), quadratic (keV/channel^2).
    live_time, real_time, input_counts, output_counts : ``(rows, cols, detectors)`` float64 or
        ``None`` when the file does not record them (times in seconds, counts as recorded: XRF-Maps
        files hold total counts, MDA and MCA files count rates; see ``count_units``).
    scalers : ``{name: (rows, cols) float64}`` in file order; ``scaler_units`` likewise.
    scaler_roles : ``{role or label: scaler name}``: the roles of :data:`SCALER_ROLES` (US_IC,
        DS_IC, SR_current, ...) and other override-file labels (CFG_1, ...).
    x_axis, y_axis : positions of the columns and rows (1-D), with ``axis_names``/``axis_units``.
    incident_energy : keV, when the file records it.
    extra_pvs : ``{name: {"value", "unit", "description"}}``, process variables recorded once
        per scan (EPICS "extra PVs"), written to ``/MAPS/Scan/Extra_PVs`` as XRF-Maps does.
    detector_names : one name per detector.
    provenance : free-form facts about the source (scan number, time stamp, file version, ...).
    notes : things a user should know (an aborted scan, a repaired value, ...).
    """

    path: str
    format: str
    rows: int
    cols: int
    detectors: int
    channels: int
    calibration: np.ndarray
    read_block: ReadBlock | None = None
    spectra: np.ndarray | None = None
    live_time: np.ndarray | None = None
    real_time: np.ndarray | None = None
    input_counts: np.ndarray | None = None
    output_counts: np.ndarray | None = None
    count_units: str = ""
    scalers: dict[str, np.ndarray] = field(default_factory=dict)
    scaler_units: dict[str, str] = field(default_factory=dict)
    scaler_roles: dict[str, str] = field(default_factory=dict)
    x_axis: np.ndarray | None = None
    y_axis: np.ndarray | None = None
    axis_names: tuple[str, str] = ("x", "y")
    axis_units: tuple[str, str] = ("", "")
    incident_energy: float | None = None
    extra_pvs: dict[str, dict] = field(default_factory=dict)
    detector_names: list[str] = field(default_factory=list)
    provenance: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    close_fn: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "detectors", "channels"):
            value = getattr(self, name)
            if int(value) < 1:
                raise DataFileError(f"{self.path}: {name} = {value}; the file holds no spectra")
        cal = np.asarray(self.calibration, dtype=np.float64)
        if cal.shape == (3,):
            cal = np.tile(cal, (self.detectors, 1))
        if cal.shape != (self.detectors, 3):
            raise DataFileError(f"{self.path}: calibration must be (detectors, 3), got {cal.shape}")
        self.calibration = cal
        if self.spectra is None and self.read_block is None:
            raise InputError("a Dataset needs either spectra or read_block")
        if self.spectra is not None and self.spectra.shape != self.shape:
            raise DataFileError(f"{self.path}: spectra have shape {self.spectra.shape}, expected {self.shape}")
        for name in ("live_time", "real_time", "input_counts", "output_counts"):
            value = getattr(self, name)
            if value is not None:
                arr = np.asarray(value, dtype=np.float64)
                if arr.shape != (self.rows, self.cols, self.detectors):
                    raise DataFileError(
                        f"{self.path}: {name} has shape {arr.shape}, expected {(self.rows, self.cols, self.detectors)}"
                    )
                setattr(self, name, arr)
        for name, arr in list(self.scalers.items()):
            arr = np.asarray(arr, dtype=np.float64)
            if arr.shape != (self.rows, self.cols):
                raise DataFileError(f"{self.path}: scaler {name!r} has shape {arr.shape}, expected {(self.rows, self.cols)}")
            self.scalers[name] = arr
        if not self.detector_names:
            self.detector_names = [f"det{i}" for i in range(self.detectors)]

    # ------------------------------------------------------------------ sizes
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(rows, cols, detectors, channels)``."""
        return (self.rows, self.cols, self.detectors, self.channels)

    @property
    def nbytes_per_row(self) -> int:
        """Bytes of one row of spectra as float32 (for choosing chunk sizes)."""
        return self.cols * self.detectors * self.channels * 4

    # ------------------------------------------------------------------ spectra
    def _detectors(self, detectors: int | Sequence[int] | None) -> list[int]:
        if detectors is None:
            return list(range(self.detectors))
        idx = [detectors] if isinstance(detectors, (int, np.integer)) else list(detectors)
        for d in idx:
            if not 0 <= int(d) < self.detectors:
                raise InputError(f"detector {d} does not exist; {self.path} has detectors 0-{self.detectors - 1}")
        return [int(d) for d in idx]

    def read(self, rows: slice | None = None, detectors: int | Sequence[int] | None = None) -> np.ndarray:
        """Spectra of a block of rows: ``(r, cols, len(detectors), channels)`` float32.

        The array may be a strided view of what the file holds (XRF-Maps files store channels
        first); use ``np.ascontiguousarray`` where a contiguous copy is needed.
        """
        start, stop, step = (rows or slice(None)).indices(self.rows)
        if step != 1:
            raise InputError("read() takes a contiguous block of rows (step 1)")
        dets = self._detectors(detectors)
        if self.spectra is not None:
            block = self.spectra[start:stop][:, :, dets]
        else:
            block = self.read_block(start, stop, dets)  # type: ignore[misc]
        return np.asarray(block, dtype=np.float32)

    def iter_rows(self, chunk_rows: int | None = None, detectors: int | Sequence[int] | None = None,
                  max_bytes: int = 16 << 20) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row slice, spectra block)`` over the map, ``chunk_rows`` rows at a time
        (default: as many rows as fit in ``max_bytes``)."""
        if chunk_rows is None:
            chunk_rows = max(1, max_bytes // max(self.nbytes_per_row, 1))
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be at least 1, got {chunk_rows}")
        for start in range(0, self.rows, chunk_rows):
            sl = slice(start, min(start + chunk_rows, self.rows))
            yield sl, self.read(sl, detectors)

    def select(self, detectors: int | Sequence[int]) -> "Dataset":
        """A view of some detector elements only (their spectra, times, counts, calibration;
        the scalers and positions stay): e.g. what XRF-Maps writes into ``<scan>.h5<N>``."""
        import dataclasses

        dets = self._detectors(detectors)

        def read_block(start: int, stop: int, sub) -> np.ndarray:
            return self.read(slice(start, stop), [dets[i] for i in sub])

        def pick(a):
            return None if a is None else a[..., dets]

        return dataclasses.replace(
            self, detectors=len(dets), calibration=self.calibration[dets], spectra=None, read_block=read_block,
            live_time=pick(self.live_time), real_time=pick(self.real_time), input_counts=pick(self.input_counts),
            output_counts=pick(self.output_counts), detector_names=[self.detector_names[d] for d in dets],
            close_fn=None)

    def integrated(self, detector: int | str | None = "sum", chunk_rows: int | None = None) -> np.ndarray:
        """Integrated spectrum: ``"sum"`` over detectors ``(channels,)``, one detector ``(channels,)``,
        or ``None`` for every detector ``(detectors, channels)``; float64, streamed by rows."""
        dets = None if detector in (None, "sum") else self._detectors(int(detector))  # type: ignore[arg-type]
        total = np.zeros((self.detectors if dets is None else 1, self.channels), dtype=np.float64)
        for _, block in self.iter_rows(chunk_rows, dets):
            total += block.sum(axis=(0, 1), dtype=np.float64)
            del block  # free it before the next block is read: one block in memory at a time
        if detector is None:
            return total
        return total.sum(0) if detector == "sum" else total[0]

    def total_counts(self) -> np.ndarray:
        """Total counts per detector ``(detectors,)``."""
        return self.integrated(None).sum(-1)

    # ------------------------------------------------------------------ scalers
    def scaler(self, name_or_role: str) -> np.ndarray:
        """A scaler map ``(rows, cols)`` by name or by role (``US_IC``, ``DS_IC``, ``SR_current``...)."""
        name = self.scaler_roles.get(name_or_role, name_or_role)
        if name not in self.scalers:
            known = ", ".join(list(self.scaler_roles) + list(self.scalers)) or "none"
            raise InputError(f"{self.path} has no scaler {name_or_role!r}; known: {known}")
        return self.scalers[name]

    def energy(self, detector: int = 0) -> np.ndarray:
        """Channel energies (keV) of one detector ``(channels,)``."""
        off, slope, quad = self.calibration[self._detectors(detector)[0]]
        c = np.arange(self.channels, dtype=np.float64)
        return off + slope * c + quad * c * c

    def live_time_range(self) -> tuple[float, float] | None:
        if self.live_time is None:
            return None
        return float(np.nanmin(self.live_time)), float(np.nanmax(self.live_time))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.close_fn is not None:
            self.close_fn()
            self.close_fn = None

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, integrated: np.ndarray | None = None) -> dict[str, object]:
        """The facts ``mapstorch info`` shows, as plain JSON-able values.

        integrated : ``integrated(None)`` when already computed (saves a pass over the file).
        """
        lt = self.live_time_range()
        per_detector = self.integrated(None) if integrated is None else np.asarray(integrated)
        return {
            "path": self.path,
            "format": self.format,
            "rows": self.rows,
            "cols": self.cols,
            "detectors": self.detectors,
            "channels": self.channels,
            "detector_names": list(self.detector_names),
            "energy_calibration": self.calibration.tolist(),
            "total_counts": per_detector.sum(-1).tolist(),
            "live_time_range": list(lt) if lt else None,
            "scalers": list(self.scalers),
            "scaler_roles": dict(self.scaler_roles),
            "incident_energy": self.incident_energy,
            "provenance": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                           for k, v in self.provenance.items()},
            "notes": list(self.notes),
        }
