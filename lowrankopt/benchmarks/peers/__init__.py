"""Peer baselines (other libraries) for the benchmarks."""


class PeerUnavailable(ImportError):
    """A peer library needed for a baseline is not installed; the message says what to install."""
