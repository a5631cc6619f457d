"""Structured covariance estimation: Kronecker-sum covariance (PRLS, truncation, flip-flop MLE), matrix-free."""

from .kronecker import KroneckerCovariance
from .rearrange import rearrange, rearrange_inverse

__all__ = ["KroneckerCovariance", "rearrange", "rearrange_inverse"]
