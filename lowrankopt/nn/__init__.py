"""Layers whose weights live on low-rank manifolds: low-rank and TT linear layers (trained with geoopt's Riemannian
optimizers), the spectral tensor-train parameterization (STTP) of linear and conv layers, Group-and-Shuffle (GS)
matrices, TT convolutions with exactly controllable singular values, and T-Basis (all weights of a network as tensor
rings over one shared basis).

One sub-package per family — :mod:`.manifold` (layers and adapters on fixed-rank / TT manifolds), :mod:`.orthogonal`
(orthogonal parametrizations and adapters), :mod:`.spectral` (layers with controlled singular values),
:mod:`.compression` (T-Basis) — and every public name here. Every converter (``convert_to_sttp``,
``convert_to_tt_conv``, ``convert_to_tbasis``, ``convert_to_gsoft``, ``convert_to_riemannian_lora``) selects and
replaces modules through :mod:`lowrankopt.nn.surgery` (PEFT's ``target_modules`` / ``exclude_modules``); the adapters
(GSOFT, Riemannian LoRA) share one base class and one model-level API (:mod:`.adapters`: ``merge_adapter``, ``unload``,
``adapter_state_dict``, ...); the layers' shared private helpers are in ``nn/_common.py``."""

from ._deprecated import (  # the 0.1 names, for one release
    inject_gsoft,
    sttp_convert,
    sttp_to_dense,
    tbasis_convert,
    tbasis_parameter_count,
    tt_conv_convert,
)
from .adapters import AdapterLayer, adapter_layers, adapter_state_dict, load_adapter_state_dict
from .compression.tbasis import (
    TBasis,
    TBasisConv2d,
    TBasisFactory,
    TBasisLinear,
    Tensorization,
    convert_to_tbasis,
    tbasis_penalty,
)
from .manifold.lora import RiemannianLoRAConfig, RiemannianLoRALinear, convert_to_riemannian_lora
from .manifold.lora_init import locally_optimal_init
from .manifold.lora_peft import from_peft, save_peft, to_peft_config, to_peft_state_dict
from .manifold.lowrank import LowRankLinear, TTLinear
from .orthogonal.gs import (
    GSMatrix,
    GSOrthogonal,
    block_shuffle_index,
    blockdiag_matmul,
    gs_matmul,
    gs_project,
    shuffle_index,
)
from .orthogonal.gs_conv import (
    GSOrthogonalConv2d,
    LipConvNet,
    MaxMin,
    MaxMinPermuted,
    SkewOrthogonalConv2d,
    certified_accuracy,
    certified_radius,
    channel_shuffle,
)
from .orthogonal.gsoft import (
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
from .orthogonal.householder import householder_numel, householder_orthonormal, householder_params
from .orthogonal.orthonormal_tt import OrthonormalTT
from .spectral.sott import SOTTConv2d
from .spectral.sttp import (
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    convert_to_sttp,
    dopt_penalty,
)
from .spectral.tt_conv import TTConv2d, convert_to_tt_conv, tt_conv_orthogonalize_, tt_conv_penalty
from .surgery import (
    convert_to_dense,
    count_parameters,
    replace_modules,
    restore_modules,
    select_modules,
)

__all__ = [
    "AdapterLayer",
    "adapter_layers",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "OrthonormalTT",
    "block_shuffle_index",
    "blockdiag_matmul",
    "householder_numel",
    "householder_orthonormal",
    "householder_params",
    "shuffle_index",
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
    "RiemannianLoRAConfig",
    "RiemannianLoRALinear",
    "MaxMin",
    "MaxMinPermuted",
    "STTPConv2d",
    "SkewOrthogonalConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "SOTTConv2d",
    "TTConv2d",
    "TTLinear",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
    "convert_to_dense",
    "convert_to_gsoft",
    "convert_to_riemannian_lora",
    "convert_to_sttp",
    "convert_to_tbasis",
    "convert_to_tt_conv",
    "count_parameters",
    "disable_adapters",
    "dopt_penalty",
    "from_peft",
    "gs_matmul",
    "gs_project",
    "gsoft_parameter_counts",
    "gsoft_state_dict",
    "inject_gsoft",
    "load_gsoft_state_dict",
    "locally_optimal_init",
    "merge_adapter",
    "merge_and_unload",
    "replace_modules",
    "restore_modules",
    "save_peft",
    "select_modules",
    "sttp_convert",
    "sttp_to_dense",
    "to_peft_config",
    "to_peft_state_dict",
    "tt_conv_convert",
    "tt_conv_orthogonalize_",
    "tt_conv_penalty",
    "unload",
    "unmerge_adapter",
]
