"""Singular values and spectral-norm bounds of convolutional layers.

- Exact: :func:`conv_singular_values` and :func:`circular_spectral_norm` (circular padding, FFT + batched SVD,
  any stride), :func:`conv_spectral_norm` (circular exactly; zero padding by power iteration).
- Upper bounds: :func:`tensor_norm_bound` (√(hw)·‖K‖_σ, independent of the input size; Grishina, Gorbunov &
  Rakhuba, ECCV 2024), :func:`fantastic_four_bound` (Singla & Feizi 2021), :func:`gram_iteration_bound`
  (Delattre et al. 2023, circular).
- Control: :func:`clip_singular_values` (Senderovich et al. 2022), :class:`ConvNormRegularizer` (a sum of
  bounds over a model's convs, warm-started), :func:`conv_spectral_normalization` (power-iteration
  normalization of a conv's weight).
"""

from ._kernel import IterationState, polyphase_kernel
from .bounds import fantastic_four_bound, tensor_norm_bound
from .circular import circular_spectral_norm, clip_singular_values, conv_singular_values, gram_iteration_bound
from .power import conv_spectral_norm
from .regularize import ConvNormRegularizer, conv_spectral_normalization

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
    "polyphase_kernel",
    "tensor_norm_bound",
]
