"""Layers with controlled singular values: the spectral tensor-train parameterization of linear and conv layers
(STTP, and SVDP at maximal ranks: ``W = U diag(σ) Vᵀ`` with orthonormal TT factors, :mod:`.sttp`) and TT convolutions
whose singular values are those of a small core conv (:mod:`.tt_conv`; :mod:`.sott` with a skew-orthogonal core,
1-Lipschitz). The conv spectra themselves (exact values,
bounds, clipping) are :mod:`lowrankopt.spectral`."""

from .sott import SOTTConv2d
from .sttp import (
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    convert_to_sttp,
    dopt_penalty,
)
from .tt_conv import TTConv2d, convert_to_tt_conv, tt_conv_orthogonalize_, tt_conv_penalty

__all__ = [
    "SOTTConv2d",
    "STTPConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "TTConv2d",
    "convert_to_sttp",
    "convert_to_tt_conv",
    "dopt_penalty",
    "tt_conv_orthogonalize_",
    "tt_conv_penalty",
]
