"""A network lab on one Linux machine: N emulated hosts behind links with their own rates, delays and loss.

Each host is a network namespace with one interface ``eth0`` (an address from 192.0.2.0/24 by default;
only the documentation ranges 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 are accepted), cabled by
a veth pair to a port of a *core* namespace. The core is a switch written here: a userspace forwarder
that reads every frame arriving on a port from an ``AF_PACKET`` socket and writes it to the destination
port once the configured one-way delay has passed (this kernel has no netem and no fq, so the delay
cannot be a qdisc). Rates are ``tc tbf`` qdiscs: the host's uplink on its ``eth0``, its downlink on its
core port. So a frame from host A to host B takes

    A's uplink tbf -> veth -> forwarder (holds it delay(A) + delay(B), drops it with loss(A) / loss(B))
                   -> B's downlink tbf -> veth -> B

and the round trip between A and B is ``2 * (delay(A) + delay(B))`` plus a fraction of a millisecond
of forwarding. Frames keep their GSO size through the forwarder (``PACKET_VNET_HDR``), so a 64 KB TCP
burst is one frame to copy: measured here, one TCP flow over a 1 Gbit/s, 40 ms RTT link reached 956
Mbit/s of goodput (1000 of frames) with the forwarder using about a third of a core. It releases a
frame at (kernel receive timestamp + delay), runs SCHED_FIFO where allowed, and holds at most
MAX_QUEUED bytes per output port. Hosts' TCP buffers may grow to 64 MB (tcp_rmem/tcp_wmem inside the
lab only), so a long fat link is not window-limited; IPv6 is off; neighbours are static (no ARP).

NAT boxes (``Lab(links, nats=[Nat("port-restricted"), ...])``): a NAT box is one more host on the switch
(its public address follows the hosts' ones) with a private side: a bridge ``lan0`` in its namespace
with one or more inner hosts on a private documentation subnet (a /27 of a range other than the lab's,
the box at ``.1``, inner hosts from ``.2``; their default route is the box). nftables in the box
masquerades what leaves ``eth0`` and drops unsolicited inbound packets silently (as home routers do, no
RST): ``endpoint-independent`` maps an inner (address, port) to the same public port for every
destination (port-preserving) and accepts inbound packets from anyone on a mapped port (full cone);
``port-restricted`` maps the same way but lets in only replies from the endpoint an inner host sent
to; ``symmetric`` gives every new connection a random public port (``masquerade random,fully-random``)
and filters like ``port-restricted``. Needs ``nft`` (nftables); ``conntrack`` is used to inspect.

Nothing outlives the lab: a namespace is held by a holder process (no ``ip netns`` name, no bind
mount), so it disappears with the last process inside it; holders, the forwarder and every process
started with ``host.popen`` get ``PDEATHSIG=SIGKILL`` (they die with the process that started the
lab, even on ``kill -9``), and ``Lab.close`` (context manager exit and ``atexit``) kills every process
left in the lab's namespaces by PID. Interface names live inside the lab's own namespaces, so labs
running in parallel never collide.

>>> with Lab([Link(up_mbit=100, down_mbit=100, delay_ms=15)] * 2) as lab:
...     server = lab.hosts[1].popen([sys.executable, "-m", "swarm", "peer", "--host", lab.hosts[1].ip],
...                                 stdout=subprocess.PIPE, text=True)
...     address = ...  # the /ip4/192.0.2.2/tcp/... line it prints
...     lab.hosts[0].run([sys.executable, "-m", "swarm", "ping", address])   # RTT ~60 ms

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip``, ``tc`` (iproute2), ``nsenter`` and ``setpriv``
(util-linux). :func:`unavailable` says why a lab cannot be built here (tests skip with that reason);
:func:`nat_unavailable` the same for labs with NAT boxes.

Also a command line, run inside the lab's namespaces by the lab itself::

    python tests/netlab.py forward CONFIG_JSON     # the core's forwarder
    python tests/netlab.py sink PORT SECONDS       # bulk-transfer receiver: prints a JSON line
    python tests/netlab.py source HOST PORT SECONDS
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DOC_SUBNETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
ROOT = Path(__file__).resolve().parent.parent
_TOOLS = ("ip", "tc", "nsenter", "setpriv")


@dataclass(frozen=True)
class Link:
    """One host's access link to the core; each direction has its own rate.

    ``up_mbit`` / ``down_mbit``: host -> core / core -> host rate in Mbit/s (10**6 bit/s of Ethernet
    frames), ``None`` for no limit. ``delay_ms``: one-way delay between the host and the core, added in
    each direction (A -> B takes ``delay(A) + delay(B)``). ``loss``: probability that a frame is dropped,
    in each direction. ``queue_ms``: the tbf queue, in milliseconds of the rate (tail drop beyond).
    """

    up_mbit: float | None = None
    down_mbit: float | None = None
    delay_ms: float = 0.0
    loss: float = 0.0
    queue_ms: float = 50.0

    def __post_init__(self) -> None:
        for name in ("up_mbit", "down_mbit"):
            rate = getattr(self, name)
            if rate is not None and not 0.01 <= rate <= 100_000:
                raise ValueError(f"{name} must be in [0.01, 100000] Mbit/s or None, not {rate}")
        if not 0 <= self.delay_ms <= 10_000:
            raise ValueError(f"delay_ms must be in [0, 10000], not {self.delay_ms}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {self.loss}")
        if not 1 <= self.queue_ms <= 10_000:
            raise ValueError(f"queue_ms must be in [1, 10000], not {self.queue_ms}")


NAT_KINDS = ("endpoint-independent", "port-restricted", "symmetric")


@dataclass(frozen=True)
class Nat:
    """A NAT box with ``inner`` hosts behind it (see the module docstring for the kinds).

    ``kind``: one of NAT_KINDS. ``link``: the box's access link to the core (the inner hosts' traffic to
    the rest of the lab crosses it; the private side is unlimited, without delay). ``inner``: number of
    inner hosts. ``subnet``: the private subnet (inside the documentation ranges, outside the lab's);
    None picks a /27 of its own. ``mapping_timeout_s``: how long an endpoint-independent box accepts
    inbound packets on a port after its inner host last sent from it.
    """

    kind: str = "port-restricted"
    link: Link = Link()
    inner: int = 1
    subnet: str | None = None
    mapping_timeout_s: int = 120

    def __post_init__(self) -> None:
        if self.kind not in NAT_KINDS:
            raise ValueError(f"kind must be one of {NAT_KINDS}, not {self.kind!r}")
        if not 1 <= self.inner <= 29:
            raise ValueError(f"inner must be in [1, 29], not {self.inner}")
        if not 1 <= self.mapping_timeout_s <= 3600:
            raise ValueError(f"mapping_timeout_s must be in [1, 3600], not {self.mapping_timeout_s}")


def unavailable() -> str | None:
    """Why a lab cannot be built on this machine (one line), or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, tc)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the network lab needs {', '.join(missing)} (iproute2, util-linux)"
    return None


def nat_unavailable() -> str | None:
    """Why a lab with NAT boxes cannot be built on this machine (one line), or None when it can."""
    reason = unavailable()
    if reason is None and shutil.which("nft") is None:
        reason = "NAT boxes in the network lab need nft (nftables)"
    return reason


def _pdeathsig(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the thread that starts it exits."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class _Namespace:
    """A network namespace held by a process of ours: it lives as long as that process (or others in it)."""

    def __init__(self, label: str):
        self.label = label
        code = ("import ctypes,sys\n"
                "if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:\n"  # CLONE_NEWNET
                "    sys.exit('unshare(CLONE_NEWNET) failed: errno %d' % ctypes.get_errno())\n"
                "print('ready', flush=True)\n"
                "sys.stdin.read()\n")  # until the lab closes our stdin or dies
        self.holder = subprocess.Popen(_pdeathsig([sys.executable, "-S", "-c", code]), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            err = self.holder.stderr.read()
            self.holder.kill()
            self.holder.wait()
            raise RuntimeError(f"could not create a network namespace: {err.strip()[-500:]}")
        self.pid = self.holder.pid
        self.inode = _netns_inode(self.pid)
        self.path = f"/proc/{self.pid}/ns/net"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return _pdeathsig(["nsenter", f"--net={self.path}", "--", *argv])

    def check(self, argv: Sequence[str], input: str | None = None, timeout: float = 30.0) -> str:
        """Run a set-up command inside; raise with its stderr when it fails."""
        result = subprocess.run(self.argv(argv), input=input, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{self.label}: {' '.join(argv)} failed ({result.returncode}): "
                               f"{result.stderr.strip()[-1000:]}\n{(input or '')[:2000]}")
        return result.stdout

    def pids(self) -> list[int]:
        """Every process in this namespace (the holder included)."""
        found = []
        if self.inode is None:
            return found
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _netns_inode(entry) == self.inode:
                found.append(int(entry))
        return found

    def close(self) -> None:
        for pid in self.pids():
            if pid != self.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.holder.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.holder.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.holder.wait(timeout=10)
        for stream in (self.holder.stdout, self.holder.stderr):
            stream.close()


class Host:
    """One emulated host: ``ip`` is its address, ``link`` its access link."""

    def __init__(self, lab: "Lab", index: int, ip: str, mac: str, link: Link, namespace: _Namespace,
                 name: str | None = None):
        self.lab, self.index, self.ip, self.mac, self.link = lab, index, ip, mac, link
        self.name = name or f"h{index}"
        self._ns = namespace
        self._procs: list[subprocess.Popen] = []

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host (for callers that start processes themselves)."""
        return self._ns.argv(argv)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside this host (same filesystem, this host's network); Popen keywords pass
        through (stdin defaults to /dev/null, cwd to the repository, PYTHONPATH includes it). The process
        is killed when the lab closes, or when the thread that started it exits: call from a long-lived one."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("cwd", ROOT)
        env = dict(kwargs.pop("env", None) or os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(self.argv(argv), env=env, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside this host to completion (killed after ``timeout`` seconds); output captured
        as text unless ``stdout``/``stderr`` say otherwise."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = self.popen(argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def python(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``host.popen([sys.executable, *args])``: this venv's python inside the host."""
        return self.popen([sys.executable, *args], **kwargs)

    def block_inbound(self) -> None:
        """Firewall this host: drop (silently) every packet that is not part of a connection it opened;
        its address stays its own (a "firewalled" peer, as opposed to one behind NAT)."""
        self._ns.check(["nft", "-f", "-"], input=(
            "table inet lab_firewall {\n"
            "  chain input { type filter hook input priority filter; policy accept;\n"
            '    iifname "eth0" ct state established,related accept\n'
            '    iifname "eth0" drop\n'
            "  }\n"
            "}\n"))

    def _kill_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip}, {self.link})"


class NatBox(Host):
    """A NAT box: a host on the switch (``ip`` is its public address) with ``inner`` hosts behind it on
    ``subnet`` (``private_ip`` is its own address there, their gateway)."""

    def __init__(self, lab: "Lab", index: int, ip: str, mac: str, nat: Nat, subnet: ipaddress.IPv4Network,
                 namespace: _Namespace, number: int):
        super().__init__(lab, index, ip, mac, nat.link, namespace, name=f"nat{number}")
        self.nat, self.kind, self.subnet = nat, nat.kind, subnet
        self.private_ip = str(next(subnet.hosts()))
        self.inner: list[Host] = []

    def conntrack(self) -> str:
        """The box's connection-tracking table (``conntrack -L``), to inspect its mappings."""
        return self._ns.check(["conntrack", "-L"])

    def ruleset(self) -> str:
        """The box's nftables rules (``nft list ruleset``)."""
        return self._ns.check(["nft", "list", "ruleset"])

    def __repr__(self) -> str:
        return f"NatBox({self.name}, {self.kind}, {self.ip}, {self.subnet}, {len(self.inner)} inner)"


def _nat_rules(nat: Nat) -> str:
    """The nftables rules of a NAT box of ``nat.kind`` (public side ``eth0``, private side ``lan0``)."""
    masquerade = "masquerade random,fully-random" if nat.kind == "symmetric" else "masquerade"
    cone = nat.kind == "endpoint-independent"
    lines = [
        "table ip lab_nat {",
        f'  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "eth0" {masquerade}; }}',
    ]
    if cone:  # full cone: remember which inner endpoint each public port maps to; let anyone in on it
        lines += [
            f"  map cone_addr {{ type inet_proto . inet_service : ipv4_addr; flags dynamic,timeout; "
            f"timeout {nat.mapping_timeout_s}s; }}",
            f"  map cone_port {{ type inet_proto . inet_service : inet_service; flags dynamic,timeout; "
            f"timeout {nat.mapping_timeout_s}s; }}",
            '  chain prerouting { type nat hook prerouting priority dstnat; iifname "eth0" ct state new '
            "dnat ip to meta l4proto . th dport map @cone_addr : meta l4proto . th dport map @cone_port; }",
            "  chain record { type filter hook postrouting priority 300;",
        ]
        for proto in ("tcp", "udp"):
            lines.append(f'    iifname "lan0" oifname "eth0" ct direction original meta l4proto {proto} '
                         f"update @cone_addr {{ meta l4proto . {proto} sport : ct original ip saddr }} "
                         f"update @cone_port {{ meta l4proto . {proto} sport : ct original proto-src }}")
        lines.append("  }")
    lines += [
        "}",
        "table inet lab_filter {",
        "  chain forward { type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        '    iifname "lan0" oifname "eth0" accept',
        *(['    iifname "eth0" oifname "lan0" ct status dnat accept'] if cone else []),
        "  }",
        "  chain input { type filter hook input priority filter; policy accept;",
        '    iifname "eth0" ct state established,related accept',
        '    iifname "eth0" drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


_OPEN_LABS: "weakref.WeakSet[Lab]" = weakref.WeakSet()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_OPEN_LABS):
        lab.close()


def _tbf(dev: str, mbit: float, queue_ms: float) -> str:
    """A ``tc -batch`` line: a token bucket at ``mbit`` on ``dev``'s egress. The bucket holds at least
    one 64 KB GSO frame (so big frames pass whole) and 1 ms of the rate; the queue holds ``queue_ms``."""
    rate_bytes = mbit * 1e6 / 8
    burst = int(max(70_000, rate_bytes / 1000))
    limit = int(max(burst + 3000, rate_bytes * queue_ms / 1000))
    return f"qdisc replace dev {dev} root tbf rate {int(mbit * 1e6)}bit burst {burst} limit {limit}"


def _private_subnets(public: ipaddress.IPv4Network | ipaddress.IPv6Network,
                     nats: Sequence[Nat]) -> list[ipaddress.IPv4Network]:
    """Each NAT box's private subnet: its own when given (checked), else the next free /27 of a
    documentation range that is not the lab's."""
    chosen: list[ipaddress.IPv4Network] = []
    free = (sub for doc in DOC_SUBNETS for sub in ipaddress.ip_network(doc).subnets(new_prefix=27)
            if not sub.overlaps(public))
    for nat in nats:
        if nat.subnet is None:
            sub = next(s for s in free if not any(s.overlaps(c) for c in chosen))
        else:
            sub = ipaddress.ip_network(nat.subnet)
            if not isinstance(sub, ipaddress.IPv4Network) or not any(
                    sub.subnet_of(ipaddress.ip_network(doc)) for doc in DOC_SUBNETS):
                raise ValueError(f"NAT subnet {nat.subnet} is not inside the documentation ranges {DOC_SUBNETS}")
            if sub.overlaps(public):
                raise ValueError(f"NAT subnet {nat.subnet} overlaps the lab's public subnet {public}")
        if sub.num_addresses - 3 < nat.inner:
            raise ValueError(f"NAT subnet {sub} has no room for {nat.inner} inner hosts")
        chosen.append(sub)
    return chosen


class Lab:
    """N hosts behind their own links to one core switch (see the module docstring).

    ``links[i]`` is host i's access link; hosts get consecutive addresses from ``subnet`` (``.1`` on).
    ``nats[j]`` adds NAT box ``lab.nats[j]`` (a :class:`NatBox`, its inner hosts in ``lab.nats[j].inner``);
    the boxes' public addresses follow the hosts'. ``seed`` seeds the forwarder's loss decisions. Use as
    a context manager; ``close()`` is idempotent.
    """

    def __init__(self, links: Sequence[Link], subnet: str = DOC_SUBNETS[0], seed: int = 0,
                 nats: Sequence[Nat] = ()):
        reason = nat_unavailable() if nats else unavailable()
        if reason:
            raise RuntimeError(reason)
        net = ipaddress.ip_network(subnet)
        if not any(net.subnet_of(ipaddress.ip_network(doc)) for doc in DOC_SUBNETS):
            raise ValueError(f"subnet {subnet} is not inside the documentation ranges {DOC_SUBNETS}")
        if not 1 <= len(links) + len(nats) <= min(200, net.num_addresses - 2) or not links and not nats:
            raise ValueError(f"a lab has 1 to {min(200, net.num_addresses - 2)} hosts and NAT boxes in {subnet}, "
                             f"not {len(links) + len(nats)}")
        self.links = list(links)
        self.subnet = net
        self.seed = seed
        self.nat_specs = list(nats)
        self.private_subnets = _private_subnets(net, self.nat_specs)
        self.hosts: list[Host] = []
        self.nats: list[NatBox] = []
        self._namespaces: list[_Namespace] = []
        self._forwarder: subprocess.Popen | None = None
        self._forwarder_err = b""
        self._closed = False
        _OPEN_LABS.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up

    def _build(self) -> None:
        core = _Namespace("core")
        self._namespaces.append(core)
        core_setup = ["link set lo up"]
        core_tc = []
        hosts = list(self.subnet.hosts())
        for i, link in enumerate(self.links):
            ns = _Namespace(f"h{i}")
            self._namespaces.append(ns)
            mac = f"02:4e:4c:00:{i >> 8:02x}:{i & 0xff:02x}"
            core_mac = f"02:4e:4c:01:{i >> 8:02x}:{i & 0xff:02x}"
            host = Host(self, i, str(hosts[i]), mac, link, ns)
            self.hosts.append(host)
            core_setup += [f"link add p{i} address {core_mac} type veth peer name eth0 address {mac} netns {ns.pid}",
                           f"link set p{i} up promisc on"]
            if link.down_mbit is not None:
                core_tc.append(_tbf(f"p{i}", link.down_mbit, link.queue_ms))
        for j, (nat, private) in enumerate(zip(self.nat_specs, self.private_subnets)):
            i = len(self.links) + j
            ns = _Namespace(f"nat{j}")
            self._namespaces.append(ns)
            mac = f"02:4e:4c:00:{i >> 8:02x}:{i & 0xff:02x}"
            core_mac = f"02:4e:4c:01:{i >> 8:02x}:{i & 0xff:02x}"
            box = NatBox(self, i, str(hosts[i]), mac, nat, private, ns, j)
            self.nats.append(box)
            core_setup += [f"link add p{i} address {core_mac} type veth peer name eth0 address {mac} netns {ns.pid}",
                           f"link set p{i} up promisc on"]
            if nat.link.down_mbit is not None:
                core_tc.append(_tbf(f"p{i}", nat.link.down_mbit, nat.link.queue_ms))
        switch: list[Host] = [*self.hosts, *self.nats]
        sysctl = ("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                  "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; ")
        core.check(["sh", "-c", sysctl])
        core.check(["ip", "-batch", "-"], input="\n".join(core_setup) + "\n")
        if core_tc:
            core.check(["tc", "-batch", "-"], input="\n".join(core_tc) + "\n")
        # Window sizes for long fat links (1 Gbit/s x 300 ms); only inside the lab's namespaces.
        host_sysctl = sysctl + ("echo '4096 131072 67108864' > /proc/sys/net/ipv4/tcp_rmem; "
                                "echo '4096 16384 67108864' > /proc/sys/net/ipv4/tcp_wmem")
        for host in switch:
            setup = ["link set lo up", f"addr add {host.ip}/{self.subnet.prefixlen} dev eth0", "link set eth0 up"]
            setup += [f"neigh replace {other.ip} lladdr {other.mac} dev eth0 nud permanent"
                      for other in switch if other is not host]
            host._ns.check(["sh", "-c", host_sysctl])
            host._ns.check(["ip", "-batch", "-"], input="\n".join(setup) + "\n")
            if host.link.up_mbit is not None:
                host._ns.check(["tc", "-batch", "-"], input=_tbf("eth0", host.link.up_mbit, host.link.queue_ms) + "\n")
        for box in self.nats:
            self._build_private_side(box, host_sysctl)
        config = {"seed": self.seed, "ports": [
            {"ifname": f"p{h.index}", "mac": h.mac, "delay_ns": int(h.link.delay_ms * 1e6), "loss": h.link.loss}
            for h in switch]}
        self._forwarder = subprocess.Popen(core.argv([sys.executable, str(Path(__file__).resolve()), "forward",
                                                      json.dumps(config)]),
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self._forwarder.stdout.readline()
        if not line.startswith(b"ready"):
            self._forwarder.kill()
            _, err = self._forwarder.communicate()
            raise RuntimeError(f"the lab's forwarder did not start: {err.decode(errors='replace')[-2000:]}")

    def _build_private_side(self, box: NatBox, host_sysctl: str) -> None:
        """``box``'s bridge ``lan0``, its inner hosts (default route: the box), forwarding and its rules."""
        prefix = box.subnet.prefixlen
        addresses = list(box.subnet.hosts())
        setup = ["link add lan0 type bridge", f"addr add {box.private_ip}/{prefix} dev lan0", "link set lan0 up"]
        for k in range(box.nat.inner):
            ns = _Namespace(f"{box.name}h{k}")
            self._namespaces.append(ns)
            inner = Host(self, -1, str(addresses[k + 1]), "", Link(), ns, name=f"{box.name}h{k}")
            box.inner.append(inner)
            setup += [f"link add l{k} type veth peer name eth0 netns {ns.pid}", f"link set l{k} master lan0",
                      f"link set l{k} up"]
        box._ns.check(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        box._ns.check(["ip", "-batch", "-"], input="\n".join(setup) + "\n")
        box._ns.check(["nft", "-f", "-"], input=_nat_rules(box.nat))
        for inner in box.inner:
            inner._ns.check(["sh", "-c", host_sysctl])
            inner._ns.check(["ip", "-batch", "-"], input="\n".join([
                "link set lo up", f"addr add {inner.ip}/{prefix} dev eth0", "link set eth0 up",
                f"route add default via {box.private_ip} dev eth0"]) + "\n")

    def all_hosts(self) -> list[Host]:
        """The hosts, the NAT boxes and their inner hosts."""
        return [*self.hosts, *[h for box in self.nats for h in (box, *box.inner)]]

    # ------------------------------------------------------------------ queries

    def one_way_ms(self, a: int, b: int) -> float:
        """Configured one-way delay from host ``a`` to host ``b`` in ms."""
        return self.links[a].delay_ms + self.links[b].delay_ms

    def rtt_ms(self, a: int, b: int) -> float:
        """Configured round-trip time between hosts ``a`` and ``b`` in ms (queueing excluded)."""
        return self.one_way_ms(a, b) + self.one_way_ms(b, a)

    def forwarder_alive(self) -> bool:
        return self._forwarder is not None and self._forwarder.poll() is None

    def pids(self) -> list[int]:
        """Every process inside the lab's namespaces (holders and the forwarder included)."""
        return [pid for ns in self._namespaces for pid in ns.pids()]

    def namespace_inodes(self) -> list[int]:
        return [ns.inode for ns in self._namespaces if ns.inode is not None]

    # ------------------------------------------------------------------ teardown

    def close(self) -> dict:
        """Kill everything the lab started, by PID, and let its namespaces vanish. Returns the forwarder's
        counters (frames, bytes, drops) when it reported them."""
        if self._closed:
            return {}
        self._closed = True
        stats: dict = {}
        for host in self.all_hosts():
            host._kill_all()
        if self._forwarder is not None:
            try:  # communicate() closes its stdin: the forwarder prints its counters and exits
                out, self._forwarder_err = self._forwarder.communicate(timeout=5)
                for line in out.decode(errors="replace").splitlines():
                    if line.startswith("{"):
                        stats = json.loads(line)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                self._forwarder.kill()
                with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
                    self._forwarder.communicate(timeout=5)
        for ns in self._namespaces:
            ns.close()
        _OPEN_LABS.discard(self)
        return stats

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ====================================================================== the core's forwarder

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
VNET_HDR_LEN = 10
MAX_FRAME = VNET_HDR_LEN + 65536 + 256
MAX_QUEUED = 128 << 20  # bytes held for one output port (1 Gbit/s x 1 s); beyond, frames are dropped


def _forward(config: dict) -> int:
    """Forward frames between the ports with their delays until stdin closes; print counters as JSON
    (frames and bytes received, ``lost`` to the configured loss, ``dropped`` by a full output queue,
    ``overflow``: over MAX_QUEUED bytes held for one port, ``flooded``: sent to every port)."""
    import heapq
    import random
    import select
    import struct

    rng = random.Random(config["seed"])
    ports = config["ports"]
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((port["ifname"], ETH_P_ALL))
        s.setblocking(False)
        socks.append(s)
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    by_mac = {bytes.fromhex(p["mac"].replace(":", "")): i for i, p in enumerate(ports)}
    delay = [int(p["delay_ns"]) for p in ports]
    loss = [float(p["loss"]) for p in ports]
    lossy = any(loss)
    everyone = list(range(len(ports)))
    counters = {"frames": 0, "bytes": 0, "lost": 0, "dropped": 0, "overflow": 0, "flooded": 0}
    queued = [0] * len(ports)
    heap: list = []
    seq = 0
    stdin = sys.stdin.fileno()
    readers = [stdin, *by_fd]
    cmsg_space = socket.CMSG_SPACE(16)
    timespec = struct.Struct("qq")
    with contextlib.suppress(OSError):  # be the wire: scheduled ahead of the peers' Python (best effort)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    print("ready", flush=True)
    while True:
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            _, _, out, frame = heapq.heappop(heap)
            queued[out] -= len(frame)
            try:
                socks[out].send(frame)
            except OSError:  # the port's tbf queue is full (ENOBUFS) or the socket buffer: a tail drop
                counters["dropped"] += 1
        timeout = None if not heap else (heap[0][0] - now) / 1e9
        ready, _, _ = select.select(readers, [], [], timeout)
        if not ready:
            continue
        offset = time.time_ns() - time.monotonic_ns()
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    print(json.dumps(counters), flush=True)
                    return 0
                continue
            src = by_fd[fd]
            s = socks[src]
            for _ in range(256):  # bounded burst per port per wake-up, so one port cannot starve the rest
                try:
                    frame, ancdata, _, _ = s.recvmsg(MAX_FRAME, cmsg_space)
                except BlockingIOError:
                    break
                arrived = None
                for level, kind, data in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                        sec, nsec = timespec.unpack_from(data)
                        arrived = sec * 1_000_000_000 + nsec - offset
                if arrived is None:
                    arrived = time.monotonic_ns()
                counters["frames"] += 1
                counters["bytes"] += len(frame) - VNET_HDR_LEN
                if len(frame) < VNET_HDR_LEN + 14:
                    continue
                dst = by_mac.get(frame[VNET_HDR_LEN:VNET_HDR_LEN + 6])
                if dst is None:
                    outs = [i for i in everyone if i != src]
                    counters["flooded"] += 1
                elif dst == src:
                    continue
                else:
                    outs = [dst]
                for out in outs:
                    if lossy and (rng.random() < loss[src] or rng.random() < loss[out]):
                        counters["lost"] += 1
                        continue
                    if queued[out] + len(frame) > MAX_QUEUED:
                        counters["overflow"] += 1
                        continue
                    queued[out] += len(frame)
                    seq += 1
                    heapq.heappush(heap, (arrived + delay[src] + delay[out], seq, out, frame))


# ====================================================================== bulk transfer

def _sink(port: int, seconds: float) -> int:
    """Accept one TCP connection and read for ``seconds``: print a JSON line with (t, bytes) samples."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1)
    print("listening", flush=True)
    server.settimeout(30)
    conn, _ = server.accept()
    conn.settimeout(1.0)
    buf = bytearray(1 << 20)
    total = 0
    samples = []
    start = None
    while True:
        try:
            n = conn.recv_into(buf)
        except socket.timeout:
            n = -1
        now = time.monotonic()
        if n == 0:
            break
        if n > 0:
            if start is None:
                start = now
            total += n
        if start is not None:
            if not samples or now - samples[-1][0] - start >= 0.05:
                samples.append((now - start, total))
            if now - start >= seconds:
                break
    samples.append((time.monotonic() - (start or time.monotonic()), total))
    print(json.dumps({"bytes": total, "samples": samples}), flush=True)
    conn.close()
    return 0


def _source(host: str, port: int, seconds: float) -> int:
    """Connect and write as fast as TCP allows for ``seconds`` seconds."""
    conn = socket.create_connection((host, port), timeout=30)
    chunk = b"\0" * (1 << 20)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            conn.sendall(chunk)
    conn.close()
    return 0


def throughput_mbit(samples: Sequence[Sequence[float]], skip_s: float = 1.0) -> float:
    """Receive rate in Mbit/s of TCP payload from ``sink`` samples, after the first ``skip_s`` seconds
    (slow start)."""
    steady = [s for s in samples if s[0] >= skip_s]
    if len(steady) < 2 or steady[-1][0] - steady[0][0] <= 0:
        raise ValueError("too few samples after the warm-up")
    return (steady[-1][1] - steady[0][1]) * 8 / 1e6 / (steady[-1][0] - steady[0][0])


def bulk_transfer(lab: Lab, src: int, dst: int, seconds: float = 4.0, port: int = 5001) -> list:
    """Send TCP from host ``src`` to host ``dst`` for ``seconds``; return the receiver's (t, bytes) samples."""
    script = str(Path(__file__).resolve())
    sink = lab.hosts[dst].popen([sys.executable, script, "sink", str(port), str(seconds)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != "listening":
            raise RuntimeError(f"sink did not start: {sink.stderr.read()[-2000:]}")
        source = lab.hosts[src].run([sys.executable, script, "source", lab.hosts[dst].ip, str(port),
                                     str(seconds + 2)], timeout=seconds + 60)
        out, err = sink.communicate(timeout=30)
        if sink.returncode != 0:
            raise RuntimeError(f"sink failed: {err[-2000:]} (source: {source.stderr[-2000:]})")
        return json.loads(out.strip().splitlines()[-1])["samples"]
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["forward"] and len(args) == 2:
        return _forward(json.loads(args[1]))
    if args[:1] == ["sink"] and len(args) == 3:
        return _sink(int(args[1]), float(args[2]))
    if args[:1] == ["source"] and len(args) == 4:
        return _source(args[1], int(args[2]), float(args[3]))
    print(__doc__.split("Also a command line")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
