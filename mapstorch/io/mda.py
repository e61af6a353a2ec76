"""EPICS MDA files (the sscan record's ``saveData`` format), read with our own XDR decoder.

Layout (all big-endian XDR; a "short" takes 4 bytes, a counted string is a length followed by
an XDR string, itself a length, the bytes and padding to 4 bytes)::

    header   float version, int scan number, short rank, int dims[rank], short regular,
             int offset of the extra PVs
    scan     short rank, int requested points, int last completed point,
             int offsets[requested] of the sub-scans (rank > 1 only),
             string name, string time stamp, short #positioners, #detectors, #triggers,
             per positioner: short number, 7 strings (name, description, step mode, unit,
                 readback name, readback description, readback unit),
             per detector: short number, 3 strings (name, description, unit),
             per trigger: short number, string name, float command,
             data: double[requested] per positioner, float[requested] per detector,
             then the sub-scans at their offsets (recursively)
    extra    short #PVs, per PV: string name, string description, short type, and unless
             type is a string: short count, string unit; then the value(s)

A map with spectra is a rank-3 file: the outer scan steps the rows, the middle scan the
columns (its detectors are the scalers), and the innermost scan is the MCA dimension whose
detectors are the spectra of the detector elements. Aborted scans are common: only completed
points are used, and the dataset says what was missing in ``notes``.

:func:`read_mda` gives the raw structure, :func:`read_mda_dataset` a
:class:`~mapstorch.io.dataset.Dataset`, :func:`read_mda_scalers` the scalers of a file that holds
no spectra (fly scans keep their spectra in a separate HDF5 file).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

from mapstorch.io.dataset import DataFileError, Dataset, check_counts, xrfmaps_live_time
from mapstorch.io.files import read_bytes
from mapstorch.io.scalers import scaler_labels

__all__ = [
    "MdaPositioner",
    "MdaDetector",
    "MdaScan",
    "MdaFile",
    "MdaScalers",
    "MdaWithoutSpectra",
    "read_mda",
    "read_mda_dataset",
    "read_mda_scalers",
    "is_mda",
]

log = logging.getLogger(__name__)

_PV_STRING, _PV_INT16, _PV_FLOAT, _PV_INT8, _PV_INT32, _PV_DOUBLE = 0, 29, 30, 32, 33, 34
_MAX_STRING = 1 << 20  # no name, unit or string PV in an MDA file is anywhere near 1 MB


class MdaWithoutSpectra(DataFileError):
    """An MDA scan without spectra: a fly scan's, whose spectra are in a separate HDF5 file."""


class _Short(Exception):
    """Raised inside the decoder when the file ends before a field (turned into notes/errors)."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what, self.offset = what, offset


class _Xdr:
    """A cursor over an in-memory XDR byte string; every read checks the remaining length."""

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def _take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Short(what, self.pos)
        start = self.pos
        self.pos += n
        return start

    def int32(self, what: str) -> int:
        return int.from_bytes(self.buf[self._take(4, what):self.pos], "big", signed=True)

    short = int32  # XDR encodes a short in 4 bytes

    def float32(self, what: str) -> float:
        return float(np.frombuffer(self.buf, ">f4", 1, self._take(4, what))[0])

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        if count < 0:
            raise _Short(f"{what} (negative count {count})", self.pos)
        start = self._take(size * count, what)
        return np.frombuffer(self.buf, dtype, count, start)

    def string(self, what: str) -> str:
        n = self.int32(what)
        if n == 0:
            return ""
        if not 0 < n <= _MAX_STRING:
            raise _Short(f"{what} (implausible length {n})", self.pos - 4)
        m = self.int32(what)
        if m != n:
            if not 0 <= m <= _MAX_STRING:
                raise _Short(f"{what} (implausible length {m})", self.pos - 4)
            n = m
        start = self._take((n + 3) // 4 * 4, what)
        return self.buf[start:start + n].decode("latin-1").rstrip("\x00")


@dataclass
class MdaPositioner:
    number: int
    name: str
    description: str
    step_mode: str
    unit: str
    readback_name: str
    readback_description: str
    readback_unit: str
    data: np.ndarray  # (requested points,) float64


@dataclass
class MdaDetector:
    number: int
    name: str
    description: str
    unit: str
    data: np.ndarray  # (requested points,) float32


@dataclass
class MdaScan:
    """One scan of the nested structure; ``sub_scans[i]`` is ``None`` where none was written."""

    rank: int
    requested_points: int
    last_point: int
    name: str
    time_stamp: str
    positioners: list[MdaPositioner]
    detectors: list[MdaDetector]
    triggers: list[tuple[int, str, float]]
    sub_scans: list["MdaScan | None"] = field(default_factory=list)
    offset: int = 0


@dataclass
class MdaFile:
    path: str
    version: float
    scan_number: int
    rank: int
    dimensions: list[int]
    regular: int
    scan: MdaScan | None
    extra_pvs: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def is_mda(head: bytes) -> bool:
    """Whether the first bytes look like an MDA header (version 1.x, scan number, rank 1-4)."""
    if len(head) < 12:
        return False
    version = float(np.frombuffer(head[:4], ">f4")[0])
    scan_number = int.from_bytes(head[4:8], "big", signed=True)
    rank = int.from_bytes(head[8:12], "big", signed=True)
    return 1.0 <= version < 2.0 and scan_number >= 0 and 1 <= rank <= 4


def _read_scan(x: _Xdr, rank: int, depth: int, notes: list[str]) -> MdaScan:
    start = x.pos
    scan_rank = x.short("scan rank")
    if scan_rank != rank:
        raise _Short(f"scan rank {scan_rank} where {rank} was expected", start)
    npts = x.int32("number of points")
    last = x.int32("current point")
    if not (1 <= npts <= 10_000_000) or not 0 <= last <= npts:
        raise _Short(f"scan with {npts} points, {last} completed", start)
    offsets = x.array(">i4", npts, "sub-scan offsets").astype(np.int64) if scan_rank > 1 else None
    name, time_stamp = x.string("scan name"), x.string("time stamp")
    n_pos, n_det, n_trig = x.short("positioners"), x.short("detectors"), x.short("triggers")
    if not (0 <= n_pos <= 4 and 0 <= n_det <= 10_000 and 0 <= n_trig <= 4):
        raise _Short(f"implausible counts: {n_pos} positioners, {n_det} detectors, {n_trig} triggers", x.pos)
    pos_info = []
    for _ in range(n_pos):
        number = x.short("positioner number")
        pos_info.append((number, *(x.string("positioner text") for _ in range(7))))
    det_info = [(x.short("detector number"), x.string("detector name"), x.string("detector description"),
                 x.string("detector unit")) for _ in range(n_det)]
    triggers = [(x.short("trigger number"), x.string("trigger name"), x.float32("trigger command"))
                for _ in range(n_trig)]
    positioners = [MdaPositioner(*info, data=x.array(">f8", npts, "positioner data").astype(np.float64))
                   for info in pos_info]
    detectors = [MdaDetector(*info, data=x.array(">f4", npts, "detector data").astype(np.float32))
                 for info in det_info]
    scan = MdaScan(scan_rank, npts, last, name, time_stamp, positioners, detectors, triggers, [], start)
    if offsets is not None:
        for i, off in enumerate(offsets):
            if off == 0 or i >= max(last + 1, 1) and off >= len(x.buf):
                break
            try:
                scan.sub_scans.append(_read_scan(_Xdr(x.buf, int(off)), rank - 1, depth + 1, notes))
            except _Short as exc:
                if i < last:  # a completed point whose data is damaged or missing
                    notes.append(f"{'  ' * depth}sub-scan {i + 1} of scan '{name}' unreadable ({exc.what} at byte "
                                 f"{exc.offset}); using the {i} before it")
                break
    return scan


def _read_extra(x: _Xdr, notes: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    n = x.short("number of extra PVs")
    if not 0 <= n <= 100_000:
        raise _Short(f"{n} extra PVs", x.pos)
    for _ in range(n):
        name, desc = x.string("extra PV name"), x.string("extra PV description")
        kind = x.short("extra PV type")
        if kind == _PV_STRING:
            value: object = x.string("extra PV value")
            unit, count = "", 1
        else:
            count = x.short("extra PV count")
            unit = x.string("extra PV unit")
            dtypes = {_PV_INT8: ">i4", _PV_INT16: ">i4", _PV_INT32: ">i4", _PV_FLOAT: ">f4", _PV_DOUBLE: ">f8"}
            if kind not in dtypes or not 1 <= count <= 1_000_000:
                raise _Short(f"extra PV {name!r} of type {kind} and count {count}", x.pos)
            arr = x.array(dtypes[kind], count, f"extra PV {name!r}")
            if kind == _PV_INT8:
                value = bytes(int(v) & 0xFF for v in arr).split(b"\x00")[0].decode("latin-1")
            else:
                vals = arr.astype(np.float64 if kind in (_PV_FLOAT, _PV_DOUBLE) else np.int64)
                value = vals[0].item() if count == 1 else vals
        out[name] = {"description": desc, "unit": unit, "type": kind, "count": count, "value": value}
    return out


def read_mda(path: str | os.PathLike[str]) -> MdaFile:
    """The raw contents of an MDA file (see module docstring).

    Raises :class:`DataFileError` when the file is missing, not MDA, or damaged inside its
    header or first scan; later damage (an aborted or truncated scan) is recorded in ``notes``.
    """
    p = os.fspath(path)
    buf = read_bytes(p, "MDA file")
    if not is_mda(buf[:12]):
        raise DataFileError(f"{p} is not an EPICS MDA file (no MDA header: version 1.x, scan number, rank 1-4)")
    x = _Xdr(buf)
    notes: list[str] = []
    try:
        version = x.float32("version")
        number = x.int32("scan number")
        rank = x.short("rank")
        dims = [int(v) for v in x.array(">i4", rank, "dimensions")]
        regular = x.short("regular flag")
        extra_offset = x.int32("extra PV offset")
    except _Short as exc:
        raise DataFileError(f"{p}: MDA header truncated ({exc.what} at byte {exc.offset})") from None
    if any(d < 1 for d in dims):
        raise DataFileError(f"{p}: MDA header gives dimensions {dims}; the file is damaged")
    try:
        scan = _read_scan(x, rank, 0, notes)
    except _Short as exc:
        raise DataFileError(f"{p}: outer scan unreadable ({exc.what} at byte {exc.offset}); the file is damaged") from None
    extra: dict[str, dict] = {}
    if extra_offset > 0:
        try:
            extra = _read_extra(_Xdr(buf, extra_offset), notes)
        except _Short as exc:
            notes.append(f"extra PVs unreadable ({exc.what} at byte {exc.offset}); calibration and metadata missing")
    return MdaFile(p, version, number, rank, dims, regular, scan, extra, notes)


# ---------------------------------------------------------------------- dataset level


@dataclass
class MdaScalers:
    """Scalers, positions and metadata of a map (e.g. the MDA file of a fly scan).

    scalers : ``{name: (rows, cols) float64}``; x_axis (cols,), y_axis (rows,);
    scaler_roles : ``{role: scaler name}`` from the ``roles`` given to :func:`read_mda_scalers`.
    """

    rows: int
    cols: int
    scalers: dict[str, np.ndarray]
    scaler_units: dict[str, str]
    x_axis: np.ndarray | None
    y_axis: np.ndarray | None
    axis_names: tuple[str, str]
    axis_units: tuple[str, str]
    extra_pvs: dict[str, dict]
    notes: list[str]
    provenance: dict[str, object]
    scaler_roles: dict[str, str] = field(default_factory=dict)


def _complete_rows(mda: MdaFile, scan: MdaScan) -> tuple[list[MdaScan], int, list[str]]:
    """Row scans with data and the number of columns every kept row has."""
    notes = list(mda.notes)
    rows = [s for s in scan.sub_scans[: max(scan.last_point, 0)] if s is not None]
    if scan.last_point < scan.requested_points:
        notes.append(f"scan aborted: {scan.last_point} of {scan.requested_points} rows recorded")
    if not rows and scan.sub_scans and scan.sub_scans[0] is not None:
        rows = [scan.sub_scans[0]]  # a map aborted inside its first row
    if not rows:
        raise DataFileError(f"{mda.path}: no completed row in this scan (rows recorded: {scan.last_point})")
    full = [r.last_point for r in rows]
    cols = max(full)
    if min(full) < cols:  # a partly recorded row: keep the complete ones, or the partial one alone
        complete = [r for r in rows if r.last_point == cols]
        if len(complete) < len(rows):
            notes.append(f"last row recorded {min(full)} of {cols} points; it is left out")
        rows = complete
    if cols < rows[0].requested_points:
        notes.append(f"rows recorded {cols} of {rows[0].requested_points} points")
    return rows, cols, notes


def _scaler_maps(rows: list[MdaScan], cols: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    scalers: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    for d, det in enumerate(rows[0].detectors):
        name = det.name or f"D{det.number:02d}"
        scalers[name] = np.stack([r.detectors[d].data[:cols] for r in rows]).astype(np.float64)
        units[name] = det.unit
    return scalers, units


def _axis(scans: list[MdaScan], n: int) -> tuple[np.ndarray | None, str, str]:
    if not scans or not scans[0].positioners:
        return None, "", ""
    pos = scans[0].positioners[0]
    return pos.data[:n].astype(np.float64), pos.name or pos.description, pos.unit


def read_mda_scalers(path: str | os.PathLike[str], roles: dict[str, str] | None = None) -> MdaScalers:
    """Scalers ``(rows, cols)``, positions and extra PVs of a rank-2 or rank-3 MDA map."""
    mda = read_mda(path)
    scan = mda.scan
    if scan is None or scan.rank < 2:
        raise DataFileError(f"{mda.path}: rank-{mda.rank} scan; a map needs rank 2 or 3")
    rows, cols, notes = _complete_rows(mda, scan)
    scalers, units = _scaler_maps(rows, cols)
    x_axis, x_name, x_unit = _axis(rows, cols)
    y = scan.positioners[0].data[: len(rows)].astype(np.float64) if scan.positioners else None
    y_name = scan.positioners[0].name if scan.positioners else ""
    y_unit = scan.positioners[0].unit if scan.positioners else ""
    return MdaScalers(
        rows=len(rows), cols=cols, scalers=scalers, scaler_units=units, x_axis=x_axis, y_axis=y,
        axis_names=(x_name, y_name), axis_units=(x_unit, y_unit), extra_pvs=dict(mda.extra_pvs), notes=notes,
        provenance=_provenance(mda), scaler_roles=scaler_labels(scalers, roles),
    )


def _has_mca_dimension(scan: MdaScan) -> bool:
    """Whether the innermost scan holds spectra: MCA arrays are 'scans' without positioners."""
    inner = scan
    while inner.rank > 1:
        nxt = next((s for s in inner.sub_scans if s is not None), None)
        if nxt is None:
            return False
        inner = nxt
    return not inner.positioners and inner.requested_points >= 64 and bool(inner.detectors)


def _single_spectrum(mda: MdaFile, scan: MdaScan) -> Dataset:
    det_names = [d.name or f"mca{d.number}" for d in scan.detectors]
    spectra = np.stack([d.data for d in scan.detectors])[None, None].astype(np.float32)
    check_counts(spectra, mda.path)
    notes = list(mda.notes)
    if scan.last_point < scan.requested_points:
        notes.append(f"acquisition saved at channel {scan.last_point} of {scan.requested_points}")

    def from_extra(suffix: str) -> np.ndarray | None:
        keys = [f"{n.rsplit('.', 1)[0]}.{suffix}" for n in det_names]
        if not all(k in mda.extra_pvs for k in keys):
            return None
        return np.array([[[float(np.ravel(mda.extra_pvs[k]["value"])[0]) for k in keys]]])

    provenance = _provenance(mda)
    return Dataset(
        path=mda.path, format="mda", rows=1, cols=1, detectors=len(det_names), channels=scan.requested_points,
        calibration=_calibration(mda.extra_pvs, det_names, notes), spectra=spectra,
        live_time=from_extra("ELTM"), real_time=from_extra("ERTM"), count_units="counts/s",
        incident_energy=_incident_energy(mda.extra_pvs, provenance), extra_pvs=dict(mda.extra_pvs),
        detector_names=det_names, provenance=provenance, notes=notes,
    )


def _provenance(mda: MdaFile) -> dict[str, object]:
    scan = mda.scan
    return {
        "mda_version": round(mda.version, 3),
        "scan_number": mda.scan_number,
        "rank": mda.rank,
        "requested_dimensions": "x".join(str(d) for d in mda.dimensions),
        "scan_name": scan.name if scan else "",
        "time_stamp": scan.time_stamp if scan else "",
        "extra_pvs": len(mda.extra_pvs),
    }


def _per_detector(scalers: dict[str, np.ndarray], det_names: list[str], suffixes: tuple[str, ...],
                  role: str, roles: dict[str, str] | None) -> np.ndarray | None:
    """One scaler per detector element: ``<mca prefix>.ELTM`` style names, else override roles."""
    found = []
    for d, det in enumerate(det_names):
        prefix = det.rsplit(".", 1)[0]  # dxpXMAP2xfm3:mca1
        candidates = [f"{prefix}.{s}" for s in suffixes]
        m = re.match(r"(.*):mca(\d+)$", prefix)
        if m:  # count rates live on the dxp record: dxpXMAP2xfm3:dxp1:InputCountRate
            candidates += [f"{m.group(1)}:dxp{m.group(2)}:{s}" for s in suffixes]
        if roles and f"{role}{d + 1}" in roles:
            candidates.append(roles[f"{role}{d + 1}"].replace("<detector+1>", str(d + 1)))
        hit = next((c for c in candidates if c in scalers), None)
        if hit is None:
            return None
        found.append(scalers[hit])
    return np.stack(found, -1)


def _calibration(extra: dict[str, dict], det_names: list[str], notes: list[str]) -> np.ndarray:
    cal = np.zeros((len(det_names), 3))
    missing = []
    for d, det in enumerate(det_names):
        prefix = det.rsplit(".", 1)[0]
        keys = [f"{prefix}.CALO", f"{prefix}.CALS", f"{prefix}.CALQ"]
        if all(k in extra for k in keys[:2]):
            cal[d] = [float(np.ravel(extra[k]["value"])[0]) if k in extra else 0.0 for k in keys]
        else:
            cal[d] = (0.0, 1.0, 0.0)
            missing.append(det)
    if missing:
        notes.append(f"no energy calibration (.CALO/.CALS/.CALQ) for {', '.join(missing)}: using channel numbers")
    return cal


def _incident_energy(extra: dict[str, dict], provenance: dict[str, object]) -> float | None:
    """The monochromator energy, from an extra PV in keV whose name mentions the energy."""
    for name, pv in extra.items():
        unit = str(pv.get("unit", "")).strip().lower()
        text = f"{name} {pv.get('description', '')}".lower()
        if unit == "kev" and ("mono" in text or "dcm" in text or "energy" in text) and "gap" not in text \
                and "id" not in name.lower()[:4]:
            value = pv["value"]
            try:
                e = float(np.ravel(value)[0])
            except (TypeError, ValueError):
                continue
            if 1.0 < e < 150.0:
                provenance["incident_energy_pv"] = name
                return e
    return None


def read_mda_dataset(path: str | os.PathLike[str], roles: dict[str, str] | None = None) -> Dataset:
    """A :class:`Dataset` from an MDA scan whose innermost dimension holds MCA spectra.

    rank 3: a map (rows = outer scan, cols = middle scan); rank 2: one row of spectra; rank 1:
    one spectrum per detector element (a 1 x 1 map; live and real time from the extra PVs). The
    innermost scan's detectors are the detector elements (their MCA arrays the spectra); the
    detectors one level up are the scalers. ``roles`` maps override-file keys (``US_IC``,
    ``DS_IC``, ``SRCURRENT``, ``ELT1``, ``ERT1``, ``ICR1``, ``OCR1``, ...) to scaler PV names.
    Live/real time and count rates are found per element by PV name (``<mca>.ELTM``,
    ``<mca>.ERTM``, ``<dxp>:InputCountRate``, ``<dxp>:OutputCountRate``) or from ``roles``;
    as in XRF-Maps, live time is real time x OCR / ICR whenever those three are recorded.
    """
    mda = read_mda(path)
    scan = mda.scan
    if scan is None or not _has_mca_dimension(scan):
        raise MdaWithoutSpectra(
            f"{mda.path}: this rank-{mda.rank} MDA scan holds no spectra (no innermost MCA dimension; a map with "
            "spectra is rank 3, a line of spectra rank 2, one spectrum rank 1). A fly scan's MDA file holds only "
            "scalers: open the fly scan's HDF5 file instead"
        )
    if mda.rank == 1:  # the scan is the MCA dimension itself: one spectrum per detector element
        return _single_spectrum(mda, scan)
    if mda.rank == 2:  # one row of spectra: the outer scan is the column scan
        row_scans, cols, notes = [scan], scan.last_point, list(mda.notes)
        if cols < scan.requested_points:
            notes.append(f"scan aborted: {cols} of {scan.requested_points} points recorded")
        if cols < 1:
            raise DataFileError(f"{mda.path}: no completed point in this scan")
    else:
        if mda.rank > 3:
            raise DataFileError(f"{mda.path}: rank-{mda.rank} scans are not supported (maps are rank 3)")
        row_scans, cols, notes = _complete_rows(mda, scan)
    # the MCA scans of every pixel; a row whose spectra stop early (a truncated file) ends the map
    pixels = []
    for i, r in enumerate(row_scans):
        subs = [s for s in r.sub_scans[:cols] if s is not None]
        if len(subs) < cols:
            if i == 0 and subs:
                cols = len(subs)
                notes.append(f"spectra of the first row stop after {cols} points; later points left out")
            else:
                notes.append(f"spectra of row {i + 1} incomplete ({len(subs)} of {cols} points); rows from it on "
                             "left out")
                break
        pixels.append(subs[:cols])
    if not pixels:
        raise DataFileError(f"{mda.path}: no complete row of spectra")
    row_scans = row_scans[: len(pixels)]
    pixels = [row[:cols] for row in pixels]
    first = pixels[0][0]
    n_det = len(first.detectors)
    if n_det == 0:
        raise DataFileError(f"{mda.path}: the innermost scan has no detectors, so no spectra")
    channels = first.requested_points
    spectra = np.empty((len(pixels), cols, n_det, channels), dtype=np.float32)
    for i, row in enumerate(pixels):
        for j, mca in enumerate(row):
            if len(mca.detectors) != n_det or mca.requested_points != channels:
                raise DataFileError(
                    f"{mda.path}: pixel ({i}, {j}) has {len(mca.detectors)} detectors x {mca.requested_points} "
                    f"channels, pixel (0, 0) {n_det} x {channels}; detectors do not match"
                )
            spectra[i, j] = np.stack([d.data for d in mca.detectors])
    check_counts(spectra, mda.path)
    det_names = [d.name or f"mca{d.number}" for d in first.detectors]
    if mda.rank == 3:
        scalers, units = _scaler_maps(row_scans, cols)
    else:
        scalers = {d.name: d.data[None, :cols].astype(np.float64) for d in scan.detectors}
        units = {d.name: d.unit for d in scan.detectors}
    x_axis, x_name, x_unit = _axis(row_scans, cols)
    if mda.rank == 3 and scan.positioners:
        y_axis = scan.positioners[0].data[: len(row_scans)].astype(np.float64)
        y_name, y_unit = scan.positioners[0].name, scan.positioners[0].unit
    else:
        y_axis, y_name, y_unit = None, "", ""
    provenance = _provenance(mda)
    lt = _per_detector(scalers, det_names, ("ELTM",), "ELT", roles)
    rt = _per_detector(scalers, det_names, ("ERTM",), "ERT", roles)
    icr = _per_detector(scalers, det_names, ("InputCountRate", "ICR"), "ICR", roles)
    ocr = _per_detector(scalers, det_names, ("OutputCountRate", "OCR"), "OCR", roles)
    if rt is not None and icr is not None and ocr is not None:
        # as XRF-Maps: with real time and both count rates, live = real x OCR / ICR; the real
        # time where either rate is zero (Spectra::recalc_elapsed_livetime)
        lt = xrfmaps_live_time(rt, icr, ocr)
        provenance["live_time"] = "real time x OCR / ICR (as XRF-Maps)"
    elif lt is not None:
        provenance["live_time"] = "ELTM"
    return Dataset(
        path=mda.path,
        format="mda",
        rows=spectra.shape[0],
        cols=cols,
        detectors=n_det,
        channels=channels,
        calibration=_calibration(mda.extra_pvs, det_names, notes),
        spectra=spectra,
        live_time=lt,
        real_time=rt,
        input_counts=icr,
        output_counts=ocr,
        count_units="counts/s",
        scalers=scalers,
        scaler_units=units,
        scaler_roles=scaler_labels(scalers, roles),
        x_axis=x_axis,
        y_axis=y_axis,
        axis_names=(x_name, y_name),
        axis_units=(x_unit, y_unit),
        incident_energy=_incident_energy(mda.extra_pvs, provenance),
        extra_pvs=dict(mda.extra_pvs),
        detector_names=det_names,
        provenance=provenance,
        notes=notes,
    )
