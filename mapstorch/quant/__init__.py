"""Quantification: areal densities (ug/cm2) from a measured thin-film standard.

* :mod:`standards` -- ``maps_standardinfo.txt`` and our JSON/YAML form;
* :mod:`measure` -- the standard's integrated spectrum fitted as the maps, its normalisers;
* :mod:`physics` -- the calibration curve's physics per element and shell (xraylib or XRF-Maps' tables);
* :mod:`calibrate` -- the fitted curve per normaliser with its uncertainty, quantified maps;
* :mod:`apply` -- a maps file quantified and written (``mapstorch quantify``).
"""

from mapstorch.quant.apply import QuantResult, quantify_file
from mapstorch.quant.calibrate import Calibration, calibrate, quantify
from mapstorch.quant.measure import measure_standard
from mapstorch.quant.physics import Geometry, XraylibTables, XrfMapsTables
from mapstorch.quant.standards import Standard, read_standards

__all__ = ["quantify_file", "QuantResult", "Calibration", "calibrate", "quantify", "measure_standard", "Geometry",
           "XraylibTables", "XrfMapsTables", "Standard", "read_standards"]
