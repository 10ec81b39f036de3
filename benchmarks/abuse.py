"""Abuse benchmark (issue 11): one attacker (one source IP, any number of identities) against a
default ``dht.DHT`` peer, one table row per attack.

    python benchmarks/abuse.py                         # every attack, full counts (~5 min on 2 busy cores)
    python benchmarks/abuse.py --scale 0.1             # a tenth of the counts (~1 min)
    python benchmarks/abuse.py --attacks nested-hello,find-flood --json
    python benchmarks/abuse.py --averaging --daemon    # also avg.part and gossip, and a real daemon

How it measures. For each attack a fresh victim process starts (``abuse_kit/victim.py``: a default
DHT on 127.0.0.1 with plain records, signed records its owner refreshes every 2 s, and a shared
dictionary; soft fd limit 1024 unless the code raises it; its per-IP-prefix limits apply to
loopback addresses as they would to public ones, unless ``--loopback-private``). A legitimate
client (a client-mode DHTNode on 127.0.0.1, in this process) joins it. Then the attacker process
(``abuse_kit/attacks.py``) attacks from 127.0.0.2 (``--ip``): it ramps up, holds the attack at full
strength for ``--hold`` seconds, and exits, which closes everything it opened. Meanwhile this
process measures:

- the victim's RSS (MiB) and open fds (its whole process tree, from /proc, every 0.1 s): *before*
  (just before the attack), *peak* (during it) and *after* (once the attacker exited and the fds
  went back to the baseline, or 10 s later);
- *connect*: every 0.4 s a fresh P2P peer on 127.0.0.1 connects to the victim and pings it, within
  3 s: the share that succeeded;
- *store+get*: the legitimate client stores a fresh key at the victim and reads it back, in a loop
  (each operation given up after 5 s): p50/p95/max of the pair's latency and how many succeeded;
- *signed*: after the attack a fresh client reads every signed record back (``latest=True``);
- *log*: bytes the victim wrote to its stderr during the attack;
- attack-specific checks (e.g. how many of the victim's contacts are Sybils).

With ``--daemon`` the victim of the ``daemon-*`` rows is a real ``swarm join`` training
examples/digits.py alone (run ``abuse-run``, the code's defaults, loopback exemptions included);
*signed* is then whether ``swarm runs`` still lists the run, and its epochs per second during the
attack are compared with the 10 s before.

Targets (PASS only if all hold): peak - before RSS <= 256 MiB; after - before fds <= 8; connect >=
90%; every store+get succeeded, the slowest under 2 s; every signed record intact; attack checks
(never-fed: at most 1,024 handlers of one identity; sybil-admission: at most 16 attacker
identities among the contacts of 16 random finds; contact-poisoning: the victim still lists L at
its real address; large-subkeys: the shared key stays readable; daemons: training keeps >= 50% of
its rate; and the victim is still alive).

127.0.0.1 and 127.0.0.2 share a /24: defences per IP prefix see the legitimate peers and the
attacker as one group (``--ip 127.0.1.2`` puts the attacker in another /24). Everything goes to
loopback only; every process started is killed by its PID at the end, even on
error; each attack is bounded in count (``--scale``) and time (``--max-time`` per attacker).

``--json`` prints ``{"scale", "hold_s", "attacker_ip", "total_s", "targets", "rows"}``; each row
has ``attack``, ``rss_mib`` and ``fds`` (``before``/``peak``/``after``), ``connect`` (``ok``,
``total``, ``share``), ``store_get_s`` (``p50``, ``p95``, ``max``, ``ok``, ``total``), ``signed``
(``intact``, ``total``, ``problems``), ``log_kib``, ``checks`` (name -> bool), ``failed`` (the
targets missed), ``passed``, ``wall_s`` and ``attacker`` (what the attack achieved, e.g. how many
of its stores were accepted); daemon rows add ``training_epochs_per_s`` (``before``/``during``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/dht.py would shadow the dht package: the repository first, benchmarks/ (procmem) last
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() != HERE] + [str(HERE)]
from procmem import children  # noqa: E402

MEMORY_LIMIT_MIB = 256.0
FD_SLACK = 8
CONNECT_SHARE = 0.9
LATENCY_LIMIT_S = 2.0
STREAM_LIMIT = 1024  # never-fed handlers one identity may hold (the issue: 256 per peer by default)
TRAINING_SHARE = 0.5  # a daemon's epochs per second during an attack, at least this share of before
TRAIN_BASELINE_S = 10.0  # seconds of training measured before an attack on a daemon
SYBIL_LIMIT = 16  # distinct attacker identities the victim may list in 16 random finds ("a few per prefix")
ROW_KEYS = ["attack", "rss_mib", "fds", "connect", "store_get_s", "signed", "log_kib", "checks", "failed",
            "passed", "wall_s", "attacker"]


@dataclass
class Spec:
    name: str
    summary: str
    victim_args: list[str] = field(default_factory=list)
    optional: str = ""  # "averaging" / "daemon": only with --averaging / --daemon
    attack: str = ""  # the attack to run (default: name)
    victim: str = "dht"  # "dht": abuse_kit/victim.py; "daemon": a real `swarm join` training examples/digits.py


SPECS = [
    Spec("nested-hello", "1,100 hellos with a protocol field nested 1,000 deep"),
    Spec("idle-sockets", "2,000 sockets that send nothing"),
    Spec("slowloris", "300 hellos at one byte per second"),
    Spec("frame-announce", "200 connections announcing a 1 MiB frame, then silent"),
    Spec("unfinished-messages", "4 conns x 32 streams x 4 MiB of never-ending messages"),
    Spec("never-fed", "1 identity, 12 conns x 1,024 streams never sent a request"),
    Spec("unsigned-store", "unsigned 29-day values over keys holding signed records"),
    Spec("sybil-admission", "2,000 identities claiming to be servers"),
    Spec("handover-pings", "300 fillers + 10 close-id pings at a victim with 60k records", ["--records", "60000"]),
    Spec("find-flood", "finds of 512 keys, 16 identities x 12 callers"),
    Spec("contact-poisoning", "find/store replies listing peer L at the attacker's address", ["--workload"]),
    Spec("storage-bytes", "1 identity stores 1,600 x 250 KiB"),
    Spec("storage-entries", "11 identities x 20,000 entries"),
    Spec("large-subkeys", "300 x 240 KiB subkeys under a shared key"),
    Spec("avg-part", "5,000 avg.part headers with 60 KB group ids, cancelled", ["--averaging"], optional="averaging"),
    Spec("gossip-push", "16 gossip pushes of the victim's 32 MB sum, stalled after 24 MiB", ["--averaging"],
         optional="averaging"),
    Spec("daemon-unsigned-store", "unsigned 29-day values over swarm.runs and the run's progress key of a daemon",
         optional="daemon", attack="unsigned-store", victim="daemon"),
    Spec("daemon-state-downloads", "8 identities x 8 callers download a daemon's state over and over",
         optional="daemon", attack="state-downloads", victim="daemon"),
]
DAEMON_RUN = "abuse-run"


# ---- measuring the victim -------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        stack += children(p)
    return pids


def measure(pid: int) -> tuple[float, int]:
    """(RSS MiB, open fds) of ``pid`` and its descendants."""
    rss = 0
    fds = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * page
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return rss / (1 << 20), fds


class Sampler(threading.Thread):
    """Samples :func:`measure` every 0.1 s and keeps the peaks."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss, self.peak_fds = measure(pid)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.1):
            rss, fds = measure(self.pid)
            self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# ---- processes --------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))


def _die_with_us() -> None:
    """preexec_fn: the child gets SIGKILL when this process dies (Linux), so that no victim or
    attacker outlives a benchmark that was itself killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill(proc: subprocess.Popen | None) -> None:
    """Kill a process we started, by its PID, and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream:
                stream.close()
        except OSError:
            pass


async def _readline(proc: subprocess.Popen, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout)
    if not line:
        raise RuntimeError(f"process {proc.pid} exited ({proc.poll()}) before it was ready")
    return line


# ---- the legitimate side -----------------------------------------------------------------------
async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def connect_probe(address: str, stop: asyncio.Event, results: list[bool]) -> None:
    """Every 0.4 s until ``stop``: a fresh P2P peer connects to ``address`` and pings it within 3 s."""
    from dht import P2P

    async def one() -> None:
        peer = None
        try:
            async def attempt() -> None:
                nonlocal peer
                peer = await P2P.create(host="127.0.0.1", client_mode=True)
                await peer.ping(address, timeout=3.0)
            await asyncio.wait_for(attempt(), 3.0)
            results.append(True)
        except Exception:
            results.append(False)
        finally:
            if peer is not None:
                try:
                    await asyncio.wait_for(peer.shutdown(), 3.0)
                except Exception:
                    pass

    tasks = []
    while not stop.is_set():
        tasks.append(asyncio.ensure_future(one()))
        await _sleep_or_stop(stop, 0.4)
    await asyncio.gather(*tasks, return_exceptions=True)


async def latency_probe(client: Any, stop: asyncio.Event, results: list[tuple[bool, float]]) -> None:
    """Store a fresh key and get it back, in a loop until ``stop``; (ok, seconds) of each pair."""
    from dht import get_dht_time

    tag = uuid.uuid4().hex[:8]
    i = 0
    while not stop.is_set():
        i += 1
        key = f"legit/{tag}/{i}"
        t0 = time.perf_counter()
        ok = False
        try:
            if await asyncio.wait_for(client.store(key, i, get_dht_time() + 600), 5.0):
                got = await asyncio.wait_for(client.get(key), 5.0)
                ok = got is not None and got.value == i
        except Exception:
            ok = False
        results.append((ok, time.perf_counter() - t0))
        await _sleep_or_stop(stop, 0.2)


async def _fresh_client(address: str):
    from dht.node import DHTNode

    return await asyncio.wait_for(DHTNode.create([address], host="127.0.0.1", client_mode=True), 15.0)


async def check_signed(info: dict) -> tuple[int, int, list[str]]:
    """(intact, total, problems) of the victim's signed records, read by a fresh client."""
    try:
        client = await _fresh_client(info["address"])
    except Exception as e:
        return 0, len(info["signed"]), [f"cannot join the victim: {type(e).__name__}"]
    intact, problems = 0, []
    try:
        for key, subkey in info["signed"]:
            expected = {"key": key, "subkey": subkey, "owner": info["peer_id"]}
            try:
                found = await asyncio.wait_for(client.get(key, latest=True), 10.0)
            except Exception as e:
                problems.append(f"{key}: {type(e).__name__}")
                continue
            if subkey is None:
                good = found is not None and found.value == expected
            else:
                good = (found is not None and isinstance(found.value, dict) and subkey in found.value
                        and found.value[subkey].value == expected)
            intact += good
            if not good and len(problems) < 4:
                size = len(found.value) if found is not None and hasattr(found.value, "__len__") else "?"
                shown = "absent" if found is None else f"{type(found.value).__name__} of {size}"
                problems.append(f"{key}/{subkey}: {shown}")
    finally:
        await client.shutdown()
    return intact, len(info["signed"]), problems


async def check_shared(info: dict) -> bool:
    """Whether the victim's own subkey of the shared dictionary can still be read."""
    key, subkey = info["shared"]
    try:
        client = await _fresh_client(info["address"])
    except Exception:
        return False
    try:
        found = await asyncio.wait_for(client.get(key, latest=True), 10.0)
        return found is not None and isinstance(found.value, dict) and subkey in found.value
    except Exception:
        return False
    finally:
        await client.shutdown()


async def check_listed(info: dict, target: Any) -> bool:
    """Whether the victim still lists peer ``target`` (a DHTNode) at its real address."""
    from dht import P2P
    from dht.routing import DHTID

    peer = await P2P.create(host="127.0.0.1", client_mode=True)
    real = {str(a.without_peer_id()) for a in target.p2p.get_visible_addresses()}
    try:
        reply = await peer.call(info["address"], "dht.find", {"v": 1, "server": False, "k": 20,
                                                              "keys": [DHTID.of_peer(target.peer_id).to_bytes20()]},
                                timeout=5.0)
        for raw, addresses in reply["results"][0][1]:
            if bytes(raw) == target.peer_id.raw:
                return bool(real & set(addresses))
        return False
    except Exception:
        return False
    finally:
        await peer.shutdown()


async def start_daemon(workdir: Path, log_path: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``swarm join examples/digits.py`` (a new swarm of one, creating run ``abuse-run``) with
    the 1024-fd soft limit; wait until ``swarm runs`` lists the run; (process, victim info)."""
    import resource

    def limit_fds() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        _die_with_us()

    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "swarm", "join", str(ROOT / "examples" / "digits.py"),
                                 "--host", "127.0.0.1", "--threads", "1", "--quiet", "--run-id", DAEMON_RUN,
                                 "--identity", str(workdir / "daemon.key"), "--max-seconds", "900",
                                 "--metrics-file", str(log_path.with_suffix(".metrics.jsonl")),
                                 "--matchmaking-time", "0.5"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                preexec_fn=limit_fds)
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            text = log_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.strip().startswith("/ip4/127.0.0.1/"):
                    address = line.strip()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {text[-1000:]}")
            await asyncio.sleep(0.2)
        info = {"address": address, "peer_id": address.rsplit("/", 1)[1], "pid": proc.pid, "run": DAEMON_RUN,
                "metrics": str(log_path.with_suffix(".metrics.jsonl")),
                "signed": [["swarm.runs", None], [f"{DAEMON_RUN}.progress", None]], "shared": None,
                "averaging_prefix": None}
        while not (await check_daemon_run(info))[0]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon's run never got listed: {log_path.read_text(errors='replace')[-1000:]}")
            await asyncio.sleep(1.0)
        await asyncio.sleep(TRAIN_BASELINE_S)  # a training rate to compare with
        return proc, info
    except BaseException:
        _kill(proc)
        raise


def epochs_between(metrics: str, start: float, end: float) -> int:
    """Epochs the daemon finished between wall-clock times ``start`` and ``end`` (its metrics file)."""
    try:
        records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0
    return sum(1 for r in records if isinstance(r, dict) and start <= r.get("time", 0) < end)


async def check_daemon_run(info: dict) -> tuple[int, int, list[str]]:
    """(1, 1, []) if ``swarm runs`` lists the daemon's run with a live peer, else (0, 1, [why])."""
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, lambda: subprocess.run(
            [sys.executable, "-m", "swarm", "runs", "--initial-peers", info["address"], "--json"], cwd=ROOT,
            env=_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL))
        runs = json.loads(result.stdout)
    except Exception as e:
        return 0, 1, [f"swarm runs failed: {type(e).__name__}"]
    listed = [r for r in runs if r.get("run_id") == DAEMON_RUN and (r.get("peers") or 0) >= 1]
    return (1, 1, []) if listed else (0, 1, [f"swarm runs lists {[r.get('run_id') for r in runs]} with "
                                             f"{[r.get('peers') for r in runs]} peers"])


# ---- one attack ----------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_attack(spec: Spec, args: argparse.Namespace, workdir: Path) -> dict:
    from dht.node import DHTNode

    t_start = time.monotonic()
    victim_args = list(spec.victim_args)
    if spec.name == "handover-pings":
        victim_args = ["--records", str(max(2000, int(60000 * args.scale)))]
    if args.loopback_private:
        victim_args.append("--loopback-private")
    victim_log = workdir / f"{spec.name}.victim.log"
    attacker_log = workdir / f"{spec.name}.attacker.log"
    victim = attacker = None
    helpers: list[Any] = []
    row: dict[str, Any] = {"attack": spec.name}
    try:
        if spec.victim == "daemon":
            victim, info = await start_daemon(workdir, victim_log)
        else:
            with open(victim_log, "wb") as log:
                victim = subprocess.Popen([sys.executable, "-m", "abuse_kit.victim", *victim_args],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=_env(), cwd=ROOT, preexec_fn=_die_with_us)
            info = json.loads(await _readline(victim, 180.0))
        assert info["address"].startswith("/ip4/127.0.0.1/"), "the victim must listen on loopback"
        row["victim"] = {k: info.get(k) for k in ("loopback_as_public", "nofile")}
        client = await _fresh_client(info["address"])
        helpers.append(client)
        params: dict = {}
        target = None
        if spec.name == "contact-poisoning":
            target = await asyncio.wait_for(DHTNode.create([info["address"]], host="127.0.0.1"), 15.0)
            helpers.append(target)
            params["target"] = str(target.peer_id)
        await asyncio.sleep(1.0)
        rss_before, fds_before = measure(victim.pid)
        log_before = victim_log.stat().st_size
        sampler = Sampler(victim.pid)
        sampler.start()
        attack_start = time.time()
        stop = asyncio.Event()
        connects: list[bool] = []
        latencies: list[tuple[bool, float]] = []
        probes = [asyncio.ensure_future(connect_probe(info["address"], stop, connects)),
                  asyncio.ensure_future(latency_probe(client, stop, latencies))]
        if target is not None:  # L's connection to the victim drops now and then: the victim must dial L again
            async def churn() -> None:
                while not stop.is_set():
                    await _sleep_or_stop(stop, 1.5)
                    target.p2p.disconnect(_peer_id(info), "churn")
            probes.append(asyncio.ensure_future(churn()))
        with open(attacker_log, "wb") as log:
            attacker = subprocess.Popen(
                [sys.executable, "-m", "abuse_kit.attacks", spec.attack or spec.name, "--info", json.dumps(info),
                 "--params", json.dumps(params), "--scale", str(args.scale), "--hold", str(args.hold),
                 "--ip", args.ip, "--max-time", str(args.max_time)],
                stdout=subprocess.PIPE, stderr=log, text=True, env=_env(), cwd=ROOT, preexec_fn=_die_with_us)
        loop = asyncio.get_running_loop()
        try:
            out, _ = await loop.run_in_executor(None, lambda: attacker.communicate(timeout=args.max_time + 15))
        except subprocess.TimeoutExpired:
            _kill(attacker)
            out = ""
        attack_end = time.time()
        stop.set()
        await asyncio.gather(*probes, return_exceptions=True)
        result = next((json.loads(line[7:]) for line in (out or "").splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            tail = attacker_log.read_text(errors="replace")[-600:]
            result = {"error": f"attacker exited with {attacker.returncode}: {tail}"}
        log_during = victim_log.stat().st_size - log_before
        settle_end = time.monotonic() + 10.0
        while time.monotonic() < settle_end and measure(victim.pid)[1] > fds_before + FD_SLACK:
            await asyncio.sleep(0.25)
        rss_after, fds_after = measure(victim.pid)
        sampler.stop()
        alive = victim.poll() is None
        if not alive:
            signed_ok, signed_total, problems = 0, max(1, len(info["signed"])), ["victim died"]
        elif spec.victim == "daemon":
            signed_ok, signed_total, problems = await check_daemon_run(info)
        else:
            signed_ok, signed_total, problems = await check_signed(info)
        checks: dict[str, bool] = {}
        if spec.name == "sybil-admission" and "sybils_listed" in result:
            checks[f"sybils listed <= {SYBIL_LIMIT}"] = result["sybils_listed"] <= SYBIL_LIMIT
        if spec.name == "never-fed" and "accepted" in result:
            checks[f"handlers of one identity <= {STREAM_LIMIT}"] = result["accepted"] <= STREAM_LIMIT
        if spec.name == "large-subkeys":
            checks["shared key readable"] = alive and await check_shared(info)
        if spec.name == "contact-poisoning":
            checks["L listed at its address"] = alive and await check_listed(info, target)
        if spec.victim == "daemon":
            before = epochs_between(info["metrics"], attack_start - TRAIN_BASELINE_S, attack_start) / TRAIN_BASELINE_S
            during = epochs_between(info["metrics"], attack_start, attack_end) / max(attack_end - attack_start, 1e-3)
            row["training_epochs_per_s"] = {"before": round(before, 2), "during": round(during, 2)}
            checks[f"training >= {TRAINING_SHARE:.0%} of its rate"] = before == 0 or during >= TRAINING_SHARE * before
        checks["victim alive"] = alive
        lat_ok = [s for ok, s in latencies]
        row.update({
            "rss_mib": {"before": round(rss_before, 1), "peak": round(max(sampler.peak_rss, rss_after), 1),
                        "after": round(rss_after, 1)},
            "fds": {"before": fds_before, "peak": max(sampler.peak_fds, fds_after), "after": fds_after},
            "connect": {"ok": sum(connects), "total": len(connects),
                        "share": round(sum(connects) / len(connects), 3) if connects else None},
            "store_get_s": {"p50": round(_percentile(lat_ok, 0.5), 3), "p95": round(_percentile(lat_ok, 0.95), 3),
                            "max": round(max(lat_ok), 3) if lat_ok else None,
                            "ok": sum(ok for ok, _ in latencies), "total": len(latencies)},
            "signed": {"intact": signed_ok, "total": signed_total, "problems": problems},
            "log_kib": round(log_during / 1024, 1),
            "checks": checks,
            "attacker": result,
        })
        failed = []
        if row["rss_mib"]["peak"] - rss_before > MEMORY_LIMIT_MIB:
            failed.append("memory")
        if fds_after - fds_before > FD_SLACK:
            failed.append("fds")
        if not connects or sum(connects) / len(connects) < CONNECT_SHARE:
            failed.append("connect")
        if not latencies or row["store_get_s"]["ok"] < len(latencies) or max(lat_ok) >= LATENCY_LIMIT_S:
            failed.append("store/get")
        if signed_ok < signed_total:
            failed.append("signed")
        failed += [name for name, ok in checks.items() if not ok]
        if "error" in result:
            failed.append("attacker error")
        row["failed"], row["passed"] = failed, not failed
    except Exception as e:
        row.setdefault("failed", []).append(f"harness error: {type(e).__name__}: {str(e)[:200]}")
        row["passed"] = False
    finally:
        for helper in helpers:
            try:
                await asyncio.wait_for(helper.shutdown(), 10.0)
            except Exception:
                pass
        _kill(attacker)
        _kill(victim)
    row["wall_s"] = round(time.monotonic() - t_start, 1)
    for key in ROW_KEYS:
        row.setdefault(key, None)
    return row


def _peer_id(info: dict):
    from dht.peer.identity import PeerID

    return PeerID.from_base58(info["peer_id"])


# ---- output -------------------------------------------------------------------------------------
def format_row(row: dict) -> str:
    def trio(d: dict | None, fmt: str) -> str:
        return "-" if not d else "/".join(format(d[k], fmt) for k in ("before", "peak", "after"))

    conn = row["connect"] or {}
    lat = row["store_get_s"] or {}
    signed = row["signed"] or {}
    verdict = "PASS" if row["passed"] else "FAIL: " + ", ".join(row["failed"] or [])
    lat_text = "-" if not lat or lat.get("max") is None else \
        f"{lat['p50']:.2f}/{lat['p95']:.2f}/{lat['max']:.2f} ({lat['ok']}/{lat['total']})"
    return (f"{row['attack']:<20} {trio(row['rss_mib'], '.0f'):>15} {trio(row['fds'], 'd'):>15} "
            f"{(str(conn.get('ok')) + '/' + str(conn.get('total'))) if conn else '-':>8} {lat_text:>26} "
            f"{(str(signed.get('intact')) + '/' + str(signed.get('total'))) if signed else '-':>6} "
            f"{row['log_kib'] if row['log_kib'] is not None else '-':>7} {row['wall_s']:>6.1f}  {verdict}")


HEADER = (f"{'attack':<20} {'RSS MiB b/p/a':>15} {'fds b/p/a':>15} {'connect':>8} "
          f"{'store+get s p50/p95/max':>26} {'signed':>6} {'log KiB':>7} {'wall s':>6}  verdict")  # noqa: E501


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # our legitimate side's noise under attack
    names = [s.name for s in SPECS]
    epilog = "attacks:\n" + "\n".join(f"  {s.name:<23} {s.summary}" + (f" (--{s.optional})" if s.optional else "")
                                       for s in SPECS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="", help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each attack's counts (default 1.0)")
    parser.add_argument("--hold", type=float, default=None,
                        help="seconds each attack is held at full strength (default 8 x scale, in [2, 8])")
    parser.add_argument("--ip", default="127.0.0.2", help="the attacker's source address (loopback)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="seconds one attacker may run before it is killed (default 40 + 80 x scale)")
    parser.add_argument("--averaging", action="store_true", help="also the attacks that need an Averager on the victim")
    parser.add_argument("--loopback-private", action="store_true",
                        help="victims keep the default that exempts loopback addresses from per-IP-prefix limits")
    parser.add_argument("--daemon", action="store_true",
                        help="also attack a real `swarm join` daemon training examples/digits.py")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout (the table goes to stderr)")
    args = parser.parse_args()
    if not 0 < args.scale <= 4:
        parser.error("--scale must lie in (0, 4]")
    if not args.ip.startswith("127.") or args.ip == "127.0.0.1":
        parser.error("--ip must be a loopback address other than 127.0.0.1")
    args.hold = min(8.0, max(2.0, 8.0 * args.scale)) if args.hold is None else args.hold
    args.max_time = 40.0 + 80.0 * args.scale if args.max_time is None else args.max_time
    chosen = [n.strip() for n in args.attacks.split(",") if n.strip()] or \
        [s.name for s in SPECS if not s.optional or (s.optional == "averaging" and args.averaging)
         or (s.optional == "daemon" and args.daemon)]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown attacks {unknown}; choose from {names}")
    specs = [s for s in SPECS if s.name in chosen]
    table = sys.stderr if args.json else sys.stdout
    print(f"abuse benchmark: scale {args.scale}, hold {args.hold:.0f} s, attacker {args.ip}", file=table)
    print(HEADER, file=table, flush=True)
    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # killed: run_attack's cleanup still kills our processes
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="abuse-") as workdir:
        try:
            for spec in specs:
                row = asyncio.run(run_attack(spec, args, Path(workdir)))
                rows.append(row)
                print(format_row(row), file=table, flush=True)
        except KeyboardInterrupt:
            print(f"interrupted after {len(rows)} attacks", file=table, flush=True)
            sys.exit(130)
    total = time.monotonic() - t0
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} attacks passed; total {total:.0f} s", file=table, flush=True)
    if args.json:
        print(json.dumps({"scale": args.scale, "hold_s": args.hold, "attacker_ip": args.ip, "total_s": round(total, 1),
                          "targets": {"memory_mib": MEMORY_LIMIT_MIB, "fd_slack": FD_SLACK, "connect_share": CONNECT_SHARE,
                                      "latency_s": LATENCY_LIMIT_S, "sybils_listed": SYBIL_LIMIT,
                                      "handlers_per_identity": STREAM_LIMIT},
                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
