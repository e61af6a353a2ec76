"""Reading and writing the files beamlines use.

* :mod:`mapstorch.io.dataset` - the :class:`Dataset` every reader returns;
* :mod:`mapstorch.io.override` - ``maps_fit_parameters_override.txt``.
"""

from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.override import OverrideFile, read_override

__all__ = ["DataFileError", "Dataset", "OverrideFile", "read_override"]
