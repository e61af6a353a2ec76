"""Elemental maps of every pixel: batched solvers, streaming by rows, resumable runs."""

from mapstorch.maps.average import average_maps
from mapstorch.maps.fit import METHODS, STATUS_CODES, MapResult, fit_map

__all__ = ["fit_map", "average_maps", "MapResult", "METHODS", "STATUS_CODES"]
