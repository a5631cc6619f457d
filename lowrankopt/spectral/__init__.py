"""Singular values and spectral-norm bounds of convolutional layers.

- Exact: :func:`conv_singular_values` and :func:`circular_spectral_norm` (circular padding, FFT + batched SVD,
  any stride), :func:`conv_spectral_norm` (circular exactly; zero padding: a lower estimate by power iteration).
- Guaranteed upper bounds, independent of the input size: :func:`symbol_norm_bound` (within a chosen
  tolerance of ``sup_ω ‖K̂(ω)‖₂``, by a certified frequency search), :func:`tensor_norm_bound` (√(hw)·the
  smallest norm of K's matricizations ≥ √(hw)·‖K‖_σ, Grishina, Gorbunov & Rakhuba, ECCV 2024),
  :func:`fantastic_four_bound` (Singla & Feizi 2021), :func:`lipgrid_bound` (Araujo et al. 2021, a frequency
  grid with a certified factor), :func:`zero_padding_gram_bound` (Delattre et al. 2024, Gram iteration on the
  zero-padded conv's kernel); for circular padding at size n, :func:`gram_iteration_bound` (Delattre et al. 2023).
- Estimate: :func:`tensor_norm_estimate` (√(hw)·‖K‖_σ by HOPM: a lower estimate of the bound, for penalties).
- Control: :func:`clip_singular_values` (Senderovich et al. 2022), :class:`ConvNormRegularizer` (a sum of
  bounds or estimates over a model's convs, warm-started), :func:`conv_spectral_normalization` (power-iteration
  or HOPM normalization of a conv's weight).
"""

from ._kernel import IterationState, polyphase_kernel
from .bounds import fantastic_four_bound, tensor_norm_bound, tensor_norm_estimate
from .circular import circular_spectral_norm, clip_singular_values, conv_singular_values, gram_iteration_bound
from .lipgrid import lipgrid_bound, lipgrid_factor
from .power import conv_spectral_norm
from .regularize import ConvNormRegularizer, conv_spectral_normalization
from .symbol import symbol_norm_bound
from .toeplitz import zero_padding_gram_bound

__all__ = [
    "ConvNormRegularizer",
    "IterationState",
    "circular_spectral_norm",
    "clip_singular_values",
    "conv_singular_values",
    "conv_spectral_norm",
    "conv_spectral_normalization",
    "fantastic_four_bound",
    "gram_iteration_bound",
    "lipgrid_bound",
    "lipgrid_factor",
    "polyphase_kernel",
    "symbol_norm_bound",
    "tensor_norm_bound",
    "tensor_norm_estimate",
    "zero_padding_gram_bound",
]
