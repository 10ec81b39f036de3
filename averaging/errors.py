"""Errors of the averaging layer."""

__all__ = ["AveragingError", "MatchmakingError"]


class AveragingError(Exception):
    """An averaging round failed; the message says why. The caller's tensors were left unchanged."""


class MatchmakingError(AveragingError):
    """No group could be formed in time (e.g. too few peers under the same prefix)."""
