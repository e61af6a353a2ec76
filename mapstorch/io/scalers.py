"""Scaler labels from an override file, as XRF-Maps applies them.

An override file names the scalers a scan recorded: plain mappings (``US_IC: 2xfm:scaler3_cts1.B``,
``SRCURRENT: S:SRcurrentAI``, ``CFG_1: ...``), counters to divide by the counting time
(``TIME_SCALER_PV``, ``TIME_SCALER_CLOCK``, ``TIME_NORMALIZED_SCALER: US_IC;2xfm:mcs:mca2.VAL``, used
by fly scans whose scalers are raw counts per pixel) and sums of labels
(``SUMMED_SCALER: DS_IC:CFG_2,CFG_3``). XRF-Maps divides a time-normalized counter by
``time counter / clock`` (setting non-finite results to 0) and then adds the summed scalers;
:func:`apply_override_scalers` does the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mapstorch.io.dataset import Dataset

__all__ = ["scaler_labels", "apply_override_scalers", "LABEL_ALIASES"]

#: Override keys spelled differently from the label mapstorch uses.
LABEL_ALIASES = {"SRCURRENT": "SR_current", "SR_CURRENT": "SR_current"}

_NOT_SCALERS = re.compile(r"^(ELT|ERT|ICR|OCR)\d+$|_PV$")  # per-detector times; PV-name settings


def scaler_labels(scalers: Mapping[str, np.ndarray], mapping: Mapping[str, str] | None) -> dict[str, str]:
    """``{label: scaler name}`` for the override lines ``LABEL: PV`` whose PV the scan recorded.

    Per-detector times (``ELT1``...) and ``*_PV`` settings are not labels; ``SRCURRENT`` becomes
    ``SR_current``.
    """
    out = {}
    for key, pv in (mapping or {}).items():
        if _NOT_SCALERS.search(key):
            continue
        if pv.strip() in scalers:
            out[LABEL_ALIASES.get(key, key)] = pv.strip()
    return out


def apply_override_scalers(ds: Dataset, override) -> None:
    """Label ``ds``'s scalers from ``override`` and add its time-normalized and summed scalers.

    Labels go to ``ds.scaler_roles``; derived scalers are added to ``ds.scalers`` under their
    label. What cannot be applied (a counter the scan did not record) is said in ``ds.notes``.
    """
    ds.scaler_roles.update(scaler_labels(ds.scalers, override.scaler_pvs))
    normalized = list(override.time_normalized_scalers)
    if normalized:
        time_pv = override.scaler_pvs.get("TIME_SCALER_PV", "").strip()
        clock = float(override.settings.get("TIME_SCALER_CLOCK", 0.0) or 0.0)
        if time_pv not in ds.scalers or clock <= 0:
            ds.notes.append(
                "time-normalized scalers not applied: the override's TIME_SCALER_PV "
                f"{time_pv or '(none)'} was not recorded in this scan" if time_pv not in ds.scalers
                else "time-normalized scalers not applied: TIME_SCALER_CLOCK is missing or not positive")
        else:
            seconds = ds.scalers[time_pv] / clock
            missing = []
            for label, pv in normalized:
                pv = pv.strip()
                if pv not in ds.scalers:
                    missing.append(pv)
                    continue
                with np.errstate(divide="ignore", invalid="ignore"):
                    rate = ds.scalers[pv] / seconds
                ds.scalers[label] = np.where(np.isfinite(rate), rate, 0.0)
                ds.scaler_units[label] = "cts/s"
                ds.scaler_roles[label] = label
            if missing:
                ds.notes.append(f"time-normalized scalers not recorded in this scan: {', '.join(missing)}")
    for label, parts in override.summed_scalers:
        names = [ds.scaler_roles.get(p, p) for p in parts]
        present = [n for n in names if n in ds.scalers]
        if not present:
            continue
        ds.scalers[label] = np.sum([ds.scalers[n] for n in present], axis=0)
        ds.scaler_units[label] = ds.scaler_units.get(present[0], "")
        ds.scaler_roles[label] = label
        if len(present) < len(names):
            ds.notes.append(f"summed scaler {label}: {', '.join(p for p, n in zip(parts, names) if n not in present)} "
                            "not recorded; summed the rest")
