"""Sharing the training state with late joiners: announce, serve in chunks, download in parallel.

Each peer that holds a state (a blob from :mod:`swarm.state`) announces it under the DHT dictionary
key ``{run_id}.state`` (subkey: its owner marker; value: epoch, sha256 of the blob, size) and serves
byte ranges of it over the RPC method ``swarm.state.{run_id}``; each StateSharing registers
:func:`state_schema` on its DHT (announcements of another shape are refused). A joiner:

1. reads the announcements and takes the newest epoch; among the donors at that epoch, the hash
   announced by the most donors is the one the swarm agreed on (donors with another hash are not
   used: their state diverged or they are lying);
2. downloads ``chunk_bytes`` ranges from all those donors in parallel (one worker per donor pulling
   from a shared queue); a donor that fails or leaves mid-transfer is dropped and its range goes
   back to the queue for the others;
3. checks the sha256 of the whole blob against the agreed hash before handing it over; if it does
   not match (a donor sent wrong bytes), it retries with one donor at a time.

A donor answers only for the exact hash asked for (a request for a state it no longer holds gets
an error), so a transfer never mixes two states.

The ``swarm.state.{run_id}`` call (joiner -> donor), validated on receipt:

=========  ===========================================================================================
request    ``{"hash": sha256 hex (str, 64 chars), "offset": int >= 0 (< the state's size), "length":
           int in [1, MAX_CHUNK_BYTES=16 MiB]}`` (at most 4 KiB packed; anything else: ``bad_request``)
reply      ``{"data": bytes}``, sent from a view of the published blob (no copy); ``bad_request`` for a
           state this donor does not hold; ``overloaded`` beyond ``max_requests_per_peer`` (2) requests
           in flight from one peer or ``max_requests`` (8) in all (the joiner retries after a pause,
           while its other workers go on with the other donors); a reply not sent within
           ``request_timeout`` is abandoned, so a joiner that does not read cannot hold a slot
=========  ===========================================================================================
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Annotated, Callable

import pydantic

from dht import DHT, PeerID, RemoteError, SchemaValidator
from dht.peer.errors import BadRequestError, ErrorCode, P2PError
from dht.peer.slots import Slots
from dht.peer.untrusted import brief

__all__ = ["StateSharing", "StateDownloadError", "Donor", "state_schema"]

logger = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 16 << 20  # largest range a donor serves in one reply
MAX_REQUEST_BYTES = 4096  # a request, packed


class StateRecord(pydantic.BaseModel):
    """A donor's announcement under ``{run_id}.state`` as the DHT checks it."""

    epoch: int
    hash: Annotated[str, pydantic.Field(max_length=64)]
    size: Annotated[int, pydantic.Field(ge=0, lt=2 ** 63)]
    peer_id: Annotated[str, pydantic.Field(max_length=128)]


class StateSchema(pydantic.BaseModel):
    state: dict[str, StateRecord | None]  # subkey: the donor's owner marker; None: withdrawn


def state_schema(run_id: str) -> SchemaValidator:
    """The DHT schema of ``{run_id}.state`` (registered by every :class:`StateSharing` of the run)."""
    return SchemaValidator(StateSchema, prefix=run_id, separator=".")


class StateDownloadError(RuntimeError):
    """No donor could provide a verified state; the message says why. ``corrupt``: the bytes arrived
    but did not match the agreed hash."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


@dataclass(frozen=True)
class Donor:
    peer_id: PeerID
    epoch: int
    hash: str
    size: int


class StateSharing:
    """Announce and serve this peer's state; download the swarm's.

    ``chunk_bytes`` (4 MiB): bytes per request; ``request_timeout`` (30 s) per chunk, asked or served;
    ``expiration`` (60 s): how long an announcement lives without a refresh;
    ``max_requests_per_peer`` (2) and ``max_requests`` (8): requests served at once per peer and in
    all (``overloaded`` beyond: a donor's training must not starve while it serves joiners).
    """

    def __init__(self, dht: DHT, run_id: str, *, serve: bool = True, chunk_bytes: int = 4 << 20,
                 request_timeout: float = 30.0, expiration: float = 60.0, max_requests_per_peer: int = 2,
                 max_requests: int = 8):
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must lie in [1, {MAX_CHUNK_BYTES}]")
        self.dht, self.run_id = dht, run_id
        self.key, self.method = f"{run_id}.state", f"swarm.state.{run_id}"
        self.chunk_bytes, self.request_timeout, self.expiration = chunk_bytes, request_timeout, expiration
        self.serve = serve and not dht.client_mode
        self._blob: bytes | None = None
        self._hash: str | None = None
        self._previous: tuple[str, bytes | None] | None = None  # still served: a joiner may be downloading it
        self._epoch = -1
        self._announcer: asyncio.Task | None = None
        self._announcements: set[asyncio.Task] = set()  # one-off announcements, kept until done
        self.bytes_served = 0
        self.overloaded_answers = 0  # 'overloaded' answers this peer got as a joiner (it retried)
        self.downloads = {"ok": 0, "failed": 0}  # state downloads by result (swarm.metrics)
        self.bytes_downloaded = 0
        self.show_progress = False  # a progress line (swarm.progress_bar) on stderr while downloading
        self.downloading = False  # a download is in progress (swarm.status)
        # banned peers (verification): never served, never downloaded from, their announcements not counted
        self.refuse: Callable[[PeerID], bool] | None = None
        self._slots = Slots(max_requests_per_peer, max_requests, "state requests")
        dht.add_validators([state_schema(run_id)])
        if self.serve:
            dht.run_coroutine(self._setup)

    async def _setup(self, _dht: DHT, node) -> None:
        self._subkey = node.signature_validator.ownership_marker
        node.p2p.add_stream_handler(self.method, self._serve_request, max_message_size=MAX_REQUEST_BYTES)
        self._announcer = asyncio.ensure_future(self._announce_loop(node))

    # ---- donor side

    def publish(self, blob: bytes, epoch: int) -> str:
        """Offer ``blob`` (the state at ``epoch``) to joiners; returns its hash. Thread-safe."""
        digest = hashlib.sha256(blob).hexdigest()
        if not self.serve:
            return digest
        if not isinstance(blob, bytes):
            blob = bytes(blob)  # served from views: must never change (nor be resized) afterwards

        def swap() -> None:
            if self._hash is not None and self._hash != digest:
                self._previous = (self._hash, self._blob)
            self._blob, self._hash, self._epoch = blob, digest, epoch
            if self._announcer is not None:
                task = asyncio.ensure_future(self._announce(self.dht.node))
                self._announcements.add(task)
                task.add_done_callback(self._announcements.discard)
        self.dht.loop.call_soon_threadsafe(swap)
        return digest

    async def _announce(self, node) -> None:
        if self._hash is None:
            return
        value = {"epoch": int(self._epoch), "hash": self._hash, "size": len(self._blob or b""),
                 "peer_id": str(node.peer_id)}
        try:
            await node.store(self.key, value, node.clock() + self.expiration, subkey=self._subkey)
        except Exception as e:  # noqa: BLE001 - retried by the loop
            logger.debug("state announcement failed: %s", e)

    async def _announce_loop(self, node) -> None:
        while True:
            await asyncio.sleep(self.expiration / 3)
            await self._announce(node)

    async def _serve_request(self, stream, ctx) -> None:
        """One chunk request, within this peer's and the total budget of requests in flight."""
        with self._slots.hold(ctx.peer_id):  # OverloadedError: the joiner gets "overloaded"
            try:
                request = await asyncio.wait_for(stream.recv(), self.request_timeout)
                reply = await self._handle(request, ctx)
                await asyncio.wait_for(stream.send(reply, end=True), self.request_timeout)
            except asyncio.TimeoutError:
                raise BadRequestError(f"the request was not sent or its reply not read within "
                                      f"{self.request_timeout:.3g} s") from None
        self.bytes_served += len(reply["data"])

    async def _handle(self, request, ctx) -> dict:
        """``{"data": the bytes request asks for}``, a view of the blob (BadRequestError if malformed)."""
        if self.refuse is not None and self.refuse(ctx.peer_id):
            raise BadRequestError("this peer is banned from the run")
        if not isinstance(request, dict) or not isinstance(request.get("hash"), str) or len(request["hash"]) != 64:
            raise BadRequestError(f"expected {{hash, offset, length}} (got {brief(request)})")
        offset, length = request.get("offset"), request.get("length")
        if (not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool)
                or isinstance(length, bool) or offset < 0 or not 0 < length <= MAX_CHUNK_BYTES):
            raise BadRequestError(f"offset/length out of range (length at most {MAX_CHUNK_BYTES} bytes)")
        blob, digest = self._blob, self._hash
        if self._previous is not None and self._previous[0] == request["hash"]:
            digest, blob = self._previous
        if blob is None or digest != request["hash"]:
            raise BadRequestError(f"this peer does not hold state {brief(request['hash'][:12])} (it holds "
                                  f"{(digest or 'none')[:12]})")
        if offset >= len(blob):
            raise BadRequestError("offset beyond the end of the state")
        return {"data": memoryview(blob)[offset:offset + length]}  # no copy: the transport frames the view

    # ---- joiner side

    def donors(self, timeout: float = 10.0) -> list[Donor]:
        """Announced donors (any epoch), excluding this peer."""
        async def fetch(_dht, node):
            found = await node.get(self.key, latest=True)
            donors = []
            if found is not None and isinstance(found.value, dict):
                for item in found.value.values():
                    v = getattr(item, "value", None)
                    if not isinstance(v, dict):
                        continue
                    try:
                        donor = Donor(PeerID.from_base58(v["peer_id"]), int(v["epoch"]), str(v["hash"]), int(v["size"]))
                    except (KeyError, TypeError, ValueError):
                        continue
                    if donor.peer_id != node.peer_id and donor.size > 0 and len(donor.hash) == 64 and (
                            self.refuse is None or not self.refuse(donor.peer_id)):
                        donors.append(donor)
            return donors
        return self.dht.run_coroutine(fetch, return_future=True).result(timeout)

    @staticmethod
    def agreed(donors: list[Donor], min_epoch: int = 0) -> tuple[str, int, int, list[Donor]] | None:
        """(hash, epoch, size, donors) of the newest epoch's majority hash, or None."""
        donors = [d for d in donors if d.epoch >= min_epoch]
        if not donors:
            return None
        epoch = max(d.epoch for d in donors)
        votes = collections.Counter((d.hash, d.size) for d in donors if d.epoch == epoch)
        (digest, size), _ = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
        return digest, epoch, size, [d for d in donors if d.epoch == epoch and d.hash == digest]

    def download(self, min_epoch: int = 0, timeout: float = 600.0,
                 alive: Callable[[Donor], bool] | None = None) -> tuple[bytes, int] | None:
        """Download the swarm's agreed state: (blob, epoch), or None when nobody offers one at
        ``min_epoch`` or later. ``alive`` (optional): only donors it accepts are considered (e.g. the
        peers online in the progress view: a dead donor's announcement outlives it). Raises
        :class:`StateDownloadError` when every donor failed."""
        try:
            found = self._download_agreed(min_epoch, timeout, alive)
        except StateDownloadError:
            self.downloads["failed"] += 1
            raise
        if found is not None:
            self.downloads["ok"] += 1
            self.bytes_downloaded += len(found[0])
        return found

    def _download_agreed(self, min_epoch: int, timeout: float,
                         alive: Callable[[Donor], bool] | None) -> tuple[bytes, int] | None:
        deadline = time.monotonic() + timeout  # the caller's thread (no event loop): its own clock
        error: StateDownloadError | None = None
        for _attempt in range(3):  # donors move on to newer states; re-read the announcements and retry
            choice = self.agreed([d for d in self.donors() if alive is None or alive(d)], min_epoch)
            if choice is None:
                if error is not None:
                    raise error
                return None
            digest, epoch, size, donors = choice
            # all donors in parallel; if the result does not verify, someone sent wrong bytes: then
            # one donor at a time, so that honest donors still deliver
            for group in [donors] + ([[d] for d in donors] if len(donors) > 1 else []):
                future = asyncio.run_coroutine_threadsafe(self._download(digest, size, group), self.dht.loop)
                try:
                    return future.result(max(deadline - time.monotonic(), 0.1)), epoch
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    raise StateDownloadError(f"downloading the state took longer than {timeout} s") from None
                except StateDownloadError as e:
                    error = e
                    if not e.corrupt:
                        break
        assert error is not None  # every attempt that did not return recorded its error
        raise error

    async def _download(self, digest: str, size: int, donors: list[Donor]) -> bytes:
        p2p = self.dht.node.p2p
        buffer = bytearray(size)
        queue: collections.deque[int] = collections.deque(range(0, size, self.chunk_bytes))
        pending = len(queue)
        done = asyncio.Event()
        failures: list[str] = []
        random.shuffle(donors)
        bar = None
        self.downloading = True
        if self.show_progress:
            from .progress_bar import ProgressBar
            bar = ProgressBar(f"downloading the swarm's state from {len(donors)} peer{'s' if len(donors) != 1 else ''}",
                              size)

        async def worker(donor: Donor) -> None:
            nonlocal pending
            backoff = 0.1
            while pending > 0:
                if not queue:  # the rest is in flight elsewhere: stay to take back what fails
                    await asyncio.sleep(0.05)
                    continue
                offset = queue.popleft()
                length = min(self.chunk_bytes, size - offset)
                try:
                    reply = await p2p.call(donor.peer_id, self.method,
                                           {"hash": digest, "offset": offset, "length": length},
                                           timeout=self.request_timeout)
                    data = reply.get("data") if isinstance(reply, dict) else None
                    if not isinstance(data, bytes) or len(data) != length:
                        raise BadRequestError(f"sent {len(data) if isinstance(data, bytes) else 'no'} bytes "
                                              f"for a {length}-byte chunk")
                except RemoteError as e:
                    queue.appendleft(offset)  # someone else takes it
                    if e.code != ErrorCode.OVERLOADED:
                        failures.append(f"{donor.peer_id}: {e}")
                        logger.info("state donor %s failed (%s); continuing with the others", donor.peer_id, e)
                        return
                    self.overloaded_answers += 1  # busy serving others: ask again after a pause
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, 2.0)
                    continue
                except (P2PError, OSError, asyncio.TimeoutError) as e:
                    queue.appendleft(offset)  # someone else takes it
                    failures.append(f"{donor.peer_id}: {e}")
                    logger.info("state donor %s failed (%s); continuing with the others", donor.peer_id, e)
                    return
                buffer[offset:offset + length] = data
                backoff = 0.1
                pending -= 1
                if bar is not None:
                    bar.advance(length)
                if pending == 0:
                    done.set()

        workers = [asyncio.ensure_future(worker(d)) for d in donors]
        waiter = asyncio.ensure_future(done.wait())
        try:
            while not done.is_set():
                alive = [w for w in workers if not w.done()]
                if not alive:
                    raise StateDownloadError("every donor failed: " + "; ".join(failures[-len(donors):]))
                await asyncio.wait([waiter, *alive], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (waiter, *workers):
                w.cancel()
            self.downloading = False
            if bar is not None:
                bar.close(ok=done.is_set())
        blob = bytes(buffer)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise StateDownloadError(f"the state downloaded from {', '.join(str(d.peer_id) for d in donors)} does not "
                                     f"match the agreed hash {digest[:12]}", corrupt=True)
        return blob

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop serving and announcing, and withdraw the announcement (waits at most ``timeout``
        seconds for that; idempotent; if it cannot be stored, the announcement expires on its own)."""
        if not self.serve or not self.dht.loop.is_running():
            self.serve = False
            return

        async def stop(_dht, node):
            node.p2p.remove_handler(self.method)
            if self._announcer is not None:
                self._announcer.cancel()
            if self._hash is not None:  # withdraw the announcement: joiners must not ask a peer that left
                await node.store(self.key, None, node.clock() + self.expiration, subkey=self._subkey)
        try:
            self.dht.run_coroutine(stop, return_future=True).result(timeout)
        except Exception as e:  # noqa: BLE001 - the announcement expires on its own
            logger.debug("could not withdraw the state announcement: %s", e)
        self.serve = False
