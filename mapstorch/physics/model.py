"""The spectrum model: a line table and a fit window, evaluated for batches of parameter sets.

:class:`SpectrumModel` is thin: it holds the line table as tensors and the channel window, and
composes the pure functions of :mod:`mapstorch.physics.spectrum`. It exposes the linear
structure of the MAPS model: for fixed shape parameters ``theta`` the spectrum is
``D(theta) @ amplitudes`` with the design matrix ``D`` of shape ``[..., C, K + 2]`` whose columns
are the ``K`` components (elements and pile-ups), the elastic and the Compton peak, each at unit
amplitude and including its escape peak.

Typical use::

    lines = build_line_table(["Ca", "Fe", "Pb_L"])
    model = SpectrumModel(lines, window=fit_window(2048, params))
    spectrum = model(params.shape_values(), params.amplitudes())          # [C]
    D = model.design_matrix(params.shape_values())                         # [C, K + 2]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import InputError
from mapstorch.parameters.set import N_SHAPE, ParameterSet
from mapstorch.physics.coefficients import line_coefficients
from mapstorch.physics.lines import LineTable, TorchLines
from mapstorch.physics.profiles import Peaks, evaluate_peaks, expand_to
from mapstorch.physics.shapes import FANO_EPSILON_XRFMAPS, detector_sigma
from mapstorch.physics.spectrum import (
    ESCAPE_EDGE_KEV,
    ESCAPE_ENERGY_KEV,
    P,
    channel_energies,
    compton_energy,
)

__all__ = ["SpectrumModel", "FitWindow", "fit_window", "ELASTIC", "COMPTON"]

_SQRT_2PI = math.sqrt(2.0 * math.pi)

ELASTIC = "Elastic"
COMPTON = "Compton"


@dataclass(frozen=True)
class FitWindow:
    """Absolute channel range ``[first, last]`` (inclusive) that the model evaluates."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise InputError(f"fit window [{self.first}, {self.last}] is empty or negative")

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def slice(self) -> slice:
        return slice(self.first, self.last + 1)


def fit_window(n_channels: int, params: ParameterSet | dict) -> FitWindow:
    """XRF-Maps' fit window: channels of MIN/MAX_ENERGY_TO_FIT under the linear calibration.

    ``first = round((MIN - offset) / slope)``, ``last = round((MAX - offset) / slope)``, with
    ``last`` clipped to the spectrum and the whole range used when the window is empty.
    """
    get = (lambda k: float(params[k])) if isinstance(params, dict) else (lambda k: float(params[k].reshape(-1)[0]))
    off, slope = get("ENERGY_OFFSET"), get("ENERGY_SLOPE")
    if not slope > 0:
        raise InputError(f"ENERGY_SLOPE must be positive to place the fit window, got {slope}")
    first = int(round((get("MIN_ENERGY_TO_FIT") - off) / slope))
    last = int(round((get("MAX_ENERGY_TO_FIT") - off) / slope))
    if last > n_channels - 1 or last <= first:
        last = n_channels - 1
    if first > last or first < 0:
        first = max(0, min(first, last)) if first <= last else 0
    return FitWindow(first, last)


class SpectrumModel:
    """The MAPS model for one line table over one channel window (see module docstring).

    lines : the :class:`~mapstorch.physics.lines.LineTable` of the fit components.
    window : channels to evaluate (a :class:`FitWindow`, or the number of channels for all).
    escape : include detector escape peaks (scaled by ``SI_ESCAPE`` / ``GE_ESCAPE`` for the
        table's detector material). ``None`` (default) decides per call: included when the
        factor is non-zero. Pass ``True`` when fitting the factor from zero.
    fano_epsilon : the ``eps`` in ``sigma^2 = (FWHM_OFFSET/2.3548)^2 + eps E FANOPRIME``.
    max_incident_energy : lines whose gating edge is at or above it can never be excited and
        are dropped once, here (pass the upper bound of COHERENT_SCT_ENERGY in a fit).
    windowed : evaluate each line only on the channels where it is above tolerance (see
        :mod:`mapstorch.physics.profiles`); ``False`` evaluates every line on every channel.
    dtype, device : where the model's tensors are prepared first; every call follows the dtype
        and device of its inputs (float32 or float64, CPU or CUDA).
    """

    def __init__(
        self,
        lines: LineTable,
        window: FitWindow | int,
        *,
        escape: bool | None = None,
        fano_epsilon: float = FANO_EPSILON_XRFMAPS,
        max_incident_energy: float | None = None,
        windowed: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(window, int):
            window = FitWindow(0, window - 1)
        self.table = lines
        self.window = window
        self.escape = escape
        self.fano_epsilon = float(fano_epsilon)
        self.windowed = windowed
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        keep = np.arange(lines.n_lines)
        if max_incident_energy is not None:
            keep = np.nonzero(lines.gate_edge_kev < float(max_incident_energy))[0]
        self._keep = keep
        self.n_components = len(lines.components)
        self.detector = lines.detector
        self._escape_index = P.SI_ESCAPE if self.detector == "Si" else P.GE_ESCAPE
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[TorchLines, Tensor, Tensor]] = {}
        self._tensors(dtype, self.device)

    def _tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[TorchLines, Tensor, Tensor]:
        """Line table, channel numbers and scatter rows as tensors of this dtype and device."""
        key = (dtype, device)
        if key not in self._cache:
            lines = self.table.to_torch(dtype, device)
            if len(self._keep) < self.table.n_lines:
                lines = lines.select(torch.as_tensor(self._keep, device=device))
            channels = torch.arange(self.window.first, self.window.last + 1, dtype=dtype, device=device)
            k = self.n_components
            rows = torch.tensor([k, k + 1, k + 1, k + 1], device=device)
            self._cache[key] = (lines, channels, rows)
        return self._cache[key]

    @property
    def lines(self) -> TorchLines:
        """The line table as tensors in the model's default dtype and device."""
        return self._tensors(self.dtype, self.device)[0]

    @property
    def channels(self) -> Tensor:
        """Absolute channel numbers of the window, in the model's default dtype and device."""
        return self._tensors(self.dtype, self.device)[1]

    # ------------------------------------------------------------------ names
    @property
    def column_names(self) -> tuple[str, ...]:
        """Names of the design-matrix columns: the components, then Elastic, then Compton."""
        return self.table.names + (ELASTIC, COMPTON)

    # ------------------------------------------------------------------ validation
    def _check(self, theta: Tensor, amplitudes: Tensor | None = None) -> None:
        if not isinstance(theta, Tensor) or theta.shape[-1:] != (N_SHAPE,):
            shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise InputError(
                f"shape parameters must be a tensor [..., {N_SHAPE}] (ParameterSet.shape_values()), got {shape}"
            )
        if not theta.is_floating_point():
            raise InputError(f"shape parameters must be float32 or float64, got {theta.dtype}")
        if amplitudes is not None:
            k = self.n_components + 2
            if not isinstance(amplitudes, Tensor) or amplitudes.shape[-1:] != (k,):
                shape = tuple(amplitudes.shape) if isinstance(amplitudes, Tensor) else type(amplitudes).__name__
                raise InputError(f"amplitudes must be a tensor [..., {k}] (components, elastic, Compton), got {shape}")
            if amplitudes.dtype != theta.dtype or amplitudes.device != theta.device:
                raise InputError(
                    f"amplitudes are {amplitudes.dtype} on {amplitudes.device} but the shape parameters are "
                    f"{theta.dtype} on {theta.device}; convert one of them"
                )

    def _use_escape(self, theta: Tensor) -> bool:
        if self.escape is not None:
            return self.escape
        return bool(torch.any(theta[..., self._escape_index] != 0))

    # ------------------------------------------------------------------ evaluation
    def _excited(self, theta: Tensor) -> TorchLines:
        """The lines some batch member's incident energy can excite (a constant selection)."""
        lines = self._tensors(theta.dtype, theta.device)[0]
        e0_max = float(theta[..., P.COHERENT_SCT_ENERGY].detach().max())
        keep = lines.gate_edge < e0_max
        if bool(keep.all()):
            return lines
        return lines.select(torch.nonzero(keep).flatten())

    def _peaks(self, theta: Tensor, scale: Tensor | None, escape: bool) -> tuple[Peaks, int]:
        """All peaks: lines, elastic, Compton (Gaussian, step + low tail, mirrored high tail), and
        their escape copies.

        Rows: ``scale is None`` -> components 0..K-1, elastic K, Compton K+1, and the escape
        copies in rows K+2.. (same order); otherwise every peak is multiplied by the amplitude
        of its column and goes to row 0. Returns (peaks, number of rows).
        """
        lines, k = self._excited(theta), self.n_components
        p = theta.unbind(-1)
        sigma, gamma, a, b, c = line_coefficients(lines, theta, self.fano_epsilon)
        # scatter peaks: elastic; Compton Gaussian (width x FWHM_CORR); Compton step + low tail;
        # Compton high tail (a tail mirrored upward: negative width)
        e0, e_c = p[P.COHERENT_SCT_ENERGY], compton_energy(theta)
        one, zero = torch.ones_like(e0), torch.zeros_like(e0)
        g = p[P.ENERGY_SLOPE]
        fs, ft, fh = p[P.COMPTON_F_STEP], p[P.COMPTON_F_TAIL], p[P.COMPTON_HI_F_TAIL]
        gamma_c, gamma_hi = p[P.COMPTON_GAMMA], p[P.COMPTON_HI_GAMMA]
        norm_g = g / (1.0 + fs + ft + fh)
        sc_centers = torch.stack([e0, e_c, e_c, e_c], -1)
        s_base = detector_sigma(sc_centers, p[P.FWHM_OFFSET][..., None], p[P.FWHM_FANOPRIME][..., None],
                                self.fano_epsilon)
        sc_sigma = s_base * torch.stack([one, p[P.COMPTON_FWHM_CORR], one, -one], -1)
        sc_gamma = torch.stack([one, one, gamma_c, gamma_hi], -1)
        sc_a = torch.stack([g, norm_g, zero, zero], -1) / (sc_sigma * _SQRT_2PI)
        sc_b = torch.stack([zero, zero, norm_g * fs / (2.0 * e_c), zero], -1)
        sc_c = torch.stack([zero, zero, norm_g * ft / gamma_c, norm_g * fh / gamma_hi], -1) / (2.0 * s_base)
        line_peaks = Peaks(lines.energy, sigma, gamma, a, b, c, lines.component)
        scatter_peaks = Peaks(sc_centers, sc_sigma, sc_gamma, sc_a, sc_b, sc_c,
                              self._tensors(theta.dtype, theta.device)[2])
        n_rows = k + 2
        out = []
        for pk in (_concat(line_peaks, scatter_peaks),):
            rows, pa, pb, pc = pk.rows, pk.a, pk.b, pk.c
            if scale is not None:
                amp = scale[..., rows]
                pa, pb, pc = pa * amp, pb * amp, pc * amp
                rows = torch.zeros_like(rows)
            centers, sig, gam = pk.centers, pk.sigma, pk.gamma
            if escape:
                shift = ESCAPE_ENERGY_KEV[self.detector]
                gate = (centers > ESCAPE_EDGE_KEV[self.detector]).to(theta.dtype) * p[self._escape_index][..., None]
                pa, pb, pc, gate = torch.broadcast_tensors(pa, pb, pc, gate)
                centers, sig, gam = (t.expand(pa.shape) for t in (centers, sig, gam))
                centers = torch.cat([centers, centers - shift], -1)
                sig, gam = torch.cat([sig, sig], -1), torch.cat([gam, gam], -1)
                pa, pb, pc = (torch.cat([u, u * gate], -1) for u in (pa, pb, pc))
                rows = torch.cat([rows, rows + (n_rows if scale is None else 0)])
            out.append(Peaks(centers, sig, gam, pa, pb, pc, rows))
        if escape and scale is None:
            n_rows = 2 * n_rows
        return out[0], (1 if scale is not None else n_rows)

    def _evaluate(self, theta: Tensor, scale: Tensor | None, escape: bool) -> Tensor:
        peaks, n_rows = self._peaks(theta, scale, escape)
        calibration = (theta[..., P.ENERGY_OFFSET], theta[..., P.ENERGY_SLOPE], theta[..., P.ENERGY_QUADRATIC])
        channels = self._tensors(theta.dtype, theta.device)[1]
        return evaluate_peaks(calibration, channels, peaks, n_rows, full=not self.windowed)

    def columns(self, theta: Tensor, with_escape: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(columns, escape_columns)``: unit-amplitude spectra ``[..., K + 2, C]`` of every
        column (components, elastic, Compton) without escape, and their escape peaks (already
        scaled by the escape factor), or ``None`` when escape is off."""
        self._check(theta)
        escape = with_escape and self._use_escape(theta)
        out = self._evaluate(theta, None, escape)
        if not escape:
            return out, None
        n = self.n_components + 2
        return out[..., :n, :], out[..., n:, :]

    def design_matrix(self, theta: Tensor, with_escape: bool = True) -> Tensor:
        """Design matrix ``D`` ``[..., C, K + 2]`` with escape peaks folded into each column
        (``with_escape=False``: without them, as XRF-Maps' NNLS fit matrix)."""
        cols, esc = self.columns(theta, with_escape=with_escape)
        if esc is not None:
            cols = cols + esc
        return cols.transpose(-1, -2)

    def __call__(self, theta: Tensor, amplitudes: Tensor, background: Tensor | None = None) -> Tensor:
        """Model counts ``[..., C]`` = ``D(theta) @ amplitudes`` (+ ``background`` if given).

        theta : ``[..., N_SHAPE]`` shape parameters; amplitudes : ``[..., K + 2]`` linear counts.
        Peaks are summed straight into the spectrum, so no ``[..., C, K]`` matrix is formed.
        """
        self._check(theta, amplitudes)
        if amplitudes.shape[:-1] != theta.shape[:-1]:
            # shared shape parameters, many amplitude vectors: columns once, then a product
            cols, esc = self.columns(theta)
            if esc is not None:
                cols = cols + esc
            out = torch.einsum("...kc,...k->...c", cols, amplitudes)
        else:
            out = self._evaluate(theta, amplitudes, self._use_escape(theta))[..., 0, :]
        if background is not None:
            out = out + background
        return out

    def components(
        self, theta: Tensor, amplitudes: Tensor, background: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-component spectra ``{name: [..., C]}`` for plotting.

        Each component, ``Elastic``, ``Compton``, then ``Escape`` (all escape peaks, when on),
        ``Background`` (when given) and ``Total``. Pile-ups appear under their own names.
        """
        self._check(theta, amplitudes)
        cols, esc = self.columns(theta)
        scaled = cols * amplitudes[..., None]
        out = {name: scaled[..., i, :] for i, name in enumerate(self.column_names)}
        total = scaled.sum(-2)
        if esc is not None:
            out["Escape"] = torch.einsum("...kc,...k->...c", esc, amplitudes)
            total = total + out["Escape"]
        if background is not None:
            out["Background"] = background
            total = total + background
        out["Total"] = total
        return out

    def counts(self, theta: Tensor, amplitudes: Tensor) -> Tensor:
        """Modelled counts of each column inside the fit window ``[..., K + 2]`` (escape excluded).

        Every line of the family counts. XRF-Maps reports the amplitude instead (the model
        spectrum's main line has relative intensity 1): ``counts / amplitudes`` per column.
        """
        self._check(theta, amplitudes)
        cols, _ = self.columns(theta, with_escape=False)
        return cols.sum(-1) * amplitudes

    def energies(self, theta: Tensor) -> Tensor:
        """Energy (keV) of each window channel, ``[..., C]``."""
        self._check(theta)
        return channel_energies(self._tensors(theta.dtype, theta.device)[1], theta)

    def __repr__(self) -> str:
        return (
            f"SpectrumModel({self.n_components} components, {len(self._keep)} lines, "
            f"channels {self.window.first}-{self.window.last}, detector={self.detector}, "
            f"{self.dtype}, {self.device})"
        )



def _concat(first: Peaks, second: Peaks) -> Peaks:
    """Two peak sets as one (per-peak tensors broadcast to a common batch shape)."""
    parts = []
    for name in ("centers", "sigma", "gamma", "a", "b", "c"):
        u, v = getattr(first, name), getattr(second, name)
        batch = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
        parts.append(torch.cat([expand_to(u, (*batch, u.shape[-1])), expand_to(v, (*batch, v.shape[-1]))], -1))
    return Peaks(*parts, torch.cat([first.rows, second.rows]))
