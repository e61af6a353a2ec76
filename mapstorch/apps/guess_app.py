import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="mapstorch · guess")

with app.setup:
    from pathlib import Path

    import marimo as mo

    from mapstorch.apps import figures, guessing, session, widgets
    from mapstorch.errors import MapstorchError


@app.cell
def _():
    mo.md(r"""
    # Which elements are present?
    """)
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
    _facts = dict(scan.facts())
    _keys = ("pixels", "detectors", "energy calibration", "override file", "elements to fit")
    _notes = mo.callout(mo.md("\n".join(f"- {n}" for n in scan.notes)), kind="warn") if scan.notes else mo.md("")
    mo.vstack([
        mo.md(" · ".join(f"**{k}** {_facts[k]}" for k in _keys)),
        _notes,
        mo.ui.plotly(figures.spectrum_figure(scan.energy, scan.spectrum, log=True,
                                             title="Integrated spectrum" + (" (sum of detectors)"
                                                                            if scan.detectors > 1 else ""))),
    ])
    return


@app.cell
def _(scan):
    energy_start, energy_source = guessing.starting_energy(scan)
    energy_box = mo.ui.number(start=0.1, stop=200.0, step=0.001, value=energy_start or 10.0,
                              label=f"Incident energy (keV), {energy_source}")
    mode_choice = mo.ui.radio(options=[guessing.EVERY_FAMILY, guessing.MY_LIST], value=guessing.EVERY_FAMILY,
                              label="Candidates", inline=True)
    list_box = mo.ui.text(value=", ".join(scan.elements), label="my list", full_width=True,
                          placeholder="Fe, Ca, Pb_L ...")
    significance_box = mo.ui.number(start=1.0, stop=100.0, step=0.5, value=5.0, label="significance (sigma)")
    pileup_switch = mo.ui.switch(value=True, label="test pile-ups")
    run_button = mo.ui.run_button(label="Guess the elements", kind="success")
    _unknown = (mo.callout(mo.md("No incident energy in the files and no elastic peak found: type it."),
                           kind="warn") if energy_start is None else mo.md(""))
    mo.vstack([
        mo.md("## Guess"),
        _unknown,
        mo.hstack([energy_box, significance_box, pileup_switch], justify="start", gap=2),
        mode_choice,
        list_box,
    ])
    return energy_box, list_box, mode_choice, pileup_switch, run_button, significance_box


@app.cell
def _(energy_box, list_box, mode_choice, run_button, scan):
    try:
        candidates = guessing.candidate_names(mode_choice.value, list_box.value, energy_box.value, scan)
        if candidates is None:
            _what = (f"{guessing.default_family_count(energy_box.value, scan)} families the incident energy "
                     "excites inside the fit window (rare elements need 7 sigma)")
        else:
            _what = f"{len(candidates)} families: {', '.join(candidates)}"
        candidates_error = None
    except MapstorchError as exc:
        candidates, candidates_error, _what = None, str(exc), ""
    mo.vstack([
        mo.callout(mo.md(f"**Check the candidates.** {candidates_error}"), kind="danger") if candidates_error
        else mo.md(f"Testing {_what}."),
        run_button,
    ])
    return candidates, candidates_error


@app.cell
def _(run_button):
    run_now = run_button.value
    return (run_now,)


@app.cell
def _(candidates, candidates_error, energy_box, pileup_switch, run_now, scan, significance_box):
    mo.stop(candidates_error is not None)
    mo.stop(not run_now, mo.callout(mo.md("Press **Guess the elements** to run the guess."), kind="info"))
    _progress = None
    try:
        with mo.status.progress_bar(total=len(guessing.STEPS) - 1, title="Guessing the elements",
                                    subtitle="starting", remove_on_exit=True) as _bar:
            _progress = guessing.GuessProgress(lambda step, total, message: _bar.update(increment=1, subtitle=message))
            result = guessing.run_guess(scan, energy_box.value, candidates, significance_box.value,
                                        pileup_switch.value, progress=_progress)
        guess_error = None
    except (MapstorchError, RuntimeError, ValueError) as exc:
        result, guess_error = None, f"{exc}"
    _where = f" (during: {_progress.messages[-1]})" if _progress is not None and _progress.messages else ""
    mo.stop(guess_error is not None, mo.callout(mo.md(f"**The guess failed{_where}.** {guess_error}"),
                                                kind="danger"))
    return (result,)


@app.cell
def _(result):
    _uncertain = [e.name for e in result.candidates if e.decision == "uncertain"]
    _absent = sum(e.decision == "absent" for e in result.candidates)
    _stats = mo.hstack([
        mo.stat(len(result.present), label="present", bordered=True),
        mo.stat(len(_uncertain), label="uncertain", bordered=True),
        mo.stat(_absent, label="absent", bordered=True),
        mo.stat(f"{result.incident_energy:.4g} keV", label="incident energy", bordered=True),
        mo.stat(f"{result.seconds:.1f} s", label="time", bordered=True),
    ], justify="start", gap=1)
    _lines = [f"**Present:** {', '.join(result.present) or 'none'}"]
    if _uncertain:
        _lines.append(f"**Uncertain:** {', '.join(_uncertain)}")
    _lines.append(f"Test: significance >= {result.threshold:g} sigma (signed-root likelihood ratio), "
                  f"dispersion {result.dispersion:.3g}.")
    _warnings = guessing.result_warnings(result)
    _doubts = (mo.callout(mo.md("\n".join(f"- {n}" for n in _warnings)), kind="warn") if _warnings
               else mo.md(""))
    _notes = (mo.callout(mo.md("\n".join(f"- {n}" for n in result.notes)), kind="neutral") if result.notes
              else mo.md(""))
    mo.vstack([mo.md("## Result"), _stats, mo.md("\n\n".join(_lines)), _doubts, _notes])
    return


@app.cell
def _(result):
    _status, _hover = guessing.element_table(result)
    mo.ui.plotly(figures.periodic_table_figure(_status, _hover, title="Elements (hover for the evidence)"))
    return


@app.cell
def _(result):
    mo.vstack([mo.md("### Evidence per candidate"),
               mo.ui.table(guessing.evidence_rows(result), selection=None, page_size=20, label="")])
    return


@app.cell
def _(result):
    _fit = result.fit
    mo.ui.plotly(figures.fit_figure(_fit.energies, _fit.data, _fit.components,
                                    title=f"Fit with the chosen list (reduced chi2 {_fit.reduced_chi2:.3g}, "
                                          f"{_fit.status})"))
    return


@app.cell
def _(result, scan):
    _options, _chosen = guessing.chosen_options(result)
    chosen_box = mo.ui.multiselect(options=_options, value=_chosen, label="List to fit", full_width=True)
    out_box = mo.ui.text(value=guessing.default_output_path(scan), label="Write to", full_width=True)
    overwrite_box = mo.ui.checkbox(value=False, label="overwrite an existing file")
    accept_button = mo.ui.run_button(label="Accept the list", kind="success")
    _in_use = (f"The override file in use is `{scan.override_path}`; it is replaced only if you type its path "
               "and tick the box." if scan.override_path else "The scan has no override file: a new one is "
               "written from the guess's fitted parameters.")
    mo.vstack([mo.md("## Accept the list"), mo.md(_in_use), chosen_box, out_box,
               mo.hstack([overwrite_box, accept_button], justify="start", gap=2)])
    return accept_button, chosen_box, out_box, overwrite_box


@app.cell
def _(accept_button):
    accept_now = accept_button.value
    return (accept_now,)


@app.cell
def _(chosen_box, out_box, result, scan):
    try:
        accepted = guessing.accepted_override(result, scan.override, chosen_box.value)
        _error = None
    except MapstorchError as exc:
        accepted, _error = None, str(exc)
    mo.stop(_error is not None, mo.callout(mo.md(f"**Cannot build the override file.** {_error}"), kind="warn"))
    _name = Path(out_box.value.strip()).name or guessing.STANDARD_NAME
    mo.hstack([mo.download(data=accepted.to_text().encode(), filename=_name, mimetype="text/plain",
                           label="Download the override file"),
               mo.accordion({"Show the file": mo.plain_text(accepted.to_text())})], justify="start", gap=2)
    return (accepted,)


@app.cell
def _(accept_now, accepted, out_box, overwrite_box):
    mo.stop(not accept_now)
    try:
        written = session.write_override_file(accepted, out_box.value, overwrite=overwrite_box.value)
        _error = None
    except MapstorchError as exc:
        written, _error = None, str(exc)
    mo.stop(_error is not None, mo.callout(mo.md(f"**Not written.** {_error}"), kind="danger"))
    _pileups = f"; ELEMENTS_WITH_PILEUP: {', '.join(accepted.pileups)}" if accepted.pileups else ""
    mo.callout(mo.md(f"**Wrote** `{written}`: ELEMENTS_TO_FIT: {', '.join(accepted.elements)}{_pileups}"),
               kind="success")
    return (written,)


if __name__ == "__main__":
    app.run()
