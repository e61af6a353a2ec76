"""PNG plots of spectra, components and maps (matplotlib, imported only when a plot is made)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError

__all__ = ["plot_spectrum", "plot_lines", "plot_maps", "plot_calibration", "element_colors"]

_SKIP = {"Total", "Background"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def element_colors(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per component name (same name, same colour, in every plot)."""
    palette = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
    ]  # fmt: skip
    out = {}
    for n in names:
        h = sum((i + 1) * ord(ch) for i, ch in enumerate(n))
        out[n] = palette[h % len(palette)]
    return out


def _save(plt, fig, path: str | os.PathLike[str], dpi: int) -> None:
    """Write the figure atomically (a failed write leaves nothing under ``path``)."""
    from mapstorch.io.atomic import atomic_path

    try:
        kind = Path(path).suffix.lower().lstrip(".") or "png"
        supported = fig.canvas.get_supported_filetypes()
        if kind not in supported:
            raise InputError(f"cannot write a plot as {Path(path).name!r}: use one of "
                             + ", ".join("." + k for k in sorted(supported)))
        with atomic_path(path, "plot") as tmp:
            fig.savefig(tmp, dpi=dpi, format=kind)
    finally:
        plt.close(fig)


def plot_spectrum(
    path: str | os.PathLike[str],
    energies_kev: np.ndarray,
    counts: np.ndarray | None,
    components: Mapping[str, np.ndarray],
    title: str = "",
    top_n: int = 12,
    residual_model: np.ndarray | None = None,
    data_label: str = "data",
) -> str:
    """Data, model total, background and the ``top_n`` strongest components on a log scale.

    With ``residual_model`` a lower panel shows Pearson residuals ``(data - model)/sqrt(model)``.
    Returns the path written.
    """
    plt = _pyplot()
    e = np.asarray(energies_kev)
    rows = 2 if residual_model is not None and counts is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 6.5 if rows == 2 else 5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]} if rows == 2 else None)
    ax = axes[0] if rows == 2 else axes
    floor = 0.5
    if counts is not None:
        ax.step(e, np.maximum(counts, floor), where="mid", color="0.35", lw=0.8, label=data_label)
    if "Total" in components:
        ax.plot(e, np.maximum(components["Total"], floor), color="k", lw=1.2, label="model")
    if "Background" in components:
        ax.plot(e, np.maximum(components["Background"], floor), color="0.5", ls="--", lw=1, label="background")
    parts = {k: np.asarray(v) for k, v in components.items() if k not in _SKIP}
    strongest = sorted(parts, key=lambda k: -float(parts[k].sum()))[:top_n]
    colors = element_colors(strongest)
    for k in strongest:
        ax.plot(e, np.maximum(parts[k], floor), lw=0.9, color=colors[k], label=k)
    ax.set_yscale("log")
    top = max(float(np.max(counts)) if counts is not None else 0.0,
              float(np.max(components.get("Total", np.ones(1)))))
    ax.set_ylim(floor, top * 2.0)
    ax.set_ylabel("counts / channel")
    ax.legend(ncol=4, fontsize=7, loc="upper right")
    if title:
        ax.set_title(title)
    if rows == 2:
        m = np.maximum(np.asarray(residual_model), 1e-9)
        axes[1].plot(e, (counts - m) / np.sqrt(m), lw=0.6, color="C3")
        axes[1].axhline(0, color="k", lw=0.6)
        axes[1].set_ylabel("(data-model)/sqrt(model)")
        axes[1].set_xlabel("energy (keV)")
    else:
        ax.set_xlabel("energy (keV)")
    fig.tight_layout()
    _save(plt, fig, path, dpi=110)
    return os.fspath(path)


def plot_lines(
    path: str | os.PathLike[str],
    energies_kev: np.ndarray,
    counts: np.ndarray,
    model: np.ndarray | None,
    lines: Mapping[str, Sequence[tuple[float, float]]],
    title: str = "",
    uncertain: Sequence[str] = (),
) -> str:
    """The spectrum (log scale) with each component's lines marked: ``lines[name]`` is a list
    of ``(energy keV, relative intensity)``; the strongest line of each gets the name. Names in
    ``uncertain`` are drawn dashed. Returns the path written."""
    plt = _pyplot()
    e = np.asarray(energies_kev)
    y = np.maximum(np.asarray(counts, dtype=float), 0.5)
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.step(e, y, where="mid", color="0.35", lw=0.8, label="data")
    if model is not None:
        ax.plot(e, np.maximum(model, 0.5), color="k", lw=1.0, label="fit")
    ax.set_yscale("log")
    top = float(y.max()) * 3.0
    ax.set_ylim(0.5, top)
    colors = element_colors(list(lines))
    for name, marks in lines.items():
        marks = [(en, r) for en, r in marks if e[0] <= en <= e[-1]]
        if not marks:
            continue
        ls = "--" if name in uncertain else "-"
        strongest = max(marks, key=lambda m: m[1])
        for en, r in marks:
            i = int(np.clip(np.searchsorted(e, en), 0, len(e) - 1))
            h = y[i] * (1.0 + 2.0 * max(min(r, 1.0), 0.05))
            ax.plot([en, en], [y[i], h], color=colors[name], lw=1.0, ls=ls)
            if (en, r) == strongest:
                ax.text(en, h * 1.05, name, color=colors[name], fontsize=7, ha="center", va="bottom", rotation=90)
    ax.set_xlabel("energy (keV)")
    ax.set_ylabel("counts / channel")
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(plt, fig, path, dpi=110)
    return os.fspath(path)


def plot_maps(
    path: str | os.PathLike[str],
    maps: Mapping[str, np.ndarray],
    title: str = "",
    ncols: int = 4,
    units: str | Mapping[str, str] = "counts",
) -> str:
    """A grid of map images with colour bars; ``units`` is one label or one per map name."""
    plt = _pyplot()
    names = list(maps)
    nrows = max(1, (len(names) + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.7 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        values = np.asarray(maps[name])
        finite = values[np.isfinite(values)]
        shown, limits = name, {}
        if finite.size == 0:
            shown = f"{name} (no finite value)"
        elif finite.min() == finite.max():  # a flat map: say so, rather than a colour bar around it
            v = float(finite.min())
            shown, limits = f"{name} (all {v:.4g})", {"vmin": v, "vmax": v + max(1.0, abs(v))}
        im = ax.imshow(values, origin="lower", cmap="viridis", interpolation="nearest", **limits)
        ax.set_title(shown, fontsize=9)
        label = units if isinstance(units, str) else units.get(name, "")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, path, dpi=100)
    return os.fspath(path)


def plot_calibration(path: str | os.PathLike[str], curve: np.ndarray, points: Mapping[str, tuple[int, str, float, float]],
                     title: str = "", units: str = "") -> str:
    """A calibration curve ``[3, 100]`` (shells K, L, M over Z = 1..100, zeros not drawn) on a
    log scale, with the standard's measured factors ``points[name] = (Z, shell, value, stderr)``.
    Returns the path written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    z = np.arange(1, curve.shape[1] + 1)
    colors = {"K": "#1f77b4", "L": "#ff7f0e", "M": "#2ca02c"}
    for row, shell in enumerate(("K", "L", "M")):
        y = np.where(curve[row] > 0, curve[row], np.nan)
        if np.isfinite(y).any():
            ax.plot(z, y, "-", color=colors[shell], label=f"{shell} shell (fitted curve)")
    for name, (zi, shell, value, err) in points.items():
        ax.errorbar([zi], [value], yerr=[err] if err and np.isfinite(err) else None, fmt="o",
                    color=colors.get(shell, "k"), ms=6, capsize=3)
        ax.annotate(name, (zi, value), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("atomic number Z")
    ax.set_ylabel(units or "calibration factor")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(plt, fig, path, 120)
    return str(path)
