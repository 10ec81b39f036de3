"""Public runs: announced in the DHT by their creator, listed by ``swarm runs``.

All announcements live under the DHT dictionary key ``swarm.runs``. The creator of run ``R`` stores
its announcement under the subkey ``"R [owner:<creator's public key>]"``: the DHT's signature
validator accepts that record only with the creator's signature, so nobody else can change or extend
it (another peer can only add a *competing* record under its own key; the earliest-created record of a
run wins, and a record whose creation time lies in the future is ignored). The announcement holds the
run id, the task reference, the sha256 of the task's code, the hyperparameters, the settings every
peer must share (task attribute, optimizer mode and options, batch sizes: see
:func:`settings_differences`), the creator's peer id and the creation time. The creator refreshes it
every ``refresh_period`` seconds with an expiration of ``expiration`` seconds (default one hour); if
every creator's record expired, the next peer to join creates the run anew. The functions here
register :data:`RUNS_SCHEMA` on the DHT they are given: its node then refuses announcements of another
shape (and a plain value under the key).

:func:`list_runs` reads every announcement and each run's progress records (:mod:`swarm.progress`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import pydantic

from dht import DHT, SchemaValidator, get_dht_time
from dht.peer.untrusted import brief

from .progress import fetch_records, summarize

__all__ = ["RunAnnouncement", "RunInfo", "RUNS_KEY", "RUNS_SCHEMA", "find_run", "announce_run", "list_runs",
           "RunAnnouncer", "settings_differences"]

logger = logging.getLogger(__name__)
RUNS_KEY = "swarm.runs"
MAX_SETTINGS, MAX_SETTING_CHARS = 64, 200
_Text = Annotated[str, pydantic.Field(max_length=4096)]


class AnnouncementRecord(pydantic.BaseModel):
    """One announcement under ``swarm.runs`` as the DHT checks it (fields of :class:`RunAnnouncement`)."""

    run_id: _Text
    task: _Text
    task_hash: _Text
    creator: _Text
    created: float
    target_batch_size: Annotated[int, pydantic.Field(ge=0, lt=2 ** 63)] = 0
    hyperparameters: dict | None = None
    settings: Annotated[dict[Annotated[str, pydantic.Field(max_length=64)],
                             bool | int | float | Annotated[str, pydantic.Field(max_length=MAX_SETTING_CHARS)] | None],
                        pydantic.Field(max_length=MAX_SETTINGS)] | None = None


class RunsSchema(pydantic.BaseModel):
    runs: dict[str, AnnouncementRecord]  # a dictionary: subkey = "{run_id} {creator's owner marker}"


RUNS_SCHEMA = SchemaValidator(RunsSchema, prefix="swarm", separator=".")  # registered by this module's functions


@dataclass
class RunAnnouncement:
    run_id: str
    task: str  # the task reference as the creator gave it (informative)
    task_hash: str  # sha256 hex of the task's code
    creator: str  # peer id of the creator
    created: float  # DHT time
    target_batch_size: int = 0
    hyperparameters: dict = field(default_factory=dict)
    # what every peer must share besides the code (task attribute, optimizer mode and options, batch
    # sizes...): name -> scalar; see :func:`settings_differences`. Empty in announcements of old versions.
    settings: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> "RunAnnouncement | None":
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["run_id"]), str(value["task"]), str(value["task_hash"]), str(value["creator"]),
                       float(value["created"]), int(value.get("target_batch_size", 0)),
                       dict(value.get("hyperparameters") or {}), _parse_settings(value.get("settings")))
        except (KeyError, TypeError, ValueError):
            return None



def _parse_settings(value: Any) -> dict:
    """An announcement's settings, from the DHT (untrusted): at most ``MAX_SETTINGS`` entries of a
    short string name and a scalar value (strings at most ``MAX_SETTING_CHARS``); anything else is
    refused (ValueError), so a malformed record is ignored as a whole."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_SETTINGS:
        raise ValueError("bad settings")
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 64:
            raise ValueError("bad setting name")
        if not (item is None or isinstance(item, (bool, int, float)) or
                (isinstance(item, str) and len(item) <= MAX_SETTING_CHARS)):
            raise ValueError("bad setting value")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > 2 ** 63:
            raise ValueError("bad setting value")
    return dict(value)


def settings_differences(announcement: RunAnnouncement, task_ref: str, task_hash: str, settings: dict,
                         hyperparameters: dict) -> list[str]:
    """One line per field in which this peer differs from the run's announcement (empty: it may
    join): the task code's hash, then every pinned setting and hyperparameter. Values from the
    announcement are untrusted and shown through :func:`dht.peer.untrusted.brief`."""
    lines = []
    if announcement.task_hash != task_hash:
        lines.append(f"task code: run {announcement.run_id!r} was announced with task code "
                     f"{brief(announcement.task_hash[:12])} (task {brief(announcement.task)}), but {task_ref} hashes "
                     f"to {task_hash[:12]}: refusing to train different code in the same run")
    if announcement.settings:  # an old version's announcement pins the code only
        for name in sorted(set(announcement.settings) | set(settings)):
            theirs, mine = announcement.settings.get(name, "(not set)"), settings.get(name, "(not set)")
            if theirs != mine or type(theirs) is not type(mine):
                lines.append(f"{name}: the run has {brief(theirs)}, this peer {brief(mine)}")
    for name in sorted(set(announcement.hyperparameters) | set(hyperparameters), key=brief)[:MAX_SETTINGS]:
        theirs = announcement.hyperparameters.get(name, "(not set)")
        mine = hyperparameters.get(name, "(not set)")
        try:
            same = bool(theirs == mine)
        except Exception:  # noqa: BLE001 - a value nested too deep to compare: not the same
            same = False
        if not same:
            lines.append(f"hyperparameters[{brief(name)}]: the run has {brief(theirs)}, this peer {brief(mine)}")
    return lines


@dataclass
class RunInfo:
    """One run as ``swarm runs`` lists it. ``peers``, ``samples_per_second`` and ``loss`` count the
    peers online now (a record newer than ``online_window`` s); ``epoch`` is the newest epoch any
    record shows (the last known one for a dead run), ``last_seen`` the DHT time of the newest
    record (None: no record left, the run's peers are gone for longer than the records live)."""

    run_id: str
    peers: int
    samples_per_second: float
    epoch: int
    loss: float | None
    task: str
    task_hash: str
    creator: str
    created: float
    last_seen: float | None = None
    # pipeline runs only (their announcement pins "pipeline stages"): [{"stage", "servers",
    # "samples_per_s"}] from the stage announcements, and the trainers' samples/s (the progress records)
    stages: list[dict] | None = None
    trainers_samples_per_s: float | None = None
    # verified runs (their announcement pins "verification"): [{"peer_id", "reason", "reporters"}], the
    # peers most of the run's verifying peers ban (swarm.verified.fetch_ban_views); [] otherwise
    banned: list[dict] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.peers > 0

    def as_dict(self) -> dict:
        d = dict(asdict(self), alive=self.alive)
        if self.stages is None:
            del d["stages"], d["trainers_samples_per_s"]
        return d


async def _announcements(node) -> list[RunAnnouncement]:
    node.validator.extend([RUNS_SCHEMA])  # (idempotent)
    found = await node.get(RUNS_KEY, latest=True)
    result = []
    now = get_dht_time()
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            announcement = RunAnnouncement.parse(getattr(item, "value", None))
            if announcement is None or not isinstance(subkey, str) or announcement.created > now + 60:
                continue
            if not subkey.startswith(f"{announcement.run_id} [owner:"):
                continue  # a record filed under another run's name
            result.append(announcement)
    return result


def _earliest(announcements: list[RunAnnouncement]) -> dict[str, RunAnnouncement]:
    runs: dict[str, RunAnnouncement] = {}
    for a in sorted(announcements, key=lambda a: (a.created, a.creator)):
        runs.setdefault(a.run_id, a)
    return runs


def find_run(dht: DHT, run_id: str, timeout: float = 30.0) -> RunAnnouncement | None:
    """The run's announcement (the earliest-created one), or None if nobody announced it."""
    async def go(_dht, node):
        return _earliest(await _announcements(node)).get(run_id)
    return dht.run_coroutine(go, return_future=True).result(timeout)


def announce_run(dht: DHT, announcement: RunAnnouncement, expiration: float = 3600.0, timeout: float = 30.0) -> bool:
    """Store (or refresh) this peer's signed announcement of a run."""
    async def go(_dht, node):
        node.validator.extend([RUNS_SCHEMA])
        subkey = f"{announcement.run_id} {node.signature_validator.ownership_marker}"
        return await node.store(RUNS_KEY, asdict(announcement), get_dht_time() + expiration, subkey=subkey)
    return dht.run_coroutine(go, return_future=True).result(timeout)


class RunAnnouncer:
    """Keeps the creator's announcement alive (refresh every ``refresh_period`` s) until shut down."""

    def __init__(self, dht: DHT, announcement: RunAnnouncement, refresh_period: float = 600.0,
                 expiration: float = 3600.0):
        self.dht = dht

        async def loop(_dht, node):
            async def refresh():
                while True:
                    await asyncio.sleep(refresh_period)
                    try:
                        await node.store(RUNS_KEY, asdict(announcement), get_dht_time() + expiration,
                                         subkey=f"{announcement.run_id} {node.signature_validator.ownership_marker}")
                    except Exception as e:  # noqa: BLE001 - retried next period
                        logger.warning("could not refresh the run announcement: %s", e)
            return asyncio.ensure_future(refresh())
        self._task = dht.run_coroutine(loop)

    def shutdown(self) -> None:
        try:
            self.dht.loop.call_soon_threadsafe(self._task.cancel)
        except RuntimeError:
            pass


async def _pipeline(node, run_id: str, num_stages: int) -> list[dict]:
    """Servers and their summed samples/s per stage of a pipeline run (empty stages included)."""
    from .pipeline.registry import fetch_stages

    try:
        stages = await fetch_stages(node, run_id, num_stages)
    except Exception as e:  # noqa: BLE001 - the run is still listed, without its stages
        logger.debug("could not read the stages of %s: %s", brief(run_id), e)
        stages = {}
    return [{"stage": k, "servers": len(stages.get(k, [])),
             "samples_per_s": round(sum(r.samples_per_s for r in stages.get(k, [])), 2)} for k in range(num_stages)]


def list_runs(dht: DHT, timeout: float = 30.0, online_window: float = 10.0) -> list[RunInfo]:
    """Every announced run with its live progress (peers online, samples/s, latest loss), its last
    known epoch and when a peer of it was last seen; live runs first, then by when they were seen."""
    async def go(_dht, node):
        runs = _earliest(await _announcements(node))
        ids = list(runs)
        progress = await asyncio.gather(*(fetch_records(node, r) for r in ids))
        now = get_dht_time()
        infos = []
        for run_id, records in zip(ids, progress):
            a = runs[run_id]
            g = summarize(records, a.target_batch_size or 1, now, online_window=online_window)
            last_seen = max((r.time for r in records), default=None)
            epoch = max([g.epoch] + [r.epoch for r in records if not r.client_mode])
            loss = g.loss
            if not g.num_peers and records:  # dead: the last known loss, at the last known epoch
                losses = [r.loss for r in records if r.loss is not None and r.epoch == epoch]
                loss = sum(losses) / len(losses) if losses else None
            infos.append(RunInfo(run_id, g.num_peers, round(g.samples_per_second, 2), epoch, loss, a.task,
                                 a.task_hash, a.creator, a.created, last_seen))

        async def extras(info: RunInfo) -> None:  # the runs' stages and bans: looked up concurrently
            settings = runs[info.run_id].settings or {}
            num_stages = settings.get("pipeline stages")
            if isinstance(num_stages, int) and not isinstance(num_stages, bool) and 0 < num_stages <= 1024:
                info.stages = await _pipeline(node, info.run_id, num_stages)
                info.trainers_samples_per_s = info.samples_per_second
            if "verification" in settings:
                from .verified import fetch_ban_views

                info.banned = await fetch_ban_views(node, info.run_id)

        await asyncio.gather(*(extras(info) for info in infos))
        return sorted(infos, key=lambda i: (-i.peers, -(i.last_seen or i.created), i.run_id))
    return dht.run_coroutine(go, return_future=True).result(timeout)
