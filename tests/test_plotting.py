"""Map images: flat and empty maps are labelled, not drawn around a meaningless colour scale."""

import numpy as np

from mapstorch import plotting


def test_plot_maps_labels_flat_and_empty_maps(tmp_path, monkeypatch):
    seen = {}
    save = plotting._save

    def capture(plt, fig, path, dpi):
        axes = [ax for ax in fig.axes if ax.get_title()]
        seen.update({ax.get_title(): ax.images[0].get_clim() for ax in axes if ax.images})
        save(plt, fig, path, dpi)

    monkeypatch.setattr(plotting, "_save", capture)
    maps = {"Fe": np.arange(6.0).reshape(2, 3), "K": np.zeros((2, 3)), "Ti": np.full((2, 3), np.nan),
            "Ca": np.full((2, 3), 5.0)}
    out = plotting.plot_maps(tmp_path / "maps.png", maps, units="cts/s")
    assert (tmp_path / "maps.png").stat().st_size > 0 and out.endswith("maps.png")
    assert seen["Fe"] == (0.0, 5.0)
    assert seen["K (all 0)"] == (0.0, 1.0)  # not a colour bar from -0.1 to 0.1
    assert seen["Ca (all 5)"] == (5.0, 10.0)
    assert "Ti (no finite value)" in seen
