"""Plotly figures of the web apps: spectra with line marks, fits with components and residuals,
map images and grids, and a periodic table of guessed elements.

Colours per element come from :func:`mapstorch.plotting.element_colors`, so an element has the
same colour in every app and in the PNG plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mapstorch.plotting import element_colors

__all__ = ["spectrum_figure", "fit_figure", "image_figure", "image_grid", "periodic_table_figure",
           "element_colors", "DECISION_COLORS"]

#: Colours of the periodic table's decisions.
DECISION_COLORS = {"present": "#2ca02c", "uncertain": "#ffbf00", "absent": "#d9d9d9", "not tested": "#ffffff"}


def _go():
    import plotly.graph_objects as go

    return go


def _add_marks(fig, marks: Sequence[Mapping], y_top: float, log: bool) -> None:
    """Vertical lines at the energies of ``marks`` (from :func:`session.line_marks`), height by
    relative intensity, coloured per element, one legend entry per element."""
    go = _go()
    colors = element_colors(sorted({m["element"] for m in marks}))
    by_element: dict[str, list[Mapping]] = {}
    for m in marks:
        by_element.setdefault(m["element"], []).append(m)
    for name, ms in by_element.items():
        xs, ys, text = [], [], []
        for m in ms:
            top = y_top * (m["ratio"] ** 0.5 if log else m["ratio"])
            xs += [m["energy"], m["energy"], None]
            ys += [1.0 if log else 0.0, max(top, 1.0), None]
            text += [f"{name} {m['line']} {m['energy']:.3f} keV"] * 2 + [""]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} lines", line={"color": colors[name], "width": 1},
                                 hovertext=text, hoverinfo="text", legendgroup=name))


def spectrum_figure(energy: np.ndarray, counts: np.ndarray, *, log: bool = True, marks: Sequence[Mapping] = (),
                    title: str = "", extra: Mapping[str, np.ndarray] | None = None):
    """Counts against energy (keV), linear or log scale, with line marks and extra traces
    (e.g. a pixel's spectrum) ``{name: counts}`` on the same energy axis."""
    go = _go()
    fig = go.Figure()
    y = np.asarray(counts, dtype=float)
    fig.add_trace(go.Scatter(x=np.asarray(energy), y=np.clip(y, 0.5, None) if log else y, mode="lines",
                             name="counts", line={"color": "#222222", "width": 1}))
    for name, values in (extra or {}).items():
        v = np.asarray(values, dtype=float)
        fig.add_trace(go.Scatter(x=np.asarray(energy), y=np.clip(v, 0.5, None) if log else v, mode="lines",
                                 name=name, line={"width": 1}))
    if marks:
        _add_marks(fig, marks, float(np.nanmax(y)) if y.size else 1.0, log)
    fig.update_layout(title=title, xaxis_title="energy (keV)", yaxis_title="counts", template="plotly_white",
                      height=420, margin={"l": 60, "r": 20, "t": 40 if title else 20, "b": 50})
    fig.update_yaxes(type="log" if log else "linear")
    return fig


def fit_figure(energies: np.ndarray, data: np.ndarray, components: Mapping[str, np.ndarray], *, log: bool = True,
               title: str = "", max_components: int = 12):
    """Data, model, background and the strongest components over the fit window, with the
    residuals ``(data - model) / sqrt(max(model, 1))`` underneath."""
    go = _go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.04)
    e = np.asarray(energies)
    floor = 0.5 if log else -np.inf
    fig.add_trace(go.Scatter(x=e, y=np.clip(data, floor, None), mode="markers", name="data",
                             marker={"size": 3, "color": "#222222"}), row=1, col=1)
    model = components.get("Total")
    if model is not None:
        fig.add_trace(go.Scatter(x=e, y=np.clip(model, floor, None), mode="lines", name="model",
                                 line={"color": "#d62728", "width": 2}), row=1, col=1)
    if "Background" in components:
        fig.add_trace(go.Scatter(x=e, y=np.clip(components["Background"], floor, None), mode="lines",
                                 name="background", line={"color": "#7f7f7f", "dash": "dot"}), row=1, col=1)
    named = [(k, v) for k, v in components.items() if k not in ("Total", "Background")]
    named.sort(key=lambda kv: -float(np.sum(kv[1])))
    colors = element_colors([k for k, _ in named])
    for k, v in named[:max_components]:
        v = np.asarray(v, dtype=float)
        shown = np.where(v > (0.5 if log else 0.0), v, np.nan)
        fig.add_trace(go.Scatter(x=e, y=shown, mode="lines", name=k, line={"color": colors[k], "width": 1}),
                      row=1, col=1)
    if model is not None:
        resid = (np.asarray(data) - model) / np.sqrt(np.clip(model, 1.0, None))
        fig.add_trace(go.Scatter(x=e, y=resid, mode="lines", name="residual (sigma)", showlegend=False,
                                 line={"color": "#1f77b4", "width": 1}), row=2, col=1)
    fig.update_yaxes(type="log" if log else "linear", title_text="counts", row=1, col=1)
    fig.update_yaxes(title_text="residual (sigma)", row=2, col=1)
    fig.update_xaxes(title_text="energy (keV)", row=2, col=1)
    fig.update_layout(title=title, template="plotly_white", height=560,
                      margin={"l": 60, "r": 20, "t": 40 if title else 20, "b": 50})
    return fig


def image_figure(image: np.ndarray, title: str = "", *, colorscale: str = "Viridis", units: str = "",
                 log: bool = False):
    """A map image ``[rows, cols]`` with a colour bar (row 0 at the top, as XRF-Maps shows it)."""
    go = _go()
    z = np.asarray(image, dtype=float)
    if log:
        z = np.log10(np.clip(z, np.nanmax(z) * 1e-6 if np.isfinite(np.nanmax(z)) and np.nanmax(z) > 0 else 1e-12,
                             None))
    fig = go.Figure(go.Heatmap(z=z, colorscale=colorscale, colorbar={"title": ("log10 " if log else "") + units},
                               hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title_text="row")
    fig.update_xaxes(title_text="column")
    fig.update_layout(title=title, template="plotly_white", height=380, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig


def image_grid(images: Mapping[str, np.ndarray], *, ncols: int = 4, colorscale: str = "Viridis", units: str = ""):
    """Several map images in a grid, each with its own colour bar."""
    go = _go()
    from plotly.subplots import make_subplots

    names = list(images)
    n = max(len(names), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=names, horizontal_spacing=0.1,
                        vertical_spacing=0.12 if nrows > 1 else 0.05)
    for i, name in enumerate(names):
        r, c = divmod(i, ncols)
        # each colour bar just right of its own image, as tall as it
        suffix = "" if i == 0 else str(i + 1)
        xd, yd = fig.layout["xaxis" + suffix].domain, fig.layout["yaxis" + suffix].domain
        fig.add_trace(go.Heatmap(z=np.asarray(images[name], dtype=float), colorscale=colorscale,
                                 colorbar={"x": xd[1] + 0.005, "xanchor": "left", "y": (yd[0] + yd[1]) / 2,
                                           "len": yd[1] - yd[0], "thickness": 10, "title": units,
                                           "tickfont": {"size": 9}},
                                 hovertemplate=name + ": row %{y}, col %{x}: %{z:.4g}<extra></extra>"),
                      row=r + 1, col=c + 1)
        fig.update_yaxes(autorange="reversed", row=r + 1, col=c + 1)
    fig.update_layout(template="plotly_white", height=260 * nrows + 60, margin={"l": 30, "r": 30, "t": 50, "b": 30})
    return fig


# (symbol, period, group) of the elements the MAPS model fits (Z 11-92); lanthanides and actinides
# on their own rows below, as usual.
_TABLE_ROWS = [
    "H . . . . . . . . . . . . . . . . He",
    "Li Be . . . . . . . . . . B C N O F Ne",
    "Na Mg . . . . . . . . . . Al Si P S Cl Ar",
    "K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr",
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe",
    "Cs Ba * Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn",
    "Fr Ra ** . . . . . . . . . . . . . . .",
    ". . La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu .",
    ". . Ac Th Pa U . . . . . . . . . . . .",
]


def _table_positions() -> dict[str, tuple[int, int]]:
    pos = {}
    for r, row in enumerate(_TABLE_ROWS):
        for c, sym in enumerate(row.split()):
            if sym not in (".", "*", "**"):
                pos[sym] = (r + (1 if r >= 7 else 0), c)  # a gap above the f-block rows
    return pos


def periodic_table_figure(status: Mapping[str, str], hover: Mapping[str, str] | None = None, title: str = ""):
    """A periodic table; each element coloured by ``status[symbol]`` (a key of
    :data:`DECISION_COLORS`), with ``hover[symbol]`` text (its evidence)."""
    go = _go()
    pos = _table_positions()
    fig = go.Figure()
    hover = hover or {}
    for decision, color in DECISION_COLORS.items():
        syms = [s for s in pos if status.get(s, "not tested") == decision]
        if not syms:
            continue
        xs = [pos[s][1] for s in syms]
        ys = [pos[s][0] for s in syms]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers+text", text=syms, name=decision, textfont={"size": 12},
            marker={"symbol": "square", "size": 34, "color": color, "line": {"color": "#555555", "width": 1}},
            hovertext=[hover.get(s, f"{s}: {decision}") for s in syms], hoverinfo="text"))
    fig.update_xaxes(visible=False, range=[-0.7, 17.7])
    fig.update_yaxes(visible=False, autorange="reversed", range=[9.7, -0.7])
    fig.update_layout(title=title, template="plotly_white", height=440, showlegend=True,
                      legend={"orientation": "h", "y": -0.02}, margin={"l": 10, "r": 10, "t": 40 if title else 10,
                                                                         "b": 10})
    return fig
