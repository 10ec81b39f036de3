"""A process hosting several DHT peers, driven by JSON commands on stdin (for multi-process DHT tests).

    python tests/dht_worker.py --peers 4 [--rpc-timeout 5] [--lifetime 900] [INITIAL_PEER_ADDRESS ...]

Starts ``--peers`` DHTNodes on 127.0.0.1 in one event loop. The first bootstraps from the addresses
on the command line (none: it starts a new DHT); the others bootstrap from those and from the first.
Prints ``PEER <index> <address>`` for each peer, then ``READY``; from then on every stdout line is
the JSON answer to one JSON command read from stdin. Commands run concurrently; an answer carries the
command's ``id`` (if any) so answers can be matched to commands:

    {"op": "store", "peer": i, "key": k, "value": v, "ttl": s | "expiration_time": t, "subkey": sk?}
        -> {"ok": bool}
    {"op": "store_many", "peer": i, "items": [{"key", "value", "ttl" | "expiration_time", "subkey"?}, ...]}
        -> {"ok": [bool, ...]}
    {"op": "get", "peer": i, "key": k, "latest": bool?}            -> {"result": RESULT}
    {"op": "get_many", "peer": i, "keys": [k, ...], "latest": bool?} -> {"results": [RESULT, ...]}
    {"op": "routing", "peer": i}                                   -> {"size": routing table size}
    {"op": "time"}                                                 -> {"time": DHT time}
    {"op": "quit"}                                                 -> {"ok": true}, then the process exits

RESULT is null (not found) or {"value": v, "expiration_time": t}; for a dictionary key ``"subkeys":
true`` and ``value`` maps str(subkey) to {"value": v, "expiration_time": t}. A failed command answers
{"error": "..."}. End of stdin (the test process died) or ``--lifetime`` seconds make the process exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dht import DHTNode, ValueWithExpiration, get_dht_time  # noqa: E402


def _result(found: ValueWithExpiration | None) -> dict | None:
    if found is None:
        return None
    value = found.value
    if isinstance(value, dict) and value and all(isinstance(v, ValueWithExpiration) for v in value.values()):
        return {"subkeys": True, "expiration_time": found.expiration_time,
                "value": {str(s): {"value": v.value, "expiration_time": v.expiration_time} for s, v in value.items()}}
    return {"value": value, "expiration_time": found.expiration_time}


def _expiration(item: dict) -> float:
    if "expiration_time" in item:
        return float(item["expiration_time"])
    return get_dht_time() + float(item["ttl"])


class Worker:
    def __init__(self, nodes: list[DHTNode]):
        self.nodes = nodes
        self.quit = asyncio.Event()

    def node(self, command: dict) -> DHTNode:
        index = command["peer"]
        if not isinstance(index, int) or not 0 <= index < len(self.nodes):
            raise ValueError(f"no peer {index!r} here (0..{len(self.nodes) - 1})")
        return self.nodes[index]

    async def execute(self, command: dict) -> dict:
        op = command.get("op")
        if op == "store":
            ok = await self.node(command).store(command["key"], command["value"], _expiration(command),
                                                command.get("subkey"))
            return {"ok": ok}
        if op == "store_many":
            items = [(i["key"], i["value"], _expiration(i), i.get("subkey")) for i in command["items"]]
            return {"ok": await self.node(command).store_many(items)}
        if op == "get":
            return {"result": _result(await self.node(command).get(command["key"], bool(command.get("latest"))))}
        if op == "get_many":
            keys = command["keys"]
            found = await self.node(command).get_many(keys, bool(command.get("latest")))
            return {"results": [_result(found[k]) for k in keys]}
        if op == "routing":
            return {"size": len(self.node(command).routing_table)}
        if op == "time":
            return {"time": get_dht_time()}
        if op == "quit":
            self.quit.set()
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    async def serve(self, line: str) -> None:
        command_id = None
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise ValueError("a command must be a JSON object")
            command_id = command.get("id")
            answer = await self.execute(command)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- every failure is reported to the test, never fatal
            answer = {"error": f"{type(e).__name__}: {e}"}
        if command_id is not None:
            answer["id"] = command_id
        try:
            text = json.dumps(answer)
        except (TypeError, ValueError) as e:
            text = json.dumps({"error": f"unserializable answer: {e}", "id": command_id})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rpc-timeout", type=float, default=5.0)
    parser.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds regardless")
    parser.add_argument("initial_peers", nargs="*")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    loop.call_later(args.lifetime, os._exit, 3)  # last resort against a leaked process

    nodes: list[DHTNode] = []
    try:
        first = await DHTNode.create(args.initial_peers, host="127.0.0.1", rpc_timeout=args.rpc_timeout)
        nodes.append(first)
        initial = [*args.initial_peers, str(first.p2p.get_visible_addresses()[0])]
        nodes += await asyncio.gather(*(DHTNode.create(initial, host="127.0.0.1", rpc_timeout=args.rpc_timeout)
                                        for _ in range(args.peers - 1)))
        for index, node in enumerate(nodes):
            print(f"PEER {index} {node.p2p.get_visible_addresses()[0]}", flush=True)
        print("READY", flush=True)

        worker = Worker(nodes)
        tasks: set[asyncio.Task] = set()

        def on_line(line: str) -> None:
            if not line:  # end of stdin: the test process is gone
                worker.quit.set()
            elif line.strip():
                task = asyncio.ensure_future(worker.serve(line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        def read_commands() -> None:  # a daemon thread: a blocked readline() never delays the exit
            while True:
                line = sys.stdin.readline()
                try:
                    loop.call_soon_threadsafe(on_line, line)
                except RuntimeError:  # the loop is closed: we are exiting
                    return
                if not line:
                    return

        threading.Thread(target=read_commands, name="stdin-reader", daemon=True).start()
        await worker.quit.wait()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await asyncio.wait_for(asyncio.gather(*(n.shutdown() for n in nodes), return_exceptions=True), 10)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
