"""Reading and writing the files beamlines use.

* :mod:`mapstorch.io.dataset` - the :class:`Dataset` every reader returns;
* :mod:`mapstorch.io.open` - :func:`open_dataset`, the reader chosen by content;
* :mod:`mapstorch.io.hdf5` - XRF-Maps HDF5 (v10, v9), raw fly scans, and the v10 writer;
* :mod:`mapstorch.io.mda`, :mod:`mapstorch.io.mca`, :mod:`mapstorch.io.arrays` - EPICS MDA,
  GSE MCA, NumPy and text;
* :mod:`mapstorch.io.override` / :mod:`mapstorch.io.scalers` - ``maps_fit_parameters_override.txt``.

None of these import PyTorch.
"""

from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.hdf5 import read_xrfmaps_h5, read_xrfmaps_h5_detectors, read_xrfmaps_results, write_xrfmaps_h5
from mapstorch.io.open import FORMATS, detect_format, open_dataset, override_beside
from mapstorch.io.override import OverrideFile, find_override, read_override

__all__ = [
    "FORMATS",
    "DataFileError",
    "Dataset",
    "OverrideFile",
    "detect_format",
    "find_override",
    "open_dataset",
    "override_beside",
    "read_override",
    "read_xrfmaps_h5",
    "read_xrfmaps_h5_detectors",
    "read_xrfmaps_results",
    "write_xrfmaps_h5",
]
