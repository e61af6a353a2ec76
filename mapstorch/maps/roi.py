"""XRF-Maps' ROI maps: each component's counts in an energy window around its main line.

XRF-Maps' ``ROI`` routine (``ROI_Fit_Routine``) sums a pixel's raw spectrum over channels
``round((E - w - offset) / slope) .. round((E + w - offset) / slope)``, with ``E`` the main line
(K: Ka1; L: La1; a pile-up: the sum of the two Ka1) and the half width
``w = int(sqrt(150^2 + (12 E)^2)) / 2000 keV`` times the override file's ``WIDTH_MULTIPLIER``
of that element (``Fit_Element_Map``); the energy calibration is the fit's offset and slope (the
quadratic term is not used). Past the spectrum's end the window stops at its last channel but
one; a window whose start passes its end starts one channel before the end. The maps are
divided by the live time like the fitted ones. The map fit sums the windows inside the SNIP's
pass over each chunk of spectra, while it is in the cache (``snip_window(..., roi=windows)``).

One difference: for M lines XRF-Maps leaves the centre at 0 keV (``init_energy_ratio_for_
detector_element`` sets it for K and L only), so its M windows sum the first channels of the
spectrum; ours are centred on Ma1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["roi_half_width", "roi_windows"]

_MAIN_LINES = ("Ka1", "La1", "Ma1", "Ka1+Ka1")


def roi_half_width(center_kev: float, multiplier: float = 1.0) -> float:
    """XRF-Maps' half width of an element's ROI (keV) around a line at ``center_kev``."""
    return int(math.sqrt(150.0 ** 2 + (center_kev * 12.0) ** 2)) / 2000.0 * multiplier


def _round_half_away(x: float) -> int:
    """``std::round``: halves away from zero (Python's ``round`` takes them to even)."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def roi_windows(table, names: Sequence[str], offset: float, slope: float, channels: int,
                multipliers: Mapping[str, float] | None = None) -> list[tuple[int, int]]:
    """The ROI of each component in ``names`` (of the line table ``table``): ``(first, last)``
    channels, inclusive, for spectra of ``channels`` channels with the energy calibration
    ``offset + slope * channel`` (keV)."""
    multipliers = dict(multipliers or {})
    out = []
    for name in names:
        lines = table.lines_of(name)
        labels = list(lines["line"])
        main = next((i for i, lab in enumerate(labels) if lab in _MAIN_LINES), int(np.argmax(lines["ratio"])))
        center = float(lines["energy_kev"][main])
        w = roi_half_width(center, multipliers.get(name, 1.0))
        left = max(_round_half_away((center - w - offset) / slope), 0)
        right = max(_round_half_away((center + w - offset) / slope), 0)
        if right >= channels:
            right = channels - 2
        if left > right:
            left = max(right - 1, 0)
        out.append((left, right))
    return out
