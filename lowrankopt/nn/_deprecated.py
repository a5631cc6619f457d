"""The names of lowrankopt 0.1 that changed, kept for one release: each call warns (``DeprecationWarning``, naming the
replacement) and does what the replacement does. Delete this module, and the shim modules of the old module paths
(``lowrankopt/nn/{lowrank,householder,gs,gs_conv,gsoft,sttp,tt_conv,tbasis}.py``), in the next release."""

from __future__ import annotations

from torch import nn

from ._common import _deprecated_alias
from .compression.tbasis import TBasis, TBasisFactory, convert_to_tbasis
from .orthogonal.gsoft import convert_to_gsoft
from .spectral.sttp import STTPConv2d, STTPLinear, convert_to_sttp
from .spectral.tt_conv import convert_to_tt_conv
from .surgery import convert_to_dense, count_parameters

__all__ = [
    "inject_gsoft",
    "sttp_convert",
    "sttp_to_dense",
    "tbasis_convert",
    "tbasis_parameter_count",
    "tt_conv_convert",
]

sttp_convert = _deprecated_alias(convert_to_sttp, "sttp_convert")
tt_conv_convert = _deprecated_alias(convert_to_tt_conv, "tt_conv_convert")
tbasis_convert = _deprecated_alias(convert_to_tbasis, "tbasis_convert")
inject_gsoft = _deprecated_alias(convert_to_gsoft, "inject_gsoft")


def _sttp_to_dense(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every STTP/SVDP layer of ``model`` by its dense ``nn.Linear`` / ``nn.Conv2d``, in place."""
    return convert_to_dense(model, (STTPLinear, STTPConv2d))


def _tbasis_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a converted model: ``total``; ``basis`` (B N R², shared); ``layers`` (Σ_ℓ m_ℓ (B + R),
    or Σ_ℓ m_ℓ (N R² + R) for plain rings); ``other`` (biases and unconverted layers); ``without_basis`` = total −
    basis."""
    total = count_parameters(model, trainable_only=False)
    without_basis = count_parameters(model, trainable_only=False, exclude_modules=lambda name, m: isinstance(m, TBasis))
    factories = [m for m in model.modules() if isinstance(m, TBasisFactory)]
    layers = sum(p.numel() for f in factories for d in (f.coefficients, f.log_adapters) for p in d.values())
    basis = total - without_basis
    return {
        "total": total,
        "basis": basis,
        "layers": layers,
        "other": total - basis - layers,
        "without_basis": without_basis,
    }


sttp_to_dense = _deprecated_alias(_sttp_to_dense, "sttp_to_dense", "convert_to_dense(model, (STTPLinear, STTPConv2d))")
tbasis_parameter_count = _deprecated_alias(
    _tbasis_parameter_count, "tbasis_parameter_count", "count_parameters (exclude_modules= for the basis)"
)
