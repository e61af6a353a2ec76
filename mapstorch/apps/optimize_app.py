import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="mapstorch · optimize")

with app.setup:
    from pathlib import Path

    import marimo as mo

    from mapstorch.apps import figures, optimizing, session, widgets
    from mapstorch.errors import MapstorchError


@app.cell
def _():
    mo.md("""# Optimize the fit parameters""")
    return


@app.cell
def _():
    start_path = session.start_file()
    path_box, browser, _view = widgets.file_controls(start_path)
    _view
    return browser, path_box


@app.cell
def _(browser, path_box):
    path = widgets.chosen_path(browser, path_box)
    return (path,)


@app.cell
def _(path):
    scan = widgets.open_or_stop(session.open_scan, path)
    mo.md(f"**{Path(scan.path).name}**: {scan.format}, {scan.rows} x {scan.cols} pixels, {scan.detectors} "
          f"detector(s), {scan.channels} channels; override file: {scan.override_path or 'none found'}")
    return (scan,)


@app.cell
def _(scan):
    source_pick = mo.ui.radio(options=[optimizing.START_OVERRIDE, optimizing.START_DEFAULTS],
                              value=optimizing.START_OVERRIDE if scan.override is not None else optimizing.START_DEFAULTS,
                              label="Start from", inline=True)
    override_box = mo.ui.text(value=scan.override_path or "", label="override file", full_width=True,
                              placeholder="maps_fit_parameters_override.txt (empty: the one beside the data)")
    spectrum_pick = mo.ui.dropdown(options=optimizing.spectrum_choices(scan),
                                   value=next(iter(optimizing.spectrum_choices(scan))), label="Spectrum")
    mo.vstack([mo.md("## Start"), mo.hstack([source_pick, spectrum_pick], justify="start", gap=2), override_box])
    return override_box, source_pick, spectrum_pick


@app.cell
def _(override_box, scan, source_pick):
    try:
        fit_start = optimizing.load_start(scan, source_pick.value, override_box.value)
        _start_error = None
    except MapstorchError as exc:
        fit_start, _start_error = None, str(exc)
    mo.stop(_start_error is not None, mo.callout(mo.md(f"**Cannot use this starting point.** {_start_error}"),
                                                kind="danger"))
    mo.md(f"Starting from {fit_start.description}.")
    return (fit_start,)


@app.cell
def _(fit_start):
    elements_box = mo.ui.text(value=", ".join(fit_start.elements), label="Elements to fit", full_width=True,
                              placeholder="Ca, Fe, Zn, Pb_L, Si_Cl ...")
    preset_pick = mo.ui.dropdown(options=optimizing.preset_names(), value="2", label="preset")
    optimizer_pick = mo.ui.dropdown(options=optimizing.optimizer_names(), value="lm", label="optimizer")
    objective_pick = mo.ui.dropdown(options=optimizing.objective_names(), value="poisson", label="objective")
    iterations_box = mo.ui.number(start=0, stop=100_000, step=1, value=0, label="max iterations (0: default)")
    energy_box = mo.ui.number(start=0, stop=200, step=0.001, value=fit_start.incident_energy or 0,
                              label="incident energy keV (0: elastic peak)")
    run_button = mo.ui.run_button(label="Fit", kind="success", tooltip="fit the spectrum with these settings")
    mo.vstack([mo.md("## Options"), elements_box,
               mo.hstack([preset_pick, optimizer_pick, objective_pick, iterations_box, energy_box], justify="start",
                         gap=1.5, wrap=True),
               mo.md("Preset 2: calibration, widths and scatter (no tails); 3 adds the tails; 5 the quadratic "
                     "calibration term; all: every parameter the model uses."),
               run_button])
    return elements_box, energy_box, iterations_box, objective_pick, optimizer_pick, preset_pick, run_button


@app.cell
def _(run_button):
    run_now = run_button.value
    return (run_now,)


@app.cell
def _():
    log_switch = mo.ui.switch(value=True, label="log scale")
    fixed_switch = mo.ui.switch(value=False, label="show fixed parameters too")
    return fixed_switch, log_switch


@app.cell
def _(elements_box, energy_box, fit_start, iterations_box, objective_pick, optimizer_pick, preset_pick, run_now,
      scan, spectrum_pick):
    mo.stop(not run_now, mo.callout(mo.md("Choose the options and press **Fit**."), kind="info"))
    try:
        _fit_elements = optimizing.parse_elements(elements_box.value)
        _counts, _calibration = optimizing.spectrum_of(scan, spectrum_pick.value)
        with mo.status.spinner(title="Fitting", subtitle="starting", remove_on_exit=True) as _spinner:
            _progress = optimizing.FitProgress(_spinner.update)
            result = optimizing.run_fit(_counts, _calibration, fit_start, _fit_elements, preset=preset_pick.value,
                                        optimizer=optimizer_pick.value, objective=objective_pick.value,
                                        max_iter=iterations_box.value, incident_energy=energy_box.value,
                                        progress=_progress)
        _fit_error = None
    except MapstorchError as exc:
        result, _fit_error = None, str(exc)
    mo.stop(_fit_error is not None, mo.callout(mo.md(f"**Cannot fit.** {_fit_error}"), kind="danger"))
    fit_spectrum_name = spectrum_pick.selected_key
    return fit_spectrum_name, result


@app.cell
def _(fit_spectrum_name, result):
    _kind, _text = optimizing.status_kind(result)
    _stats = (f"{result.optimizer} / {result.objective} on the {fit_spectrum_name}: reduced chi2 "
              f"**{result.reduced_chi2:.4g}** (dof {result.dof}), deviance {result.deviance:.6g}, "
              f"{result.iterations} iterations, {result.evaluations} model evaluations, {result.seconds:.2f} s; "
              f"window {result.energies[0]:.3f}-{result.energies[-1]:.3f} keV")
    _notes = (mo.callout(mo.md("\n".join(f"- {n}" for n in result.notes)), kind="warn") if result.notes
              else mo.md(""))
    mo.vstack([mo.md("## Result"), mo.callout(mo.md(f"Fit status: {_text}"), kind=_kind), mo.md(_stats), _notes])
    return


@app.cell
def _(fit_spectrum_name, log_switch, result):
    fit_plot = mo.ui.plotly(figures.fit_figure(result.energies, result.data, result.components,
                                               log=log_switch.value,
                                               title=f"Fit of the {fit_spectrum_name}: {result.status}"))
    mo.vstack([log_switch, fit_plot])
    return


@app.cell
def _(fit_start, fixed_switch, result):
    _formats = optimizing.TABLE_FORMATS
    _params = mo.ui.table(optimizing.parameter_rows(result, fit_start.values or None, fixed=fixed_switch.value),
                          selection=None, pagination=False, format_mapping=_formats, show_column_summaries=False,
                          label="Parameters (stderr from the inverse Fisher information)")
    _counts = mo.ui.table(optimizing.count_rows(result), selection=None, pagination=False, format_mapping=_formats,
                          show_column_summaries=False, label="Counts in the fit window")
    _stages = mo.ui.table(optimizing.stage_rows(result), selection=None, pagination=False, format_mapping=_formats,
                          show_column_summaries=False, label="Stages")
    mo.vstack([fixed_switch, _params, mo.hstack([_counts, _stages], widths=[1, 1], align="start", gap=1.5)])
    return


@app.cell
def _(scan):
    out_box = mo.ui.text(value=optimizing.default_output_path(scan), label="write to", full_width=True)
    overwrite_box = mo.ui.checkbox(value=False, label="overwrite an existing file")
    write_button = mo.ui.run_button(label="Write", tooltip="write the fitted override file to this path")
    return out_box, overwrite_box, write_button


@app.cell
def _(fit_start, out_box, overwrite_box, result, write_button):
    override_text = result.to_override(fit_start.override).to_text()
    _download = mo.download(data=override_text.encode("utf-8"), filename="maps_fit_parameters_override.txt",
                            mimetype="text/plain", label="Download the override file")
    mo.vstack([mo.md("## New override file"),
               mo.md("The fitted values in the starting override file (every other line kept), or a new file "
                     "when starting from the defaults."),
               mo.hstack([_download, write_button, overwrite_box], justify="start", gap=1.5), out_box,
               mo.accordion({"Show the file": mo.plain_text(override_text)})])
    return (override_text,)


@app.cell
def _(write_button):
    write_now = write_button.value
    return (write_now,)


@app.cell
def _(out_box, override_text, overwrite_box, write_now):
    mo.stop(not write_now)
    try:
        written = session.write_override_file(override_text, out_box.value, overwrite=overwrite_box.value)
        _write_error = None
    except MapstorchError as exc:
        written, _write_error = None, str(exc)
    mo.stop(_write_error is not None, mo.callout(mo.md(f"**Not written.** {_write_error}"), kind="danger"))
    mo.callout(mo.md(f"Wrote `{written}`"), kind="success")
    return (written,)


if __name__ == "__main__":
    app.run()
