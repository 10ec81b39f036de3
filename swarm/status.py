"""The swarm's overview as one JSON-able dict: what ``/api/status`` serves, ``swarm status --json``
prints and the dashboard draws.

:func:`collect_status` reads the DHT's records (run announcements of :mod:`swarm.runs`, progress
records ``{run_id}.progress`` of :mod:`swarm.progress`) and, when given, the local peer's own
:class:`PeerView` (filled by the daemon: role, state, the optimizer's averaging rounds, a bounded
history of observations). Schema version 1 (every key always present; SI units: seconds, bytes,
samples/s; times are unix seconds)::

    {"version": 1, "generated_at": float,
     "self": {"peer_id", "role", "run_id", "addresses", "state", "uptime_s",
              "nat": {"verdict", "observed_ip", "relayed", "relays", "relay_reservations", "relay_circuits",
                      "relay_bytes", "holepunch_attempts", "holepunch_successes", ...} | None} | None,
     "runs": [{"run_id", "peers", "epoch", "samples_per_second", "last_seen_s"}],
     "peers": [{"peer_id", "address", "role", "stage", "samples_per_second", "reachability",
                "last_seen_s", "state", "run_id", "epoch", "loss"}],
     "progress": {"run_id", "epoch", "samples", "target_batch_size", "samples_per_second", "loss", "heldout"},
     "history": {"t": [...], "epoch": [...], "loss": [...], "heldout": [...], "samples_per_second": [...]},
     "averaging": {"rounds": [{"t", "group_size", "seconds", "bytes_sent", "bytes_received", "result",
                               "cause", "epoch"}]},
     "stages": [], "bans": []}

``last_seen_s`` is how long ago (seconds) the newest record arrived; a peer whose record is older than
``ONLINE_WINDOW`` seconds, or that said it left, has state ``"left"``. Remote peers' records do not
say whether they average or download, so they show ``"training"`` while online; the local peer shows
its own state. Values read from the DHT are untrusted: strings are cut to bounded lengths.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dht import get_dht_time
from dht.peer.identity import PeerID

from .progress import PeerProgress, fetch_records, summarize
from .runs import _announcements, _earliest

__all__ = ["PeerView", "collect_status", "format_status", "SCHEMA_VERSION", "ONLINE_WINDOW", "HISTORY_POINTS",
           "ROLES", "STATES"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ONLINE_WINDOW = 10.0  # s: a record older than this counts as a peer gone (as ``swarm runs`` counts)
HISTORY_POINTS = 1000  # points kept in PeerView.history
MAX_PEERS = 1000  # peer rows in one overview
MAX_RUNS = 100
MAX_ROUNDS = 200  # averaging rounds in one overview (the newest)
ROLES = ("trainer", "server", "dht", "status")
STATES = ("starting", "training", "averaging", "downloading", "left", "serving")
_ID_CHARS = 128  # peer ids and run ids from the DHT are cut to this


@dataclass
class PeerView:
    """What the local peer knows about itself (filled by the daemon; read by :func:`collect_status`
    and :class:`swarm.metrics.Metrics`).

    ``role``: one of :data:`ROLES`; ``state``: one of :data:`STATES`; ``optimizer``: the peer's
    :class:`swarm.Optimizer` while it trains (its epoch, speed, bytes and averaging rounds are read
    from it); ``loss``/``heldout``: the latest training loss and held-out metric (``heldout_name``);
    ``history``: bounded points ``(t, epoch, loss, heldout, swarm samples/s)``, at most one per
    ``history_period`` seconds unless forced; ``checkpoint_loads``: checkpoints resumed from."""

    role: str = "trainer"
    run_id: str | None = None
    state: str = "starting"
    started: float = field(default_factory=time.time)  # unix seconds
    optimizer: Any = None
    loss: float | None = None
    heldout: float | None = None
    heldout_name: str | None = None
    target_batch_size: int | None = None
    history_period: float = 1.0
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY_POINTS))
    checkpoint_loads: int = 0
    _last_point: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self.state = state

    def add_point(self, epoch: int, loss: float | None, heldout: float | None, samples_per_second: float,
                  t: float | None = None, force: bool = False) -> bool:
        """Append a history point (``t``: unix seconds, default now); skipped (False) if the last one
        is younger than ``history_period`` seconds, unless ``force``."""
        t = time.time() if t is None else t
        if not force and t - self._last_point < self.history_period:
            return False
        self._last_point = t
        self.history.append((t, int(epoch), _num(loss), _num(heldout), float(samples_per_second)))
        return True

    def current_state(self) -> str:
        """``state``, or what the optimizer does now: ``"downloading"`` a state, ``"averaging"``."""
        opt = self.optimizer
        if opt is not None and self.state == "training":
            if getattr(getattr(opt, "sharing", None), "downloading", False):
                return "downloading"
            if getattr(opt, "averaging", False):
                return "averaging"
        return self.state

    @property
    def uptime(self) -> float:
        return max(time.time() - self.started, 0.0)


def _num(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN/Inf)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def _cut(text: Any, limit: int = _ID_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _address_of(node, peer_id: str) -> str | None:
    try:
        pid = PeerID.from_base58(peer_id)
    except Exception:  # noqa: BLE001 - a malformed id from the DHT: no address
        return None
    address = node.p2p.best_address(pid)
    return None if address is None else str(address.with_peer_id(pid))


def _reachability(node, record: PeerProgress) -> str:
    try:
        pid = PeerID.from_base58(record.peer_id)
    except Exception:  # noqa: BLE001
        return "unknown"
    conns = node.p2p.connections_to(pid) if hasattr(node.p2p, "connections_to") else []
    if conns and all(getattr(c.channel, "relayed_via", None) is not None for c in conns):
        return "relayed"  # we reach it through a relay only (behind NAT, no hole punched yet)
    if record.client_mode:
        return "client"
    return "public" if pid in node.routing_table else "unknown"


def _round_rows(optimizer: Any) -> list[dict]:
    rounds = tuple(getattr(optimizer, "rounds", ()) or ())  # (a copy: the training thread appends)
    return [dict(r) for r in rounds[-MAX_ROUNDS:]]


async def collect_status(node: Any, *, run_id: str | None = None, local: PeerView | None = None,
                         timeout: float = 10.0) -> dict:
    """The overview (schema above) of ``run_id`` (default: the local peer's run, else the live run with
    the most peers), from ``node``'s DHT (a :class:`dht.DHTNode`; run on its event loop) and ``local``.
    ``runs`` and ``peers`` cover every run found when neither ``run_id`` nor ``local.run_id`` is set.
    DHT lookups are bounded by ``timeout`` seconds (what did not arrive is left out)."""
    run_id = run_id if run_id is not None else (local.run_id if local is not None else None)
    whole_swarm = run_id is None

    async def bounded(coro: Any, default: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except Exception as e:  # noqa: BLE001 - a lookup that timed out or failed: the overview shows what it has
            logger.debug("status: %s: %s", what, e)
            return default

    async def records_of(ids: list[str]) -> list[list[PeerProgress]]:
        return list(await asyncio.gather(*(fetch_records(node, r) for r in ids)))

    if whole_swarm:  # the runs first, then their records
        announcements = _earliest(await bounded(_announcements(node), [], "run announcements"))
        ids = sorted(announcements)[:MAX_RUNS]
        found = await bounded(records_of(ids), [[] for _ in ids], "progress records")
    else:  # both lookups at once
        assert run_id is not None
        ids = [run_id]
        listed, found = await asyncio.gather(bounded(_announcements(node), [], "run announcements"),
                                             bounded(records_of(ids), [[]], "progress records"))
        announcements = _earliest(listed)
    dht_now = get_dht_time()
    me = str(node.peer_id)
    runs: list[dict] = []
    peers: list[dict] = []
    summaries = {}
    for rid, records in zip(ids, found):
        announcement = announcements.get(rid)
        target = announcement.target_batch_size if announcement is not None and announcement.target_batch_size else None
        if target is None and local is not None and local.run_id == rid:
            target = local.target_batch_size
        g = summarize(records, target or 1, dht_now, online_window=ONLINE_WINDOW)
        epoch = max([g.epoch] + [r.epoch for r in records if not r.client_mode])
        last_seen = max((r.time for r in records), default=None)
        summaries[rid] = (g, epoch, target, records)
        runs.append({"run_id": _cut(rid), "peers": g.num_peers, "epoch": epoch,
                     "samples_per_second": round(g.samples_per_second, 3),
                     "last_seen_s": None if last_seen is None else round(max(dht_now - last_seen, 0.0), 3)})
        for r in sorted(records, key=lambda r: r.peer_id):
            if len(peers) >= MAX_PEERS:
                break
            age = max(dht_now - r.time, 0.0)
            online = not r.left and age <= ONLINE_WINDOW
            if r.peer_id == me and local is not None and local.current_state() in ("training", "averaging",
                                                                                   "downloading"):
                state = local.current_state()
            else:
                state = "training" if online else "left"
            peers.append({"peer_id": _cut(r.peer_id), "address": _address_of(node, r.peer_id), "role": "trainer",
                          "stage": None, "samples_per_second": round(r.samples_per_second, 3) if online else 0.0,
                          "reachability": _reachability(node, r), "last_seen_s": round(age, 3), "state": state,
                          "run_id": _cut(rid), "epoch": r.epoch, "loss": _num(r.loss)})
    runs.sort(key=lambda r: (-r["peers"], r["last_seen_s"] if r["last_seen_s"] is not None else float("inf"),
                             r["run_id"]))
    selected = run_id if not whole_swarm else (runs[0]["run_id"] if runs else None)
    progress: dict[str, Any] = {"run_id": selected, "epoch": 0, "samples": 0, "target_batch_size": None,
                                "samples_per_second": 0.0, "loss": None, "heldout": None}
    if selected in summaries:
        g, epoch, target, _records = summaries[selected]
        progress.update(epoch=epoch, samples=g.samples if g.epoch == epoch else 0, target_batch_size=target,
                        samples_per_second=round(g.samples_per_second, 3), loss=_num(g.loss))
    own_run = local is not None and local.run_id is not None and local.run_id == selected
    if own_run and local is not None:
        progress["heldout"] = _num(local.heldout)
        if progress["loss"] is None:
            progress["loss"] = _num(local.loss)
    if local is not None and (own_run or local.run_id is None):
        local.add_point(progress["epoch"], progress["loss"], progress["heldout"], progress["samples_per_second"])
    history: dict[str, list] = {"t": [], "epoch": [], "loss": [], "heldout": [], "samples_per_second": []}
    if local is not None:
        for t, e, loss, heldout, sps in tuple(local.history):
            history["t"].append(round(t, 3))
            history["epoch"].append(e)
            history["loss"].append(loss)
            history["heldout"].append(heldout)
            history["samples_per_second"].append(sps)
    own = None
    if local is not None:
        own = {"peer_id": me, "role": local.role, "run_id": local.run_id,
               "addresses": [str(a) for a in node.p2p.get_visible_addresses()], "state": local.current_state(),
               "uptime_s": round(local.uptime, 3),
               "nat": node.p2p.nat.status() if getattr(node.p2p, "nat", None) is not None else None}
    rounds = _round_rows(local.optimizer) if local is not None and local.optimizer is not None else []
    return {"version": SCHEMA_VERSION, "generated_at": time.time(), "self": own, "runs": runs, "peers": peers,
            "progress": progress, "history": history, "averaging": {"rounds": rounds}, "stages": [], "bans": []}


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _opt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_status(status: dict, max_peers: int = 50, max_rounds: int = 10) -> str:
    """The overview as text tables (``swarm status``): runs, the selected run's progress, its peers
    (at most ``max_peers`` rows) and this peer's latest averaging rounds (at most ``max_rounds``)."""
    lines = []
    runs, peers = status["runs"], status["peers"]
    nat = (status.get("self") or {}).get("nat")
    if nat and (nat.get("verdict") != "unknown" or nat.get("relays") or nat.get("relay_circuits")):
        relays = ", ".join(nat.get("relays") or []) or "none"
        lines += [f"this peer: reachability {nat['verdict']}" + (f" (seen as {nat['observed_ip']})"
                                                                 if nat.get("observed_ip") else "")
                  + f"; relays held: {relays}; relaying {nat.get('relay_circuits', 0)} circuits for "
                    f"{nat.get('relay_reservations', 0)} reservations; hole punches "
                    f"{nat.get('holepunch_successes', 0)}/{nat.get('holepunch_attempts', 0)}", ""]
    if not runs:
        lines.append("no runs found")
    else:
        lines.append(f"{'RUN':24} {'PEERS':>5} {'SAMPLES/S':>10} {'EPOCH':>6}  LAST SEEN")
        for r in runs:
            lines.append(f"{r['run_id'][:24]:24} {r['peers']:>5} {r['samples_per_second']:>10.1f} {r['epoch']:>6}  "
                         f"{'now' if r['peers'] else _ago(r['last_seen_s'])}")
    p = status["progress"]
    if p["run_id"] is not None:
        target = p["target_batch_size"]
        done = f"{p['samples']}/{target} samples ({100 * p['samples'] / target:.0f}%)" if target else \
            f"{p['samples']} samples"
        lines += ["", f"run {p['run_id']}: epoch {p['epoch']}, {done} of this epoch, "
                      f"{p['samples_per_second']:.1f} samples/s, loss {_opt(p['loss'])}, "
                      f"held-out {_opt(p['heldout'])}"]
    if peers:
        lines += ["", f"{'PEER':16} {'RUN':16} {'STATE':11} {'REACH':8} {'SAMPLES/S':>10} {'EPOCH':>6} {'LOSS':>8}  "
                      f"{'LAST SEEN':10} ADDRESS"]
        for peer in peers[:max_peers]:
            lines.append(f"{peer['peer_id'][:16]:16} {str(peer.get('run_id') or '-')[:16]:16} {peer['state']:11} "
                         f"{peer['reachability']:8} {peer['samples_per_second']:>10.1f} "
                         f"{peer.get('epoch', '-'):>6} {_opt(peer.get('loss')):>8}  "
                         f"{_ago(peer['last_seen_s']):10} {peer['address'] or '-'}")
        if len(peers) > max_peers:
            lines.append(f"... and {len(peers) - max_peers} more peers (--json lists all)")
    rounds = status["averaging"]["rounds"][-max_rounds:]
    if rounds:
        lines += ["", f"{'ROUND AT':19} {'EPOCH':>6} {'GROUP':>5} {'SECONDS':>8} {'SENT':>10} {'RECEIVED':>10}  RESULT"]
        for r in rounds:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["t"]))
            result = r["result"] if r["cause"] is None else f"{r['result']}: {r['cause'][:80]}"
            lines.append(f"{when:19} {r.get('epoch', '-'):>6} {r['group_size']:>5} {r['seconds']:>8.2f} "
                         f"{r['bytes_sent']:>10} {r['bytes_received']:>10}  {result}")
    return "\n".join(lines)
