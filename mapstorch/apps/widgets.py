"""Widgets every app shares: choosing a file and opening it with a message instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mapstorch.errors import MapstorchError

__all__ = ["file_controls", "chosen_path", "open_or_stop"]

T = TypeVar("T")


def file_controls(start: str, placeholder: str = "a scan: XRF-Maps .h5, .mda, .mca, .npy ..."):
    """``(path_box, browser, view)``: a path box holding ``start`` and a file browser beside it
    (in a folded accordion), and the view that shows both."""
    import marimo as mo

    path_box = mo.ui.text(value=start, label="File", full_width=True, placeholder=placeholder)
    browser = mo.ui.file_browser(initial_path=str(Path(start).parent) if start else str(Path.cwd()),
                                 multiple=False, label="or pick one")
    return path_box, browser, mo.vstack([path_box, mo.accordion({"Browse files": browser})])


def chosen_path(browser, path_box) -> str:
    """The file picked in the browser, else the one typed in the path box."""
    return str(browser.path(0)) if browser.value else path_box.value.strip()


def open_or_stop(opener: Callable[[str], T], path: str, what: str = "a scan") -> T:
    """``opener(path)`` with a spinner; stops the cell with a message when no path is given or
    the file cannot be opened (the message says why)."""
    import marimo as mo

    mo.stop(not path, mo.callout(mo.md(f"Type the path of {what} above (or browse for one)."), kind="info"))
    error = None
    try:
        with mo.status.spinner(title="Opening the file", subtitle=path):
            return opener(path)
    except MapstorchError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- shown in the page, never a traceback
        error = f"{type(exc).__name__}: {exc}"
    mo.stop(True, mo.callout(mo.md(f"**Cannot open this file.** {error}"), kind="danger"))
    raise AssertionError("unreachable")  # pragma: no cover - mo.stop raises
