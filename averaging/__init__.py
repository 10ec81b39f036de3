"""Averaging layer: DHT matchmaking, butterfly all-reduce with exact recovery, gossip, compression."""

from .averager import Averager, StepResult
from .errors import AveragingError, MatchmakingError
from .gossip import Gossip

__all__ = ["Averager", "StepResult", "Gossip", "AveragingError", "MatchmakingError"]
