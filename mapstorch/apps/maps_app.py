import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="mapstorch · maps")

with app.setup:

    import marimo as mo

    from mapstorch.apps import figures, mapping, session, widgets
    from mapstorch.errors import MapstorchError

    WAYS = {"Run a map fit on the scan": "run", "Open the maps in a results file": "open"}


@app.cell
def _():
    mo.md(r"""
    # Elemental maps
    """)
    return


@app.cell
def _():
    start = session.start_file()
    path_box, browser, _view = widgets.file_controls(
        start, "a scan (XRF-Maps .h5, .mda, ...) or a results file with /MAPS/XRF_Analyzed")
    way_pick = mo.ui.radio(options=WAYS, inline=True,
                           value=next(k for k, v in WAYS.items() if v == ("open" if mapping.has_results(start)
                                                                          else "run")))
    mo.vstack([_view, way_pick])
    return browser, path_box, way_pick


@app.cell
def _(browser, path_box):
    path = widgets.chosen_path(browser, path_box)
    return (path,)


@app.cell
def _(way_pick):
    way = way_pick.value
    return (way,)


@app.cell
def _(path):
    source = widgets.open_or_stop(mapping.inspect_file, path, "a scan or a results file")
    _notes = mo.callout(mo.md("\n".join(f"- {n}" for n in source.notes)), kind="warn") if source.notes else mo.md("")
    mo.vstack([mo.ui.table([{"": k, "value": v} for k, v in source.facts()], selection=None, pagination=False,
                           label="What the file holds"), _notes])
    return (source,)


@app.cell
def _(source, way):
    method_pick = mo.ui.dropdown(options=["nnls", "poisson", "nonlinear"], value="nnls", label="method")
    detector_pick = mo.ui.dropdown(options=["sum"] + [str(d) for d in range(source.detectors)], value="sum",
                                   label="detector")
    elements_box = mo.ui.text(value=", ".join(source.elements), label="elements", full_width=True,
                              placeholder="Ca, Fe, Zn, Pb_L ... (default: the override file's ELEMENTS_TO_FIT)")
    out_box = mo.ui.text(value="", label="write the maps to", full_width=True,
                         placeholder="optional: an output .h5 (XRF-Maps layout, as `mapstorch map --out`)")
    run_button = mo.ui.run_button(label="Run the map fit", kind="success")
    routine_pick = mo.ui.dropdown(options=source.routines or ["(none)"],
                                  value=(source.routines or ["(none)"])[0], label="maps")
    if way == "run":
        _hint = (mo.callout(mo.md(f"This file already holds maps ({', '.join(source.routines)}): choose "
                                  "*Open the maps in a results file* to look at them."), kind="info")
                 if source.routines else mo.md(""))
        _shown = mo.vstack([
            mo.hstack([method_pick, detector_pick, run_button], justify="start", gap=1.5),
            elements_box, out_box, _hint,
            mo.md("*nnls*: SNIP background, non-negative least squares (as XRF-Maps); *poisson*: Poisson "
                  "likelihood with the background in the model (better at low counts); *nonlinear*: also refits "
                  "energy offset, slope and detector width per pixel (parameter maps; slow)."),
        ])
    else:
        _shown = (routine_pick if len(source.routines) > 1 else
                  mo.md(f"Maps: **{source.routines[0]}**") if source.routines else
                  mo.callout(mo.md("This file holds no maps (/MAPS/XRF_Analyzed): choose *Run a map fit on the "
                                   "scan*."), kind="warn"))
    _shown
    return detector_pick, elements_box, method_pick, out_box, routine_pick, run_button


@app.cell
def _(out_box, run_button):
    run_now = run_button.value
    out_path = out_box.value.strip()
    return out_path, run_now


@app.cell
def _(detector_pick, elements_box, method_pick, out_path, routine_pick, run_now, source, way):
    maps, _message = None, mo.md("")
    if way == "run" and not run_now:
        _message = mo.callout(mo.md("Choose the method and detector, then press **Run the map fit**."), kind="info")
    elif way == "run":
        try:
            with mo.status.progress_bar(total=max(source.rows * source.cols, 1), title="Fitting every pixel",
                                        subtitle=f"{source.rows} x {source.cols} pixels, {method_pick.value}",
                                        completion_title="Map fitted", remove_on_exit=True) as _bar:
                _done = [0]

                def _progress(done, total):
                    _bar.update(increment=max(int(done) - _done[0], 0))
                    _done[0] = int(done)

                # the override file's elements unless changed (a detector's own override file may list others)
                _elements = (None if mapping.parse_elements(elements_box.value) == source.elements
                             else elements_box.value)
                maps = mapping.run_maps(source.path, method_pick.value, detector_pick.value, _elements, out_path,
                                        progress=_progress)
        except MapstorchError as _exc:
            _message = mo.callout(mo.md(f"**The map fit failed.** {_exc}"), kind="danger")
        except Exception as _exc:  # noqa: BLE001 -- any failure is shown in the page, never a traceback
            _message = mo.callout(mo.md(f"**The map fit failed.** {type(_exc).__name__}: {_exc}"), kind="danger")
    elif source.routines:
        try:
            with mo.status.spinner(title="Reading the maps"):
                maps = mapping.read_maps(source, routine_pick.value)
        except MapstorchError as _exc:
            _message = mo.callout(mo.md(f"**Cannot read these maps.** {_exc}"), kind="danger")
        except Exception as _exc:  # noqa: BLE001 -- shown in the page, never a traceback
            _message = mo.callout(mo.md(f"**Cannot read these maps.** {type(_exc).__name__}: {_exc}"), kind="danger")
    _message
    return (maps,)


@app.cell
def _(maps):
    mo.stop(maps is None)
    _notes = mo.callout(mo.md("\n".join(f"- {n}" for n in maps.notes)), kind="warn") if maps.notes else mo.md("")
    mo.vstack([mo.md("## Maps"), mo.ui.table([{"": k, "value": v} for k, v in maps.facts()], selection=None,
                                             pagination=False, label="Fit"), _notes])
    return


@app.cell
def _(maps):
    mo.stop(maps is None)
    element_pick = mo.ui.multiselect(options=list(maps.names), value=maps.elements or list(maps.names),
                                     label="maps of", full_width=True)
    _shown = mapping.quantities(maps)
    quantity_pick = mo.ui.dropdown(options=_shown, value=_shown[-1] if len(_shown) > 2 else "counts/s", label="show")
    scale_pick = mo.ui.dropdown(options=["linear", "log"], value="linear", label="colour scale")
    error_pick = mo.ui.dropdown(options=list(mapping.UNCERTAINTIES), value="standard error", label="uncertainty")
    mo.vstack([element_pick, mo.hstack([quantity_pick, scale_pick, error_pick], justify="start", gap=1.5),
               mo.md("Click a pixel of any map to see its spectrum and fit below.")])
    return element_pick, error_pick, quantity_pick, scale_pick


@app.cell
def _(maps):
    mo.stop(maps is None)
    get_pixel, set_pixel = mo.state((maps.rows // 2, maps.cols // 2))

    def on_click(points):
        """A click on a map picks that pixel."""
        _hit = mapping.clicked_pixel(points, maps.rows, maps.cols)
        if _hit is not None:
            set_pixel(_hit)
    return get_pixel, on_click, set_pixel


@app.cell
def _(element_pick, maps, on_click, quantity_pick, scale_pick):
    mo.stop(maps is None)
    try:
        _images, _unit = mapping.element_maps(maps, element_pick.value, quantity_pick.value,
                                              scale_pick.value == "log")
        _error = None
    except MapstorchError as _exc:
        _images, _error = {}, str(_exc)
    # bound to a global name: a click on it reaches Python (on_click picks the pixel)
    element_grid = (mo.ui.plotly(figures.image_grid(_images, ncols=4, units=_unit), on_change=on_click)
                    if _images else None)
    if _error:
        _shown = mo.callout(_error, kind="warn")
    else:
        _shown = element_grid if element_grid is not None else mo.md("Choose the elements to show above.")
    mo.vstack([mo.md(f"## Element maps ({quantity_pick.value}, {scale_pick.value})"), _shown])
    return (element_grid,)


@app.cell
def _(element_pick, error_pick, maps, on_click, quantity_pick):
    mo.stop(maps is None)
    error_grid = None
    try:
        _images, _unit = mapping.uncertainty_maps(maps, element_pick.value, error_pick.value, quantity_pick.value)
        if _images:
            error_grid = mo.ui.plotly(figures.image_grid(_images, ncols=4, units=_unit, colorscale="Cividis"),
                                      on_change=on_click)
        _shown = error_grid if error_grid is not None else mo.md("")
    except MapstorchError as _exc:
        _shown = mo.callout(str(_exc), kind="warn")
    mo.vstack([mo.md(f"## Uncertainty ({error_pick.value})"), _shown])
    return (error_grid,)


@app.cell
def _(maps, on_click):
    mo.stop(maps is None)
    _images = mapping.quality_maps(maps)
    quality_grid = (mo.ui.plotly(figures.image_grid(_images, ncols=4, colorscale="Magma"), on_change=on_click)
                    if _images else None)
    mo.vstack([mo.md("## Fit quality" + (" and parameter maps" if maps.parameters else "")),
               quality_grid if quality_grid is not None else
               mo.md("These maps come without fit-quality maps (reduced chi-square, status, iterations)."),
               mo.md("status: 0 converged, 1 max-iterations, 2 non-finite") if "status" in _images else mo.md("")])
    return (quality_grid,)


@app.cell
def _(get_pixel, maps, set_pixel):
    mo.stop(maps is None)
    _row, _col = get_pixel()
    row_pick = mo.ui.number(start=0, stop=maps.rows - 1, step=1, value=_row, label="pixel row",
                            on_change=lambda v: set_pixel((int(v), get_pixel()[1])))
    col_pick = mo.ui.number(start=0, stop=maps.cols - 1, step=1, value=_col, label="column",
                            on_change=lambda v: set_pixel((get_pixel()[0], int(v))))
    log_fit = mo.ui.switch(value=True, label="log scale")
    mo.vstack([mo.md("## Pixel spectrum and fit"), mo.hstack([row_pick, col_pick, log_fit], justify="start",
                                                             gap=1.5)])
    return col_pick, log_fit, row_pick


@app.cell
def _(get_pixel):
    pixel = get_pixel()
    return (pixel,)


@app.cell
def _(log_fit, maps, pixel):
    mo.stop(maps is None)
    try:
        with mo.status.spinner(title="Rebuilding the pixel's model", subtitle=f"pixel {tuple(pixel)}"):
            _fit = mapping.pixel_fit(maps, *pixel)
        _error = None
    except MapstorchError as _exc:
        _fit, _error = None, str(_exc)
    except Exception as _exc:  # noqa: BLE001 -- shown in the page, never a traceback
        _fit, _error = None, f"{type(_exc).__name__}: {_exc}"
    if _fit is None:
        _shown = mo.callout(mo.md(f"**No pixel fit.** {_error}"), kind="warn")
    else:
        _shown = mo.vstack([
            mo.ui.plotly(figures.fit_figure(_fit.energy, _fit.data, _fit.components, log=log_fit.value,
                                            title=_fit.title())),
            mo.ui.table(mapping.pixel_table(maps, *pixel), selection=None, pagination=False,
                        label=f"pixel ({pixel[0]}, {pixel[1]})"),
        ])
    _shown
    return


if __name__ == "__main__":
    app.run()
