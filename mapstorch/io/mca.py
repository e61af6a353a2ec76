"""GSE MCA text files (GSECARS / EPICS MCA tools; ``*.mca``, ``*.xrf``).

A header of ``KEY: values`` lines, with one value per detector element where it applies
(``VERSION``, ``ELEMENTS``, ``DATE``, ``CHANNELS``, ``ROIS``, ``REAL_TIME``, ``LIVE_TIME``,
``CAL_OFFSET``, ``CAL_SLOPE``, ``CAL_QUAD``, ``ROI_n_LEFT/RIGHT/LABEL``, ``ENVIRONMENT``, ...),
then ``DATA:`` and one row per channel holding one column per element. The file becomes a
1 x 1 map with one detector per element. The incident energy is taken from the ENVIRONMENT entry
described as the mono energy (readback preferred; eV values are converted to keV).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.files import read_bytes

__all__ = ["read_gse_mca", "is_gse_mca"]

log = logging.getLogger(__name__)

_PER_ELEMENT = ("REAL_TIME", "LIVE_TIME", "CAL_OFFSET", "CAL_SLOPE", "CAL_QUAD", "TWO_THETA")
_ENV = re.compile(r'^\s*(?P<pv>\S+)\s*=\s*"(?P<value>[^"]*)"\s*(?:\((?P<desc>.*)\))?\s*$')


def is_gse_mca(head: bytes) -> bool:
    """Whether the first bytes look like a GSE MCA file."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return False
    return text.lstrip().startswith("VERSION:") and ("ELEMENTS:" in text or "CHANNELS:" in text)


def _numbers(p: str, lineno: int, key: str, text: str, n: int) -> np.ndarray:
    parts = text.split()
    if len(parts) != n:
        raise DataFileError(f"{p}, line {lineno}: {key} has {len(parts)} values, expected {n} (one per element)")
    try:
        vals = np.array([float(v) for v in parts])
    except ValueError:
        raise DataFileError(f"{p}, line {lineno}: {key}: {text.strip()!r} is not a list of numbers") from None
    if not np.isfinite(vals).all():
        raise DataFileError(f"{p}, line {lineno}: {key} has a non-finite value")
    return vals


def _mono_energy(env: list[tuple[str, str, str]], provenance: dict) -> float | None:
    """The mono energy in keV from ENVIRONMENT entries (readback before the requested value)."""
    ranked = []
    for pv, value, desc in env:
        d = desc.lower()
        if "mono" in d and "energy" in d:
            ranked.append((0 if ("readback" in d or "rbv" in pv.lower()) else 1, pv, value))
    for _, pv, value in sorted(ranked):
        try:
            e = float(value)
        except ValueError:
            continue
        e = e / 1000.0 if e > 200.0 else e  # eV -> keV
        if 0.5 < e < 200.0:
            provenance["incident_energy_pv"] = pv
            return e
    return None


def read_gse_mca(path: str | os.PathLike[str]) -> Dataset:
    """Read a GSE MCA file as a 1 x 1 map with one detector per element; see module docstring.

    Raises :class:`DataFileError` naming the file and line for anything malformed.
    """
    p = os.fspath(path)
    raw = read_bytes(p, "MCA file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{p}: not a text file (byte {exc.start} is not ASCII); is this a GSE MCA file?") from None
    lines = text.splitlines()
    header: dict[str, tuple[int, str]] = {}
    env: list[tuple[str, str, str]] = []
    rois: dict[str, str] = {}
    data_line = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            raise DataFileError(f"{p}, line {lineno}: expected 'KEY: value' or DATA:, got {line.strip()[:60]!r}")
        if key == "DATA":
            data_line = lineno
            break
        if key == "ENVIRONMENT":
            m = _ENV.match(value)
            if m:
                env.append((m.group("pv"), m.group("value").strip(), m.group("desc") or ""))
            continue
        if key.startswith("ROI_"):
            rois[key] = value.strip()
            continue
        header[key] = (lineno, value)
    if "VERSION" not in header:
        raise DataFileError(f"{p}: no VERSION line; this is not a GSE MCA file")
    if data_line is None:
        raise DataFileError(f"{p}: no DATA: line; the file is truncated or not a GSE MCA file")
    n_el = 1
    if "ELEMENTS" in header:
        ln, v = header["ELEMENTS"]
        n_el = int(_numbers(p, ln, "ELEMENTS", v, 1)[0])
        if not 1 <= n_el <= 1024:
            raise DataFileError(f"{p}, line {ln}: ELEMENTS = {n_el}")
    values = {k: _numbers(p, header[k][0], k, header[k][1], n_el) for k in _PER_ELEMENT if k in header}
    rows = [ln for ln in lines[data_line:] if ln.strip()]
    if not rows:
        raise DataFileError(f"{p}: DATA: is followed by no channels")
    parsed = []
    for i, r in enumerate(rows):
        parts = r.split()
        if len(parts) != n_el:
            raise DataFileError(f"{p}, line {data_line + 1 + i}: {len(parts)} columns, expected {n_el} (ELEMENTS)")
        try:
            parsed.append([float(v) for v in parts])
        except ValueError:
            raise DataFileError(f"{p}, line {data_line + 1 + i}: {r.strip()[:60]!r} is not a row of numbers") from None
    table = np.array(parsed, dtype=np.float64).reshape(len(parsed), n_el)
    if "CHANNELS" in header:
        ln, v = header["CHANNELS"]
        expected = int(_numbers(p, ln, "CHANNELS", v.split()[0] if v.split() else v, 1)[0])
        if expected != table.shape[0]:
            raise DataFileError(f"{p}: CHANNELS says {expected}, DATA holds {table.shape[0]} rows (truncated file?)")
    if not np.isfinite(table).all() or (table < 0).any():
        r, c = np.argwhere(~np.isfinite(table) | (table < 0))[0]
        raise DataFileError(f"{p}, line {data_line + 1 + int(r)}: count {table[r, c]} in column {int(c) + 1}")
    if table.shape[0] < 8:
        raise DataFileError(f"{p}: only {table.shape[0]} channels")
    cal = np.stack([values.get("CAL_OFFSET", np.zeros(n_el)), values.get("CAL_SLOPE", np.ones(n_el)),
                    values.get("CAL_QUAD", np.zeros(n_el))], -1)
    notes = [] if "CAL_SLOPE" in values else ["no CAL_SLOPE in the header: energies are channel numbers"]
    provenance: dict[str, object] = {"version": header["VERSION"][1].strip()}
    if "DATE" in header:
        provenance["date"] = header["DATE"][1].strip()
    provenance.update({f"env:{pv}": f"{value} ({desc})" for pv, value, desc in env})
    provenance.update({k.lower(): v for k, v in rois.items()})
    incident = _mono_energy(env, provenance)

    def per_pixel(key: str) -> np.ndarray | None:
        return values[key].reshape(1, 1, n_el) if key in values else None

    return Dataset(
        path=p,
        format="gse-mca",
        rows=1,
        cols=1,
        detectors=n_el,
        channels=table.shape[0],
        calibration=cal,
        spectra=table.T.astype(np.float32).reshape(1, 1, n_el, table.shape[0]),
        live_time=per_pixel("LIVE_TIME"),
        real_time=per_pixel("REAL_TIME"),
        incident_energy=incident,
        detector_names=[f"element {i + 1}" for i in range(n_el)],
        provenance=provenance,
        notes=notes,
    )
