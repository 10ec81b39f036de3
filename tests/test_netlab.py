"""The network lab (tests/netlab.py): emulated hosts with their own link rates, delays and loss on one
machine, checked with ``swarm ping`` and bulk TCP transfers; and a swarm trained across its hosts.

Needs root (network namespaces); elsewhere these tests skip with the reason. CI runs them as root."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from . import netlab
from .netlab import Lab, Link, bulk_transfer, throughput_mbit

REASON = netlab.unavailable()
needs_lab = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# TCP payload per Ethernet frame at MTU 1500 with timestamps: 1448 of 1514 bytes. tbf meters frames.
GOODPUT = 1448 / 1514


def _start_peer(host, port: int = 4000) -> tuple[subprocess.Popen, str]:
    """``swarm peer`` on ``host``; returns (process, its /ip4 address)."""
    proc = host.popen([sys.executable, "-m", "swarm", "peer", "--host", host.ip, "--port", str(port)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"swarm peer exited: {proc.stderr.read()[-2000:]}")
        if line.strip().startswith(f"/ip4/{host.ip}/"):
            return proc, line.strip()
    raise AssertionError("swarm peer did not print its address")


def _swarm_ping(host, address: str, count: int = 11) -> list[float]:
    """RTTs in ms printed by ``swarm ping`` run on ``host`` (the first one includes the connection set-up)."""
    result = host.run([sys.executable, "-m", "swarm", "ping", address, "--count", str(count), "--interval", "0.1"],
                      timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rtts = [float(line.rsplit(":", 1)[1].split()[0]) for line in result.stdout.splitlines() if line.startswith("ping ")]
    assert len(rtts) == count, result.stdout
    return rtts


# ---------------------------------------------------------------- configuration (no root needed)

def test_links_and_subnets_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="loss"):
        Link(loss=1.0)
    with pytest.raises(ValueError, match="up_mbit"):
        Link(up_mbit=0)
    with pytest.raises(ValueError, match="delay_ms"):
        Link(delay_ms=-1)
    if REASON is None:
        with pytest.raises(ValueError, match="documentation ranges"):
            Lab([Link()], subnet="10.0.0.0/24")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netlab.unavailable() == "the network lab needs root (network namespaces, veth, tc)"
    with pytest.raises(RuntimeError, match="needs root"):
        Lab([Link()])


# ---------------------------------------------------------------- hosts, processes, teardown

@needs_lab
def test_hosts_run_the_venv_python_on_their_own_network_and_vanish_on_close():
    lab = Lab([Link(), Link(), Link()], subnet="198.51.100.0/24")
    try:
        inodes = lab.namespace_inodes()
        assert len(set(inodes)) == 4 and os.stat("/proc/self/ns/net").st_ino not in inodes
        probe = ("import json, socket, sys, subprocess; "
                 "print(json.dumps([sys.executable, open('/proc/net/route').read().count('eth0'), "
                 "subprocess.run(['ip', '-4', '-o', 'addr', 'show', 'eth0'], capture_output=True, text=True).stdout]))")
        for host in lab.hosts:
            result = host.run([sys.executable, "-c", probe])
            executable, routes, addr = json.loads(result.stdout)
            assert executable == sys.executable and routes == 1, result
            assert f"inet {host.ip}/24" in addr, addr
        assert [h.ip for h in lab.hosts] == ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        # TCP between hosts through the core; the hosts cannot reach the machine's other networks.
        server = lab.hosts[2].popen([sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.create_server(("0.0.0.0", 7000)); print("up", flush=True)
            c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()""")], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        client = lab.hosts[0].run([sys.executable, "-c", "import socket; c = socket.create_connection(('198.51.100.3', "
                                   "7000), timeout=10); print(c.recv(100).decode())"])
        assert client.stdout.strip() == "198.51.100.1", client.stderr
        unreachable = lab.hosts[0].run([sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 9), "
                                        "timeout=2)"])
        assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr.lower(), unreachable.stderr
        sleeper = lab.hosts[1].popen(["sleep", "600"])
        deadline = time.monotonic() + 10  # setpriv and nsenter exec it once they entered the namespace
        while sleeper.pid not in lab.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = lab.pids()
        assert sleeper.pid in pids and len(pids) >= 6  # 4 holders, the forwarder, the sleeper
    finally:
        lab.close()
    assert sleeper.poll() is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.1)
    assert not _alive(pids)
    assert not _processes_in(inodes)  # no process left in them: the namespaces are gone


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _processes_in(inodes: list[int]) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and netlab._netns_inode(e) in inodes]


@needs_lab
def test_a_lab_dies_with_its_process_even_on_kill_9(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(netlab.ROOT)!r})
        from tests.netlab import Lab, Link
        lab = Lab([Link(delay_ms=5), Link(delay_ms=5)])
        children = [lab.hosts[0].popen(["sleep", "600"]).pid,
                    lab.hosts[1].popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid]
        while not set(children) <= set(lab.pids()):
            time.sleep(0.05)
        print(json.dumps({{"inodes": lab.namespace_inodes(), "pids": lab.pids()}}), flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        assert len(info["pids"]) == 6 and _alive(info["pids"]) == info["pids"]  # 3 holders, forwarder, 2 children
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        owner.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_alive(info["pids"]) or _processes_in(info["inodes"])):
        time.sleep(0.1)
    assert not _alive(info["pids"]) and not _processes_in(info["inodes"])


@needs_lab
def test_an_exception_inside_the_lab_still_tears_it_down():
    with pytest.raises(ZeroDivisionError):
        with Lab([Link(), Link()]) as lab:
            inodes = lab.namespace_inodes()
            sleeper = lab.hosts[0].popen(["sleep", "600"])
            1 / 0
    assert sleeper.poll() is not None and not _processes_in(inodes)


# ---------------------------------------------------------------- delay, rate, loss

@needs_lab
def test_swarm_ping_measures_the_configured_round_trip():
    """One-way delays 10, 20 and 5 ms to the core: RTTs 60 ms (h0-h1) and 50 ms (h2-h1)."""
    with Lab([Link(delay_ms=10), Link(delay_ms=20), Link(delay_ms=5)]) as lab:
        assert (lab.rtt_ms(0, 1), lab.rtt_ms(2, 1)) == (60, 50)
        _, address = _start_peer(lab.hosts[1])
        for client in (0, 2):
            configured = lab.rtt_ms(client, 1)
            rtts = _swarm_ping(lab.hosts[client], address)[1:]  # the first includes TCP + handshake
            median = statistics.median(rtts)
            print(f"h{client}-h1: configured {configured} ms, swarm ping median {median:.2f} ms, "
                  f"min {min(rtts):.2f}, max {max(rtts):.2f}")
            assert min(rtts) >= configured * 0.99, rtts  # never faster than the wire
            assert abs(median - configured) <= 0.1 * configured, rtts


@needs_lab
def test_bulk_transfer_runs_at_the_configured_rate_each_way():
    """h0 uploads at 40 Mbit/s and downloads at 200; h1 at 300 / 80; 40 ms RTT. So h0 -> h1 is held by
    h0's uplink (40) and h1 -> h0 by h0's downlink (200)."""
    with Lab([Link(up_mbit=40, down_mbit=200, delay_ms=10), Link(up_mbit=300, down_mbit=80, delay_ms=10)]) as lab:
        for src, dst, rate in ((0, 1, 40), (1, 0, 200)):
            goodput = throughput_mbit(bulk_transfer(lab, src, dst, seconds=4.0))
            print(f"h{src} -> h{dst}: configured {rate} Mbit/s, TCP goodput {goodput:.1f} Mbit/s "
                  f"({goodput / GOODPUT:.1f} Mbit/s of frames)")
            assert abs(goodput - rate) <= 0.1 * rate, (src, dst, goodput)
            assert goodput / GOODPUT <= rate * 1.03, (src, dst, goodput)  # the limit is the link's
        assert lab.forwarder_alive()


@needs_lab
def test_loss_drops_the_configured_fraction():
    """20% loss on h0's link: about 20% of h0's datagrams to h1 are lost, all of them in the core."""
    with Lab([Link(loss=0.2, delay_ms=1), Link(delay_ms=1)], seed=7) as lab:
        receiver = lab.hosts[1].popen([sys.executable, "-c", textwrap.dedent("""
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 7001)); s.settimeout(3)
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no drops in our own buffer
            print("up", flush=True)
            n = 0
            try:
                while True:
                    s.recv(100); n += 1
            except socket.timeout:
                print(n, flush=True)""")], stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "up"
        lab.hosts[0].run([sys.executable, "-c", textwrap.dedent("""
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(2000):
                s.sendto(b"x" * 100, ("192.0.2.2", 7001))
                if i % 50 == 0:
                    time.sleep(0.005)""")])
        received = int(receiver.stdout.readline())
        stats = lab.close()
    print(f"received {received} of 2000 with 20% loss; forwarder: {stats}")
    assert 1600 - 100 <= received <= 1600 + 100  # 5 standard deviations
    assert stats["lost"] == 2000 - received


# ---------------------------------------------------------------- a swarm across the lab's hosts

PEER_SCRIPT = str(netlab.ROOT / "tests" / "netlab_peers" / "allreduce_peer.py")

# 192 samples per epoch, 16 per step of 0.2 s.
# Training waits (in data()) until the file GO exists, so that all peers start together; the first call
# of data() is the daemon's check before it joins, which does not wait.
TINY_TASK = textwrap.dedent("""
    import os, time
    import torch
    from swarm import Task

    GO = {go!r}
    calls = [0]

    def data(shard, num_shards, batch_size, seed):
        calls[0] += 1
        deadline = time.monotonic() + 120
        while calls[0] > 1 and not os.path.exists(GO) and time.monotonic() < deadline:
            time.sleep(0.1)
        g = torch.Generator().manual_seed(seed)
        w = torch.arange(1.0, 5.0)
        for _ in range(8):
            time.sleep(0.2)  # a peer alone needs 2.4 s per epoch, 4 together 0.6 s: they see each other
            x = torch.randn(batch_size, 4, generator=g)
            yield x, x @ w + 0.1 * torch.randn(batch_size, generator=g)

    task = Task(name="tiny", model=lambda: torch.nn.Linear(4, 1),
                optimizer=lambda p: torch.optim.Adam(p, lr=0.05), data=data,
                loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]).sum(-1), b[1]),
                batch_size=16, target_batch_size=192)
""")


class _Logs:
    """Processes started in lab hosts, each writing ``DIR/NAME.log``."""

    def __init__(self, directory):
        self.directory = directory
        self.procs: dict[str, subprocess.Popen] = {}
        self._files = []

    def spawn(self, name: str, host, args: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "a")
        self._files.append(log)
        self.procs[name] = host.python(args, stdout=log, stderr=subprocess.STDOUT, text=True)
        return self.procs[name]

    def text(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float) -> "re.Match":
        import re
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text(name), re.MULTILINE)
            if match:
                return match
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                match = re.search(pattern, self.text(name), re.MULTILINE)
                if match:
                    return match
                raise AssertionError(f"{name} did not print {pattern!r} (exit {self.procs[name].poll()}):\n"
                                     f"{self.text(name)[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        for f in self._files:
            f.close()


@needs_lab
@pytest.mark.slow
def test_a_four_host_swarm_averages_exactly_and_trains_over_limited_links(tmp_path):
    """4 hosts with unequal, asymmetric links (20-200 Mbit/s, RTTs 30-80 ms): a DHT across them, one
    all-reduce of 500k floats per peer (the exact weighted average everywhere), then ``swarm join`` on
    each host for two epochs (each peer's epochs rise one by one to 2, with all 4 peers in view)."""
    import torch

    links = [Link(up_mbit=100, down_mbit=100, delay_ms=5), Link(up_mbit=50, down_mbit=50, delay_ms=10),
             Link(up_mbit=20, down_mbit=40, delay_ms=15), Link(up_mbit=200, down_mbit=200, delay_ms=20)]
    size = 500_000
    logs = _Logs(tmp_path)
    try:
        with Lab(links) as lab:
            hosts = lab.hosts
            # --- a DHT across the hosts and one all-reduce
            logs.spawn("bootstrap", hosts[0], ["-m", "swarm", "dht", "--host", hosts[0].ip, "--report-interval", "3600"])
            first = logs.wait_for("bootstrap", r"--initial-peers (/ip4/\S+)", 60).group(1)
            assert first.startswith(f"/ip4/{hosts[0].ip}/tcp/")
            for i in range(4):
                logs.spawn(f"avg{i}", hosts[i], [PEER_SCRIPT, "--host", hosts[i].ip, "--index", str(i), "--peers", "4",
                                                 "--size", str(size), "--out", str(tmp_path), first])
            expected = sum((i + 1) * vector for i, vector in enumerate(
                torch.randn(size, generator=torch.Generator().manual_seed(i)) for i in range(4))) / 10
            results = []
            for i in range(4):
                seen = json.loads(logs.wait_for(f"avg{i}", r'^(\{"dht".*)$', 90).group(1))["dht"]
                assert seen == {str(j): h.ip for j, h in enumerate(hosts)}, seen
                results.append(json.loads(logs.wait_for(f"avg{i}", r'^(\{"codec".*)$', 120).group(1)))
                logs.wait_for(f"avg{i}", r"^DONE", 30)
            print("all-reduce of 500k floats:", [round(r.get("seconds", -1), 2) for r in results])
            averages = [torch.load(tmp_path / f"peer{i}.pt") for i in range(4)]
            for i, (result, average) in enumerate(zip(results, averages)):
                assert "error" not in result and result["members"] == 4, result
                assert result["bytes_sent"] > 0 and result["bytes_received"] > 0
                assert torch.equal(average, averages[0]), i  # every peer holds the same vector
                assert torch.allclose(average, expected, rtol=0, atol=1e-5), (average - expected).abs().max()

            # --- training with `swarm join` on every host
            task = tmp_path / "tiny_task.py"
            go = tmp_path / "go"
            task.write_text(TINY_TASK.format(go=str(go)))

            def join(i: int, *initial: str) -> None:
                args = ["-m", "swarm", "join", str(task), "--host", hosts[i].ip, "--threads", "1", "--quiet",
                        "--identity", str(tmp_path / f"peer{i}.key"), "--matchmaking-time", "1.0",
                        "--run-id", "netlab-run", "--max-epochs", "2", "--metrics-file", str(tmp_path / f"m{i}.jsonl")]
                logs.spawn(f"join{i}", hosts[i], args + (["--initial-peers", *initial] if initial else []))

            join(0, first)
            logs.wait_for("join0", r"run 'netlab-run' is new: this peer created it", 90)
            for i in (1, 2, 3):
                join(i, first)
            for i in (1, 2, 3):
                logs.wait_for(f"join{i}", r"joining run 'netlab-run' created by", 90)
            go.touch()
            for i in range(4):
                proc = logs.procs[f"join{i}"]
                try:
                    proc.wait(timeout=150)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"join{i} still running:\n{logs.text(f'join{i}')[-3000:]}") from None
                assert proc.returncode == 0, logs.text(f"join{i}")[-3000:]
            for i in range(4):
                records = [json.loads(line) for line in (tmp_path / f"m{i}.jsonl").read_text().splitlines()]
                epochs = [r["epoch"] for r in records]
                assert epochs and epochs[-1] == 2 and all(b == a + 1 for a, b in zip(epochs, epochs[1:])), (i, epochs)
                assert max(r["peers"] for r in records) == 4, (i, records)
                assert records[-1]["bytes_received"] > 0, records
    finally:
        logs.close()


@needs_lab
@pytest.mark.slow
def test_the_benchmark_peers_time_a_dht_and_a_diloco_overlap_run_across_hosts(tmp_path):
    """The lab peers of benchmarks/wan.py on 2 hosts: dht_peer.py stores and finds every key across
    the hosts (hops counted for remote gets); train_peer.py trains charlm in DiLoCo with overlap for
    two rounds, both peers end at the same global model (the last round awaited and applied), with
    compute shares in (0, 1]."""
    links = [Link(up_mbit=100, down_mbit=100, delay_ms=5)] * 2
    peers_dir = netlab.ROOT / "tests" / "netlab_peers"
    logs = _Logs(tmp_path)
    phases = tmp_path / "phases"
    phases.mkdir()
    try:
        with Lab(links) as lab:
            hosts = lab.hosts
            common = ["--processes", "2", "--dir", str(phases), "--nodes", "2", "--keys", "3"]
            dht_peer = str(peers_dir / "dht_peer.py")
            logs.spawn("dht0", hosts[0], [dht_peer, "--host", hosts[0].ip, "--index", "0", *common])
            first = logs.wait_for("dht0", r"^ADDR (\S+)", 60).group(1)
            logs.spawn("dht1", hosts[1], [dht_peer, "--host", hosts[1].ip, "--index", "1", *common, first])
            logs.wait_for("dht1", r"^ADDR ", 60)
            # training peers start (importing torch) while the DHT phases run
            start = tmp_path / "start"
            for i in range(2):
                logs.spawn(f"train{i}", hosts[i], [
                    str(peers_dir / "train_peer.py"), "--host", hosts[i].ip, "--index", str(i), "--peers", "2",
                    "--mode", "diloco_overlap", "--samples", "1024", "--run-id", "netlab-overlap",
                    "--start", str(start),
                    "--out", str(tmp_path / f"train{i}.json"), "--bandwidth", "12.5", first])
            (phases / "store").touch()
            for i in range(2):
                stored = json.loads(logs.wait_for(f"dht{i}", r"^STORED (.*)$", 60).group(1))
                assert stored["ok"] == [True] * 6 and all(x > 0 for x in stored["lat"]), stored
            (phases / "get").touch()
            for i in range(2):
                got = json.loads(logs.wait_for(f"dht{i}", r"^GOT (.*)$", 60).group(1))
                assert got["ok"] == [True] * 6, got
                assert all(h >= 1 for h, local in zip(got["hops"], got["local"]) if not local), got
                assert all(h == 0 for h, local in zip(got["hops"], got["local"]) if local), got
            for i in range(2):
                logs.wait_for(f"train{i}", r"^ready", 120)
            start.write_text(repr(time.time() + 1.0))
            results = [json.loads(logs.wait_for(f"train{i}", r"^DONE (.*)$", 180).group(1)) for i in range(2)]
    finally:
        logs.close()
    for r in results:
        assert r["steps"] == 32 and r["samples"] == 512 and r["epochs"] == 2 and r["failed_rounds"] == 0, r
        assert 0 < r["compute"] <= r["wall"] and 0 < r["compute_cpu"] <= r["compute"] * 1.05, r
        assert r["bytes"] > 0, r
    assert results[0]["heldout_loss"] == results[1]["heldout_loss"], results  # the same global parameters
