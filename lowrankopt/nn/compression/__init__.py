"""Network compression: T-Basis (:mod:`.tbasis`), every weight of a network as a tensor ring over one shared basis of
cores, decompressed in one batched pass per forward."""

from .tbasis import (
    TBasis,
    TBasisConv2d,
    TBasisFactory,
    TBasisLinear,
    Tensorization,
    convert_to_tbasis,
    tbasis_penalty,
)

__all__ = [
    "TBasis",
    "TBasisConv2d",
    "TBasisFactory",
    "TBasisLinear",
    "Tensorization",
    "convert_to_tbasis",
    "tbasis_penalty",
]
