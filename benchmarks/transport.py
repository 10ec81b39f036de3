#!/usr/bin/env python3
"""Transport benchmark: swarm's encrypted P2P vs plain asyncio TCP vs hivemind 1.1.12, on loopback.

Run from the repo root (one run prints everything, side by side)::

    .venv/bin/python benchmarks/transport.py [--size-mb 100] [--calls 1000] [--repeats 3]
                                             [--loop {auto,asyncio,uvloop,both}] [--no-hivemind]
                                             [--profile] [--time-limit 600]

Every measurement is between TWO OS processes on 127.0.0.1: this process is the sender/caller, the
receiver is a subprocess (``sys.executable benchmarks/transport.py --role ...``) that prints its
address as one JSON line on stdout and exits when its stdin closes (or at its own time limit).

1. ours: a float32 tensor of ``--size-mb`` MB (1e6 bytes) streamed with ``averaging.tensor_wire.send_tensor``
   (1 MiB chunks) over ``dht.P2P`` (TCP + AEAD, multiplexed stream) to a stream handler that runs
   ``recv_tensor`` and replies a checksum (float64 sum + 3 samples + numel, the same summary that
   benchmarks/hivemind_side/transport_hm.py uses); the sender verifies it against its own copy.
   Timed on the sender from opening the stream until the verified reply. One warm-up, then the
   median of ``--repeats``. The receiver also reports how long its checksum took ("ckpt" column):
   "ours (transport)" subtracts it, which is what the plain-TCP bound is compared with.
2. bound: the same bytes over plain, unencrypted asyncio streams (1 MiB writes + drain, the same
   4 MiB StreamReader limit as dht's TCP transport); the receiver copies everything into a
   preallocated tensor and replies one byte. Its transfers are interleaved with ours (ours, tcp,
   ours, tcp, ...) so background load hits both alike.
3. hivemind: ``.bench-venv/bin/python benchmarks/hivemind_side/transport_hm.py --mode throughput``
   and ``--mode rtt`` as subprocesses; their JSON line is parsed. Skipped (with a note) when
   ``.bench-venv`` is missing or with ``--no-hivemind``. Create it with ``bash benchmarks/bench_venv.sh``.
4. RTT: ``p2p.call`` of a tiny echo (int -> int + 1), 50 warm-up calls then ``--calls`` timed
   calls: median and p99 (ms), ours vs hivemind.
5. memory: peak RSS growth over the RSS right before each transfer, in the receiver and in the
   sender (the kernel's VmHWM, reset through /proc/self/clear_refs; a 1 ms psutil sampler where
   that is not allowed). The maximum over all transfers (warm-up included) is reported, in MB and
   as a multiple of the tensor size. The receiver's growth includes the received tensor itself (1x).

Finally a summary table with ratios and targets, and one JSON line with every figure.
``--profile`` adds one extra (untimed) transfer with cProfile on in both processes and prints the
top functions of each. Every process started here is killed by PID in ``finally``; the whole run
is bounded by ``--time-limit`` seconds (SIGALRM).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

HM_PYTHON = os.path.join(ROOT, ".bench-venv", "bin", "python")
HM_SCRIPT = os.path.join(ROOT, "benchmarks", "hivemind_side", "transport_hm.py")
CHUNK = 1 << 20
TCP_READ_LIMIT = 4 << 20  # same as dht.peer.tcp_transport._READ_LIMIT
MB = 1e6
UPLOAD, ECHO, MARK = "bench.upload", "bench.echo", "bench.mark"


def log(msg: str) -> None:
    print(f"[transport pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


class TimeLimit(Exception):
    pass


# ------------------------------------------------------------------------------------------ helpers


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_on(loop_name: str, coro):
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def summarize(t: torch.Tensor) -> list:
    """float64 sum (pairwise, accumulated in float64; no float64 copy of the tensor) + 3 samples + numel."""
    flat = t.reshape(-1).numpy()  # numpy: ~6x faster than torch.sum(dtype=float64) here, no float64 copy
    n = flat.size
    return [float(flat.sum(dtype=np.float64)), float(flat[0]), float(flat[n // 2]), float(flat[-1]), float(n)]


def make_tensor(size_mb: float) -> torch.Tensor:
    numel = int(size_mb * MB) // 4
    return torch.randn(numel, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


class PeakRSS:
    """Peak RSS of this process between start() and stop(), and the RSS at start()."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.method = "VmHWM" if self._reset_hwm() else "psutil-sampler"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0
        self.before = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def cpu(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    @staticmethod
    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def start(self) -> int:
        gc.collect()
        self.before = self._proc.memory_info().rss
        self.cpu_start = self.cpu()
        self.faults_start = self.faults()
        if self.method == "VmHWM":
            self._reset_hwm()
        else:
            self._peak = self.before
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self.before

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self.cpu_used = self.cpu() - self.cpu_start
        self.faults_used = self.faults() - self.faults_start
        if self.method == "VmHWM":
            return self._status("VmHWM")
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, self._proc.memory_info().rss)


def profile_text(path: str, top: int = 22) -> str:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


def wait_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Future) -> None:
    def reader() -> None:
        try:
            sys.stdin.buffer.read()
        finally:
            loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

    threading.Thread(target=reader, daemon=True).start()


# ------------------------------------------------------------------------------ receivers (children)


async def ours_receiver(args) -> None:
    from dht.peer.p2p import P2P
    from averaging.tensor_wire import recv_tensor

    p2p = await P2P.create(host="127.0.0.1", port=0)
    rss = PeakRSS()
    state: dict[str, Any] = {"profiler": None}

    async def mark(request, ctx):
        if request.get("profile"):
            state["profiler"] = cProfile.Profile()
        before = rss.start()
        if state["profiler"] is not None:
            state["profiler"].enable()
        return {"rss_before": before}

    async def upload(stream, ctx):
        t0 = time.perf_counter()
        tensor = await recv_tensor(stream)
        t1 = time.perf_counter()
        profiler, state["profiler"] = state["profiler"], None
        if profiler is not None:
            profiler.disable()
        peak = rss.stop()
        summary = summarize(tensor)
        t2 = time.perf_counter()
        reply = {"summary": summary, "rss_before": rss.before, "rss_peak": peak, "recv_s": t1 - t0,
                 "checksum_s": t2 - t1, "rss_method": rss.method, "cpu_s": rss.cpu_used,
                 "faults": rss.faults_used}
        if profiler is not None:
            path = os.path.join(tempfile.gettempdir(), f"swarm-bench-recv-{os.getpid()}.prof")
            profiler.dump_stats(path)
            reply["profile"] = path
        del tensor
        await stream.send(reply, end=True)

    async def echo(request, ctx):
        return request + 1

    p2p.add_unary_handler(MARK, mark)
    p2p.add_stream_handler(UPLOAD, upload)
    p2p.add_unary_handler(ECHO, echo)
    await serve_until_stdin_closes(args, {"addr": str(p2p.get_visible_addresses()[0]), "pid": os.getpid()})
    await p2p.shutdown()


async def tcp_receiver(args) -> None:
    rss = PeakRSS()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    (n,) = struct.unpack("!Q", await reader.readexactly(8))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                rss.start()  # before the sender starts its clock (gc.collect() is slow), as MARK for ours
                writer.write(b"r")
                await writer.drain()
                out = torch.empty(n, dtype=torch.uint8)  # preallocated, like recv_tensor
                buf = memoryview(out.numpy())
                got = 0
                while got < n:
                    chunk = await reader.read(min(CHUNK, n - got))
                    if not chunk:
                        return
                    buf[got:got + len(chunk)] = chunk
                    got += len(chunk)
                peak = rss.stop()
                del out, buf
                writer.write(b"\x01" + struct.pack("!QQdQ", rss.before, peak, rss.cpu_used, rss.faults_used))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, limit=TCP_READ_LIMIT)
    port = server.sockets[0].getsockname()[1]
    await serve_until_stdin_closes(args, {"port": port, "pid": os.getpid()})
    server.close()


async def serve_until_stdin_closes(args, ready: dict) -> None:
    loop = asyncio.get_running_loop()
    ready["loop"] = type(loop).__module__ + "." + type(loop).__name__
    print(json.dumps(ready), flush=True)
    stop = loop.create_future()
    wait_stdin_eof(loop, stop)
    try:
        await asyncio.wait_for(stop, args.time_limit + 30)
    except asyncio.TimeoutError:
        log("receiver time limit reached, exiting")


# ------------------------------------------------------------------------------- sender (parent)


class Children:
    """Subprocesses started here; all killed by PID in close()."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start_receiver(self, role: str, loop_name: str, time_limit: float) -> tuple[subprocess.Popen, dict]:
        cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--loop", loop_name,
               "--time-limit", str(time_limit)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=ROOT)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} exited before becoming ready (rc={proc.wait()})")
        return proc, json.loads(line)

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                proc.stdin.close()  # polite: the child exits on EOF
            except OSError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"child pid {proc.pid} did not exit; killing it")
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc, grace=5.0)
        self.procs.clear()


async def bench_ours_and_tcp(args, loop_name: str, children: Children, tensor: torch.Tensor) -> dict:
    from dht.peer.p2p import P2P
    from averaging.tensor_wire import send_tensor

    loop = asyncio.get_running_loop()
    loop_desc = type(loop).__module__ + "." + type(loop).__name__
    _, ours_info = children.start_receiver("receiver", loop_name, args.time_limit)
    _, tcp_info = children.start_receiver("tcp-receiver", loop_name, args.time_limit)
    log(f"[{loop_name}] receivers ready: ours {ours_info}, tcp {tcp_info}")
    expected = summarize(tensor)
    nbytes = tensor.numel() * tensor.element_size()
    view = memoryview(tensor.view(torch.uint8).numpy())
    rss = PeakRSS()

    p2p = await P2P.create(host="127.0.0.1", port=0)
    addr = ours_info["addr"]
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_info["port"], limit=TCP_READ_LIMIT)
    try:
        async def ours_once(profile: bool = False) -> dict:
            await p2p.call(addr, MARK, {"profile": profile}, timeout=30)
            sender_before = rss.start()
            profiler = cProfile.Profile() if profile else None
            t0 = time.perf_counter()
            if profiler:
                profiler.enable()
            stream = await p2p.open_stream(addr, UPLOAD, timeout=120)
            async with stream:
                await send_tensor(stream, tensor, chunk_bytes=args.chunk_bytes)
                await stream.end()
                reply = await stream.recv()
            if profiler:
                profiler.disable()
            dt = time.perf_counter() - t0
            sender_peak = rss.stop()
            if reply["summary"] != expected:
                raise RuntimeError(f"checksum mismatch: receiver saw {reply['summary']}, expected {expected}")
            reply.update(seconds=dt, sender_before=sender_before, sender_peak=sender_peak, sender_cpu_s=rss.cpu_used,
                         sender_faults=rss.faults_used)
            if profiler:
                path = os.path.join(tempfile.gettempdir(), f"swarm-bench-send-{os.getpid()}.prof")
                profiler.dump_stats(path)
                reply["sender_profile"] = path
            return reply

        async def tcp_once() -> dict:
            writer.write(struct.pack("!Q", nbytes))
            if await reader.readexactly(1) != b"r":
                raise RuntimeError("bad reply from the TCP receiver")
            sender_before = rss.start()
            t0 = time.perf_counter()
            for offset in range(0, nbytes, CHUNK):
                writer.write(view[offset:offset + CHUNK])
                await writer.drain()
            ack = await reader.readexactly(33)
            dt = time.perf_counter() - t0
            sender_peak = rss.stop()
            if ack[0] != 1:
                raise RuntimeError("bad ack from the TCP receiver")
            before, peak, cpu_s, faults = struct.unpack("!QQdQ", ack[1:])
            return {"seconds": dt, "rss_before": before, "rss_peak": peak, "cpu_s": cpu_s, "faults": faults,
                    "sender_faults": rss.faults_used,
                    "sender_before": sender_before, "sender_peak": sender_peak, "sender_cpu_s": rss.cpu_used}

        ours_runs, tcp_runs = [], []
        for i in range(args.repeats + 1):  # i == 0: warm-up (memory counted, time not)
            o = await ours_once()
            t = await tcp_once()
            ours_runs.append(o)
            tcp_runs.append(t)
            tag = "warm-up" if i == 0 else f"{i}/{args.repeats}"
            log(f"[{loop_name}] {tag}: ours {nbytes / MB / o['seconds']:.0f} MB/s "
                f"(checksum {o['checksum_s'] * 1e3:.0f} ms), tcp {nbytes / MB / t['seconds']:.0f} MB/s")

        # RTT of a tiny unary call
        for i in range(50):
            assert await p2p.call(addr, ECHO, i, timeout=10) == i + 1
        samples = []
        for i in range(args.calls):
            t0 = time.perf_counter()
            r = await p2p.call(addr, ECHO, i, timeout=10)
            samples.append((time.perf_counter() - t0) * 1e3)
            if r != i + 1:
                raise RuntimeError(f"echo mismatch: sent {i}, got {r}")
        samples.sort()
        p99 = samples[min(len(samples) - 1, int(round(0.99 * len(samples))) - 1)]

        profile = None
        if args.profile:
            o = await ours_once(profile=True)
            profile = {"receiver": profile_text(o["profile"]), "sender": profile_text(o["sender_profile"]),
                       "mb_per_s": nbytes / MB / o["seconds"]}
            for p in (o["profile"], o["sender_profile"]):
                try:
                    os.unlink(p)
                except OSError:
                    pass
    finally:
        writer.close()
        await p2p.shutdown()
        children.close()

    timed_ours, timed_tcp = ours_runs[1:], tcp_runs[1:]
    med_s = statistics.median(r["seconds"] for r in timed_ours)
    med_transport_s = statistics.median(r["seconds"] - r["checksum_s"] for r in timed_ours)
    tcp_med_s = statistics.median(r["seconds"] for r in timed_tcp)

    def growth(runs, before, peak):
        return max(r[peak] - r[before] for r in runs) / MB

    return {
        "loop": loop_name,
        "loop_class": loop_desc,
        "ours_mb_per_s": nbytes / MB / med_s,
        "ours_transport_mb_per_s": nbytes / MB / med_transport_s,
        "ours_seconds": [r["seconds"] for r in timed_ours],
        "checksum_ms": statistics.median(r["checksum_s"] for r in timed_ours) * 1e3,
        "tcp_mb_per_s": nbytes / MB / tcp_med_s,
        "tcp_seconds": [r["seconds"] for r in timed_tcp],
        "ours_send_cpu_ms": statistics.median(r["sender_cpu_s"] for r in timed_ours) * 1e3,
        "ours_recv_cpu_ms": statistics.median(r["cpu_s"] for r in timed_ours) * 1e3,
        "tcp_send_cpu_ms": statistics.median(r["sender_cpu_s"] for r in timed_tcp) * 1e3,
        "tcp_recv_cpu_ms": statistics.median(r["cpu_s"] for r in timed_tcp) * 1e3,
        "ours_send_faults": statistics.median(r["sender_faults"] for r in timed_ours),
        "ours_recv_faults": statistics.median(r["faults"] for r in timed_ours),
        "tcp_send_faults": statistics.median(r["sender_faults"] for r in timed_tcp),
        "tcp_recv_faults": statistics.median(r["faults"] for r in timed_tcp),
        "rtt_median_ms": statistics.median(samples),
        "rtt_p99_ms": p99,
        "rtt_mean_ms": statistics.fmean(samples),
        "ours_recv_rss_growth_mb": growth(ours_runs, "rss_before", "rss_peak"),
        "ours_send_rss_growth_mb": growth(ours_runs, "sender_before", "sender_peak"),
        "tcp_recv_rss_growth_mb": growth(tcp_runs, "rss_before", "rss_peak"),
        "tcp_send_rss_growth_mb": growth(tcp_runs, "sender_before", "sender_peak"),
        "ours_recv_idle_rss_mb": ours_runs[0]["rss_before"] / MB,
        "rss_method": ours_runs[0]["rss_method"],
        "profile": profile,
    }


def run_hivemind(args, mode: str, deadline: float) -> dict:
    cmd = [HM_PYTHON, HM_SCRIPT, "--mode", mode]
    cmd += ["--size-mb", str(args.size_mb), "--repeats", str(args.repeats)] if mode == "throughput" \
        else ["--calls", str(args.calls)]
    budget = deadline - time.monotonic() - 20
    if budget < 30:
        raise TimeLimit(f"not enough time left for hivemind {mode}")
    cmd += ["--time-limit", str(int(budget))]
    if args.loop == "asyncio":
        cmd.append("--no-uvloop")
    log("running " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, cwd=ROOT, text=True)
    try:
        out, _ = proc.communicate(timeout=budget + 15)
    finally:
        if proc.poll() is None:  # SIGINT first: its finally kills its receiver and p2pd daemons by PID
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"hivemind {mode} failed (rc={proc.returncode})")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"hivemind {mode} printed no JSON line")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def report(args, results: list[dict], hm_tp: dict | None, hm_rtt: dict | None, hm_note: str,
           size_bytes: int) -> dict:
    tensor_mb = size_bytes / MB
    print()
    print(f"=== transport benchmark: {tensor_mb:.0f} MB float32, chunk {args.chunk_bytes} B, "
          f"{args.repeats} timed transfers (median) after 1 warm-up, {args.calls} RPCs; 127.0.0.1, "
          f"2 processes each; {psutil.cpu_count()} CPUs ===")
    for r in results:
        print(f"loop for ours/tcp: {r['loop']} ({r['loop_class']})")
    print(f"hivemind: {hm_note}")
    print()
    cols = [r["loop"] for r in results]
    w = 12
    head = f"{'':40}" + "".join(f"{'ours@' + c:>{w}}" for c in cols) + f"{'hivemind':>{w}}"
    print(head)
    print("-" * len(head))

    def row(label, key, spec=".0f", hm=None):
        print(f"{label:40}" + "".join(f"{fmt(r[key], spec):>{w}}" for r in results) + f"{fmt(hm, spec, '-'):>{w}}")

    hm_mbps = hm_tp["mb_per_s"] if hm_tp else None
    row("throughput, end to end (MB/s)", "ours_mb_per_s", hm=hm_mbps)
    row("  of which receiver checksum (ms)", "checksum_ms", ".1f")
    row("throughput, transport only (MB/s)", "ours_transport_mb_per_s")
    row("plain asyncio TCP bound (MB/s)", "tcp_mb_per_s")
    row("CPU per transfer: sender (ms)", "ours_send_cpu_ms")
    row("CPU per transfer: receiver (ms)", "ours_recv_cpu_ms")
    row("  plain TCP: sender (ms)", "tcp_send_cpu_ms")
    row("  plain TCP: receiver (ms)", "tcp_recv_cpu_ms")
    row("page faults per transfer: sender", "ours_send_faults")
    row("page faults per transfer: receiver", "ours_recv_faults")
    row("  plain TCP: sender", "tcp_send_faults")
    row("  plain TCP: receiver", "tcp_recv_faults")
    row("RTT median (ms)", "rtt_median_ms", ".3f", hm=hm_rtt["median_ms"] if hm_rtt else None)
    row("RTT p99 (ms)", "rtt_p99_ms", ".3f", hm=hm_rtt["p99_ms"] if hm_rtt else None)
    row("receiver peak RSS growth (MB)", "ours_recv_rss_growth_mb", ".1f")
    row("sender peak RSS growth (MB)", "ours_send_rss_growth_mb", ".1f")
    row("  plain TCP receiver growth (MB)", "tcp_recv_rss_growth_mb", ".1f")
    row("  plain TCP sender growth (MB)", "tcp_send_rss_growth_mb", ".1f")
    print(f"(RSS: peak over the RSS right before the transfer, max over all {args.repeats + 1} transfers, "
          f"via {results[0]['rss_method']}; receiver growth includes the {tensor_mb:.0f} MB tensor itself)")

    print()
    print("=== summary (ratios) ===")
    head = f"{'':46}{'target':>10}" + "".join(f"{'@' + c:>{w}}" for c in cols)
    print(head)
    print("-" * len(head))
    summary: dict[str, dict] = {}

    def srow(label, target, fn, ok):
        vals = [fn(r) for r in results]
        cells = []
        for v in vals:
            if v is None:
                cells.append(f"{'n/a':>{w}}")
            else:
                cells.append(f"{format(v, '.2f') + ('  ' if ok(v) else ' !'):>{w}}")
        print(f"{label:46}{target:>10}" + "".join(cells))
        summary[label] = {r["loop"]: v for r, v in zip(results, vals)}

    srow("ours / plain TCP (transport only)", ">= 0.70", lambda r: ratio(r["ours_transport_mb_per_s"], r["tcp_mb_per_s"]),
         lambda v: v >= 0.70)
    srow("ours / plain TCP (end to end)", ">= 0.70", lambda r: ratio(r["ours_mb_per_s"], r["tcp_mb_per_s"]),
         lambda v: v >= 0.70)
    srow("ours / hivemind throughput (end to end)", ">= 3", lambda r: ratio(r["ours_mb_per_s"], hm_mbps),
         lambda v: v >= 3)
    srow("RTT median hivemind / ours", "> 1", lambda r: ratio(hm_rtt["median_ms"] if hm_rtt else None,
                                                               r["rtt_median_ms"]), lambda v: v > 1)
    srow("RTT p99 hivemind / ours", "> 1", lambda r: ratio(hm_rtt["p99_ms"] if hm_rtt else None, r["rtt_p99_ms"]),
         lambda v: v > 1)
    srow("receiver RSS growth / tensor size", "<= 2", lambda r: r["ours_recv_rss_growth_mb"] / tensor_mb,
         lambda v: v <= 2)
    srow("sender RSS growth / tensor size", "<= 2", lambda r: r["ours_send_rss_growth_mb"] / tensor_mb,
         lambda v: v <= 2)
    print("('!' marks a missed target)")

    for r in results:
        if r.get("profile"):
            p = r["profile"]
            print(f"\n=== cProfile, one extra transfer on {r['loop']} ({p['mb_per_s']:.0f} MB/s under the profiler) ===")
            print("--- receiver (event-loop thread, from mark to tensor received), by tottime ---")
            print(p["receiver"])
            print("--- sender (open_stream .. verified reply), by tottime ---")
            print(p["sender"])

    figures = {
        "bench": "transport",
        "size_mb": tensor_mb,
        "chunk_bytes": args.chunk_bytes,
        "repeats": args.repeats,
        "calls": args.calls,
        "cpus": psutil.cpu_count(),
        "ours": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "profile"}
                 for r in results],
        "hivemind": {"throughput": hm_tp, "rtt": hm_rtt, "note": hm_note},
        "ratios": summary,
    }
    return figures


# ----------------------------------------------------------------------------------------- main


def main_parent(args) -> int:
    deadline = time.monotonic() + args.time_limit

    def on_alarm(signum, frame):
        raise TimeLimit(f"time limit of {args.time_limit:g} s exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_limit)))

    if args.loop == "both":
        loops = ["asyncio", "uvloop"] if have_uvloop() else ["asyncio"]
    elif args.loop == "auto":
        loops = ["uvloop" if have_uvloop() else "asyncio"]
    else:
        loops = [args.loop]
    if "uvloop" in loops and not have_uvloop():
        print("uvloop is not importable", file=sys.stderr)
        return 2

    children = Children()
    results: list[dict] = []
    hm_tp = hm_rtt = None
    rc = 0
    try:
        tensor = make_tensor(args.size_mb)
        size_bytes = tensor.numel() * tensor.element_size()
        for loop_name in loops:
            results.append(run_on(loop_name, bench_ours_and_tcp(args, loop_name, children, tensor)))
        if args.no_hivemind:
            hm_note = "skipped (--no-hivemind)"
        elif not os.access(HM_PYTHON, os.X_OK):
            hm_note = "skipped: .bench-venv is missing (create it with: bash benchmarks/bench_venv.sh)"
        else:
            try:
                hm_tp = run_hivemind(args, "throughput", deadline)
                hm_rtt = run_hivemind(args, "rtt", deadline)
                hm_note = (f"1.1.12 via .bench-venv (p2pd, TLS, {hm_tp.get('chunk_bytes', '?')} B chunks, "
                           f"python loop {'asyncio' if args.loop == 'asyncio' else 'uvloop'})")
            except (RuntimeError, TimeLimit, subprocess.TimeoutExpired) as e:
                hm_note = f"FAILED: {e}"
                log(hm_note)
        signal.alarm(0)
        figures = report(args, results, hm_tp, hm_rtt, hm_note, size_bytes)
        print()
        print(json.dumps(figures, default=str), flush=True)
    except TimeLimit as e:
        log(f"FAILED: {e}")
        rc = 2
    finally:
        signal.alarm(0)
        children.close()
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0, help="tensor size in MB (1e6 bytes)")
    parser.add_argument("--calls", type=int, default=1000, help="timed RPCs (after 50 warm-up calls)")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers after one warm-up")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop", "both"], default="auto",
                        help="event loop for ours and the TCP bound (auto: uvloop if importable, as the CLI)")
    parser.add_argument("--no-hivemind", action="store_true", help="skip the hivemind baseline")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK,
                        help="send_tensor chunk size for ours (default 1 MiB); the TCP bound always writes 1 MiB")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra transfer on both sides")
    parser.add_argument("--time-limit", type=float, default=600.0, help="global wall-clock limit, seconds")
    parser.add_argument("--role", choices=["sender", "receiver", "tcp-receiver"], default="sender",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be >= 1")

    if args.role == "sender":
        return main_parent(args)
    loop_name = args.loop if args.loop in ("asyncio", "uvloop") else ("uvloop" if have_uvloop() else "asyncio")
    run_on(loop_name, ours_receiver(args) if args.role == "receiver" else tcp_receiver(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
