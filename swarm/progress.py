"""Training progress shared through the DHT: who is training, at which epoch, how fast.

Every peer of a run publishes its own record under the DHT dictionary key ``{run_id}.progress``, with
its owner marker as the subkey (so only it can write its record), and reads everyone's records.
From them it derives the swarm's :class:`GlobalProgress`: the global epoch (the highest epoch of
peers that train), the samples the swarm accumulated towards it, the number of peers and the swarm's
samples/s. Records expire ``expiration`` seconds (default 60) after their last refresh; a peer that
shuts down cleanly overwrites its record with one that says it left (``"left": true``), so the
others stop counting it at their next refresh. A live peer republishes its record at least every
``heartbeat`` seconds (default 1), even while it is busy averaging, so a peer killed without a word
(``kill -9``, a preempted machine) is no longer counted once no new version of its record arrived
for ``online_window`` seconds (default 4, measured on this peer's own clock, so clock skew between
machines does not matter); its record stays known until it expires, should it come back.
Every tracker registers :func:`progress_schema` on its DHT, so its node refuses records of another
shape under the key (and a plain value, which would replace the dictionary).

The tracker runs on the DHT's event loop: publishing and fetching never block the training thread,
which reads :attr:`ProgressTracker.global_progress` (refreshed every ``refresh_period`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic

from dht import DHT, SchemaValidator, get_dht_time

__all__ = ["PeerProgress", "GlobalProgress", "ProgressTracker", "progress_key", "progress_schema", "fetch_records"]

logger = logging.getLogger(__name__)
_Count = Annotated[int, pydantic.Field(ge=0, lt=2 ** 63)]


def progress_key(run_id: str) -> str:
    return f"{run_id}.progress"


class ProgressRecord(pydantic.BaseModel):
    """One peer's record under ``{run_id}.progress`` as the DHT checks it (fields of :class:`PeerProgress`)."""

    peer_id: Annotated[str, pydantic.Field(max_length=128)]
    epoch: _Count
    samples: _Count
    samples_per_second: Annotated[float, pydantic.Field(ge=0)]
    loss: float | None = None
    time: float
    client_mode: bool = False
    bytes_sent: _Count = 0
    bytes_received: _Count = 0
    left: bool = False


class ProgressSchema(pydantic.BaseModel):
    progress: dict[str, ProgressRecord]  # a dictionary: subkey = the peer's owner marker


async def fetch_records(node: Any, run_id: str) -> list[PeerProgress]:
    """The valid progress records of ``run_id`` in ``node``'s DHT, the newest per peer (one lookup).
    Records dated over 60 s ahead of this peer's DHT clock are dropped: a record from the future is
    not evidence."""
    found = await node.get(progress_key(run_id), latest=True)
    now = get_dht_time()
    newest: dict[str, PeerProgress] = {}
    if found is not None and isinstance(found.value, dict):
        for item in found.value.values():
            record = PeerProgress.parse(getattr(item, "value", None))
            if record is None or record.time > now + 60:
                continue
            if record.peer_id not in newest or record.time > newest[record.peer_id].time:
                newest[record.peer_id] = record
    return list(newest.values())


def progress_schema(run_id: str) -> SchemaValidator:
    """The DHT schema of ``{run_id}.progress`` (registered by every :class:`ProgressTracker` of the run)."""
    return SchemaValidator(ProgressSchema, prefix=run_id, separator=".")


@dataclass
class PeerProgress:
    peer_id: str
    epoch: int
    samples: int  # accumulated in this epoch
    samples_per_second: float
    loss: float | None
    time: float  # DHT time of the report
    client_mode: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    left: bool = False  # the peer shut down: its last word, which overrides its earlier records

    @classmethod
    def parse(cls, value: Any) -> "PeerProgress | None":
        """The record, or None if it is malformed (a peer's bad record is ignored, never trusted)."""
        if not isinstance(value, dict):
            return None
        try:
            record = cls(str(value["peer_id"]), int(value["epoch"]), int(value["samples"]),
                         float(value["samples_per_second"]),
                         None if value.get("loss") is None else float(value["loss"]),
                         float(value["time"]), bool(value.get("client_mode", False)),
                         int(value.get("bytes_sent", 0)), int(value.get("bytes_received", 0)),
                         bool(value.get("left", False)))
        except (KeyError, TypeError, ValueError):
            return None
        if record.epoch < 0 or record.samples < 0 or not record.samples_per_second >= 0:
            return None
        return record


@dataclass
class GlobalProgress:
    epoch: int  # the swarm's current epoch
    samples: int  # accumulated by the swarm towards the end of ``epoch``
    target_batch_size: int
    num_peers: int  # peers that reported recently (any epoch)
    num_peers_at_epoch: int  # of them, at ``epoch``
    samples_per_second: float  # of the whole swarm
    loss: float | None  # mean of the latest losses reported at ``epoch`` (or the previous one)
    peers: list[PeerProgress] = field(default_factory=list)
    fetched_at: float = 0.0

    @property
    def eta(self) -> float:
        """Seconds until the swarm reaches ``target_batch_size`` at the current rate (inf if idle)."""
        missing = max(self.target_batch_size - self.samples, 0)
        if missing == 0:
            return 0.0
        return missing / self.samples_per_second if self.samples_per_second > 0 else float("inf")


def summarize(records: list[PeerProgress], target_batch_size: int, now: float,
              online_window: float | None = None) -> GlobalProgress:
    """The swarm's progress from the peers' records (pure; used by the tracker and by ``swarm runs``).
    Records of peers that left are ignored, and with ``online_window`` (seconds) also records whose
    DHT time is older than that (for a one-off listing; the tracker filters on its own clock)."""
    records = [r for r in records if not r.left and (online_window is None or now - r.time <= online_window)]
    training = [r for r in records if not r.client_mode] or records
    epoch = max((r.epoch for r in training), default=0)
    at_epoch = [r for r in records if r.epoch == epoch]
    samples = 0
    for r in at_epoch:  # extrapolate a little: reports are up to a few seconds old
        samples += r.samples + int(r.samples_per_second * min(max(now - r.time, 0.0), 2.0))
    losses = [r.loss for r in at_epoch if r.loss is not None] or \
             [r.loss for r in records if r.loss is not None and r.epoch == epoch - 1]
    return GlobalProgress(epoch, samples, target_batch_size, len(records), len(at_epoch),
                          sum(r.samples_per_second for r in records),
                          sum(losses) / len(losses) if losses else None, records, now)


class ProgressTracker:
    """Publishes this peer's progress and follows the swarm's.

    - ``report(epoch, samples, samples_per_second, loss)``: thread-safe, returns at once; the record
      is stored in the background (at once when the epoch changes, else at most every
      ``min_publish_period`` seconds, and at least every ``expiration / 3`` seconds).
    - ``global_progress``: the latest :class:`GlobalProgress` (refreshed every ``refresh_period`` s;
      ``refresh()`` forces a fetch and returns it). It counts only peers online: a new version of
      their record arrived within ``online_window`` seconds (this peer's clock), and they did not leave.
    - ``heartbeat`` (1 s): the longest time between two publications of this peer's record.
    """

    def __init__(self, dht: DHT, run_id: str, target_batch_size: int, *, client_mode: bool = False,
                 refresh_period: float = 0.5, min_publish_period: float = 0.5, expiration: float = 60.0,
                 heartbeat: float = 1.0, online_window: float = 4.0):
        if not 0 < heartbeat < online_window:
            raise ValueError(f"need 0 < heartbeat < online_window, got {heartbeat} and {online_window}")
        self.dht, self.run_id, self.target_batch_size = dht, run_id, target_batch_size
        self.key = progress_key(run_id)
        self.client_mode = client_mode
        self.refresh_period, self.min_publish_period, self.expiration = refresh_period, min_publish_period, expiration
        self.heartbeat, self.online_window = heartbeat, online_window
        self._local: dict | None = None
        self._known: dict[str, PeerProgress] = {}
        self._heard: dict[str, float] = {}  # peer id -> time.monotonic() when a new version of its record arrived
        self._local_epoch_published = -1
        self._published_at = 0.0
        self._dirty = asyncio.Event()
        self.global_progress = GlobalProgress(0, 0, target_batch_size, 0, 0, 0.0, None)
        self._closed = False
        dht.add_validators([progress_schema(run_id)])  # (before _start: the loop runs callbacks in order)
        self._task = dht.run_coroutine(self._start)

    async def _start(self, _dht: DHT, node) -> asyncio.Task:
        self._subkey = node.signature_validator.ownership_marker
        self._dirty = asyncio.Event()
        return asyncio.ensure_future(self._loop(node))

    def report(self, epoch: int, samples: int, samples_per_second: float, loss: float | None = None,
               bytes_sent: int = 0, bytes_received: int = 0) -> None:
        self._local = {"peer_id": str(self.dht.peer_id), "epoch": int(epoch), "samples": int(samples),
                       "samples_per_second": float(samples_per_second), "loss": loss, "client_mode": self.client_mode,
                       "bytes_sent": int(bytes_sent), "bytes_received": int(bytes_received)}
        try:
            self.dht.loop.call_soon_threadsafe(self._dirty.set)
        except RuntimeError:
            pass  # the DHT is shut down

    def heard_within(self, seconds: float) -> set[str]:
        """Peer ids whose record changed within the last ``seconds`` (this peer's clock), this one included."""
        since = time.monotonic() - seconds
        heard = tuple(self._heard.items())  # (a copy: the DHT's thread updates the dict)
        return {k for k, t in heard if t >= since} | {str(self.dht.peer_id)}

    def online_peers(self) -> set[str]:
        """Peer ids (base58) of the peers counted in :attr:`global_progress`, this one included."""
        return {r.peer_id for r in self.global_progress.peers}

    def refresh(self, timeout: float = 10.0) -> GlobalProgress:
        """Fetch the swarm's progress now (blocking, at most ``timeout`` seconds)."""
        async def fetch(_dht, node):
            return await self._fetch(node)
        try:
            return self.dht.run_coroutine(fetch, return_future=True).result(timeout)
        except Exception as e:  # noqa: BLE001 - keep the previous view
            logger.debug("progress refresh failed: %s", e)
            return self.global_progress

    async def _publish(self, node) -> None:
        local = self._local
        if local is None:
            return
        now = get_dht_time()
        record = dict(local, time=now)
        ok = await node.store(self.key, record, now + self.expiration, subkey=self._subkey)
        if ok:
            self._published_at = time.monotonic()
            self._local_epoch_published = local["epoch"]

    async def _fetch(self, node) -> GlobalProgress:
        found = await node.get(self.key, latest=True)
        now = get_dht_time()
        if found is not None and isinstance(found.value, dict):
            for item in found.value.values():
                record = PeerProgress.parse(getattr(item, "value", None))
                known = self._known.get(record.peer_id) if record is not None else None
                if record is not None and (known is None or record.time >= known.time):
                    if known is None:  # first sight: as old as its DHT time says (a dead peer's last word)
                        age = min(max(now - record.time, 0.0), self.expiration)
                        self._heard[record.peer_id] = time.monotonic() - age
                    elif record.time > known.time:
                        self._heard[record.peer_id] = time.monotonic()
                    self._known[record.peer_id] = record
        # a lookup that misses some replicas must not make peers vanish: records stay until they expire
        self._known = {k: r for k, r in self._known.items() if now - r.time < self.expiration}
        self._heard = {k: t for k, t in self._heard.items() if k in self._known}
        heard_since = time.monotonic() - self.online_window
        records = [r for k, r in self._known.items() if self._heard.get(k, 0.0) >= heard_since]
        if self._local is not None and not any(r.peer_id == self._local["peer_id"] for r in records):
            mine = PeerProgress.parse(dict(self._local, time=get_dht_time()))
            if mine is not None:
                records.append(mine)
        self.global_progress = summarize(records, self.target_batch_size, get_dht_time())
        return self.global_progress

    async def _loop(self, node) -> None:
        next_fetch = 0.0
        while not self._closed:
            try:
                timeout = max(min(next_fetch - time.monotonic(), self.min_publish_period, self.heartbeat), 0.0)
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                now = time.monotonic()
                local = self._local
                if local is not None and self._dirty.is_set():
                    wait = self._published_at + self.min_publish_period - now
                    if local["epoch"] != self._local_epoch_published or wait <= 0:
                        self._dirty.clear()
                        await self._publish(node)
                    else:
                        await asyncio.sleep(wait)  # throttled: publish on the next pass
                elif local is not None and now - self._published_at >= min(self.heartbeat, self.expiration / 3):
                    await self._publish(node)  # the heartbeat: others count this peer as online
                if time.monotonic() >= next_fetch:
                    await self._fetch(node)
                    next_fetch = time.monotonic() + self.refresh_period
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the tracker keeps going; the DHT may be briefly unreachable
                logger.debug("progress tracker: %s", e)
                await asyncio.sleep(self.refresh_period)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop publishing and tell the swarm that this peer left (waits at most ``timeout`` seconds for
        that; if it cannot be stored, the record expires on its own)."""
        if self._closed:
            return
        self._closed = True

        async def leave(_dht, node):
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self._local is not None:
                now = get_dht_time()
                await node.store(self.key, dict(self._local, time=now, left=True), now + self.expiration,
                                 subkey=self._subkey)

        try:
            if not self.dht.loop.is_running():
                raise RuntimeError("the DHT is shut down")
            self.dht.run_coroutine(leave, return_future=True).result(timeout)
        except Exception as e:  # noqa: BLE001 - the DHT may be gone or unreachable: the record expires
            logger.debug("could not announce leaving: %s", e)
            try:
                self.dht.loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass
