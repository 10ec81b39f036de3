"""A process serving one pipeline stage over TCP on 127.0.0.1 (tests/test_pipeline_net.py).

    python tests/pipeline_worker.py --run RUN --stage K [--seed S] [--delay SECONDS] [--codec none]
        INITIAL_PEER_ADDRESS ...

Joins the DHT through the initial peers, builds stage ``K`` of :func:`build_stages` (``--seed``) and
serves it with :class:`swarm.pipeline.StageServer`. Prints ``READY <peer id>`` once serving; then
``FWD`` when a forward starts computing and ``BWD`` when a backward's re-materialised forward does,
each followed by ``--delay`` seconds of sleep in the compute thread (so a test can kill the process
mid-forward or mid-backward). Exits at the end of stdin's parent (it is killed by PID by the test).
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

    def __init__(self, module: torch.nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = module, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("BWD" if torch.is_grad_enabled() else "FWD", flush=True)
        if self.delay:
            time.sleep(self.delay)
        return self.inner(x)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--codec", default="none")
    parser.add_argument("initial_peers", nargs="*")
    args = parser.parse_args()
    node = await DHTNode.create(args.initial_peers, host="127.0.0.1")
    module = Marked(build_stages(args.seed)[args.stage], args.delay)
    server = StageServer(node, args.run, args.stage, module, codec=args.codec, announce_period=1.0)
    await server.start()
    print(f"READY {node.peer_id.to_base58()}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
