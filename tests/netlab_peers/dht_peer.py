"""One process of a lab DHT: ``--nodes`` DHTNodes on ``--host`` sharing one event loop, timing stores and gets.

    python tests/netlab_peers/dht_peer.py --host IP --index P --processes N --dir DIR [--nodes 4] [--keys 8]
        [INITIAL_PEER ...]

Node 0 of process 0 starts the DHT (no initial peers); the other nodes join through the initial peers
and their process's node 0. Prints ``ADDR /ip4/...`` (its node 0) once every node joined, then runs
two phases, each when the driver creates its file in ``DIR`` (``store``, then ``get``):

* store: every node stores ``--keys`` keys ``k{P}.{node}.{i}`` (value: the key's name), one at a
  time; prints ``STORED {"ok": [...], "lat": [...]}`` (seconds per store);
* get: every node reads ``--keys`` keys stored by nodes of the *other* processes (key ``i`` of node
  ``n`` of process ``(P + 1 + i) mod N``), one at a time, so that the node's ``last_lookup`` is this
  get's: prints ``GOT {"lat": [s], "hops": [LookupResult.rounds, 0 when answered locally], "local":
  [the issuer held a replica], "ok": [the right value came back]}``.

Exits when the driver kills it (the lab does) or after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dht import DHTNode, get_dht_time
from dht.node import _pack
from dht.routing import DHTID


def key_name(process: int, node: int, i: int) -> str:
    return f"k{process}.{node}.{i}"


async def _wait_file(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    nodes: list[DHTNode] = []
    initial = list(args.initial_peers)
    try:
        for n in range(args.nodes):
            nodes.append(await DHTNode.create(initial, host=args.host))
            if n == 0:
                initial.append(str(nodes[0].p2p.get_visible_addresses()[0]))
        print("ADDR", nodes[0].p2p.get_visible_addresses()[0], flush=True)

        await _wait_file(directory / "store")
        ok, lat = [], []
        for n, node in enumerate(nodes):
            for i in range(args.keys):
                name = key_name(args.index, n, i)
                started = time.perf_counter()
                try:
                    stored = bool(await node.store(name, name, get_dht_time() + 600))
                except Exception as e:  # noqa: BLE001 - a failed store is a result
                    print(f"store {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                    stored = False
                ok.append(stored)
                lat.append(time.perf_counter() - started)
        print("STORED", json.dumps({"ok": ok, "lat": lat}), flush=True)

        await _wait_file(directory / "get")
        result: dict[str, list] = {"lat": [], "hops": [], "local": [], "ok": []}

        async def reads(n: int, node: DHTNode) -> list[tuple]:
            out = []
            for i in range(args.keys):
                owner = (args.index + 1 + i) % args.processes
                if owner == args.index:
                    owner = (owner + 1) % args.processes
                name = key_name(owner, n, i)
                local = node.storage.get(DHTID.of_key(_pack(name)), get_dht_time()) is not None
                node.last_lookup = None
                started = time.perf_counter()
                try:
                    found = await node.get(name)
                except Exception as e:  # noqa: BLE001
                    print(f"get {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                    found = None
                elapsed = time.perf_counter() - started
                hops = node.last_lookup.rounds if node.last_lookup is not None else 0
                out.append((elapsed, hops, local, found is not None and found.value == name))
            return out

        for rows in await asyncio.gather(*(reads(n, node) for n, node in enumerate(nodes))):
            for elapsed, hops, local, good in rows:
                result["lat"].append(elapsed)
                result["hops"].append(hops)
                result["local"].append(local)
                result["ok"].append(good)
        print("GOT", json.dumps(result), flush=True)
        await asyncio.sleep(args.lifetime)
    finally:
        await asyncio.wait_for(asyncio.gather(*(n.shutdown() for n in nodes), return_exceptions=True), 10)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("initial_peers", nargs="*")
    p.add_argument("--host", required=True)
    p.add_argument("--index", type=int, required=True, help="this process's index P")
    p.add_argument("--processes", type=int, required=True, help="processes in the DHT (N)")
    p.add_argument("--dir", required=True, help="where the driver creates the phase files")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--keys", type=int, default=8, help="keys stored and read per node")
    p.add_argument("--lifetime", type=float, default=900.0)
    arguments = p.parse_args()
    timer = threading.Timer(arguments.lifetime + 120, os._exit, (3,))
    timer.daemon = True
    timer.start()
    asyncio.run(main(arguments))
