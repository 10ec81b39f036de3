"""Stage announcements in the DHT: which peer serves which stage of a pipeline run, and how fast.

Every stage server stores its :class:`StageRecord` under the DHT dictionary key
``f"{run_id}.stage_load.{stage}"`` with its owner marker as the subkey, so only it can write (and
sign) its record; a record whose ``peer_id`` is not the PeerID of the subkey's key is dropped on
fetch. Trainers read the records to find servers (``peer_id`` and ``addrs``), the rebalancer
(algorithms.md 1.5) reads ``samples_per_s``, ``queue``, ``mem_bytes`` and ``last_moved_at``. A server
that stops serving a stage stores a last record with ``left=True`` (and a later expiration, so it
wins over its earlier ones); records expire ``expiration_s`` after their last refresh otherwise.
:func:`stage_schema` is registered on the node by :func:`announce` and :func:`fetch_stages`, so the
node refuses records of another shape under these keys.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import pydantic

from dht import DHTNode, SchemaValidator, get_dht_time
from dht.peer.identity import PeerID, b58decode

__all__ = ["StageRecord", "stage_key", "stage_schema", "announce", "fetch_stages", "MAX_STAGES"]

MAX_STAGES = 1024  # stage indices are 0 .. MAX_STAGES - 1
MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_PEER_ID_LEN = 128
_FUTURE_TOLERANCE_S = 60.0  # a record dated further ahead of this peer's DHT clock is not evidence
_OWNER = re.compile(r"\[owner:([1-9A-HJ-NP-Za-km-z]{1,64})\]")

_Count = Annotated[int, pydantic.Field(ge=0, lt=2 ** 63)]
_Addr = Annotated[str, pydantic.Field(max_length=MAX_ADDR_LEN)]
_Finite = Annotated[float, pydantic.Field(allow_inf_nan=False)]


def stage_key(run_id: str, stage: int) -> str:
    """The DHT key of stage ``stage``'s announcements in run ``run_id``."""
    return f"{run_id}.stage_load.{stage}"


class _WireRecord(pydantic.BaseModel):
    """The shape a node accepts under a stage key (as :meth:`StageRecord.to_wire` writes it)."""

    peer_id: Annotated[str, pydantic.Field(max_length=MAX_PEER_ID_LEN)]
    addrs: Annotated[list[_Addr], pydantic.Field(max_length=MAX_ADDRS)]
    stage: Annotated[int, pydantic.Field(ge=0, lt=MAX_STAGES)]
    samples_per_s: Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]
    queue: _Count
    mem_bytes: _Count
    last_moved_at: _Finite
    relayed: bool = False
    left: bool = False
    time: _Finite = 0.0


class _StageSchema(pydantic.BaseModel):
    stage_load: dict[str, _WireRecord]  # a dictionary: subkey = the server's owner marker


def stage_schema(run_id: str) -> SchemaValidator:
    """The DHT schema of ``{run_id}.stage_load.{K}`` for every stage ``K``."""
    return SchemaValidator(_StageSchema, patterns={"stage_load": re.escape(run_id) + r"\.stage_load\.[0-9]{1,4}"})


@dataclass
class StageRecord:
    """One server's announcement of one stage.

    ``peer_id`` (base58), ``addrs`` (multiaddresses to dial it, at most 8), ``stage``, ``samples_per_s``
    (its measured throughput, samples/s, EMA), ``queue`` (requests waiting or running now),
    ``mem_bytes`` (memory it offers for a stage: params + grads + optimizer state, bytes),
    ``last_moved_at`` (DHT time of its last migration, 0 if never), ``relayed`` (reachable only
    through a relay), ``left`` (it stopped serving this stage), ``time`` (DHT time of the record,
    set by :func:`announce`); ``expiration_time``: the DHT expiration of the record as fetched (not
    on the wire; 0 for a record not fetched).
    """

    peer_id: str
    addrs: list[str]
    stage: int
    samples_per_s: float
    queue: int
    mem_bytes: int
    last_moved_at: float
    relayed: bool = False
    left: bool = False
    time: float = 0.0
    expiration_time: float = field(default=0.0, compare=False)

    def to_wire(self) -> dict:
        """The record as stored in the DHT (a msgpack-able dict); ValueError if out of bounds."""
        wire = asdict(self)
        del wire["expiration_time"]
        wire["addrs"] = list(self.addrs)
        try:
            _WireRecord.model_validate(wire, strict=True)
        except pydantic.ValidationError as e:
            raise ValueError(f"invalid stage record: {e.errors()[0].get('msg', 'invalid')}") from None
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> "StageRecord | None":
        """The record in ``value`` (from the DHT, untrusted), or None if it is malformed."""
        if not isinstance(value, dict):
            return None
        try:
            checked = _WireRecord.model_validate(value, strict=True)
        except (pydantic.ValidationError, TypeError, ValueError):
            return None
        return cls(**checked.model_dump())  # (samples_per_s is finite: allow_inf_nan=False)


def _owner_peer_id(subkey: Any) -> str | None:
    """The base58 PeerID of the key named by an ``[owner:...]`` subkey, or None."""
    if not isinstance(subkey, str) or len(subkey) > 100:
        return None
    match = _OWNER.fullmatch(subkey)
    if match is None:
        return None
    try:
        public_key = b58decode(match.group(1))
    except ValueError:
        return None
    if len(public_key) != 32:
        return None
    return PeerID.from_public_key(public_key).to_base58()


def _register(node: DHTNode, run_id: str) -> None:
    node.validator.extend([stage_schema(run_id)])  # (duplicates are left out)


async def announce(node: DHTNode, run_id: str, record: StageRecord, expiration_s: float = 30.0) -> bool:
    """Store ``record`` (its ``time`` set to now) under its stage's key with this node's owner marker
    as the subkey, for ``expiration_s`` seconds; True if some DHT peer stored it."""
    if not 0 <= record.stage < MAX_STAGES:
        raise ValueError(f"stage must be in 0..{MAX_STAGES - 1}, got {record.stage}")
    if record.peer_id != node.peer_id.to_base58():
        raise ValueError("a stage record announces this node's own peer id")
    _register(node, run_id)
    now = get_dht_time()
    record.time = now
    return await node.store(stage_key(run_id, record.stage), record.to_wire(), now + expiration_s,
                            subkey=node.signature_validator.ownership_marker)


async def fetch_stages(node: DHTNode, run_id: str, num_stages: int,
                       include_left: bool = False) -> dict[int, list[StageRecord]]:
    """Every stage's live records, ``{stage: [records]}`` for stages ``0..num_stages - 1`` (one batched
    lookup). Dropped: malformed records, records whose ``peer_id`` is not the subkey's owner or whose
    ``stage`` is not the key's, records dated over 60 s in the future, and (unless ``include_left``)
    records of servers that left; one record per peer, the newest."""
    if not 0 < num_stages <= MAX_STAGES:
        raise ValueError(f"num_stages must be in 1..{MAX_STAGES}, got {num_stages}")
    _register(node, run_id)
    keys = [stage_key(run_id, k) for k in range(num_stages)]
    found = await node.get_many(keys, latest=True)
    now = get_dht_time()
    result: dict[int, list[StageRecord]] = {}
    for k, key in enumerate(keys):
        newest: dict[str, StageRecord] = {}
        entry = found.get(key)
        value = getattr(entry, "value", None)
        if isinstance(value, dict):
            for subkey, item in value.items():
                record = StageRecord.from_wire(getattr(item, "value", None))
                if record is not None:
                    record.expiration_time = float(getattr(item, "expiration_time", 0.0))
                if (record is None or record.stage != k or record.time > now + _FUTURE_TOLERANCE_S
                        or _owner_peer_id(subkey) != record.peer_id):
                    continue
                known = newest.get(record.peer_id)
                if known is None or record.time > known.time:
                    newest[record.peer_id] = record
        result[k] = sorted((r for r in newest.values() if include_left or not r.left), key=lambda r: r.peer_id)
    return result
