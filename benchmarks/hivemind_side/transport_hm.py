#!/usr/bin/env python3
"""Baseline: hivemind 1.1.12 P2P transport on loopback, between two OS processes.

Runs ONLY inside the benchmark venv (``bash benchmarks/bench_venv.sh``); swarm never
imports hivemind. Usage (from the repo root):

    .bench-venv/bin/python benchmarks/hivemind_side/transport_hm.py --mode throughput --size-mb 100
    .bench-venv/bin/python benchmarks/hivemind_side/transport_hm.py --mode rtt --calls 1000

What is measured (all with hivemind's real APIs):

* throughput: the parent process (sender) streams one float32 tensor to a child
  process (receiver) through a stream handler registered with
  ``P2P.add_protobuf_handler(..., stream_input=True)``. The tensor is serialized with
  ``serialize_torch_tensor`` (CompressionType.NONE) and cut with ``split_for_streaming``
  at hivemind's default chunk size (``STREAMING_CHUNK_SIZE_BYTES`` = 64 KiB), exactly as
  ``DecentralizedAverager`` streams state. The receiver reassembles with
  ``combine_from_streaming`` + ``deserialize_torch_tensor``, computes a float64 sum and
  a few sample values and returns them; the sender checks them against its own copy.
  Timed on the sender: from just before the first chunk is handed to P2P (the tensor
  is pre-serialized; per-chunk slicing is included) until the verified reply arrives.
  One warm-up transfer, then the median of ``--repeats`` (default 3). MB = 1e6 bytes.
* rtt: a unary protobuf RPC (``test_pb2.TestRequest`` -> ``TestResponse``, number+1),
  ``--warmup`` (50) untimed calls then ``--calls`` (1000) sequential timed calls;
  median and p99 in ms.

Both peers listen on /ip4/127.0.0.1/tcp/0 only, with NAT port mapping, AutoNAT,
relays and auto-relay disabled; the sender bootstraps only from the receiver's
loopback multiaddr. Exactly one JSON line goes to stdout; logs go to stderr.
Every process started here (the receiver child and both p2pd daemons) is killed
by PID on exit; a hard time limit (``--time-limit``, default 300 s) applies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2, test_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.streaming import STREAMING_CHUNK_SIZE_BYTES, combine_from_streaming, split_for_streaming

UPLOAD_HANDLER = "swarm_bench.upload"
ECHO_HANDLER = "swarm_bench.echo"
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def log(msg: str) -> None:
    print(f"[transport_hm pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


class TimeLimit(Exception):
    pass


async def create_loopback_p2p(initial_peers=None) -> P2P:
    """A P2P daemon that only ever touches 127.0.0.1."""
    p2p = await P2P.create(
        initial_peers=initial_peers,
        host_maddrs=[LOOPBACK_MADDR],
        announce_maddrs=None,
        auto_nat=False,
        nat_port_map=False,
        use_relay=False,
        use_auto_relay=False,
        use_ipfs=False,
        dht_mode="client",  # no DHT serving: nothing to bootstrap except the one given peer
        tls=True,  # hivemind default channel security
        startup_timeout=30,
    )
    maddrs = await p2p.get_visible_maddrs()
    for m in maddrs:
        if "ip4" not in m or m["ip4"] != "127.0.0.1":
            await p2p.shutdown()
            raise RuntimeError(f"p2pd exposes a non-loopback address: {m}")
    return p2p


def summarize(t: torch.Tensor) -> list:
    flat = t.reshape(-1)
    n = flat.numel()
    return [
        float(flat.double().sum().item()),
        float(flat[0].item()),
        float(flat[n // 2].item()),
        float(flat[-1].item()),
        float(n),
    ]


# --------------------------------------------------------------------------- receiver (child)


async def serve(args) -> None:
    p2p = await create_loopback_p2p()

    async def upload(requests, context: P2PContext) -> runtime_pb2.Tensor:
        parts = [part async for part in requests]
        tensor = deserialize_torch_tensor(combine_from_streaming(parts))
        stats = torch.tensor(summarize(tensor), dtype=torch.float64)
        del parts, tensor
        return serialize_torch_tensor(stats)

    async def echo(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        return test_pb2.TestResponse(number=request.number + 1)

    await p2p.add_protobuf_handler(UPLOAD_HANDLER, upload, runtime_pb2.Tensor, stream_input=True)
    await p2p.add_protobuf_handler(ECHO_HANDLER, echo, test_pb2.TestRequest)

    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    ready = {"peer_id": p2p.peer_id.to_base58(), "maddrs": maddrs, "p2pd_pid": p2p._child.pid}
    print(json.dumps(ready), flush=True)  # child's stdout is a pipe read by the parent only
    log(f"receiver ready at {maddrs}")

    # Run until the parent closes our stdin (or dies), or our own time limit expires.
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def wait_stdin():
        try:
            sys.stdin.buffer.read()
        finally:
            loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

    threading.Thread(target=wait_stdin, daemon=True).start()
    try:
        await asyncio.wait_for(stop, timeout=args.time_limit + 30)
    except asyncio.TimeoutError:
        log("receiver time limit reached, exiting")
    finally:
        await p2p.shutdown()


# --------------------------------------------------------------------------- sender (parent)


async def run_throughput(p2p: P2P, peer: PeerID, args) -> dict:
    numel = int(args.size_mb * 1e6) // 4
    nbytes = numel * 4
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(numel, generator=gen, dtype=torch.float32)
    expected = summarize(tensor)
    serialized = serialize_torch_tensor(tensor)  # CompressionType.NONE, as for fp32 state
    del tensor
    n_chunks = len(range(0, len(serialized.buffer), args.chunk_bytes))
    log(f"throughput: {nbytes / 1e6:.1f} MB float32, {n_chunks} chunks of {args.chunk_bytes} B")

    async def one_transfer() -> float:
        async def chunks():
            for part in split_for_streaming(serialized, args.chunk_bytes):
                yield part

        t0 = time.perf_counter()
        reply = await p2p.call_protobuf_handler(peer, UPLOAD_HANDLER, chunks(), runtime_pb2.Tensor)
        got = deserialize_torch_tensor(reply).tolist()
        dt = time.perf_counter() - t0
        if got != expected:
            raise RuntimeError(f"verification failed: receiver saw {got}, expected {expected}")
        return dt

    warm = await one_transfer()
    log(f"warm-up transfer: {warm:.3f} s ({nbytes / 1e6 / warm:.1f} MB/s)")
    seconds = []
    for i in range(args.repeats):
        dt = await one_transfer()
        seconds.append(dt)
        log(f"transfer {i + 1}/{args.repeats}: {dt:.3f} s ({nbytes / 1e6 / dt:.1f} MB/s)")
    med = statistics.median(seconds)
    return {
        "system": "hivemind",
        "mode": "throughput",
        "mb_per_s": round(nbytes / 1e6 / med, 2),
        "size_mb": int(args.size_mb) if float(args.size_mb).is_integer() else args.size_mb,
        "seconds": [round(s, 4) for s in seconds],
        "chunk_bytes": args.chunk_bytes,
        "verified": True,
    }


async def run_rtt(p2p: P2P, peer: PeerID, args) -> dict:
    async def call(i: int) -> None:
        resp = await p2p.call_protobuf_handler(peer, ECHO_HANDLER, test_pb2.TestRequest(number=i), test_pb2.TestResponse)
        if resp.number != i + 1:
            raise RuntimeError(f"echo mismatch: sent {i}, got {resp.number}")

    for i in range(args.warmup):
        await call(i)
    samples = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(round(0.99 * len(samples))) - 1)]
    return {
        "system": "hivemind",
        "mode": "rtt",
        "median_ms": round(statistics.median(samples), 4),
        "p99_ms": round(p99, 4),
        "mean_ms": round(statistics.fmean(samples), 4),
        "calls": args.calls,
    }


async def drive(args, server_info: dict) -> dict:
    peer = PeerID.from_base58(server_info["peer_id"])
    p2p = await create_loopback_p2p(initial_peers=[Multiaddr(m) for m in server_info["maddrs"]])
    drive.p2pd_pid = p2p._child.pid
    try:
        # make sure we are connected to the receiver (bootstrap is async in p2pd)
        for _ in range(100):
            if any(info.peer_id == peer for info in await p2p.list_peers()):
                break
            await asyncio.sleep(0.05)
        if args.mode == "throughput":
            return await run_throughput(p2p, peer, args)
        return await run_rtt(p2p, peer, args)
    finally:
        await p2p.shutdown()


drive.p2pd_pid = None


def kill_pid(pid, what: str) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        log(f"killed leftover {what} pid {pid}")
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def pid_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def main_parent(args) -> int:
    def on_alarm(signum, frame):
        raise TimeLimit(f"hard time limit of {args.time_limit:g} s exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_limit)))

    child_cmd = [sys.executable, os.path.abspath(__file__), "--role", "server", "--time-limit", str(args.time_limit)]
    if not args.uvloop:
        child_cmd.append("--no-uvloop")
    child = subprocess.Popen(child_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
    server_info: dict = {}
    result = None
    rc = 0
    try:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver process exited before becoming ready (rc={child.wait()})")
        server_info = json.loads(line)
        if args.uvloop:
            import uvloop

            uvloop.install()
        result = asyncio.run(drive(args, server_info))
    except TimeLimit as e:
        log(f"FAILED: {e}")
        rc = 2
    except BaseException as e:  # noqa: BLE001 - report anything, incl. KeyboardInterrupt
        log(f"FAILED: {type(e).__name__}: {e}")
        rc = 1
    finally:
        signal.alarm(0)
        # Ask the receiver to stop (EOF on its stdin), then make sure, by PID.
        try:
            child.stdin.close()
        except Exception:
            pass
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"receiver pid {child.pid} did not exit; killing it")
            child.kill()
            child.wait()
        # The p2pd daemons are children of the two Python processes and P2P.shutdown()
        # terminates them; if anything went wrong, kill exactly the PIDs we started.
        for pid, what in ((drive.p2pd_pid, "sender p2pd"), (server_info.get("p2pd_pid"), "receiver p2pd")):
            if pid is not None:
                for _ in range(50):
                    if not pid_alive(pid):
                        break
                    time.sleep(0.1)
                if pid_alive(pid):
                    kill_pid(pid, what)
    if rc == 0 and result is not None:
        print(json.dumps(result), flush=True)
    elif rc == 0:
        log("FAILED: no result")
        rc = 1
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["throughput", "rtt"], default="throughput")
    parser.add_argument("--size-mb", type=float, default=100.0, help="tensor size in MB (1e6 bytes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers after one warm-up")
    parser.add_argument(
        "--chunk-bytes", type=int, default=STREAMING_CHUNK_SIZE_BYTES, help="split_for_streaming chunk size"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=300.0, help="hard wall-clock limit, seconds")
    parser.add_argument(
        "--no-uvloop", dest="uvloop", action="store_false", help="use the default asyncio loop instead of uvloop"
    )
    parser.add_argument("--role", choices=["client", "server"], default="client", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "server":
        if args.uvloop:
            import uvloop

            uvloop.install()
        asyncio.run(serve(args))
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
