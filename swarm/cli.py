"""The ``swarm`` command line. ``swarm --help`` lists the subcommands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, Coroutine

__all__ = ["main"]


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where the platform has it, else on the standard event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
            pass
    await stop.wait()


async def _peer(args: argparse.Namespace) -> int:
    from dht import P2P, P2PError

    p2p = await P2P.create(host=args.host, port=args.port, identity_path=args.identity)
    print(f"peer {p2p.peer_id} listening on:", flush=True)
    for address in p2p.get_visible_addresses():
        print(f"  {address}", flush=True)
    for address in args.initial_peers:
        try:
            peer_id = await p2p.connect(address)
            print(f"connected to {peer_id} (authenticated, encrypted)", flush=True)
        except P2PError as e:
            print(f"could not connect to initial peer {address}: {e}", file=sys.stderr, flush=True)

    async def ping_loop() -> None:
        rounds = 0
        while args.ping_rounds == 0 or rounds < args.ping_rounds:
            await asyncio.sleep(args.ping_interval)
            rounds += 1
            for peer_id in sorted(p2p.connected_peers()):
                try:
                    rtt = await p2p.ping(peer_id, timeout=5.0)
                    print(f"ping {peer_id} ok {rtt * 1000:.2f} ms", flush=True)
                except P2PError as e:
                    print(f"ping {peer_id} failed: {e}", flush=True)

    pinger = asyncio.ensure_future(ping_loop())
    stopper = asyncio.ensure_future(_wait_for_stop_signal())
    try:
        await asyncio.wait({pinger, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if args.ping_rounds and pinger.done():
            await asyncio.sleep(args.linger)  # keep answering the others' last pings
    finally:
        pinger.cancel()
        stopper.cancel()
        await p2p.shutdown()
        print("peer stopped", flush=True)
    return 0


async def _ping(args: argparse.Namespace) -> int:
    from dht import P2P, P2PError

    p2p = await P2P.create(host="127.0.0.1", client_mode=True)
    failures = 0
    try:
        for i in range(args.count):
            try:
                rtt = await p2p.ping(args.address, timeout=args.timeout)
                print(f"ping {args.address}: {rtt * 1000:.2f} ms", flush=True)
            except P2PError as e:
                failures += 1
                print(f"ping {args.address} failed: {e}", file=sys.stderr, flush=True)
            if i + 1 < args.count:
                await asyncio.sleep(args.interval)
    finally:
        await p2p.shutdown()
    return 1 if failures == args.count else 0


async def _dht(args: argparse.Namespace) -> int:
    from dht import DHTNode, P2PError

    log = logging.getLogger("swarm.dht")
    try:
        node = await DHTNode.create(args.initial_peers, host=args.host, port=args.port,
                                    identity_path=args.identity, client_mode=args.client_mode)
    except (P2PError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    mode = "client mode (not reachable by others)" if args.client_mode else "others can join with"
    print(f"DHT peer {node.peer_id} running; {mode}:", flush=True)
    for address in node.p2p.get_visible_addresses():
        print(f"  --initial-peers {address}", flush=True)

    async def report() -> None:
        while True:
            await asyncio.sleep(args.report_interval)
            message = (f"routing table: {len(node.routing_table)} peers, storing {len(node.storage)} entries, "
                       f"{len(node.p2p.connected_peers())} connections")
            log.info(message)
            print(message, flush=True)

    reporter = asyncio.ensure_future(report())
    try:
        await _wait_for_stop_signal()
    finally:
        reporter.cancel()
        await node.shutdown()
        print("DHT peer stopped", flush=True)
    return 0


def _identity(args: argparse.Namespace) -> int:
    from dht import Identity, IdentityError

    try:
        identity = Identity.load_or_create(args.path)
    except (IdentityError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(identity.peer_id)
    return 0


def _runs(args: argparse.Namespace) -> int:
    import json

    from dht import DHT, P2PError

    from .runs import list_runs

    try:
        dht = DHT(initial_peers=args.initial_peers, host="127.0.0.1", client_mode=True)
    except (P2PError, OSError, ValueError) as e:
        print(f"error: could not reach the swarm: {e}", file=sys.stderr)
        return 4
    try:
        runs = list_runs(dht)
    finally:
        dht.shutdown()
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=1))
        return 0
    if not runs:
        print("no runs announced")
        return 0
    print(f"{'RUN':24} {'PEERS':>5} {'SAMPLES/S':>10} {'EPOCH':>6} {'LOSS':>8}  TASK")
    for r in runs:
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        print(f"{r.run_id[:24]:24} {r.peers:>5} {r.samples_per_second:>10.1f} {r.epoch:>6} {loss:>8}  {r.task}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Peer-to-peer training of PyTorch models.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    peer = sub.add_parser("peer", help="run a bare peer that answers pings and pings the peers it knows",
                          description="Run a peer on the authenticated transport: it prints the addresses "
                                      "others can use to reach it, connects to --initial-peers and pings every "
                                      "connected peer each --ping-interval seconds. Ctrl-C stops it cleanly.")
    peer.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all interfaces)")
    peer.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    peer.add_argument("--identity", default=None, metavar="PATH",
                      help="Ed25519 key file, created (mode 0600) if missing; default: an ephemeral key")
    peer.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR",
                      help="peers to connect to, as /ip4/HOST/tcp/PORT/p2p/PEERID")
    peer.add_argument("--ping-interval", type=float, default=5.0, help="seconds between ping rounds (default 5)")
    peer.add_argument("--ping-rounds", type=int, default=0, help="stop after this many rounds (default 0: run forever)")
    peer.add_argument("--linger", type=float, default=2.0, help="seconds to keep serving after the last round")

    ping = sub.add_parser("ping", help="ping a peer by its full address",
                          description="Connect to a peer, authenticate it, and measure round-trip times.")
    ping.add_argument("address", help="/ip4/HOST/tcp/PORT/p2p/PEERID")
    ping.add_argument("--count", type=int, default=3, help="number of pings (default 3)")
    ping.add_argument("--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)")

    dht = sub.add_parser("dht", help="run a bootstrap/DHT peer in the foreground",
                         description="Run a Kademlia DHT peer: prints the addresses others can use to join, "
                                     "logs the routing-table size periodically, stops cleanly on Ctrl-C. "
                                     "It does not import torch, so it stays small.")
    dht.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all interfaces)")
    dht.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    dht.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR",
                     help="peers already in the DHT, as /ip4/HOST/tcp/PORT/p2p/PEERID (none: start a new DHT)")
    dht.add_argument("--identity", default=None, metavar="PATH",
                     help="Ed25519 key file, created (mode 0600) if missing; default: an ephemeral key")
    dht.add_argument("--client-mode", action="store_true",
                     help="do not accept inbound connections (for peers behind NAT/firewalls)")
    dht.add_argument("--report-interval", type=float, default=30.0,
                     help="seconds between routing-table reports (default 30)")

    join = sub.add_parser("join", help="train a task with the swarm (the peer daemon)",
                          description="Join (or create) the training run of TASK and train until stopped: "
                                      "Ctrl-C leaves the swarm cleanly. The first peer of an unknown run id creates "
                                      "the run; later peers must run the same task code.")
    from .daemon import add_join_arguments  # no torch import: that happens when the daemon runs
    add_join_arguments(join)

    runs = sub.add_parser("runs", help="list the training runs reachable from some peers",
                          description="List the runs announced in the DHT reachable from --initial-peers, with "
                                      "their peers, samples/s, epoch and latest loss.")
    runs.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR",
                      help="peers in the swarm, as /ip4/HOST/tcp/PORT/p2p/PEERID")
    runs.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")

    demo = sub.add_parser("demo", help="train a model with a local swarm on loopback and plot it",
                          description="Start a bootstrap peer and N training peers as separate processes on "
                                      "127.0.0.1, train the task to its target, print a summary and write a PNG of "
                                      "the loss curves. Exit code 0 only if the target was reached.")
    demo.add_argument("--peers", type=int, default=4, help="training peers (default 4)")
    demo.add_argument("--task", default=None, help="task reference (default: examples/digits.py)")
    demo.add_argument("--out", default="demo-output", help="directory for the plot and logs (default demo-output)")
    demo.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long (default 300)")

    identity = sub.add_parser("identity", help="create or read an identity file and print its PeerID")
    identity.add_argument("path", help="key file (created with mode 0600 if missing)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "peer":
            code = _run(_peer(args))
        elif args.command == "ping":
            code = _run(_ping(args))
        elif args.command == "dht":
            code = _run(_dht(args))
        elif args.command == "join":
            from .daemon import run_join
            code = run_join(args)
        elif args.command == "runs":
            code = _runs(args)
        elif args.command == "demo":
            from .demo import run_demo
            code = run_demo(args)
        else:
            code = _identity(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
