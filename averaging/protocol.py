"""The averaging wire protocol, sans I/O: every message of matchmaking, the all-reduce and gossip.

Each message has an encoder (arguments -> the map a stream sends, keys in wire order) next to a
validating parser (what arrived -> checked values); a parser raises
:class:`~dht.peer.errors.BadRequestError` with a bounded message (values described by
:func:`~dht.peer.untrusted.brief`), so a handler's caller gets ``bad_request`` and the transport logs
one rate-limited line per peer, never a traceback. Messages are msgpack maps with short keys; a
method is ``{name}.{prefix}`` (:func:`method`), the prefix being the averager's. No I/O here: the
modules that use it (:mod:`.matchmaking`, :mod:`.allreduce`, :mod:`.gossip`) do the sending.

==============================  ==========================================================================
method, direction               message (field: meaning) and limits
==============================  ==========================================================================
``avg.join``  stream,           request: ``{"key": group key (str, at most MAX_KEY_CHARS=512), "schema":
follower -> leader              tensor schema hash (bytes, at most MAX_SCHEMA_BYTES=64), "exp": the
                                follower's expiration (finite number), "info": map packing to at most
                                MAX_INFO_BYTES=16 KiB (``{"size", "bandwidth", "gather", "min_part"}``),
                                "client": bool, "addrs": [str] (at most MAX_ADDRS=16, each at most
                                MAX_ADDR_CHARS=512)}``; the whole request at most MAX_JOIN_BYTES=64 KiB.
leader -> follower              ``{"status": "rejected", "reason": str}``; or ``{"status": "accepted",
                                "exp": the leader's expiration (finite number)}`` then, when the group
                                starts, ``{"status": "begin", "group_id": bytes (1 to MAX_GROUP_ID_BYTES=
                                64), "members": [PeerID bytes] (distinct), "addrs": [[str]] (as in the
                                request), "sizes": [int >= 0] (values each member reduces, summing to the
                                vector's size), "bandwidths": [float >= 0 or None], "client": [bool],
                                "gathered": [each member's info]}`` (lists as long as ``members``, 1 to
                                MAX_GROUP_SIZE=4096), or ``{"status": "disbanded", "reason": str,
                                "leader": PeerID bytes of a better leader, or None}``.
``avg.part``  stream,           the header ``{"g": group id (bytes, 1 to 64), "p": phase (int: 0 the
member -> owner                 butterfly, 1 recovery), "t": recovery tag (bytes, at most MAX_TAG_BYTES=32;
                                b"" in phase 0), "i": the caller's index in the group (int, 0 <= i <
                                MAX_MEMBER_INDEX=65536; must be the caller's PeerID), "w": weight (int or
                                float; the owner excludes a member whose weight is not finite and >= 0)}``,
                                with commitments on (version 2, optional key) also ``"c": {"d": SHA-256
                                digest of the caller's values for the part as the owner decodes them (32
                                bytes), "k": its Ed25519 key (32 bytes), "s": signature (64 bytes)}`` (a
                                compact :class:`~averaging.commitments.Commitment`, role ``"input"``; the
                                signature also covers the run prefix, round, phase, part, group, weight,
                                codec and the part's ranges, which the owner knows),
                                then one codec map per chunk of the owner's ranges (:mod:`.compression`:
                                the codec checks sizes and values). The tag is the first 16 bytes of
                                SHA-256 of ``repr((group id, survivors, spans))``, which every survivor
                                computes alike (:mod:`.allreduce`); an owner refuses another one.
owner -> member                 one averaged codec map per chunk, then ``{"done": [member indices whose
                                values are in every chunk], "mixed": bool (a member was dropped after some
                                chunks included it)}``; with commitments on also ``"c"`` (as in the header:
                                the owner's signed digest of its whole averaged part, role ``"result"``,
                                binding the ``done`` list). Absent keys: commitments off (version 1 bytes).
``avg.report``  unary,          ``{"g": group id (bytes, 1 to 64), "i": the caller's index (int, as in
member -> member                ``avg.part``), "failed": [member indices it saw fail] (ints in range, at
                                most the group's size)}``; at most MAX_REPORT_BYTES=64 KiB.
reply                           ``{"failed": [member indices]}``; to a client-mode caller also ``"heard":
                                [client members whose reports this peer has]`` and ``"relayed": [the union
                                of their reports]``, both checked like ``failed``.
``gossip.push``  stream,        ``{"w": weight (int or float, finite, > 0)}``, then a tensor
pusher -> receiver              (:mod:`.tensor_wire`: header ``{"dtype", "shape", "chunk"}`` and raw
                                chunks of at most PUSH_CHUNK_BYTES=1 MiB).
reply                           ``"ok"`` once the push is mixed in.
``avg.gather``  stream,         version 1, for sparse codecs (:mod:`.sparse_allgather`). The header
dialer -> acceptor              ``{"g": group id (bytes, 1 to 64), "i": the caller's index (as in
(client -> non-client, else     ``avg.part``), "v": 1 (GATHER_VERSION; another one is refused)}``.
the lower index dials)
both directions                 ``{"w": weight (int or float; the receiver excludes a sender whose weight
                                is not finite and >= 0)}``, then one codec map per chunk of the vector
                                (the codec's ``chunk_ranges``; the codec checks sizes, indices, values),
                                then ``{"have": [[member index, digest (GATHER_DIGEST_BYTES=16 bytes)]]}``
                                (the contributions it holds valid; at most the group's size, distinct
                                members), then ``{"f": [member indices averaged]}``; every message at
                                most MAX_GATHER_MESSAGE_BYTES=16 MiB.
relay -> client                 with two or more client-mode members (they cannot reach each other) the
                                lowest-index other member relays: after its own contribution, for each
                                other client in index order ``{"r": client index, "n": 1 or 0}`` and, if
                                1, that client's contribution as it arrived (weight map and chunks);
                                after its own ``have``, ``{"rh": [[client index, have list or None]]}``
                                (the other clients' reports, as they arrived).
==============================  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from dht.peer.errors import BadRequestError
from dht.peer.identity import PeerID
from dht.peer.untrusted import brief

__all__ = [
    "JOIN_METHOD", "PART_METHOD", "REPORT_METHOD", "GOSSIP_PUSH_METHOD", "method",
    "MAX_GROUP_ID_BYTES", "MAX_TAG_BYTES", "MAX_MEMBER_INDEX", "MAX_REPORT_BYTES", "MAX_KEY_CHARS",
    "MAX_SCHEMA_BYTES", "MAX_ADDRS", "MAX_ADDR_CHARS", "MAX_INFO_BYTES", "MAX_GROUP_SIZE", "MAX_JOIN_BYTES",
    "PUSH_CHUNK_BYTES", "BadRequestError", "refuse", "packed_size",
    "join_request", "check_join_request", "parse_join_request", "join_rejected", "join_accepted",
    "parse_join_accepted", "join_begin", "Begin", "parse_begin", "join_disbanded",
    "PartHeader", "part_header", "parse_part_header", "part_done", "parse_part_done", "parse_part_commitment",
    "ReportRequest", "report_request", "parse_report_request", "report_reply", "parse_report_reply",
    "member_indices", "push_header", "parse_push_header", "PUSH_OK", "check_push_reply",
]

JOIN_METHOD = "avg.join"
PART_METHOD = "avg.part"
REPORT_METHOD = "avg.report"
GOSSIP_PUSH_METHOD = "gossip.push"

MAX_GROUP_ID_BYTES = 64  # matchmaking makes 20-byte ids
MAX_TAG_BYTES = 32  # recovery tags are 16 bytes
MAX_MEMBER_INDEX = 1 << 16  # member indices in avg.part and avg.report are below this
MAX_REPORT_BYTES = 64 << 10  # an avg.report request (at most 4096 member indices)
MAX_KEY_CHARS = 512
MAX_SCHEMA_BYTES = 64
MAX_ADDRS = 16
MAX_ADDR_CHARS = 512
MAX_INFO_BYTES = 16 << 10  # a member's info (with its ``gather`` value), packed
MAX_GROUP_SIZE = 4096
MAX_JOIN_BYTES = 64 << 10  # a join request, packed (the transport refuses a bigger one with too_large)
PUSH_CHUNK_BYTES = 1 << 20  # bytes per data message of a gossip push (the handler refuses bigger ones)
PUSH_OK = "ok"


def method(name: str, prefix: str) -> str:
    """The method of message family ``name`` (e.g. :data:`PART_METHOD`) for an averager's ``prefix``."""
    return f"{name}.{prefix}"


def refuse(what: str, value: Any = None) -> BadRequestError:
    """A BadRequestError saying what is wrong, with ``value`` described by ``brief`` (bounded)."""
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


_refuse = refuse


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_GROUP_ID_BYTES:
        raise _refuse(f"'g' must be a group id of 1 to {MAX_GROUP_ID_BYTES} bytes", value)
    return value


def _member(value: Any) -> int:
    if not _is_int(value) or not 0 <= value < MAX_MEMBER_INDEX:
        raise _refuse("'i' must be a member index", value)
    return value


def packed_size(value: Any) -> int | None:
    """Bytes of ``value`` packed with msgpack, or None if it cannot be packed."""
    try:
        return len(msgpack.packb(value, use_bin_type=True))
    except Exception:  # noqa: BLE001 - not serializable (cannot come from the wire, only from a caller)
        return None


def member_indices(value: Any, members: int, name: str = "failed") -> list[int]:
    """``value`` as a sorted list of distinct member indices in ``[0, members)`` (at most ``members``
    of them); BadRequestError naming field ``name`` otherwise."""
    if not isinstance(value, list) or len(value) > members or not all(_is_int(v) and 0 <= v < members for v in value):
        raise _refuse(f"{name!r} must be a list of member indices", value)
    return sorted(set(value))


# ---- avg.join ------------------------------------------------------------------------------------

def _addresses(value: Any) -> list[str] | None:
    """``value`` as a list of address strings within the bounds, or None."""
    if not isinstance(value, list) or len(value) > MAX_ADDRS:
        return None
    if not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in value):
        return None
    return value


def join_request(key: str, schema: bytes, exp: float, info: dict, client: bool, addrs: list[str]) -> dict:
    """A follower's request to a leader (see the table)."""
    return {"key": key, "schema": schema, "exp": exp, "info": info, "client": client, "addrs": addrs}


def check_join_request(request: Any) -> str | None:
    """Why ``request`` is not a well-formed join request (None if it is one)."""
    if not isinstance(request, dict):
        return "the request must be a map"
    if not isinstance(request.get("key"), str) or len(request["key"]) > MAX_KEY_CHARS:
        return f"'key' must be a string of at most {MAX_KEY_CHARS} characters"
    if not isinstance(request.get("schema"), bytes) or len(request["schema"]) > MAX_SCHEMA_BYTES:
        return f"'schema' must be at most {MAX_SCHEMA_BYTES} bytes"
    if not _is_number(request.get("exp")):
        return "'exp' must be a finite number"
    if not isinstance(request.get("client", False), bool):
        return "'client' must be a bool"
    if _addresses(request.get("addrs", [])) is None:
        return f"'addrs' must be at most {MAX_ADDRS} strings of at most {MAX_ADDR_CHARS} characters"
    info = request.get("info", {})
    if not isinstance(info, dict) or (packed_size(info) or MAX_INFO_BYTES + 1) > MAX_INFO_BYTES:
        return f"'info' must be a map of at most {MAX_INFO_BYTES} bytes"
    return None


def parse_join_request(request: Any) -> dict:
    """``request`` checked against the table (``client``, ``addrs`` and ``info`` may be missing:
    False, [] and {}); BadRequestError otherwise."""
    problem = check_join_request(request)
    if problem is not None:
        raise _refuse(problem, request)
    return request


def join_rejected(reason: str) -> dict:
    return {"status": "rejected", "reason": reason}


def join_accepted(exp: float) -> dict:
    return {"status": "accepted", "exp": exp}


def parse_join_accepted(reply: Any) -> float | None:
    """The leader's expiration if ``reply`` accepts the follower (0.0 if it names none), None for
    any other reply (rejected: ask the next leader); BadRequestError for a bad expiration."""
    if not isinstance(reply, dict) or reply.get("status") != "accepted":
        return None
    exp = reply.get("exp", 0.0)
    if not _is_number(exp):
        raise _refuse("bad expiration in the leader's reply", exp)
    return float(exp)


def join_begin(group_id: bytes, members: list[bytes], addrs: list[list[str]], sizes: list[int],
               bandwidths: list[float | None], client: list[bool], gathered: list[Any]) -> dict:
    """The leader's announcement of the group, the same to every member (see the table)."""
    return {"status": "begin", "group_id": group_id, "members": members, "addrs": addrs, "sizes": sizes,
            "bandwidths": bandwidths, "client": client, "gathered": gathered}


@dataclass(frozen=True)
class Begin:
    """A checked ``begin`` message."""

    group_id: bytes
    members: list[PeerID]  # distinct, in part order
    addrs: list[list[str]]
    sizes: list[int]
    bandwidths: list[float | None]
    client: list[bool]
    gathered: list[Any]


def parse_begin(message: Any, total: int | None = None) -> Begin | None:
    """The group a ``begin`` message announces, None if ``message`` is another reply (e.g.
    ``disbanded``); BadRequestError if it breaks any bound, or if ``total`` is given and the part
    sizes do not sum to it."""
    if not isinstance(message, dict) or message.get("status") != "begin":
        return None
    fields: list[Any] = [message.get(k) for k in ("group_id", "members", "addrs", "sizes", "bandwidths", "client",
                                                  "gathered")]
    group_id, members, addrs, sizes, bandwidths, client, gathered = fields
    if not isinstance(group_id, bytes) or not 0 < len(group_id) <= MAX_GROUP_ID_BYTES:
        raise _refuse("bad group id", group_id)
    if not isinstance(members, list) or not 0 < len(members) <= MAX_GROUP_SIZE:
        raise _refuse("bad member list", members)
    n = len(members)
    if not all(isinstance(x, list) and len(x) == n for x in (addrs, sizes, bandwidths, client, gathered)):
        raise _refuse("inconsistent begin message: lists of different lengths")
    if not all(_is_int(a) and a >= 0 for a in sizes) or (total is not None and sum(sizes) != total):
        raise _refuse("bad part sizes")
    if not all(b is None or (_is_number(b) and b >= 0) for b in bandwidths):
        raise _refuse("bad bandwidths")
    if not all(isinstance(c, bool) for c in client) or not all(_addresses(a) is not None for a in addrs):
        raise _refuse("bad client flags or addresses")
    try:
        peers = [PeerID(raw) for raw in members]
    except (ValueError, TypeError):  # IdentityError is a ValueError
        raise _refuse("bad member PeerIDs") from None
    if len(set(peers)) != n:
        raise _refuse("inconsistent begin message: duplicate members")
    return Begin(group_id, peers, list(addrs), list(sizes), list(bandwidths), list(client), list(gathered))


def join_disbanded(reason: str, leader: bytes | None) -> dict:
    """The leader gave up its group (``leader``: a better one it joined, as PeerID bytes, or None)."""
    return {"status": "disbanded", "reason": reason, "leader": leader}


# ---- avg.part ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartHeader:
    """The first message of an ``avg.part`` stream."""

    group_id: bytes
    phase: int  # 0: the butterfly, 1: recovery
    tag: bytes  # the recovery plan's tag (b"" in phase 0)
    member: int  # the caller's index in the group
    weight: int | float  # not yet checked for finiteness: the owner excludes a member with a bad weight
    commitment: dict | None = None  # compact signed digest of the caller's part (commitments on), checked shape


def part_header(header: PartHeader) -> dict:
    message = {"g": header.group_id, "p": header.phase, "t": header.tag, "i": header.member, "w": header.weight}
    if header.commitment is not None:
        message["c"] = header.commitment
    return message


def parse_part_commitment(message: Any) -> dict | None:
    """The compact commitment ``"c"`` of a part header or final message (``{"d": 32 bytes, "k": 32
    bytes, "s": 64 bytes}``), None when absent; BadRequestError if malformed. The signature is
    checked by the caller (:meth:`averaging.commitments.Commitment.verify`)."""
    value = message.get("c") if isinstance(message, dict) else None
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) != 3
            or not all(isinstance(value.get(k), bytes) and len(value[k]) == n for k, n in (("d", 32), ("k", 32),
                                                                                          ("s", 64)))):
        raise _refuse("'c' must be a commitment {'d': 32 bytes, 'k': 32 bytes, 's': 64 bytes}", value)
    return value


def parse_part_header(message: Any) -> PartHeader:
    """A part header checked for types and lengths; BadRequestError otherwise."""
    if not isinstance(message, dict):
        raise _refuse("the part header must be a map", message)
    fields: list[Any] = [message.get(k) for k in ("g", "p", "t", "i", "w")]
    group_id, phase, tag, member, weight = fields
    _group_id(group_id)
    if not _is_int(phase) or phase not in (0, 1):
        raise _refuse("'p' must be the phase, 0 or 1", phase)
    if not isinstance(tag, bytes) or len(tag) > MAX_TAG_BYTES:
        raise _refuse(f"'t' must be a tag of at most {MAX_TAG_BYTES} bytes", tag)
    _member(member)
    if not (_is_int(weight) or isinstance(weight, float)):
        raise _refuse("'w' must be a number", weight)
    return PartHeader(group_id, phase, tag, member, weight, parse_part_commitment(message))


def part_done(contributors: list[int], mixed: bool, commitment: dict | None = None) -> dict:
    """The owner's last message on a part stream (``commitment``: its compact signed result digest)."""
    message: dict[str, Any] = {"done": contributors, "mixed": mixed}
    if commitment is not None:
        message["c"] = commitment
    return message


def parse_part_done(message: Any, members: int) -> tuple[list[int], bool]:
    """(contributors, mixed) of an owner's last message in a group of ``members``; BadRequestError
    if it is malformed."""
    if not isinstance(message, dict):
        raise _refuse("the owner's final message must be a map", message)
    contributors = member_indices(message.get("done"), members, "done")
    mixed = message.get("mixed")
    if not isinstance(mixed, bool):
        raise _refuse("'mixed' must be a bool", mixed)
    return contributors, mixed


# ---- avg.report ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportRequest:
    group_id: bytes
    member: int  # the caller's index
    failed: Any  # check with member_indices(failed, group size) once the group is known


def report_request(group_id: bytes, member: int, failed: list[int]) -> dict:
    return {"g": group_id, "i": member, "failed": failed}


def parse_report_request(message: Any) -> ReportRequest:
    """A report checked for types and lengths (``failed`` is checked against the group's size by
    :func:`member_indices`); BadRequestError otherwise."""
    if not isinstance(message, dict):
        raise _refuse("a report must be a map", message)
    return ReportRequest(_group_id(message.get("g")), _member(message.get("i")), message.get("failed"))


def report_reply(failed: list[int], heard: list[int] | None = None, relayed: list[int] | None = None) -> dict:
    """The reply to a report; ``heard`` and ``relayed`` only to a client-mode caller."""
    reply: dict[str, Any] = {"failed": failed}
    if heard is not None:
        reply["heard"] = heard
        reply["relayed"] = relayed if relayed is not None else []
    return reply


def parse_report_reply(message: Any, members: int, client: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(failed, heard, relayed) of a report reply in a group of ``members``; ``heard`` and
    ``relayed`` are read only for a ``client`` caller ([] when absent or not read). BadRequestError
    if malformed."""
    if not isinstance(message, dict):
        raise _refuse("a report reply must be a map", message)
    failed = member_indices(message.get("failed"), members, "failed")
    if not client:
        return failed, [], []
    return (failed, member_indices(message.get("heard", []), members, "heard"),
            member_indices(message.get("relayed", []), members, "relayed"))


# ---- gossip.push ---------------------------------------------------------------------------------

def push_header(weight: float) -> dict:
    return {"w": weight}


def parse_push_header(message: Any) -> float:
    """The weight of a push (positive, finite); BadRequestError otherwise."""
    w: Any = message.get("w") if isinstance(message, dict) else None
    if not _is_number(w) or not w > 0:
        raise _refuse("the first message must be {'w': a positive finite weight}", w)
    return float(w)


def check_push_reply(reply: Any) -> None:
    """BadRequestError unless ``reply`` is :data:`PUSH_OK`."""
    if reply != PUSH_OK:
        raise _refuse("the push was not acknowledged", reply)


# ---- avg.gather ----------------------------------------------------------------------------------

GATHER_METHOD = "avg.gather"
GATHER_VERSION = 1
GATHER_DIGEST_BYTES = 16  # SHA-256 of a contribution as received, truncated
MAX_GATHER_MESSAGE_BYTES = 16 << 20  # any message of an avg.gather stream

__all__ += ["GATHER_METHOD", "GATHER_VERSION", "GATHER_DIGEST_BYTES", "MAX_GATHER_MESSAGE_BYTES", "GatherHeader",
            "gather_header", "parse_gather_header", "gather_weight", "parse_gather_weight", "gather_have",
            "parse_gather_have", "gather_final", "parse_gather_final", "gather_relay", "parse_gather_relay",
            "gather_relayed_have", "parse_gather_relayed_have"]


@dataclass(frozen=True)
class GatherHeader:
    """The first message of an ``avg.gather`` stream."""

    group_id: bytes
    member: int  # the caller's index in the group


def gather_header(group_id: bytes, member: int) -> dict:
    return {"g": group_id, "i": member, "v": GATHER_VERSION}


def parse_gather_header(message: Any) -> GatherHeader:
    """A gather header checked for types, lengths and version; BadRequestError otherwise."""
    if not isinstance(message, dict):
        raise _refuse("the gather header must be a map", message)
    version = message.get("v")
    if not _is_int(version) or version != GATHER_VERSION:
        raise _refuse(f"unsupported avg.gather version (this peer speaks {GATHER_VERSION})", version)
    return GatherHeader(_group_id(message.get("g")), _member(message.get("i")))


def gather_weight(weight: float) -> dict:
    return {"w": weight}


def parse_gather_weight(message: Any) -> float:
    """A sender's weight (finite, >= 0); BadRequestError otherwise."""
    weight: Any = message.get("w") if isinstance(message, dict) else None
    if not _is_number(weight) or weight < 0:
        raise _refuse("'w' must be a finite weight >= 0", weight)
    return float(weight)


def gather_have(have: dict[int, bytes]) -> dict:
    """The contributions a member holds valid: member index -> digest (sorted by member)."""
    return {"have": [[m, have[m]] for m in sorted(have)]}


def parse_gather_have(message: Any, members: int) -> dict[int, bytes]:
    """``{member: digest}`` of a ``have`` report in a group of ``members``; BadRequestError if malformed."""
    entries = message.get("have") if isinstance(message, dict) else None
    if not isinstance(entries, list) or len(entries) > members:
        raise _refuse("'have' must be a list of [member, digest] pairs", entries)
    have: dict[int, bytes] = {}
    for entry in entries:
        if (not isinstance(entry, list) or len(entry) != 2 or not _is_int(entry[0]) or not 0 <= entry[0] < members
                or not isinstance(entry[1], bytes) or len(entry[1]) != GATHER_DIGEST_BYTES or entry[0] in have):
            raise _refuse("'have' must be a list of distinct [member index, 16-byte digest] pairs", entry)
        have[entry[0]] = entry[1]
    return have


def gather_final(contributors: list[int]) -> dict:
    return {"f": contributors}


def parse_gather_final(message: Any, members: int) -> list[int]:
    """The contributors a member averaged (sorted member indices); BadRequestError if malformed."""
    if not isinstance(message, dict):
        raise _refuse("the final gather message must be a map", message)
    return member_indices(message.get("f"), members, "f")


def gather_relay(member: int, present: bool) -> dict:
    """A relayed client's contribution follows (``present``) or not."""
    return {"r": member, "n": 1 if present else 0}


def parse_gather_relay(message: Any, members: int) -> tuple[int, bool]:
    """(client index, present) of a relay header in a group of ``members``; BadRequestError otherwise."""
    member: Any = message.get("r") if isinstance(message, dict) else None
    present: Any = message.get("n") if isinstance(message, dict) else None
    if not _is_int(member) or not 0 <= member < members or not _is_int(present) or present not in (0, 1):
        raise _refuse("a relay header is {'r': member index, 'n': 0 or 1}", message)
    return member, present == 1


def gather_relayed_have(reports: dict[int, dict[int, bytes] | None]) -> dict:
    """The other clients' ``have`` reports as the relay got them (None: none came)."""
    entries: list[list[Any]] = []
    for c in sorted(reports):
        have = reports[c]
        entries.append([c, None if have is None else gather_have(have)["have"]])
    return {"rh": entries}


def parse_gather_relayed_have(message: Any, members: int) -> dict[int, dict[int, bytes] | None]:
    """``{client: its report or None}`` of a relayed-reports message; BadRequestError if malformed."""
    entries = message.get("rh") if isinstance(message, dict) else None
    if not isinstance(entries, list) or len(entries) > members:
        raise _refuse("'rh' must be a list of [member, report] pairs", entries)
    reports: dict[int, dict[int, bytes] | None] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2 or not _is_int(entry[0]) or not 0 <= entry[0] < members \
                or entry[0] in reports:
            raise _refuse("'rh' must be a list of distinct [member index, report] pairs", entry)
        reports[entry[0]] = None if entry[1] is None else parse_gather_have({"have": entry[1]}, members)
    return reports
