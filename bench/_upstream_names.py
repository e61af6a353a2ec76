"""Component names: ours (``Fe``, ``Pb_L``, ``Au_M``, ``Si_Cl``) to upstream MapsTorch's.

Imported by the scripts that run inside ``bench/.venv-upstream`` (plain Python, no dependencies).
"""


def upstream_name(name):
    """Our component name -> upstream's candidate names (K lines have no suffix there)."""
    parts = name.split("_")
    if len(parts) == 2 and parts[1].upper() == "K":
        return [parts[0]]
    if len(parts) == 2 and parts[1].upper() in ("L", "M"):
        return [f"{parts[0]}_{parts[1].upper()}"]
    if len(parts) == 2:  # K+K pile-up; upstream's name may list the pair the other way round
        return [name, f"{parts[1]}_{parts[0]}"]
    return [name]


def map_components(ours, e_consts, elem_info, pileups, warn, skip=()):
    """Our component names -> upstream's: ``(energy constants, {ours: upstream}, dropped)``.

    K+K pile-ups upstream's constants lack are built with its own ``define_constants`` (in the
    upstream environment); names upstream cannot model, or that map onto a name already taken,
    are dropped with a warning. ``skip``: names to leave out silently (the scatter peaks).
    """
    import contextlib
    import sys

    extra = [e for e in ours if "_" in e and e.split("_")[1].upper() not in ("K", "L", "M")
             and not any(n in e_consts for n in upstream_name(e))]
    if extra:
        from mapstorch.constant import define_constants  # upstream's package, in its venv

        try:
            with contextlib.redirect_stdout(sys.stderr):
                e_consts = define_constants(elem_info, list(pileups) + extra)
        except Exception as exc:  # noqa: BLE001 -- keep upstream's defaults; the pile-ups are dropped below
            warn(f"cannot build pile-ups {extra}: {exc}")
    mapping, dropped = {}, []
    for e in ours:
        if e in skip:
            continue
        known = [n for n in upstream_name(e) if n in e_consts]
        if known and known[0] not in mapping.values():
            mapping[e] = known[0]
        else:
            dropped.append(e)
            warn(f"upstream mapstorch has no component {e!r}; dropped")
    return e_consts, mapping, dropped


def fit_window(spectrum, init, warn):
    """Upstream's fit window ``(first, last)`` in channels from MIN/MAX_ENERGY_TO_FIT and the
    starting calibration, clipped to the spectrum (the whole spectrum if that leaves nothing)."""
    import numpy as np

    n_ch = spectrum.shape[0]
    off, slope = init["ENERGY_OFFSET"], init["ENERGY_SLOPE"]
    first = int(np.clip(round((init["MIN_ENERGY_TO_FIT"] - off) / slope), 0, n_ch - 1))
    last = int(np.clip(round((init["MAX_ENERGY_TO_FIT"] - off) / slope), 0, n_ch - 1))
    if last <= first:
        warn(f"empty fit window ({first}, {last}); using the whole spectrum")
        first, last = 0, n_ch - 1
    return first, last
