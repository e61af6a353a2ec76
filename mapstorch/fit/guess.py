"""Automatic starting point of a spectrum fit: incident energy, energy calibration, Compton angle.

From the spectrum alone (plus what is known: the calibration of the file or override, the
incident energy when given, the fit components):

1. find significant peaks (smoothed spectrum; prominence above 4 Poisson standard deviations);
2. the **elastic** peak is the highest-energy strong peak (near the incident energy when it is
   given); without a given incident energy, its energy under the current calibration is taken
   as the incident energy, otherwise the slope is set so the elastic peak lands on it;
3. the **Compton** peak is the strongest peak within the largest possible Compton shift below the
   elastic; its energy gives the scattering angle (``E_C = E_0 / (1 + E_0 / 511 (1 - cos a))``);
4. the calibration is refined by a weighted line fit through the elastic peak and the peaks that
   match the strongest line of each fit component (a grid search over slope and offset, then a
   least-squares line); it replaces the given calibration only when it explains clearly more
   peaks, and never when the given one already puts a strong peak at the incident energy.

Amplitudes are not guessed here: with the shape parameters fixed the model is linear in them,
so :meth:`~mapstorch.fit.problem.SpectrumProblem.amplitudes` solves for them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mapstorch.physics.lines import LineTable

__all__ = ["StartingGuess", "guess_start", "find_peaks", "elastic_energy", "check_incident_energy", "residual_peaks",
           "ELECTRON_REST_KEV"]

ELECTRON_REST_KEV = 511.0


@dataclass
class StartingGuess:
    """What :func:`guess_start` found; ``None`` where it found nothing. ``notes`` say what it did."""

    offset: float
    slope: float
    incident_energy: float
    compton_angle: float | None = None
    elastic_channel: float | None = None
    compton_channel: float | None = None
    matched: list[tuple[str, float, float]] = field(default_factory=list)  # (component, keV, channel)
    notes: list[str] = field(default_factory=list)


def find_peaks(counts: np.ndarray, smooth: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """``(channels, prominences)`` of significant peaks of a spectrum ``[C]`` (sub-channel
    positions from a parabola through the top three channels of the smoothed spectrum)."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks as _find

    y = gaussian_filter1d(np.asarray(counts, dtype=np.float64), smooth)
    need = 4.0 * np.sqrt(np.maximum(y, 1.0)) / math.sqrt(2.0 * math.sqrt(math.pi) * smooth)
    idx, props = _find(y, prominence=need)
    prom = props["prominences"]
    pos = idx.astype(np.float64)
    inner = (idx > 0) & (idx < len(y) - 1)
    a, b, c = y[idx[inner] - 1], y[idx[inner]], y[idx[inner] + 1]
    den = a - 2.0 * b + c
    shift = np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, -1.0), 0.0)
    pos[inner] += np.clip(shift, -0.5, 0.5)
    return pos, prom


def compton_energy_kev(e0: float, angle_deg: float) -> float:
    return e0 / (1.0 + e0 / ELECTRON_REST_KEV * (1.0 - math.cos(math.radians(angle_deg))))


def _energy(c: float | np.ndarray, offset: float, slope: float, quad: float) -> float | np.ndarray:
    return offset + slope * c + quad * c * c


def _channel(e: float | np.ndarray, offset: float, slope: float, quad: float) -> float | np.ndarray:
    if quad == 0.0:
        return (e - offset) / slope
    disc = slope * slope + 4.0 * quad * (e - offset)
    return (-slope + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * quad)


def _strongest_lines(lines: LineTable, incident: float) -> list[tuple[str, float]]:
    out = []
    for name in lines.names:
        if "_" in name and name.split("_")[1] not in ("K", "L", "M"):
            continue  # pile-ups
        d = lines.lines_of(name)
        ok = d["gate_edge_kev"] < incident
        if not np.any(ok):
            continue
        i = int(np.argmax(np.where(ok, d["ratio"], -1.0)))
        out.append((name, float(d["energy_kev"][i])))
    return out


def _score(pos: np.ndarray, weight: np.ndarray, energies: np.ndarray, offset: np.ndarray, slope: np.ndarray,
           quad: float, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """(score, matches) of candidate calibrations ``[N]``: the summed weight of the peaks that
    lie within ``tol`` channels of a line's predicted channel, and how many lines match."""
    chan = _channel(energies[None, :], offset[:, None], slope[:, None], quad)  # [N, L]
    dist = np.abs(chan[:, :, None] - pos[None, None, :])  # [N, L, P]
    near = dist.min(-1)
    best = np.take_along_axis(weight[None, None, :].repeat(len(offset), 0), dist.argmin(-1)[..., None], -1)[..., 0]
    hit = near <= tol
    return np.where(hit, best * (1.0 - 0.5 * near / tol), 0.0).sum(-1), hit.sum(-1)


def calibrate_by_lines(
    pos: np.ndarray, prom: np.ndarray, lines: list[tuple[str, float]], offset: float, slope: float, quad: float,
    slope_bounds: tuple[float, float], offset_bounds: tuple[float, float], spread: float = 0.15,
) -> tuple[float, float, list[tuple[str, float, float]]] | None:
    """Offset and slope that put the most (prominence-weighted) peaks on the components' strongest
    lines: a grid search over slope (``+-spread``) and offset, then a least-squares line through
    the matches. ``None`` unless at least two lines match (three when three or more can)."""
    if len(lines) < 2 or len(pos) < 2:
        return None
    energies = np.array([e for _, e in lines])
    weight = np.log1p(prom)
    lo_s, hi_s = max(slope * (1 - spread), slope_bounds[0]), min(slope * (1 + spread), slope_bounds[1])
    slopes = np.linspace(lo_s, hi_s, 301)
    offsets = np.linspace(offset_bounds[0], offset_bounds[1], 161)
    so, oo = (g.ravel() for g in np.meshgrid(slopes, offsets, indexing="ij"))
    best_score, best = -1.0, None
    for chunk in range(0, len(so), 8192):
        sc, _ = _score(pos, weight, energies, oo[chunk:chunk + 8192], so[chunk:chunk + 8192], quad, 3.0)
        j = int(np.argmax(sc))
        if sc[j] > best_score:
            best_score, best = float(sc[j]), (float(oo[chunk + j]), float(so[chunk + j]))
    given, _ = _score(pos, weight, energies, np.array([offset]), np.array([slope]), quad, 3.0)
    if float(given[0]) >= 0.8 * best_score:  # the given calibration explains the peaks about as well
        return None
    off, sl = best
    pairs: list[tuple[str, float, float]] = []
    for _ in range(3):
        pairs = []
        for name, e in lines:
            c = float(_channel(e, off, sl, quad))
            j = int(np.argmin(np.abs(pos - c)))
            if abs(pos[j] - c) <= 3.0:
                pairs.append((name, e, float(pos[j])))
        if len(pairs) < 2:
            return None
        ch = np.array([p[2] for p in pairs])
        en = np.array([p[1] for p in pairs]) - quad * ch * ch
        (off_new, sl_new), *_ = np.linalg.lstsq(np.stack([np.ones_like(ch), ch], 1), en, rcond=None)
        if not (offset_bounds[0] <= off_new <= offset_bounds[1] and slope_bounds[0] <= sl_new <= slope_bounds[1]):
            break
        off, sl = float(off_new), float(sl_new)
    need = 3 if len(lines) >= 3 else 2
    return (off, sl, pairs) if len(pairs) >= need else None


def _elastic_from_edge(smooth: np.ndarray, top: int, offset: float, slope: float, quadratic: float,
                       fwhm: tuple[float, float]) -> tuple[float, float]:
    """``(elastic energy, detector sigma)`` from the high-energy edge of the peak at channel
    ``top`` of the smoothed spectrum (it may merge with the Compton peak on its left)."""
    e_edge = float(_energy(_right_edge(smooth, top), offset, slope, quadratic))
    sigma = math.sqrt((fwhm[0] / 2.3548) ** 2 + 3.58 * e_edge * fwhm[1])
    return e_edge - 2.15 * sigma, sigma  # the 10 % point of a Gaussian lies 2.15 sigma from its centre


def _right_edge(y: np.ndarray, top: int, level: float = 0.1) -> float:
    """First channel right of ``top`` where the (smoothed) spectrum falls below ``level`` x its value at top."""
    after = np.nonzero(y[top:] < level * y[top])[0]
    return float(top + after[0]) if len(after) else float(len(y) - 1)


def guess_start(
    counts: np.ndarray,
    lines: LineTable,
    offset: float,
    slope: float,
    quadratic: float = 0.0,
    incident_energy: float | None = None,
    compton_angle: float = 90.0,
    fwhm: tuple[float, float] = (0.12, 0.00012),
    slope_bounds: tuple[float, float] = (1e-3, 0.1),
    offset_bounds: tuple[float, float] = (-0.2, 0.2),
) -> StartingGuess:
    """Starting calibration, incident energy and Compton angle from a spectrum ``[C]`` (module docstring).

    fwhm : ``(FWHM_OFFSET, FWHM_FANOPRIME)`` used to place the elastic peak from its high-energy edge.
    """
    from scipy.ndimage import gaussian_filter1d

    y = np.asarray(counts, dtype=np.float64)
    n = len(y)
    e_top = float(_energy(n - 1, offset, slope, quadratic))
    guess = StartingGuess(offset, slope, float(incident_energy or e_top))
    pos, prom = find_peaks(y)
    keep = (pos > max(float(_channel(0.8, offset, slope, quadratic)), 4.0)) & (pos < n - 4)
    pos, prom = pos[keep], prom[keep]
    if len(pos) == 0:
        guess.notes.append("no significant peaks found: starting from the given calibration")
        return guess
    # 1. calibration from fluorescence peaks
    e_max = incident_energy or e_top
    found = calibrate_by_lines(pos, prom, _strongest_lines(lines, e_max), offset, slope, quadratic,
                               slope_bounds, offset_bounds)
    if found is not None and incident_energy is not None:
        # the new calibration must not move a strong peak that the given one puts at the incident energy
        c_given = float(_channel(incident_energy, offset, slope, quadratic))
        strong_near = (prom >= 0.1 * prom.max()) & (np.abs(pos - c_given) <= 3.0)
        if np.any(strong_near):
            c_new = float(_channel(incident_energy, found[0], found[1], quadratic))
            if np.abs(pos[strong_near] - c_new).min() > 3.0:
                guess.notes.append("fluorescence peaks suggested another calibration, but the given one puts the "
                                   "elastic peak at the incident energy: keeping it")
                found = None
    if found is not None:
        off, sl, guess.matched = found
        guess.offset, guess.slope = off, sl
        guess.notes.append(f"calibration {off:.5g} + {sl:.6g} c keV from {len(guess.matched)} fluorescence peaks "
                           f"({', '.join(p[0] for p in guess.matched)})")
    off, sl = guess.offset, guess.slope
    # 2. the elastic peak: highest-energy strong peak (its right edge, as it may merge with Compton)
    smooth = gaussian_filter1d(y, 1.5)
    strong = prom >= 0.02 * prom.max()
    if incident_energy is not None:
        expected = float(_channel(incident_energy, off, sl, quadratic))
        near = strong & (np.abs(pos - expected) <= max(0.1 * expected, 30.0))
        candidates = pos[near] if np.any(near) else np.array([])
    else:
        candidates = pos[strong]
    if len(candidates) == 0:
        guess.notes.append("no elastic peak found: keeping the given incident energy and calibration")
        return guess
    top = int(round(candidates.max()))
    e_el, sigma = _elastic_from_edge(smooth, top, off, sl, quadratic, fwhm)
    c_el = float(_channel(e_el, off, sl, quadratic))
    guess.elastic_channel = c_el
    if incident_energy is None:
        guess.incident_energy = e_el
        guess.notes.append(f"incident energy {e_el:.4g} keV from the elastic peak's high-energy edge")
    elif found is None:
        new_slope = (incident_energy - off - quadratic * c_el * c_el) / c_el
        if slope_bounds[0] <= new_slope <= slope_bounds[1]:
            guess.slope = new_slope
            guess.notes.append(f"slope {new_slope:.6g} keV/channel puts the elastic peak at {incident_energy:g} keV")
    e0 = guess.incident_energy
    off, sl = guess.offset, guess.slope
    # 3. Compton: strongest peak within the largest possible shift below the elastic
    e_min = compton_energy_kev(e0, 180.0)
    lo = float(_channel(e_min - 0.3 * (e0 - e_min), off, sl, quadratic))
    c_el = float(_channel(e0, off, sl, quadratic))
    comp = (pos >= lo) & (pos < c_el - 1.0 * sigma / sl)
    if np.any(comp):
        j = int(np.argmax(np.where(comp, prom, -1.0)))
        guess.compton_channel = float(pos[j])
        e_c = float(_energy(pos[j], off, sl, quadratic))
        cos_a = 1.0 - ELECTRON_REST_KEV * (1.0 / e_c - 1.0 / e0) if 0 < e_c < e0 else 2.0
        if -1.0 <= cos_a <= 1.0:
            guess.compton_angle = math.degrees(math.acos(cos_a))
            guess.notes.append(f"Compton peak at {e_c:.3f} keV: scattering angle {guess.compton_angle:.1f} deg")
    return guess


def elastic_energy(counts: np.ndarray, offset: float, slope: float, quadratic: float = 0.0,
                   fwhm: tuple[float, float] = (0.12, 0.00012)) -> tuple[float, float] | None:
    """``(elastic energy, Compton energy)`` in keV read off a spectrum ``[C]`` alone: the
    highest-energy strong peak (prominence >= 2 % of the largest) placed from its high-energy
    edge, and the strongest peak within the largest possible Compton shift below it (``nan``
    when there is none). ``None`` when the spectrum has no significant peak."""
    from scipy.ndimage import gaussian_filter1d

    y = np.asarray(counts, dtype=np.float64)
    pos, prom = find_peaks(y)
    keep = (pos > max(float(_channel(0.8, offset, slope, quadratic)), 4.0)) & (pos < len(y) - 4)
    pos, prom = pos[keep], prom[keep]
    if len(pos) == 0:
        return None
    strong = prom >= 0.02 * prom.max()
    top = int(round(pos[strong].max()))
    e_el, sigma = _elastic_from_edge(gaussian_filter1d(y, 1.5), top, offset, slope, quadratic, fwhm)
    e_min = compton_energy_kev(e_el, 180.0)
    energies = _energy(pos, offset, slope, quadratic)
    comp = strong & (energies >= e_min - 0.3 * (e_el - e_min)) & (energies < e_el - sigma)
    e_c = float(energies[np.argmax(np.where(comp, prom, -1.0))]) if np.any(comp) else math.nan
    return e_el, e_c


def check_incident_energy(counts: np.ndarray, incident_energy: float, offset: float, slope: float,
                          quadratic: float = 0.0) -> tuple[float, str | None]:
    """Check an incident energy read from a data file's metadata (which may be stale) against
    the spectrum ``[C]``: when it lies above the spectrum, or no peak sits near it, while the
    spectrum shows an elastic peak with a Compton peak below it elsewhere, return that elastic
    energy and a note saying so; otherwise ``(incident_energy, None)``."""
    y = np.asarray(counts, dtype=np.float64)
    found = elastic_energy(y, offset, slope, quadratic)
    if found is None or not math.isfinite(found[1]):
        return incident_energy, None
    e_el, e_c = found
    if abs(e_el - incident_energy) <= max(0.05 * incident_energy, 0.3):
        return incident_energy, None
    e_top = float(_energy(len(y) - 1, offset, slope, quadratic))
    pos, prom = find_peaks(y)
    strong = prom >= 0.02 * prom.max() if len(prom) else prom.astype(bool)
    near = np.abs(_energy(pos[strong], offset, slope, quadratic) - incident_energy) <= 0.05 * incident_energy
    if incident_energy <= e_top and np.any(near):
        return incident_energy, None
    where = (f"lies above the spectrum (top {e_top:.3g} keV)" if incident_energy > e_top
             else "has no peak near it")
    return e_el, (f"the data file's incident energy ({incident_energy:.4g} keV) {where}, but the spectrum has "
                  f"an elastic peak at {e_el:.4g} keV with a Compton peak at {e_c:.4g} keV: using "
                  f"{e_el:.4g} keV (give --incident-energy to override)")


def residual_peaks(data: np.ndarray, model: np.ndarray, energies: np.ndarray, fwhm: float = 0.15,
                   z_min: float = 10.0, fraction: float = 0.1, limit: int = 3,
                   exclude: tuple[float, float] | None = None) -> list[tuple[float, float, float]]:
    """Peaks the model leaves unexplained: ``[(keV, excess counts, significance)]``, largest
    first, of local maxima of the data-minus-model excess summed over one ``fwhm`` (keV), less
    the larger excess two FWHM to either side (so that broad background misfits do not count), that
    are at least ``z_min`` Poisson standard deviations and ``fraction`` of the model there,
    outside the ``exclude`` energy range (e.g. the scatter peaks, whose shape misfits are not
    missing elements). ``data``, ``model``, ``energies``: ``[C]`` over the fit window."""
    from scipy.signal import find_peaks as _find

    d, m, e = (np.asarray(a, dtype=np.float64) for a in (data, model, energies))
    if len(d) < 8:
        return []
    width = max(int(round(fwhm / max(abs(float(e[1] - e[0])), 1e-9))), 1)
    kernel = np.ones(width)
    excess = np.convolve(d - m, kernel, mode="same")
    base = np.convolve(np.maximum(m, 1.0), kernel, mode="same")
    # a peak stands out from the excess two FWHM to both sides (a broad background misfit does not)
    shift = 2 * width
    padded = np.pad(excess, shift, mode="edge")
    excess = excess - np.maximum(np.maximum(padded[:-2 * shift], padded[2 * shift:]), 0.0)
    z = excess / np.sqrt(base)
    idx, _ = _find(z, height=z_min, distance=width)
    keep = [i for i in idx if excess[i] >= fraction * base[i]
            and not (exclude is not None and exclude[0] <= e[i] <= exclude[1])]
    keep.sort(key=lambda i: -z[i])
    return [(float(e[i]), float(excess[i]), float(z[i])) for i in keep[:limit]]
