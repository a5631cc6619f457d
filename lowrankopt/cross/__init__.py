"""Cross approximation: maxvol row selection, TT-cross of black-box functions and of arrays on disk, and the
differentiable cross (C-PIC)."""

from .maxvol import maxvol, rect_maxvol
from .sources import ArraySource, Quantization
from .tt_cross import CrossInfo, cross_forward, tt_cross

__all__ = ["ArraySource", "CrossInfo", "Quantization", "cross_forward", "maxvol", "rect_maxvol", "tt_cross"]
