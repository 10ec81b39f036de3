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
        pids = lab.pids()
        assert sleeper.pid in pids and len(pids) >= 5  # 4 holders, the forwarder, the sleeper
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
        lab.hosts[0].popen(["sleep", "600"])
        lab.hosts[1].popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(json.dumps({{"inodes": lab.namespace_inodes(), "pids": lab.pids()}}), flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        assert len(info["pids"]) >= 5 and _alive(info["pids"]) == info["pids"]
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
