import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="mapstorch · explore")

with app.setup:

    import marimo as mo
    import numpy as np

    from mapstorch.apps import figures, session, widgets
    from mapstorch.errors import MapstorchError


@app.cell
def _():
    mo.md("""# Explore a scan""")
    return


@app.cell
def _():
    start = session.start_file()
    path_box, browser, _view = widgets.file_controls(start)
    _view
    return browser, path_box


@app.cell
def _(browser, path_box):
    path = widgets.chosen_path(browser, path_box)
    return (path,)


@app.cell
def _(path):
    scan = widgets.open_or_stop(session.open_scan, path)
    return (scan,)


@app.cell
def _(scan):
    facts = mo.ui.table([{"": k, "value": v} for k, v in scan.facts()], selection=None, label="Scan",
                        pagination=False)
    notes = mo.callout(mo.md("\n".join(f"- {n}" for n in scan.notes)), kind="warn") if scan.notes else mo.md("")
    mo.vstack([facts, notes])
    return


@app.cell
def _(scan):
    elements_box = mo.ui.text(value=", ".join(scan.elements), label="Mark the lines of", full_width=True,
                              placeholder="Fe, Ca, Pb_L ...")
    log_switch = mo.ui.switch(value=True, label="log scale")
    row_pick = mo.ui.number(start=0, stop=scan.rows - 1, step=1, value=scan.rows // 2, label="pixel row")
    col_pick = mo.ui.number(start=0, stop=scan.cols - 1, step=1, value=scan.cols // 2, label="column")
    show_pixel = mo.ui.switch(value=False, label="show the pixel's spectrum")
    mo.vstack([elements_box, mo.hstack([log_switch, row_pick, col_pick, show_pixel], justify="start", gap=1.5)])
    return col_pick, elements_box, log_switch, row_pick, show_pixel


@app.cell
def _(col_pick, row_pick, scan, show_pixel):
    pixel = None
    if show_pixel.value:
        pixel = session.pixel_spectrum(scan, row_pick.value, col_pick.value)
    return (pixel,)


@app.cell
def _(elements_box, log_switch, pixel, row_pick, col_pick, scan):
    wanted = [e.strip() for e in elements_box.value.replace(";", ",").split(",") if e.strip()]
    try:
        marks = session.line_marks(wanted, scan.incident_energy, float(scan.energy.min()), float(scan.energy.max()))
        marks_error = None
    except MapstorchError as exc:
        marks, marks_error = [], str(exc)
    extra = {}
    if pixel is not None:
        # scaled to the integrated spectrum so both show on one axis
        scale = scan.rows * scan.cols
        extra[f"pixel ({row_pick.value}, {col_pick.value}) x {scale}"] = pixel * scale
    spectrum_plot = mo.ui.plotly(figures.spectrum_figure(scan.energy, scan.spectrum, log=log_switch.value,
                                                         marks=marks, extra=extra,
                                                         title="Integrated spectrum" + (" (sum of detectors)"
                                                                                        if scan.detectors > 1 else "")))
    mo.vstack([mo.callout(marks_error, kind="danger") if marks_error else mo.md(""), spectrum_plot])
    return


@app.cell
def _(scan):
    images = {"total counts": scan.total}
    for _name, _image in scan.scalers.items():
        if np.all(np.isfinite(_image)):
            images[_name] = _image
    shown = dict(list(images.items())[:12])
    mo.vstack([mo.md("## Images"), mo.ui.plotly(figures.image_grid(shown, ncols=4)),
               mo.md(f"{len(images) - len(shown)} more scaler image(s) not shown.") if len(images) > len(shown)
               else mo.md("")])
    return


if __name__ == "__main__":
    app.run()
