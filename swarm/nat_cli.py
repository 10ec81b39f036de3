"""The NAT flags of ``swarm peer``, ``swarm dht`` and ``swarm join`` (:class:`dht.peer.nat.NatOptions`)."""

from __future__ import annotations

import argparse

from dht.peer.addresses import AddressError, PeerAddress
from dht.peer.nat import NatOptions

__all__ = ["add_nat_arguments", "nat_options"]


def add_nat_arguments(p: argparse.ArgumentParser) -> None:
    """``--relay``, ``--use-relay``, ``--no-holepunch``, ``--no-reachability-check``, ``--nat-min-helpers``."""
    g = p.add_argument_group("NAT traversal", "At start the peer asks others to dial it back and prints "
                             "'nat: verdict=public|nat|firewalled|unknown ...' with advice; a peer found "
                             "unreachable becomes outbound-only in the DHT and is reached through relays "
                             "(and hole punching) instead.")
    g.add_argument("--relay", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="relay for peers behind NAT: auto (default: unless this peer is found unreachable), "
                        "on (--relay alone), off")
    g.add_argument("--use-relay", nargs="+", default=["auto"], metavar="auto|off|ADDR",
                   help="relays to hold reservations on when behind NAT: auto (default: reachable peers of the "
                        "swarm), off, or relay addresses /ip4/HOST/tcp/PORT/p2p/PEERID (used whatever the verdict)")
    g.add_argument("--max-relays", type=int, default=2, metavar="N",
                   help="relays to hold reservations on at once (default 2)")
    g.add_argument("--no-holepunch", action="store_true",
                   help="do not try to upgrade relayed connections to direct ones (hole punching)")
    g.add_argument("--no-reachability-check", action="store_true",
                   help="skip the dial-back check at start (verdict 'unknown'; the peer stays a server)")
    g.add_argument("--nat-min-helpers", type=int, default=3, metavar="N",
                   help="peers that must answer the dial-back check for a verdict (default 3; fewer answers: "
                        "'unknown', re-checked later); use 1 in a swarm of two or three peers")


def nat_options(args: argparse.Namespace, print_verdict: bool = True) -> NatOptions:
    """NatOptions from the parsed flags; ValueError naming a malformed flag value."""
    use = list(args.use_relay)
    if use in (["auto"], ["off"]):
        use_relay: str | list[str] = use[0]
    else:
        for text in use:
            try:
                address = PeerAddress.parse(text)
            except AddressError as e:
                raise ValueError(f"--use-relay {text!r}: {e}") from None
            if address.peer_id is None or address.relay is not None:
                raise ValueError(f"--use-relay {text!r}: give the relay as /ip4/HOST/tcp/PORT/p2p/PEERID")
        use_relay = use
    if args.max_relays < 1 or args.nat_min_helpers < 0:
        raise ValueError("--max-relays must be at least 1 and --nat-min-helpers at least 0")
    return NatOptions(check=not args.no_reachability_check, min_helpers=args.nat_min_helpers, relay=args.relay,
                      use_relay=use_relay, max_relays=args.max_relays, holepunch=not args.no_holepunch,
                      print_verdict=print_verdict)
