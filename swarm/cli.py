"""The ``swarm`` command line. ``swarm --help`` lists the subcommands; each has its own ``--help``.
Exit codes: :mod:`swarm.exitcodes` (one line on stderr says what went wrong)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, Coroutine

from .exitcodes import (
    EXIT_CHECKPOINT,
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCAL,
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_USAGE,
    startup_error,
)

__all__ = ["main", "build_parser", "parse_announce"]

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP: the terminal closed; leave cleanly as on Ctrl-C


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("swarm-training")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown (not installed)"


def parse_announce(values: list[str] | None) -> list[str] | None:
    """``--announce-addr`` values (``HOST:PORT`` or ``/ip4|ip6|dns/HOST/tcp/PORT``) as addresses for
    :meth:`dht.P2P.create` ``announce``; raises ValueError saying which one is malformed."""
    if not values:
        return None
    from dht import AddressError, PeerAddress

    result = []
    for value in values:
        try:
            if value.startswith("/"):
                address = PeerAddress.parse(value)
            else:
                host, sep, port = value.rpartition(":")
                if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise AddressError("expected HOST:PORT")
                address = PeerAddress.from_host_port(host.strip("[]"), int(port))
        except (AddressError, ValueError) as e:
            raise ValueError(f"--announce-addr {value!r}: {e} (give HOST:PORT or /ip4/HOST/tcp/PORT)") from None
        result.append(str(address.without_peer_id()))
    return result


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where the platform has it, else on the standard event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGINT, SIGTERM and SIGHUP set, on the running loop. Call it before printing the
    peer's addresses: whoever reads them may signal at once, before the slower set-up that follows."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for name in STOP_SIGNALS:
        if not hasattr(signal, name):
            continue
        try:
            loop.add_signal_handler(getattr(signal, name), stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
            pass
    return stop


async def _peer(args: argparse.Namespace) -> int:
    from dht import P2P, P2PError
    from dht.peer.nat import NatService

    from .nat_cli import nat_options

    try:
        announce = parse_announce(args.announce_addr)
        nat = nat_options(args)
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e))
    try:
        p2p = await P2P.create(host=args.host, port=args.port, identity_path=args.identity, announce=announce)
    except (P2PError, OSError, ValueError) as e:
        return _fail(*startup_error(e, args.host, args.port, args.identity))
    stop = _stop_on_signals()
    print(f"peer {p2p.peer_id} listening on:", flush=True)
    for address in p2p.get_visible_addresses():
        print(f"  {address}", flush=True)
    for address in args.initial_peers:
        try:
            peer_id = await p2p.connect(address)
            print(f"connected to {peer_id} (authenticated, encrypted)", flush=True)
        except P2PError as e:
            print(f"could not connect to initial peer {address}: {e}", file=sys.stderr, flush=True)
    await NatService(p2p, nat).start()

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
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({pinger, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if args.ping_rounds and pinger.done():
            await asyncio.sleep(args.linger)  # keep answering the others' last pings
    finally:
        pinger.cancel()
        stopper.cancel()
        await p2p.nat.close()
        await p2p.shutdown()
        print("peer stopped", flush=True)
    return EXIT_OK


async def _ping(args: argparse.Namespace) -> int:
    from dht import P2P, P2PError

    try:
        p2p = await P2P.create(host="127.0.0.1", client_mode=True)
    except (P2PError, OSError, ValueError) as e:
        return _fail(*startup_error(e))
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
    return EXIT_FAILED if failures == args.count else EXIT_OK


async def _dht(args: argparse.Namespace) -> int:
    from dht import DHTNode, P2PError

    log = logging.getLogger("swarm.dht")
    try:
        announce = parse_announce(args.announce_addr)
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e))
    from .nat_cli import nat_options

    try:
        nat = nat_options(args)
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e))
    try:
        node = await DHTNode.create(args.initial_peers, host=args.host, port=args.port,
                                    identity_path=args.identity, client_mode=args.client_mode, announce=announce,
                                    nat=nat)
    except (P2PError, ValueError, OSError) as e:
        return _fail(*startup_error(e, args.host, args.port, args.identity))
    stop = _stop_on_signals()
    mode = "client mode (not reachable by others)" if node.client_mode else "others can join with"
    print(f"DHT peer {node.peer_id} running; {mode}:", flush=True)
    for address in node.p2p.get_visible_addresses():
        print(f"  --initial-peers {address}", flush=True)
    dashboard = None
    from .dashboard.options import OFF
    if args.dashboard_port != OFF:
        from .dashboard.server import DashboardError, start_dashboard
        from .metrics import Metrics
        from .status import PeerView

        view = PeerView(role="dht", state="serving")
        try:
            dashboard = await start_dashboard(node, view, Metrics(node, view), args.dashboard_host,
                                              args.dashboard_port)
        except (DashboardError, OSError) as e:
            await node.shutdown()
            return _fail(EXIT_LOCAL, str(e))
        print(f"dashboard: {dashboard.url}", flush=True)

    async def report() -> None:
        while True:
            await asyncio.sleep(args.report_interval)
            message = (f"routing table: {len(node.routing_table)} peers, storing {len(node.storage)} entries, "
                       f"{len(node.p2p.connected_peers())} connections")
            log.info(message)
            print(message, flush=True)

    reporter = asyncio.ensure_future(report())
    try:
        await stop.wait()
    finally:
        reporter.cancel()
        if dashboard is not None:
            await dashboard.close()
        await node.shutdown()
        print("DHT peer stopped", flush=True)
    return EXIT_OK


def _identity(args: argparse.Namespace) -> int:
    from dht import Identity, IdentityError

    try:
        identity = Identity.load_or_create(args.path)
    except (IdentityError, OSError) as e:
        return _fail(*startup_error(e, identity=args.path))
    print(identity.peer_id)
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .export import export_checkpoint
    from .task import TaskLoadError, load_task

    try:
        task = load_task(args.task)
    except TaskLoadError as e:
        return _fail(EXIT_USAGE, str(e))
    try:
        path = export_checkpoint(args.checkpoint, args.out, task, args.run_id)
    except CheckpointError as e:
        return _fail(EXIT_CHECKPOINT, str(e))
    except OSError as e:
        return _fail(EXIT_LOCAL, f"cannot write {args.out}: {e.strerror or e}")
    print(f"wrote the model of task {task.name!r} to {path} (load it with model.load_state_dict(torch.load(...)))")
    return EXIT_OK


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _runs(args: argparse.Namespace) -> int:
    import json

    from dht import DHT, P2PError, get_dht_time

    from .runs import list_runs

    try:
        dht = DHT(initial_peers=args.initial_peers, host="127.0.0.1", client_mode=True)
    except (P2PError, OSError, ValueError) as e:
        return _fail(*startup_error(e))
    try:
        runs = list_runs(dht)
    except Exception as e:  # noqa: BLE001 - a lookup that timed out or failed: one line, the network code
        return _fail(EXIT_NETWORK, f"could not list the runs: {type(e).__name__}: {e}")
    finally:
        dht.shutdown()
    now = get_dht_time()
    hidden = 0
    if not args.all:
        shown = [r for r in runs if r.alive or now - (r.last_seen or r.created) <= args.hide_after]
        hidden, runs = len(runs) - len(shown), shown
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=1))
        return EXIT_OK
    if not runs:
        print("no runs announced" if not hidden else
              f"no live runs ({hidden} dead for over {args.hide_after:g} s hidden: --all shows them)")
        return EXIT_OK
    print(f"{'RUN':24} {'PEERS':>5} {'SAMPLES/S':>10} {'EPOCH':>6} {'LOSS':>8}  {'LAST SEEN':13} TASK")
    for r in runs:
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        if r.alive:
            seen = "now"
        elif r.last_seen is None:
            seen = "dead (long ago)"
        else:
            seen = "dead, " + _ago(now - r.last_seen)
        print(f"{r.run_id[:24]:24} {r.peers:>5} {r.samples_per_second:>10.1f} {r.epoch:>6} {loss:>8}  {seen:13} "
              f"{r.task}")
    if hidden:
        print(f"({hidden} run{'' if hidden == 1 else 's'} dead for over {args.hide_after:g} s hidden: "
              "--all shows them)")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import json

    from dht import DHT, P2PError

    from .status import PeerView, collect_status, format_status

    try:
        dht = DHT(initial_peers=args.initial_peers, host="127.0.0.1", client_mode=True)
    except (P2PError, OSError, ValueError) as e:
        return _fail(*startup_error(e))
    view = PeerView(role="status", run_id=args.run_id, state="serving")

    async def collect(_dht, node):
        return await collect_status(node, run_id=args.run_id, local=view, timeout=args.timeout)
    try:
        status = dht.run_coroutine(collect, return_future=True).result(args.timeout + 5)
    except Exception as e:  # noqa: BLE001 - a lookup that timed out or failed: one line, the network code
        return _fail(EXIT_NETWORK, f"could not read the swarm's status: {type(e).__name__}: {e}")
    finally:
        dht.shutdown()
    print(json.dumps(status, indent=1) if args.json else format_status(status), flush=True)
    if args.run_id is not None and status["runs"][0]["last_seen_s"] is None:
        print(f"run {args.run_id!r}: no peer of it has a progress record in the DHT", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


def add_announce_argument(p: argparse.ArgumentParser) -> None:
    """``--announce-addr``: the address others dial, for hosts behind port forwarding or NAT."""
    p.add_argument("--announce-addr", nargs="+", default=None, metavar="ADDR",
                   help="address(es) to tell other peers instead of the listening ones, as HOST:PORT or "
                        "/ip4/HOST/tcp/PORT (e.g. a public IP whose port is forwarded to --port)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Peer-to-peer training of PyTorch models.",
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"swarm {_version()}")
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
    add_announce_argument(peer)
    from .nat_cli import add_nat_arguments
    add_nat_arguments(peer)
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
    add_announce_argument(dht)
    add_nat_arguments(dht)
    dht.add_argument("--report-interval", type=float, default=30.0,
                     help="seconds between routing-table reports (default 30)")
    from .dashboard.options import add_dashboard_arguments
    add_dashboard_arguments(dht)

    join = sub.add_parser("join", help="train a task with the swarm (the peer daemon)",
                          description="Join (or create) the training run of TASK and train until stopped: "
                                      "Ctrl-C leaves the swarm cleanly. The first peer of an unknown run id creates "
                                      "the run; later peers must run the same task code.")
    from .daemon import add_join_arguments  # no torch import: that happens when the daemon runs
    add_join_arguments(join)

    runs = sub.add_parser("runs", help="list the training runs reachable from some peers",
                          description="List the runs announced in the DHT reachable from --initial-peers, with "
                                      "their peers online, samples/s, epoch (the last known one for a dead run), "
                                      "latest loss and when a peer was last seen. Runs dead for longer than "
                                      "--hide-after are hidden unless --all.")
    runs.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR",
                      help="peers in the swarm, as /ip4/HOST/tcp/PORT/p2p/PEERID")
    runs.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    runs.add_argument("--all", action="store_true", help="also list runs dead for longer than --hide-after")
    runs.add_argument("--hide-after", type=float, default=300.0, metavar="S",
                      help="hide runs whose last peer was seen more than S seconds ago (default 300)")

    status = sub.add_parser("status", help="the swarm's overview: runs, peers, progress (without training)",
                            description="Join the DHT through --initial-peers as a client (no training, not "
                                        "reachable) and print the overview the dashboard shows: the runs, the "
                                        "selected run's progress and its peers (state, reachability, samples/s, "
                                        "epoch, loss, last seen). Without --run-id: every run found. Exit codes: 0 "
                                        "shown, 1 --run-id has no peer record, 4 the swarm is unreachable.")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR",
                        help="peers in the swarm, as /ip4/HOST/tcp/PORT/p2p/PEERID")
    status.add_argument("--run-id", default=None, help="one run (default: the whole swarm)")
    status.add_argument("--json", action="store_true",
                        help="print the JSON overview (schema version 1, as the dashboard's /api/status)")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds for the DHT lookups (default 10)")

    demo = sub.add_parser("demo", help="train a model with a local swarm on loopback and plot it",
                          description="Start a bootstrap peer and N training peers as separate processes on "
                                      "127.0.0.1, train the task to its target, print a summary and write a PNG of "
                                      "the loss curves. Needs the demo extras: pip install 'swarm-training[demo]'. "
                                      "Exit code 0 only if the target was reached (1: not reached, 2: bad arguments "
                                      "or missing extras, 130: interrupted).")
    demo.add_argument("--peers", type=int, default=4, help="training peers (default 4)")
    demo.add_argument("--task", default=None,
                      help="task reference (default: swarm.examples.digits:task, shipped with the package)")
    demo.add_argument("--out", default="demo-output", help="directory for the plot and logs (default demo-output)")
    demo.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long (default 300)")

    export = sub.add_parser("export", help="write a checkpoint's model as a plain PyTorch state_dict",
                            description="Write the parameters of CHECKPOINT (a --checkpoint-dir file, or the "
                                        "directory: its newest checkpoint) as a state_dict of TASK's model with "
                                        "torch.save, so that model.load_state_dict(torch.load(OUT)) loads it without "
                                        "swarm. Exit codes: 2 the task does not load, 5 the checkpoint is unusable "
                                        "or does not fit the model, 6 OUT cannot be written.")
    export.add_argument("checkpoint", help="checkpoint file (RUN-epochNNNNNNNN.swst) or checkpoint directory")
    export.add_argument("out", help="output file, e.g. model.pt")
    export.add_argument("--task", required=True,
                        help="the task whose model it is: file.py, file.py:ATTR or package.module:ATTR")
    export.add_argument("--run-id", default=None, help="with a directory of several runs: which run")

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
        elif args.command == "status":
            code = _status(args)
        elif args.command == "demo":
            from .demo import run_demo
            code = run_demo(args)
        elif args.command == "export":
            code = _export(args)
        else:
            code = _identity(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)
