"""The victim of the abuse benchmark: a default :class:`dht.DHT` peer on 127.0.0.1.

It holds a handful of plain records, signed records (a regular key with its owner marker, and two
dictionaries of owner-marked subkeys: ``swarm.runs`` as ``swarm`` announces runs, and
``bench/owned``), refreshed every 2 s as their owner would, and a shared dictionary
``bench/shared`` with one plain subkey of its own. Options: ``--records N`` bulk records (the
hand-over attack), ``--workload`` (a lookup and a store of its own every 0.5 s, as a training peer
does), ``--averaging`` (an :class:`averaging.Averager` and a :class:`averaging.gossip.Gossip` of 4M values
under prefix ``abuse``), ``--nofile`` (the
soft fd limit it starts with: 1024, the common default, unless the code raises it). Its per-IP-prefix
limits apply to loopback addresses too (``DHTLimits.diversity_for_local_addresses``, where the code
has it), as they would to the public addresses of a peer on the internet; ``--loopback-private``
keeps the default exemption.

Prints one JSON line (``{"address": ..., "signed": [...], ...}``) when ready, then serves until
killed or until its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time


GOSSIP_SIZE = 4_000_000  # values of the victim's gossip tensor (its push-sum buffer: 32 MB of float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument("--workload", action="store_true")
    parser.add_argument("--averaging", action="store_true")
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--loopback-private", action="store_true",
                        help="keep the default that exempts loopback addresses from per-prefix limits")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.nofile, hard), hard))

    import dataclasses

    from dht import DHT, get_dht_time
    from dht.protocol import DHTLimits

    # A peer on the internet applies its per-IP-prefix limits to everyone; on loopback the defaults
    # exempt local addresses (so that local swarms work), which would hide those defences here.
    public = not args.loopback_private and any(f.name == "diversity_for_local_addresses"
                                               for f in dataclasses.fields(DHTLimits))
    dht = DHT(host="127.0.0.1", **({"limits": DHTLimits(diversity_for_local_addresses=True)} if public else {}))
    marker = dht.node.signature_validator.ownership_marker
    now = get_dht_time()
    ttl = 3600.0
    plain = {f"bench/plain/{i}": f"value {i}" for i in range(8)}
    signed = [[f"bench/signed{marker}", None]]
    signed += [["swarm.runs", f"run-{i} {marker}"] for i in range(3)]
    signed += [["bench/owned", f"sub-{i} {marker}"] for i in range(3)]

    def value_of(key: str, subkey: str | None) -> dict:
        return {"key": key, "subkey": subkey, "owner": str(dht.peer_id)}

    def refresh() -> None:
        exp = get_dht_time() + ttl
        dht.store_many([(k, value_of(k, s), exp, s) for k, s in signed])

    assert all(dht.store_many([(k, v, now + ttl, None) for k, v in plain.items()]))
    assert dht.store("bench/shared", {"mine": True}, now + ttl, subkey="victim")
    refresh()
    for start in range(0, args.records, 5000):
        dht.store_many([(f"bulk/{i}", i, now + ttl, None) for i in range(start, min(start + 5000, args.records))])
    if args.averaging:
        import torch
        from averaging import Averager

        from averaging.gossip import Gossip

        averager = Averager([torch.zeros(1024)], dht, prefix="abuse")  # noqa: F841 (kept alive)
        gossip = Gossip([torch.zeros(GOSSIP_SIZE)], dht, prefix="abuse")  # noqa: F841 (32 MB of float64 sum)

    stop = threading.Event()

    def refresher() -> None:
        while not stop.wait(2.0):
            try:
                refresh()
            except Exception as e:  # the owner keeps refreshing whatever happens
                print(f"refresh failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)

    def workload() -> None:
        i = 0
        while not stop.wait(0.5):
            i += 1
            try:
                dht.store(f"victim/heartbeat/{i % 16}", i, get_dht_time() + 60)
                dht.get(f"victim/lookup/{i}", latest=True)
            except Exception as e:
                print(f"workload: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)

    threading.Thread(target=refresher, daemon=True).start()
    if args.workload:
        threading.Thread(target=workload, daemon=True).start()
    print(json.dumps({"address": dht.get_visible_addresses()[0], "peer_id": str(dht.peer_id), "pid": os.getpid(),
                      "signed": signed, "shared": ["bench/shared", "victim"], "plain": sorted(plain),
                      "averaging_prefix": "abuse" if args.averaging else None,
                      "gossip": {"method": "gossip.push.abuse", "shape": [GOSSIP_SIZE]} if args.averaging else None,
                      "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                      "loopback_as_public": public}), flush=True)
    try:
        sys.stdin.read()  # returns when the harness closes our stdin (or dies)
    finally:
        stop.set()
        os._exit(0)  # no graceful shutdown: an attacked peer may not manage one in time


if __name__ == "__main__":
    main()
