"""Plain-socket probes for the lab's NAT boxes (tests/test_nat_lab.py), run inside lab hosts.

    nat_probe.py observe PORT                  # TCP and UDP on PORT: answer each client with its address
    nat_probe.py ask HOST:PORT... [--sport P] [--udp] [--timeout S]
                                               # print {"ip", "port"} as each saw us (or {"error"})
    nat_probe.py rendezvous PORT               # pair punchers: tell each the other's observed address
    nat_probe.py punch HOST PORT --pair ID --role a|b --sport P [--attempts N] [--timeout S]
                                               # N simultaneous TCP opens with the paired peer

``punch``: for attempt i, from local port P+i (SO_REUSEADDR + SO_REUSEPORT, with a listener on the same
port), register ``ID-i`` with the rendezvous, learn the other side's observed address and a start time,
then at that time connect to it while accepting on the listener; success is a TCP connection to the
other side (checked by exchanging roles). One JSON line per attempt: ``{"i", "ok", "via", "s"}``
(``s``: seconds from the start time to the connection; a first SYN that got through takes well under
the 1 s initial retransmission timeout).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time

RENDEZVOUS_TIMEOUT = 20.0


def _bound(sport: int, udp: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", sport))
    return s


def observe(port: int) -> int:
    """Answer every TCP connection and UDP datagram on ``port`` with the sender's "ip port"."""
    udp = _bound(port, udp=True)

    def udp_loop() -> None:
        while True:
            _, addr = udp.recvfrom(2048)
            udp.sendto(f"{addr[0]} {addr[1]}\n".encode(), addr)

    threading.Thread(target=udp_loop, daemon=True).start()
    server = _bound(port)
    server.listen(128)
    print("ready", flush=True)
    while True:
        conn, addr = server.accept()
        with conn:
            conn.sendall(f"{addr[0]} {addr[1]}\n".encode())


def ask(targets: list[str], sport: int, use_udp: bool, timeout: float) -> int:
    """Ask each HOST:PORT in turn from local port ``sport`` (one UDP socket for all of them, so that
    every answer comes back to it); print one JSON line per target."""
    udp = _bound(sport, udp=True) if use_udp else None
    try:
        for target in targets:
            host, port = target.rsplit(":", 1)
            s = udp or _bound(sport)
            s.settimeout(timeout)
            try:
                if use_udp:
                    s.sendto(b"?", (host, int(port)))
                    data = s.recvfrom(2048)[0]
                else:
                    s.connect((host, int(port)))
                    data = s.recv(2048)
                ip, seen = data.decode().split()
                print(json.dumps({"ip": ip, "port": int(seen), "local": s.getsockname()[1]}), flush=True)
            except OSError as e:
                print(json.dumps({"error": type(e).__name__, "detail": str(e)[:200]}), flush=True)
            finally:
                if udp is None:
                    s.close()
    finally:
        if udp is not None:
            udp.close()
    return 0


def rendezvous(port: int) -> int:
    """Pair connections that send the same {"pair"} line; send each {"peer": [ip, port], "at": t}."""
    server = _bound(port)
    server.listen(256)
    waiting: dict[str, tuple[socket.socket, tuple]] = {}
    lock = threading.Lock()
    print("ready", flush=True)

    def handle(conn: socket.socket, addr: tuple) -> None:
        conn.settimeout(RENDEZVOUS_TIMEOUT)
        try:
            line = conn.makefile().readline(200)
            pair = str(json.loads(line)["pair"])[:100]
        except (OSError, ValueError, KeyError, TypeError):
            conn.close()
            return
        with lock:
            other = waiting.pop(pair, None)
            if other is None:
                waiting[pair] = (conn, addr)
                return
        at = time.time() + 0.3
        other_conn, other_addr = other
        for c, peer in ((conn, other_addr), (other_conn, addr)):
            try:
                c.sendall((json.dumps({"peer": list(peer), "at": at}) + "\n").encode())
            except OSError:
                pass

    while True:
        conn, addr = server.accept()
        threading.Thread(target=handle, args=(conn, addr), daemon=True).start()


def _punch_once(host: str, port: int, pair: str, role: str, sport: int, timeout: float) -> dict:
    reg = _bound(sport)
    reg.settimeout(RENDEZVOUS_TIMEOUT)
    reg.connect((host, port))
    reg.sendall((json.dumps({"pair": pair}) + "\n").encode())
    plan = json.loads(reg.makefile().readline(500))
    peer = (plan["peer"][0], int(plan["peer"][1]))
    listener = _bound(sport)
    listener.listen(4)
    listener.setblocking(False)
    dialer = _bound(sport)
    dialer.setblocking(False)
    time.sleep(max(0.0, plan["at"] - time.time()))
    start = time.time()
    try:
        dialer.connect_ex(peer)
        deadline = start + timeout
        conn, via = None, None
        watching = [listener]
        while conn is None and time.time() < deadline:
            readable, writable, _ = select.select(watching, [dialer] if dialer.fileno() >= 0 else [], [],
                                                  max(0.0, deadline - time.time()))
            if listener in readable:
                conn, _ = listener.accept()
                via = "accept"
            elif writable:
                if dialer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    conn, via = dialer, "connect"
                else:  # refused or unreachable: the listener may still get the other side's SYN
                    dialer.close()
        if conn is None:
            return {"ok": False, "via": None, "s": round(time.time() - start, 4)}
        elapsed = time.time() - start
        conn.setblocking(True)
        conn.settimeout(5)
        conn.sendall(role.encode())
        other = conn.recv(16).decode()
        ok = other in ("a", "b") and other != role
        return {"ok": ok, "via": via, "s": round(elapsed, 4), "other": other, "peer": list(peer)}
    finally:
        for s in (reg, listener, dialer):
            s.close()


def punch(host: str, port: int, pair: str, role: str, sport: int, attempts: int, timeout: float) -> int:
    for i in range(attempts):
        try:
            result = _punch_once(host, port, f"{pair}-{i}", role, sport + i, timeout)
        except (OSError, ValueError, KeyError) as e:
            result = {"ok": False, "via": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps({"i": i, **result}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("observe")
    p.add_argument("port", type=int)
    p = sub.add_parser("ask")
    p.add_argument("targets", nargs="+", metavar="HOST:PORT")
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("rendezvous")
    p.add_argument("port", type=int)
    p = sub.add_parser("punch")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--pair", required=True)
    p.add_argument("--role", choices=("a", "b"), required=True)
    p.add_argument("--sport", type=int, required=True)
    p.add_argument("--attempts", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.cmd == "observe":
        return observe(args.port)
    if args.cmd == "ask":
        return ask(args.targets, args.sport, args.udp, args.timeout)
    if args.cmd == "rendezvous":
        return rendezvous(args.port)
    return punch(args.host, args.port, args.pair, args.role, args.sport, args.attempts, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
