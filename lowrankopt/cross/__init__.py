"""Cross approximation: maxvol row selection (TT-cross and differentiable cross build on it)."""

from .maxvol import maxvol, rect_maxvol

__all__ = ["maxvol", "rect_maxvol"]
