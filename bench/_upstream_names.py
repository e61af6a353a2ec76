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
