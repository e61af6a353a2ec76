"""Fitting spectra: objectives, solvers, the starting guess and ``fit_spectrum``."""

from mapstorch.fit.result import FitResult, StageReport
from mapstorch.fit.spectrum import OPTIMIZERS, fit_spectrum

__all__ = ["fit_spectrum", "FitResult", "StageReport", "OPTIMIZERS"]
