"""Layers whose weights live on low-rank manifolds: low-rank and TT linear layers (trained with geoopt's
Riemannian optimizers), the spectral tensor-train parameterization (STTP) of linear and conv layers,
Group-and-Shuffle (GS) matrices, TT convolutions with exactly controllable singular values, and T-Basis (all
weights of a network as tensor rings over one shared basis)."""

from .gs import GSMatrix, GSOrthogonal, gs_matmul, gs_project
from .gs_conv import (
    GSOrthogonalConv2d,
    LipConvNet,
    MaxMinPermuted,
    SkewOrthogonalConv2d,
    certified_accuracy,
    certified_radius,
    channel_shuffle,
)
from .gsoft import (
    GSOFTConfig,
    GSOFTLinear,
    disable_adapters,
    gsoft_state_dict,
    inject_gsoft,
    load_gsoft_state_dict,
    merge_adapter,
    merge_and_unload,
    unmerge_adapter,
)
from .lowrank import LowRankLinear, TTLinear
from .sttp import (
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    count_parameters,
    dopt_penalty,
    sttp_convert,
    sttp_to_dense,
)
from .tbasis import (
    TBasis,
    TBasisConv2d,
    TBasisFactory,
    TBasisLinear,
    Tensorization,
    tbasis_convert,
    tbasis_parameter_count,
    tbasis_penalty,
)
from .tt_conv import TTConv2d, tt_conv_convert, tt_conv_orthogonalize_, tt_conv_penalty

__all__ = [
    "TBasis",
    "TBasisConv2d",
    "TBasisFactory",
    "TBasisLinear",
    "Tensorization",
    "tbasis_convert",
    "tbasis_parameter_count",
    "tbasis_penalty",
    "GSMatrix",
    "GSOrthogonalConv2d",
    "GSOFTConfig",
    "GSOFTLinear",
    "GSOrthogonal",
    "LipConvNet",
    "LowRankLinear",
    "MaxMinPermuted",
    "STTPConv2d",
    "SkewOrthogonalConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "TTConv2d",
    "TTLinear",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
    "count_parameters",
    "disable_adapters",
    "dopt_penalty",
    "gs_matmul",
    "gs_project",
    "gsoft_state_dict",
    "inject_gsoft",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "sttp_convert",
    "sttp_to_dense",
    "tt_conv_convert",
    "tt_conv_orthogonalize_",
    "tt_conv_penalty",
    "unmerge_adapter",
]
