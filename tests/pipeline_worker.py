"""A process serving one pipeline stage over TCP on 127.0.0.1 (tests/test_pipeline_net.py).

    python tests/pipeline_worker.py --run RUN --stage K [--seed S] [--delay SECONDS]
        [--delay-on both|FWD|BWD] [--codec none] [--lifetime SECONDS] INITIAL_PEER_ADDRESS ...

Joins the DHT through the initial peers, builds stage ``K`` of :func:`build_stages` (``--seed``) and
serves it with :class:`swarm.pipeline.StageServer`. Prints ``READY <peer id>`` once serving; then
``FWD`` when a forward starts computing and ``BWD`` when a backward's re-materialised forward does,
each followed by ``--delay`` seconds of sleep in the compute thread (after both, or only after the
one ``--delay-on`` names), so a test can kill the process mid-forward or mid-backward. It runs until
killed (by PID, by the test), or ``--lifetime`` seconds (300) at most.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from dht.node import DHTNode
from swarm.pipeline import StageServer

WIDTH = 16


def build_stages(seed: int = 0, width: int = WIDTH) -> list[torch.nn.Module]:
    """Three stages of a small MLP classifier (8 features -> 3 classes), seeded."""
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh()),
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()),
            torch.nn.Linear(width, 3)]


class Marked(torch.nn.Module):
    """``module`` that prints FWD / BWD (autograd on: a backward's re-materialisation) and sleeps."""

    def __init__(self, module: torch.nn.Module, delay: float, delay_on: str = "both"):
        super().__init__()
        self.inner, self.delay, self.delay_on = module, delay, delay_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark = "BWD" if torch.is_grad_enabled() else "FWD"
        print(mark, flush=True)
        if self.delay and self.delay_on in ("both", mark):
            time.sleep(self.delay)
        return self.inner(x)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--delay-on", choices=["both", "FWD", "BWD"], default="both")
    parser.add_argument("--codec", default="none")
    parser.add_argument("--lifetime", type=float, default=300.0)
    parser.add_argument("initial_peers", nargs="*")
    args = parser.parse_args()
    node = await DHTNode.create(args.initial_peers, host="127.0.0.1")
    module = Marked(build_stages(args.seed)[args.stage], args.delay, args.delay_on)
    server = StageServer(node, args.run, args.stage, module, codec=args.codec, announce_period=1.0)
    await server.start()
    print(f"READY {node.peer_id.to_base58()}", flush=True)
    await asyncio.sleep(args.lifetime)  # (a test that died without killing it)
    await server.stop(drain_timeout=1.0)
    await node.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
