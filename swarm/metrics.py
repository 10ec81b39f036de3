"""Prometheus metrics of one peer (served at ``/metrics`` by the dashboard).

The lower layers keep plain counters (``dht.peer.rpc_stats``: bytes and call times per RPC method;
the routing table and storage sizes; :class:`swarm.Optimizer`'s epoch, speed, bytes and averaging
rounds; :class:`swarm.state_sharing.StateSharing`'s downloads) and never import prometheus_client:
:class:`Metrics` reads them when scraped, so instrumentation costs a few integer additions per
message and nothing per training step. Each :class:`Metrics` has its own registry (several peers may
share a process). Label values are bounded: RPC methods are those the peer serves or calls (at most
128 a side, the rest and unknown inbound methods as ``other``), roles and states come from fixed
lists. Series (units: seconds, bytes, samples):

==========================================  =================================================================
``swarm_info{peer_id,role,run_id,version}``  1, the peer's identity
``swarm_up``, ``swarm_start_time_seconds``   1; unix time the peer started
``swarm_uptime_seconds``                     seconds since it started
``swarm_state{state}``                       1 for the current state (training, averaging, ...), else 0
``swarm_bytes_sent_total{method}``           message bytes sent on streams of each RPC method (both sides)
``swarm_bytes_received_total{method}``       message bytes received, the same way
``swarm_rpc_seconds{method,side}``           histogram of call durations (side: client / server)
``swarm_rpc_failures_total{method,side}``    calls ended by an error or cancelled
``swarm_connections{direction}``             open connections (inbound / outbound)
``swarm_connected_peers``                    peers with an open connection
``swarm_address_book_peers``                 peers whose addresses are known
``swarm_streams{direction}``                 open streams (calls in flight)
``swarm_transport_memory_bytes``             memory reserved by the transport for messages in flight
``swarm_dht_routing_table_peers``            peers in the Kademlia routing table
``swarm_dht_records``                        records stored (values and subkeys)
``swarm_dht_storage_bytes``                  bytes of the stored records
``swarm_dht_cache_records``                  records in the lookup cache
``swarm_dht_evictions_total``                records evicted to make room
``swarm_dht_rpcs_sent_total``                DHT RPCs this peer sent
``swarm_nat_verdict{verdict}``               1 for the reachability verdict (public, nat, firewalled, unknown)
``swarm_nat_relays_held``                    relays this peer holds reservations on (behind NAT)
``swarm_relay_reservations``                 reservations this peer serves as a relay
``swarm_relay_circuits``                     circuits this peer relays now
``swarm_relay_bytes_total``                  bytes relayed by the circuits that closed
``swarm_holepunch_attempts_total``           hole-punch attempts (simultaneous opens) this peer started
``swarm_holepunch_successes_total``          of which gave a direct connection
``swarm_epoch``                              this peer's epoch
``swarm_run_epoch``                          the run's epoch (highest epoch of the peers online)
``swarm_run_peers``                          peers of the run online
``swarm_samples_per_second``                 this peer's training speed
``swarm_run_samples_per_second``             the whole run's speed
``swarm_epoch_samples``                      samples this peer accumulated in this epoch
``swarm_run_epoch_samples``                  samples the run accumulated towards the epoch's target
``swarm_target_batch_size``                  samples per collaborative epoch
``swarm_samples_total``                      samples this peer trained on
``swarm_loss``                               latest training loss (NaN: none yet)
``swarm_heldout``                            latest held-out metric (NaN: not evaluated)
``swarm_averaging_rounds_total{result}``     averaging rounds (ok / failed)
``swarm_averaging_seconds``                  histogram of round durations (matchmaking + all-reduce)
``swarm_averaging_group_size``               histogram of group sizes of the rounds that finished
``swarm_averaging_bytes_sent_total``         bytes sent in averaging rounds (after compression)
``swarm_averaging_bytes_received_total``     bytes received in averaging rounds
``swarm_state_downloads_total{result}``      downloads of the swarm's state (ok / failed)
``swarm_state_download_bytes_total``         bytes of states downloaded
``swarm_state_served_bytes_total``           bytes of this peer's state sent to joiners
``swarm_checkpoint_loads_total``             checkpoints loaded (resumed from)
==========================================  =================================================================

plus prometheus_client's ``process_*`` (CPU seconds, memory, open files) and ``python_*`` series.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from dht.peer.rpc_stats import SECONDS_BUCKETS

from .status import STATES, PeerView

__all__ = ["Metrics", "CONTENT_TYPE", "ROUND_SECONDS_BUCKETS", "GROUP_SIZE_BUCKETS"]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of Metrics.render()'s bytes (the Prometheus text format)
ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
GROUP_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("swarm-training")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


class _Histogram:
    """Cumulative bucket counts of values observed here (for the rounds read from the optimizer)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return _histogram(name, doc, self.bounds, self.counts, self.sum)


def _histogram(name: str, doc: str, bounds: tuple[float, ...], counts: list[int], total: float,
               labels: list[str] | None = None, values: list[str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    cumulative, running = [], 0
    for bound, n in zip(bounds, counts):
        running += n
        cumulative.append((repr(float(bound)), running))
    cumulative.append(("+Inf", running + counts[-1]))
    if family is None:
        family = HistogramMetricFamily(name, doc, labels=labels)
    family.add_metric(values or [], cumulative, total)
    return family


class Metrics:
    """The Prometheus view of one peer: ``node`` (a :class:`dht.DHTNode`) and optionally ``view``
    (its :class:`swarm.status.PeerView`; its optimizer, when training). ``render()`` returns the text
    format (:data:`CONTENT_TYPE`); ``registry`` is this peer's own ``CollectorRegistry`` (the swarm
    collector, and with ``process=True`` prometheus_client's process, platform and GC collectors),
    for use with prometheus_client's own tools. ``render()`` writes the swarm families itself (their
    names and label names are constants: no per-sample validation), several times faster than
    ``generate_latest``, and appends ``generate_latest`` of the process collectors."""

    def __init__(self, node: Any, view: PeerView | None = None, *, process: bool = True):
        self.node, self.view = node, view
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._process_registry = CollectorRegistry(auto_describe=False)  # (also in self.registry)
        if process:
            for kind in (ProcessCollector, PlatformCollector, GCCollector):
                self.registry.register(kind(registry=self._process_registry))
        self._round_seconds = _Histogram(ROUND_SECONDS_BUCKETS)
        self._group_sizes = _Histogram(GROUP_SIZE_BUCKETS)
        self._last_round = 0.0  # "t" of the newest round already counted in the histograms
        self._lock = threading.Lock()
        self.version = _version()

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return _format(self.collect()).encode() + generate_latest(self._process_registry)

    # ---- reading the counters ----------------------------------------------------------------
    def _take_rounds(self, optimizer: Any) -> None:
        with self._lock:
            for record in tuple(getattr(optimizer, "rounds", ())):  # (a copy: the training thread appends)
                t = record.get("t", 0.0)
                if t <= self._last_round:
                    continue
                self._last_round = t
                self._round_seconds.observe(float(record.get("seconds", 0.0)))
                if record.get("result") == "ok":
                    self._group_sizes.observe(int(record.get("group_size", 0)))

    def collect(self) -> Iterator[Metric]:
        node, view = self.node, self.view
        p2p = node.p2p
        now = time.time()
        role = view.role if view is not None else "dht"
        run_id = (view.run_id if view is not None else None) or ""
        info = GaugeMetricFamily("swarm_info", "this peer", labels=["peer_id", "role", "run_id", "version"])
        info.add_metric([str(node.peer_id), role, run_id[:128], self.version], 1.0)
        yield info
        yield GaugeMetricFamily("swarm_up", "1 while the peer runs", value=1.0)
        started = view.started if view is not None else now
        yield GaugeMetricFamily("swarm_start_time_seconds", "unix time the peer started", value=started)
        yield GaugeMetricFamily("swarm_uptime_seconds", "seconds since the peer started", value=max(now - started, 0.0))
        state = GaugeMetricFamily("swarm_state", "1 for the peer's current state", labels=["state"])
        current = view.current_state() if view is not None else "serving"
        for s in STATES:
            state.add_metric([s], 1.0 if s == current else 0.0)
        yield state

        # ---- peer layer
        stats = p2p.stats
        sent = CounterMetricFamily("swarm_bytes_sent", "message bytes sent on streams of each RPC method",
                                   labels=["method"])
        received = CounterMetricFamily("swarm_bytes_received", "message bytes received on streams of each RPC method",
                                       labels=["method"])
        seconds = HistogramMetricFamily("swarm_rpc_seconds", "RPC durations from stream open to close",
                                        labels=["method", "side"])
        failures = CounterMetricFamily("swarm_rpc_failures", "RPCs ended by an error or cancelled",
                                       labels=["method", "side"])
        if stats is not None:
            totals: dict[str, list[int]] = {}
            for side, table in (("client", stats.outbound), ("server", stats.inbound)):
                for method, m in list(table.items()):
                    total = totals.setdefault(method, [0, 0])
                    total[0] += m.bytes_sent
                    total[1] += m.bytes_received
                    _histogram("", "", SECONDS_BUCKETS, list(m.buckets), m.seconds, values=[method, side],
                               family=seconds)
                    failures.add_metric([method, side], m.failures)
            for method, (out, into) in sorted(totals.items()):
                sent.add_metric([method], out)
                received.add_metric([method], into)
        yield from (sent, received, seconds, failures)
        inbound, outbound = p2p.num_connections
        connections = GaugeMetricFamily("swarm_connections", "open connections", labels=["direction"])
        connections.add_metric(["inbound"], inbound)
        connections.add_metric(["outbound"], outbound)
        yield connections
        yield GaugeMetricFamily("swarm_connected_peers", "peers with an open connection",
                                value=len(p2p.connected_peers()))
        yield GaugeMetricFamily("swarm_address_book_peers", "peers whose addresses are known", value=p2p.known_peers())
        system = p2p.resources.system.stat()
        streams = GaugeMetricFamily("swarm_streams", "open streams (calls in flight)", labels=["direction"])
        streams.add_metric(["inbound"], system["inbound_streams"])
        streams.add_metric(["outbound"], system["outbound_streams"])
        yield streams
        yield GaugeMetricFamily("swarm_transport_memory_bytes", "bytes reserved for messages in flight",
                                value=system["memory"])

        # ---- DHT
        yield GaugeMetricFamily("swarm_dht_routing_table_peers", "peers in the routing table",
                                value=len(node.routing_table))
        yield GaugeMetricFamily("swarm_dht_records", "records stored here", value=len(node.storage))
        yield GaugeMetricFamily("swarm_dht_storage_bytes", "bytes of the records stored here",
                                value=node.storage.total_bytes)
        yield GaugeMetricFamily("swarm_dht_cache_records", "records in the lookup cache", value=len(node.cache))
        yield CounterMetricFamily("swarm_dht_evictions", "records evicted to make room", value=node.storage.evicted)
        yield CounterMetricFamily("swarm_dht_rpcs_sent", "DHT RPCs this peer sent", value=node.rpcs_sent)

        # ---- NAT traversal (dht.peer.nat)
        nat = p2p.nat.status() if getattr(p2p, "nat", None) is not None else {}
        verdict = GaugeMetricFamily("swarm_nat_verdict", "1 for the reachability verdict", labels=["verdict"])
        for v in ("public", "nat", "firewalled", "unknown"):
            verdict.add_metric([v], 1.0 if nat.get("verdict", "unknown") == v else 0.0)
        yield verdict
        yield GaugeMetricFamily("swarm_nat_relays_held", "relays this peer holds reservations on",
                                value=len(nat.get("relays", ())))
        yield GaugeMetricFamily("swarm_relay_reservations", "reservations this peer serves as a relay",
                                value=nat.get("relay_reservations", 0))
        yield GaugeMetricFamily("swarm_relay_circuits", "circuits this peer relays now",
                                value=nat.get("relay_circuits", 0))
        yield CounterMetricFamily("swarm_relay_bytes", "bytes relayed by closed circuits",
                                  value=nat.get("relay_bytes", 0))
        yield CounterMetricFamily("swarm_holepunch_attempts", "hole-punch attempts started",
                                  value=nat.get("holepunch_attempts", 0))
        yield CounterMetricFamily("swarm_holepunch_successes", "hole-punch attempts that gave a direct connection",
                                  value=nat.get("holepunch_successes", 0))

        # ---- training (NaN / 0 while the peer does not train)
        opt = view.optimizer if view is not None else None
        g = opt.tracker.global_progress if opt is not None else None
        target = (opt.target_batch_size if opt is not None else None) or (view.target_batch_size if view else None)

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=_num(value))

        yield gauge("swarm_epoch", "this peer's epoch", opt.local_epoch if opt is not None else None)
        yield gauge("swarm_run_epoch", "the run's epoch", g.epoch if g is not None else None)
        yield gauge("swarm_run_peers", "peers of the run online", g.num_peers if g is not None else 0)
        yield gauge("swarm_samples_per_second", "this peer's samples per second",
                    opt.samples_per_second if opt is not None else 0.0)
        yield gauge("swarm_run_samples_per_second", "the run's samples per second",
                    g.samples_per_second if g is not None else 0.0)
        yield gauge("swarm_epoch_samples", "samples this peer accumulated in this epoch",
                    opt.local_samples if opt is not None else 0)
        yield gauge("swarm_run_epoch_samples", "samples the run accumulated towards this epoch's target",
                    g.samples if g is not None else 0)
        yield gauge("swarm_target_batch_size", "samples per collaborative epoch", target)
        yield CounterMetricFamily("swarm_samples", "samples this peer trained on",
                                  value=opt.samples_total if opt is not None else 0)
        loss = opt.last_loss if opt is not None else None
        yield gauge("swarm_loss", "latest training loss", loss if loss is not None else getattr(view, "loss", None))
        yield gauge("swarm_heldout", "latest held-out metric", getattr(view, "heldout", None))
        rounds = CounterMetricFamily("swarm_averaging_rounds", "averaging rounds by result", labels=["result"])
        counts = dict(getattr(opt, "round_counts", None) or {"ok": 0, "failed": 0})
        for result in ("ok", "failed"):
            rounds.add_metric([result], counts.get(result, 0))
        yield rounds
        if opt is not None:
            self._take_rounds(opt)
        yield self._round_seconds.family("swarm_averaging_seconds", "durations of averaging rounds")
        yield self._group_sizes.family("swarm_averaging_group_size", "group sizes of the rounds that finished")
        yield CounterMetricFamily("swarm_averaging_bytes_sent", "bytes sent in averaging rounds",
                                  value=opt.bytes_sent if opt is not None else 0)
        yield CounterMetricFamily("swarm_averaging_bytes_received", "bytes received in averaging rounds",
                                  value=opt.bytes_received if opt is not None else 0)
        sharing = getattr(opt, "sharing", None)
        downloads = CounterMetricFamily("swarm_state_downloads", "downloads of the swarm's state by result",
                                        labels=["result"])
        done = dict(getattr(sharing, "downloads", None) or {})
        for result in ("ok", "failed"):
            downloads.add_metric([result], done.get(result, 0))
        yield downloads
        yield CounterMetricFamily("swarm_state_download_bytes", "bytes of states downloaded",
                                  value=getattr(sharing, "bytes_downloaded", 0))
        yield CounterMetricFamily("swarm_state_served_bytes", "bytes of this peer's state sent to joiners",
                                  value=getattr(sharing, "bytes_served", 0))
        yield CounterMetricFamily("swarm_checkpoint_loads", "checkpoints loaded",
                                  value=getattr(view, "checkpoint_loads", 0))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(families: Iterator[Metric]) -> str:
    """The text format of families whose names and label names are valid constants (as
    ``generate_latest`` writes them: counters as ``NAME_total``, no timestamps nor ``_created``)."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        out.append(f"# HELP {name} {family.documentation}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out)


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()
