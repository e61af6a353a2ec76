"""Exceptions raised by mapstorch.

Every error that reaches a user says what is wrong, where, and how to fix it. They subclass the
matching builtin so callers can catch ``ValueError`` or ``FileNotFoundError`` as usual.
"""

from __future__ import annotations

__all__ = [
    "MapstorchError",
    "InputError",
    "ElementError",
    "ParameterError",
    "LibraryError",
    "OverrideFileError",
]


class MapstorchError(Exception):
    """Base class of every error mapstorch raises on purpose."""


class InputError(MapstorchError, ValueError):
    """An argument has the wrong shape, type or value."""


class ElementError(InputError):
    """An element or line-family name is unknown or not supported (e.g. ``"Xx"``, ``"Fe_Q"``)."""


class ParameterError(InputError):
    """A fit parameter name, value or bound is invalid."""


class LibraryError(MapstorchError, ValueError):
    """A line-library source (xraylib, ``xrf_library.csv``, ``henke.xdr``) is missing or malformed."""


class OverrideFileError(MapstorchError, ValueError):
    """A ``maps_fit_parameters_override.txt`` file could not be read; the message names the line."""
