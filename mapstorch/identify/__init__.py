"""Deciding which elements are present: candidate lists, likelihood-ratio selection, evidence."""

from mapstorch.identify.candidates import RARE_ELEMENTS, default_candidates, pileup_candidates
from mapstorch.identify.decide import DECISIONS, ElementGuess, Evidence, guess_elements

__all__ = ["guess_elements", "ElementGuess", "Evidence", "DECISIONS", "default_candidates", "pileup_candidates",
           "RARE_ELEMENTS"]
