"""SWARM pipelines (algorithms.md section 1): a model split into stages, each served by a swarm of
interchangeable peers; trainers drive microbatches through them by stochastic wiring.

Data plane: :mod:`.registry` (stage announcements in the DHT), :mod:`.protocol` (``pipe.*`` wire
messages), :mod:`.wiring` (throughput EMA and the virtual-time balancer), :mod:`.server` (a stage
server: forward, stateless backward), :mod:`.client` (a trainer's pipeline client).
"""

from .client import PipelineClient, PipelineError
from .registry import MAX_STAGES, StageRecord, announce, fetch_stages, stage_key, stage_schema
from .server import StageServer
from .wiring import NoServersError, PerformanceEMA, StageBalancer

__all__ = ["MAX_STAGES", "StageRecord", "announce", "fetch_stages", "stage_key", "stage_schema",
           "PipelineClient", "PipelineError", "StageServer", "PerformanceEMA", "StageBalancer", "NoServersError"]
