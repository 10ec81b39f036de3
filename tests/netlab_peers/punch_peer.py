"""Repeated connection attempts between two peers behind NAT boxes, through a relay (tests/test_nat_lab.py).

    punch_peer.py target --host IP --relay ADDR --dir DIR --name NAME --attempts N [--port P]
                         [--concurrency C] [--no-holepunch]
    punch_peer.py dialer --host IP --dir DIR --name NAME --attempts N [--port P] [--concurrency C]
                         [--no-holepunch] [--upgrade-timeout S]

Attempt i uses a fresh pair of ``dht.P2P`` peers (fresh identities, listening ports P + i, so fresh NAT
mappings), each with a ``NatService`` without the dial-back check (tests/test_nat_lab.py checks the
verdicts of these hosts with ``swarm dht``; here hole punching learns each side's public IP from the
relay, as the relay saw it). The target reserves a slot on the relay and writes its relay address to
``DIR/NAME-i.addr``; the dialer dials that address (through the relay), pings the target, and, unless
hole punching is off, waits (at most ``--upgrade-timeout`` s) for its hole puncher to conclude: a
success or a failure after its tries; it then pings again over whatever connection it has and writes
``DIR/NAME-i.done``, at which the target closes its peer. The dialer prints one JSON line per attempt:
``{"i", "connected", "direct", "upgrade_s", "pings_ok", "relayed_left", "nat": {dialer's
NatService.status()}, "target": {the target's}}``. ``--concurrency`` attempts run at once (in order of
i), each with its own pair of peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from dht.peer.errors import P2PError
from dht.peer.nat import NatOptions, NatService
from dht.peer.p2p import P2P
from dht.peer.relay import is_relayed

WAIT = 60.0  # seconds to wait for the other side's file


async def _wait_file(path: Path, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.005)
    return path.read_text()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)  # readers never see half a file


async def _each(args: argparse.Namespace, attempt) -> None:
    """Run ``attempt(i)`` for every i, ``--concurrency`` at a time (in order of i)."""
    gate = asyncio.Semaphore(args.concurrency)

    async def gated(i: int) -> None:
        async with gate:
            await attempt(i)

    await asyncio.gather(*(gated(i) for i in range(args.attempts)))


async def target(args: argparse.Namespace) -> None:
    directory = Path(args.dir)

    async def attempt(i: int) -> None:
        p2p = await P2P.create(host=args.host, port=args.port + i)
        nat = await NatService(p2p, NatOptions(check=False, relay="off", use_relay=[args.relay],
                                               holepunch=not args.no_holepunch)).start()
        try:
            held = list(nat.relay_client.held.values())
            if not held:
                raise SystemExit(f"attempt {i}: the relay gave no reservation")
            _write(directory / f"{args.name}-{i}.addr", str(held[0].with_peer_id(p2p.peer_id)))
            await _wait_file(directory / f"{args.name}-{i}.done")
            _write(directory / f"{args.name}-{i}.target", json.dumps(nat.status()))
        finally:
            await nat.close()
            await p2p.shutdown()

    await _each(args, attempt)


async def dialer(args: argparse.Namespace) -> None:
    directory = Path(args.dir)

    async def attempt(i: int) -> None:
        address = await _wait_file(directory / f"{args.name}-{i}.addr")
        p2p = await P2P.create(host=args.host, port=args.port + i)
        nat = await NatService(p2p, NatOptions(check=False, relay="off", use_relay="off",
                                               holepunch=not args.no_holepunch)).start()
        result: dict = {"i": i, "connected": False, "direct": False, "upgrade_s": None, "pings_ok": 0}
        try:
            peer = await asyncio.wait_for(p2p.connect(address), 20)
            result["connected"] = True
            up = time.monotonic()
            await p2p.ping(peer, timeout=10)
            result["pings_ok"] += 1
            if not args.no_holepunch:
                assert nat.holepuncher is not None
                stats = nat.holepuncher.stats
                deadline = up + args.upgrade_timeout
                while time.monotonic() < deadline and stats.successes + stats.failures == 0:
                    if result["upgrade_s"] is None and any(not is_relayed(c.channel)
                                                           for c in p2p.connections_to(peer)):
                        result["upgrade_s"] = round(time.monotonic() - up, 4)
                    await asyncio.sleep(0.002)
                result["direct"] = any(not is_relayed(c.channel) for c in p2p.connections_to(peer))
                if result["direct"] and result["upgrade_s"] is None:
                    result["upgrade_s"] = round(time.monotonic() - up, 4)
                deadline = time.monotonic() + 5  # the retired relayed connection closes once idle
                while time.monotonic() < deadline and result["direct"] and any(
                        is_relayed(c.channel) for c in p2p.connections_to(peer)):
                    await asyncio.sleep(0.01)
            for _ in range(3):
                await p2p.ping(peer, timeout=10)
                result["pings_ok"] += 1
            result["relayed_left"] = sum(is_relayed(c.channel) for c in p2p.connections_to(peer))
        except (P2PError, OSError, asyncio.TimeoutError) as e:
            result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            result["nat"] = nat.status()
            _write(directory / f"{args.name}-{i}.done", "")
            await nat.close()
            await p2p.shutdown()
        try:
            result["target"] = json.loads(await _wait_file(directory / f"{args.name}-{i}.target", 10))
        except (TimeoutError, ValueError) as e:
            result["target"] = {"error": str(e)}
        print(json.dumps(result), flush=True)

    await _each(args, attempt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("target", "dialer"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--relay")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--attempts", type=int, default=1)
    parser.add_argument("--port", type=int, default=6000)
    parser.add_argument("--no-holepunch", action="store_true")
    parser.add_argument("--concurrency", type=int, default=1, help="attempts at once (default 1)")
    parser.add_argument("--upgrade-timeout", type=float, default=20.0)
    args = parser.parse_args()
    if args.role == "target" and not args.relay:
        parser.error("target needs --relay")
    asyncio.run(target(args) if args.role == "target" else dialer(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
