"""Orthogonal parametrizations and adapters: Householder maps onto Stiefel manifolds (:mod:`.householder`),
matrices with orthonormal columns as tensor trains of such cores (:mod:`.orthonormal_tt`), Group-and-Shuffle matrices
and GS orthogonal matrices (:mod:`.gs`), skew-orthogonal and GS orthogonal convolutions for
1-Lipschitz networks (:mod:`.gs_conv`), and GSOFT, orthogonal fine-tuning adapters in PEFT's style (:mod:`.gsoft`)."""

from .gs import (
    GSMatrix,
    GSOrthogonal,
    block_shuffle_index,
    blockdiag_matmul,
    gs_matmul,
    gs_project,
    shuffle_index,
)
from .gs_conv import (
    GSOrthogonalConv2d,
    LipConvNet,
    MaxMin,
    MaxMinPermuted,
    SkewOrthogonalConv2d,
    certified_accuracy,
    certified_radius,
    channel_shuffle,
)
from .gsoft import (
    GSOFTConfig,
    GSOFTLinear,
    convert_to_gsoft,
    disable_adapters,
    gsoft_parameter_counts,
    gsoft_state_dict,
    load_gsoft_state_dict,
    merge_adapter,
    merge_and_unload,
    unload,
    unmerge_adapter,
)
from .householder import householder_numel, householder_orthonormal, householder_params
from .orthonormal_tt import OrthonormalTT

__all__ = [
    "GSMatrix",
    "GSOFTConfig",
    "GSOFTLinear",
    "GSOrthogonal",
    "GSOrthogonalConv2d",
    "LipConvNet",
    "MaxMin",
    "MaxMinPermuted",
    "OrthonormalTT",
    "SkewOrthogonalConv2d",
    "block_shuffle_index",
    "blockdiag_matmul",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
    "convert_to_gsoft",
    "disable_adapters",
    "gs_matmul",
    "gs_project",
    "gsoft_parameter_counts",
    "gsoft_state_dict",
    "householder_numel",
    "householder_orthonormal",
    "householder_params",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "shuffle_index",
    "unload",
    "unmerge_adapter",
]
