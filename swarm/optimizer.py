"""swarm.Optimizer: wrap any torch optimizer so that peers that never met train one model together.

>>> opt = swarm.Optimizer(dht=dht, run_id="my-run", optimizer=lambda p: torch.optim.Adam(p, 1e-3),
...                       params=model.parameters(), target_batch_size=4096, batch_size_per_step=32)
>>> for batch in data:
...     loss = loss_fn(model, batch); loss.backward()
...     opt.step()          # accumulates; when the swarm has 4096 samples, averages and steps
...     opt.zero_grad()

An *epoch* is the swarm accumulating ``target_batch_size`` samples, all peers together (as in
hivemind). Peers publish their progress in the DHT (:mod:`swarm.progress`); every ``step()`` adds
this peer's gradients (weighted by its samples) and, once the swarm reached the target:

- ``mode="sync"``: the peers ready for the epoch form a group (:class:`averaging.Averager`), average
  their accumulated gradients weighted by samples (with ``compression`` and ``aggregator``), and all
  apply the wrapped optimizer to the average: every member takes the same step. A peer whose
  averaging failed steps with its local gradients and logs it; a peer that finds the swarm at a later
  epoch (it was slow, late or away) downloads the swarm's state (:meth:`load_state_from_peers`) and
  joins at the current epoch instead of stalling the others.
- ``mode="diloco"`` (DiLoCo / OpenDiLoCo): the wrapped optimizer is the *inner* optimizer and steps
  on every call; at the end of an epoch (the swarm reached ``target_batch_size``, or after
  ``inner_steps`` local steps when ``target_batch_size`` is None) the peers average their
  pseudo-gradients ``global - local`` (float16 on the wire by default) and apply an outer Nesterov
  SGD step (``outer_lr`` 0.7, ``outer_momentum`` 0.9) to the global parameters. With
  ``overlap=True`` the averaging runs in the background while the next inner steps go on; the local
  progress made meanwhile is kept on top of the new global parameters.
- Streaming DiLoCo (``mode="diloco", fragments=P``, algorithms.md 7.2, :mod:`swarm.streaming`): the
  parameters are split into ``P`` fragments, each averaged once every ``inner_steps`` on a staggered
  schedule (fragment p at inner steps ``floor((p + 1) H / P) + k H``), its round overlapping the next
  ``fragment_overlap`` inner steps, then merged: ``local = merge_alpha * local + (1 - merge_alpha) *
  global``. One fragment is on the wire at a time (peak traffic / P), 4-bit by default.

Who takes part is what the progress view says: peers publish a heartbeat every second, and one not
heard from for 4 s (killed, preempted) or that announced its departure is no longer counted; a round
lowers its target group size when a peer leaves the view or is silent for 2 s meanwhile (a leader
then starts without waiting for it), and is given up when no other
peer is online (0.5 s) or none is at this epoch any more (1.5 s: the others moved on, this peer
catches up by downloading), so survivors never wait out the matchmaking timeout for the departed.
A joiner downloads only from donors online in that view.

The state every peer agrees on (parameters and optimizer state in sync mode; global parameters and
outer momentum in DiLoCo mode, plus the epoch and the LR scheduler's state) is offered to joiners after every epoch
(:mod:`swarm.state_sharing`); a peer whose state hash differs from the one most peers announce for
the same epoch re-downloads it.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import inspect
import logging
import math
import time  # the training thread has no event loop: its retry pacing and speed use this clock
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch

from averaging import Averager, AveragingError, MatchmakingError
from averaging import compression as compression_codecs
from dht import DHT
from dht.peer.untrusted import brief

from . import streaming
from .progress import GlobalProgress, ProgressTracker
from .state import (
    StateFormatError,
    TrainingState,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    pack_state,
    scheduler_state_to_tensors,
    state_hash,
    unpack_state,
    validated_scheduler_state,
)
from .state_sharing import StateDownloadError, StateSharing

__all__ = ["Optimizer", "PINNED_OPTIONS", "pinned_options"]

logger = logging.getLogger(__name__)

MAX_ROUND_RECORDS = 256  # averaging rounds kept in Optimizer.rounds
MAX_SCHEDULER_REPLAY = 100_000  # scheduler steps replayed for a state without the scheduler's (see _replayed_schedule)

_live: "weakref.WeakSet[Optimizer]" = weakref.WeakSet()  # shut down at interpreter exit, before averagers and DHTs


@atexit.register
def _shutdown_at_exit() -> None:
    # registered after averaging's and dht's hooks (this module imports them first), so it runs before them
    for opt in list(_live):
        try:
            opt.shutdown(timeout=5.0)
        except Exception:  # exiting anyway
            logger.debug("shutting an optimizer down at exit failed", exc_info=True)


# the options every peer of a run must share (a run announcement pins them): the rest
# (matchmaking_time, client_mode, bandwidth, load_state_timeout, share_state, verbose) is per peer
PINNED_OPTIONS = ("mode", "inner_steps", "outer_lr", "outer_momentum", "overlap", "averaging_timeout",
                  "target_group_size", "compression", "aggregator", "average_state_every", "fragments",
                  "fragment_overlap", "merge_alpha")


def auto_compression(mode: str, fragments: Any = None) -> str | None:
    """What ``compression="auto"`` means: None (exact) in sync mode, float16 in DiLoCo, and for
    Streaming DiLoCo (``fragments`` > 1) the 4-bit codec of :mod:`averaging.compression` when it has
    one (``uniform4``/``fp4``), else 8-bit ``uint8``."""
    if mode != "diloco":
        return None
    if fragments is None or fragments == 1:
        return "float16"
    return next((name for name in STREAMING_CODECS if name in compression_codecs.CODECS), "uint8")


STREAMING_CODECS = ("uniform4", "fp4", "e3m0")  # 4-bit dense codecs, in order of preference
STREAMING_OPTIONS = ("fragments", "fragment_overlap", "merge_alpha")  # pinned only when set


def pinned_options(options: dict) -> dict[str, Any]:
    """The :data:`PINNED_OPTIONS` of an ``Optimizer(**options)``, defaults filled in, as scalars
    (a codec or aggregator object as its type and repr). Raises TypeError naming an unknown option."""
    parameters = inspect.signature(Optimizer.__init__).parameters
    unknown = sorted(set(options) - set(parameters) | set(options) & {"self", "dht", "run_id", "optimizer", "params"})
    if unknown:
        known = ", ".join(n for n in parameters if n not in ("self", "dht", "run_id", "optimizer", "params"))
        raise TypeError(f"unknown optimizer option(s) {', '.join(map(repr, unknown))} (known: {known})")
    pinned: dict[str, Any] = {}
    for name in PINNED_OPTIONS:
        value = options.get(name, parameters[name].default)
        if name == "compression" and value == "auto":
            value = auto_compression(pinned["mode"], options.get("fragments"))
        if not (value is None or isinstance(value, (bool, int, float, str))):
            text = repr(value)
            value = f"{type(value).__module__}.{type(value).__qualname__}" + (
                f" {text[:120]}" if " at 0x" not in text else "")
        if value is None and name in STREAMING_OPTIONS:
            continue  # unset: left out, so runs announced before Streaming DiLoCo existed still match
        pinned[name] = value
    return pinned


class Optimizer:
    """Collaborative optimizer (keyword arguments only, as in hivemind).

    - ``dht``: a :class:`dht.DHT`; ``run_id``: the run's name (peers with the same run id train together).
    - ``optimizer``: a torch optimizer instance, or a factory ``params -> optimizer`` (then ``params``
      is required).
    - ``target_batch_size``: samples per epoch, all peers together; ``batch_size_per_step``: samples
      per ``step()`` call when ``step(batch_size=...)`` is not given.
    - ``mode``: ``"sync"`` (default) or ``"diloco"``; ``inner_steps`` (DiLoCo without a target batch
      size), ``outer_lr`` (0.7), ``outer_momentum`` (0.9), ``overlap`` (False).
    - ``matchmaking_time`` (3 s): how long a peer waits for others to form a group (it gives up
      and steps alone after 3x that);
      ``averaging_timeout`` (60 s): limit of one averaging round; ``target_group_size`` (16).
    - ``compression``: codec for the averaged tensors (None: exact in sync mode, ``"float16"`` in DiLoCo);
      ``aggregator`` (``"mean"``): any name of :mod:`averaging.aggregators` for robust averaging.
    - ``fragments`` (None): Streaming DiLoCo with that many fragments (an int: balanced by size; or
      a list of lists of parameter indices, e.g. strided blocks); needs ``mode="diloco"``; its
      schedule counts ``inner_steps`` (``target_batch_size`` then only scales the progress view, so a
      Task's works as it is). ``fragment_overlap``: inner steps
      a fragment's round overlaps (default ``(inner_steps - 1) // P`` with ``overlap=True``, else 0;
      ``fragment_overlap * P < inner_steps``); ``merge_alpha`` (0.5 with overlap, else 0): weight of
      the local parameters when a fragment's new global ones are merged in.
    - ``average_state_every`` (0 = never): also average the parameters and the optimizer's statistics
      (e.g. Adam's moments) every that many epochs (a second averaging round, exact, not compressed).
    - ``scheduler``: a factory ``optimizer -> LR scheduler`` (any ``torch.optim.lr_scheduler``),
      stepped once per epoch; its state is part of the shared state and of checkpoints, so a joiner
      continues at the swarm's learning rate (a state without it, format 1, gets a fresh scheduler
      stepped to the state's epoch).
    - ``client_mode`` (the DHT's), ``bandwidth`` (MB/s, None = measured): passed to the averagers.
    - ``load_state_timeout`` (600 s); ``share_state`` (True): offer the state to joiners.
    - ``averager_options``: extra keyword arguments for the averagers (e.g. ``commitments=True,
      banned=...``: :class:`swarm.verified.VerifiedOptimizer` turns verification on with them).
    """

    def __init__(self, *, dht: DHT, run_id: str,
                 optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer],
                 params: Iterable[torch.nn.Parameter] | None = None, target_batch_size: int | None = None,
                 batch_size_per_step: int | None = None, mode: str = "sync", inner_steps: int = 50,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, overlap: bool = False,
                 matchmaking_time: float = 3.0, averaging_timeout: float = 60.0, target_group_size: int = 16,
                 compression: Any = "auto", aggregator: Any = "mean", average_state_every: int = 0,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, client_mode: bool | None = None,
                 bandwidth: float | None = None, load_state_timeout: float = 600.0, share_state: bool = True,
                 verbose: bool = False, fragments: Any = None, fragment_overlap: int | None = None,
                 merge_alpha: float | None = None, averager_options: dict | None = None):
        if mode not in ("sync", "diloco"):
            raise ValueError(f"mode must be 'sync' or 'diloco', got {mode!r}")
        if mode == "sync" and not target_batch_size:
            raise ValueError("mode='sync' needs target_batch_size (samples per epoch, all peers together)")
        if target_batch_size is not None and target_batch_size <= 0:
            raise ValueError("target_batch_size must be positive")
        if isinstance(optimizer, torch.optim.Optimizer):
            self.opt = optimizer
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
        elif callable(optimizer):
            if params is None:
                raise ValueError("an optimizer factory needs params=...")
            self.params = list(params)
            self.opt = optimizer(self.params)
        else:
            raise TypeError("optimizer must be a torch.optim.Optimizer or a factory taking the parameters")
        if not self.params:
            raise ValueError("no parameters to optimize")
        self.dht, self.run_id, self.mode = dht, run_id, mode
        self.target_batch_size, self.batch_size_per_step = target_batch_size, batch_size_per_step
        self.inner_steps, self.overlap = inner_steps, overlap
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.matchmaking_timeout = 3 * matchmaking_time  # then give up on the group and step with local values
        self.alone_grace = 0.5  # s without any other peer online before a round is given up
        self.moved_on_grace = 1.5  # s without any other peer at this epoch before a round is given up
        self.max_group_size = target_group_size
        self.average_state_every, self.load_state_timeout = average_state_every, load_state_timeout
        self.verbose = verbose
        self.client_mode = dht.client_mode if client_mode is None else client_mode
        self._scheduler_factory = scheduler
        self.scheduler = scheduler(self.opt) if scheduler is not None else None
        if fragments is not None and fragments != 1:
            if mode != "diloco":
                raise ValueError("fragments (Streaming DiLoCo) needs mode='diloco'")
            self.fragment_indices = streaming.partition([p.numel() for p in self.params], fragments)
            count = len(self.fragment_indices)
            if fragment_overlap is None:
                fragment_overlap = (inner_steps - 1) // count if overlap else 0
            streaming.check(inner_steps, count, fragment_overlap)
            merge_alpha = (0.5 if fragment_overlap else 0.0) if merge_alpha is None else float(merge_alpha)
            if not 0.0 <= merge_alpha <= 1.0:
                raise ValueError(f"merge_alpha must lie in [0, 1], got {merge_alpha}")
            self.fragment_offsets = streaming.offsets(inner_steps, count)
        else:
            self.fragment_indices, self.fragment_offsets = [], []
        self.streaming = bool(self.fragment_indices)
        self.fragment_overlap, self.merge_alpha = fragment_overlap or 0, merge_alpha or 0.0
        self.stream_step = 0  # inner steps counted by the streaming schedule (set from the epoch on a state load)
        # fragment rounds in flight: fragment -> (future or None when alone, peers counted, state hash at the start)
        self._fragment_pending: dict[int, tuple[concurrent.futures.Future | None, int, str | None]] = {}
        if compression == "auto":
            compression = auto_compression(mode, len(self.fragment_indices) if self.streaming else None)

        self.local_epoch = 0
        self.local_samples = 0  # accumulated in this epoch
        self.samples_total = 0  # trained on by this peer, all epochs
        self.averaging = False  # True while step() waits for an averaging round (swarm.status)
        self.inner_step_count = 0
        self.samples_per_second = 0.0
        self._seconds_per_sample = 0.0  # moving average of the training time per sample
        self.bytes_sent = self.bytes_received = 0
        self.last_loss: float | None = None
        self.last_averaging: Any = None  # StepResult or the exception of the latest round
        # the latest averaging rounds as dicts (t, epoch, group_size, seconds, bytes_sent, bytes_received,
        # result "ok"/"failed", cause), newest last, and the count of all rounds by result (swarm.status/metrics)
        self.rounds: collections.deque[dict] = collections.deque(maxlen=MAX_ROUND_RECORDS)
        self.round_counts = {"ok": 0, "failed": 0}
        self._round_started = time.monotonic()
        self._last_step_time: float | None = None
        self._counted_epoch, self._epoch_started = -1, 0.0  # the epoch whose start _swarm_samples counts from
        # DiLoCo overlap: the round in flight (its future, the parameters at its start, the peers counted)
        self._pending: tuple[concurrent.futures.Future, list[torch.Tensor], int] | None = None
        self.state_hash: str | None = None
        self._hash_before_round: str | None = None
        self._resync_epoch: int | None = None  # the epoch at which to re-download the swarm's state
        self._resync_next_try = 0.0
        self._catch_up_next_try = 0.0  # after a failed catch-up: train on, retry from then on

        with torch.no_grad():
            self._buffers = [torch.zeros_like(p, device="cpu", dtype=torch.float32) for p in self.params]
        if mode == "diloco":
            self.global_params = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
            self.outer_opt = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                             nesterov=outer_momentum > 0)
        averager_opts = dict(target_group_size=max(2, target_group_size), min_group_size=2, compression=compression,
                             aggregator=aggregator, client_mode=self.client_mode, bandwidth=bandwidth,
                             min_matchmaking_time=matchmaking_time, request_timeout=min(2.0, matchmaking_time / 2),
                             default_timeout=averaging_timeout)
        averager_opts.update(averager_options or {})  # e.g. commitments=True, banned=... (swarm.verified)
        self.averagers: list[Averager] = []  # Streaming DiLoCo: one per fragment (own prefix, own groups)
        self._fragment_buffers: list[list[torch.Tensor]] = []
        if self.streaming:
            count = len(self.fragment_indices)
            for f, indices in enumerate(self.fragment_indices):
                buffers = [self._buffers[i] for i in indices]
                self._fragment_buffers.append(buffers)
                self.averagers.append(Averager(buffers, dht, prefix=f"{run_id}.frag{f}of{count}", **averager_opts))
            self.averager = self.averagers[0]
        else:
            self.averager = Averager(self._buffers, dht, prefix=f"{run_id}.grads", **averager_opts)
            self.averagers.append(self.averager)
        self.state_averager: Averager | None = None
        self._state_tensors: list[torch.Tensor] = []  # what state_averager averages (set with it)
        self._state_averager_opts = dict(averager_opts, compression=None, aggregator="mean")
        # records outlive their peer by 10 min, so that `swarm runs` can tell a dead run's last epoch and when
        # it was last seen (who is online is decided on arrival times, not on expiration)
        self.tracker = ProgressTracker(dht, run_id, target_batch_size or 1, client_mode=self.client_mode,
                                       expiration=600.0)
        self.sharing = StateSharing(dht, run_id, serve=share_state)
        self._publish_state()
        self._report()
        _live.add(self)

    # ------------------------------------------------------------------ public API

    def step(self, batch_size: int | None = None, loss: float | torch.Tensor | None = None) -> bool:
        """Call after ``loss.backward()``. Returns True when this call ended an epoch (the model changed
        by a collaborative step). ``loss`` (optional) is published as this peer's latest loss."""
        batch_size = batch_size or self.batch_size_per_step
        if not batch_size or batch_size <= 0:
            raise ValueError("pass step(batch_size=N) or set batch_size_per_step")
        if loss is not None:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            if math.isfinite(value):
                self.last_loss = value
        self._update_speed(batch_size)
        changed = False
        if self.mode == "sync":
            self._accumulate(batch_size)
        elif self.streaming:
            changed = self._streaming_step()
        else:
            self._inner_step(batch_size)
        self.local_samples += batch_size
        self.samples_total += batch_size
        self._report()

        progress = self.tracker.global_progress
        idle = self._pending is None and not self._fragment_pending
        if progress.epoch > self.local_epoch and idle and time.monotonic() >= self._catch_up_next_try:
            return self._catch_up(progress) or changed
        if self._resync_epoch is not None and idle and time.monotonic() >= self._resync_next_try:
            if self._resync_epoch != self.local_epoch:
                self._resync_epoch = None
            else:
                logger.info("this peer's state differed from the one most of its group held: downloading theirs")
                if self.load_state_from_peers(min_epoch=self.local_epoch):
                    self._resync_epoch = None
                    return True
                self._resync_next_try = time.monotonic() + 1.0  # the donors have not announced it yet
        if self.streaming:
            return changed
        if self._ready(progress):
            if self.mode == "sync":
                self._sync_epoch(progress)
            else:
                self._outer_round(progress)
            return True
        return False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @property
    def global_progress(self) -> GlobalProgress:
        return self.tracker.global_progress

    def state_dict(self) -> dict:
        """Everything needed to resume: epoch, parameters, optimizer state (and DiLoCo's outer state)."""
        return {"epoch": self.local_epoch, "state": self.training_state_blob()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Adopt a state from :meth:`state_dict` (raises :class:`swarm.state.StateFormatError` if it
        does not fit this model and mode)."""
        self.load_training_state(unpack_state(state_dict["state"]))

    def load_training_state(self, state: TrainingState) -> None:
        """Adopt ``state`` (e.g. from a checkpoint) and offer it to joiners."""
        self._apply_state(state)
        self.local_samples = self.inner_step_count = 0
        for b in self._buffers:
            b.zero_()
        self._publish_state()
        self._report()

    def training_state_blob(self) -> bytes:
        """The packed state for checkpoints: what joiners download (the shared, hashed state) plus this
        peer's own error-feedback residuals (biased codecs such as ``sparseloco``, tensors
        ``local.ef.K`` for averager K, never shared: each peer's differs)."""
        return pack_state(self._training_state(include_local=True))

    def live_donors(self) -> list:
        """The peers that announce a state and are online in the progress view (:class:`swarm.state_sharing.Donor`)."""
        online = self.tracker.online_peers()
        try:
            return [d for d in self.sharing.donors() if str(d.peer_id) in online]
        except Exception as e:  # noqa: BLE001 - the DHT may be briefly unreachable
            logger.debug("could not read the state announcements: %s", e)
            return []

    def flush(self, timeout: float | None = None) -> bool:
        """DiLoCo with ``overlap``: wait (at most ``timeout`` seconds, default ``averaging_timeout``) for
        the outer round running in the background and apply its outcome now rather than at the next
        inner step; call it before evaluating or saving the global parameters at the end of training.
        True if a round was applied (or failed: see ``last_averaging``), False if none was in flight.
        Streaming DiLoCo: the fragment round in flight, if any, is finished now (waited for at most
        ``timeout``), not ``fragment_overlap`` steps after its start."""
        limit = self.averaging_timeout if timeout is None else timeout
        if self._fragment_pending:
            for fragment in sorted(self._fragment_pending):
                future = self._fragment_pending[fragment][0]
                if future is not None:
                    concurrent.futures.wait([future], limit)
                    if not future.done():
                        raise TimeoutError(f"the round of fragment {fragment} did not finish within {limit} s")
                if fragment in self._fragment_pending:  # (a catch-up while finishing an earlier one drops it)
                    self._finish_fragment(fragment)
            return True
        if self._pending is None:
            return False
        concurrent.futures.wait([self._pending[0]], limit)
        if not self._pending[0].done():
            raise TimeoutError(f"the background outer round did not finish within {limit} s")
        self._finish_outer_round()
        return True

    def load_state_from_peers(self, min_epoch: int | None = None) -> bool:
        """Download the swarm's agreed state (newest epoch, majority hash) from peers and adopt it.
        Returns False when no peer offers a state at ``min_epoch`` (default: this peer's epoch + 1)."""
        min_epoch = self.local_epoch + 1 if min_epoch is None else min_epoch
        if not self.tracker.global_progress.fetched_at:
            self.tracker.refresh()  # right after start: no view of who is online yet
        online = self.tracker.online_peers()
        try:  # only donors online: a dead donor's announcement outlives it by up to a minute
            found = self.sharing.download(min_epoch=min_epoch, timeout=self.load_state_timeout,
                                          alive=lambda donor: str(donor.peer_id) in online)
        except StateDownloadError as e:
            # the newest epoch's donors are unreachable (their records outlive them by up to a minute):
            # train on at this epoch and retry in a few seconds rather than stall the training
            self._catch_up_next_try = time.monotonic() + 5.0
            logger.warning("could not download the state from peers: %s", e)
            return False
        if found is None:
            return False
        blob, epoch = found
        try:
            state = unpack_state(blob)
            self._apply_state(state)
        except (StateFormatError, RuntimeError, ValueError, KeyError) as e:
            logger.warning("the downloaded state does not fit this model: %s", e)
            return False
        self.local_epoch = max(epoch, int(state.metadata.get("epoch", epoch)))
        self.local_samples = 0
        self.inner_step_count = 0
        for b in self._buffers:
            b.zero_()
        self._publish_state(blob)
        logger.info("loaded the swarm's state at epoch %d (%.1f MB, hash %s)", self.local_epoch, len(blob) / 1e6,
                    (self.state_hash or "")[:12])
        self._report()
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Leave the run: stop publishing and serving (idempotent; the DHT is left running). Waits at
        most ``timeout`` seconds (default ``averaging_timeout``) for a background averaging round. An
        optimizer left running is shut down at interpreter exit (with a 5 s timeout)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        _live.discard(self)
        pending = [self._pending[0]] if self._pending is not None else []
        pending += [f for f, _, _ in self._fragment_pending.values() if f is not None]
        for future in pending:
            try:
                future.result(self.averaging_timeout if timeout is None else timeout)
            except Exception:  # leaving anyway
                logger.debug("the outer round in flight failed while shutting down", exc_info=True)
        self._pending = None
        self._fragment_pending.clear()
        self.tracker.shutdown()
        self.sharing.shutdown()
        for averager in self.averagers:
            averager.shutdown()
        if self.state_averager is not None:
            self.state_averager.shutdown()

    def __enter__(self) -> "Optimizer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def _gather(self) -> dict:
        return {"hash": self.state_hash, "epoch": self.local_epoch, "serves": self.sharing.serve}

    # ---- hooks for subclasses (e.g. the attack harness of benchmarks/robustness.py)

    def before_averaging(self, tensors: list[torch.Tensor]) -> None:
        """Called with this peer's contribution (mean gradients, or pseudo-gradients in DiLoCo mode)
        right before it is averaged; may modify it in place. Default: nothing."""

    def averaging_weight(self) -> float:
        """This peer's weight in the average (default: its samples in this epoch)."""
        return float(max(self.local_samples, 1))

    # ------------------------------------------------------------------ internals

    def _update_speed(self, batch_size: int) -> None:
        now = time.monotonic()
        if self._last_step_time is not None and now > self._last_step_time:
            # average the seconds per sample (as hivemind does), not the rates: uneven step times
            # (threads, a shared CPU) inflate an average of rates, and with it the swarm's sample count
            per_sample = (now - self._last_step_time) / batch_size
            spent = self._seconds_per_sample
            self._seconds_per_sample = per_sample if spent == 0 else 0.9 * spent + 0.1 * per_sample
            self.samples_per_second = 1.0 / self._seconds_per_sample
        self._last_step_time = now

    def _report(self) -> None:
        if self._counted_epoch != self.local_epoch:  # this peer just entered an epoch (or loaded a state)
            self._counted_epoch, self._epoch_started = self.local_epoch, self.dht.node.clock()
            self._last_step_time = None  # the speed counts training time, not the averaging pause
        self.tracker.report(self.local_epoch, self.local_samples, self.samples_per_second, self.last_loss,
                            self.bytes_sent, self.bytes_received)

    def _swarm_samples(self, progress: GlobalProgress) -> tuple[int, int]:
        """(samples the swarm accumulated at this peer's epoch, peers at it), counting this peer live."""
        me = str(self.dht.peer_id)
        now = self.dht.node.clock()  # DHT time, as the reports carry it
        others = [r for r in progress.peers if r.peer_id != me]
        samples = 0
        for r in others:
            if r.epoch == self.local_epoch:  # extrapolated to now: reports are up to a second or two old
                samples += r.samples + int(r.samples_per_second * min(max(now - r.time, 0.0), 2.0))
            elif r.epoch < self.local_epoch and r.time < self._epoch_started and now - r.time < 3.0:
                # a live peer whose latest report we have predates our epoch: when epochs are shorter
                # than the progress refresh, it most likely entered this epoch with us; count its speed
                samples += int(r.samples_per_second * min(now - self._epoch_started, 2.0))
        # every peer online (the tracker drops those not heard from for a few seconds): our view of
        # their epoch may be stale by a few epochs when epochs are short, and a peer that is truly
        # behind catches up by downloading the state
        return samples + self.local_samples, len(others) + 1

    def _ready(self, progress: GlobalProgress) -> bool:
        if self._pending is not None or self.streaming:
            return False
        if self.target_batch_size is None:
            return self.inner_step_count >= self.inner_steps
        samples, _ = self._swarm_samples(progress)
        return samples >= self.target_batch_size

    def _accumulate(self, batch_size: int) -> None:
        with torch.no_grad():
            for p, buffer in zip(self.params, self._buffers):
                if p.grad is not None:
                    buffer.add_(p.grad.detach().to("cpu", torch.float32), alpha=float(batch_size))

    def _average(self, averager: Averager, weight: float, peers: int, what: str) -> bool:
        """One blocking averaging round of ``averager``'s tensors; False (tensors unchanged) if it failed."""
        if peers < 2:
            return False
        averager.target_group_size = max(2, min(self.max_group_size, peers))
        try:
            self._hash_before_round = self.state_hash
            self._round_started = time.monotonic()
            self.averaging = True
            future = averager.step(weight=weight, timeout=self.averaging_timeout + self.matchmaking_time,
                                   gather=self._gather(), wait=False,
                                   matchmaking_timeout=self.matchmaking_timeout, scope=f"epoch{self.local_epoch}")
            assert isinstance(future, concurrent.futures.Future)  # wait=False
            result = self._wait_for_round(future, averager)
        except AveragingError as e:
            self.last_averaging = e
            self._record_round(None, e)
            logger.log(self._failure_level(e), "averaging %s failed at epoch %d (%s)", what, self.local_epoch, e)
            return False
        finally:
            self.averaging = False
        self._account(result)
        self._check_agreement(result)
        return True

    def _wait_for_round(self, future: concurrent.futures.Future, averager: Averager) -> Any:
        """The round's result. A peer that leaves the view meanwhile lowers the group's target size
        (a leader then starts without waiting for it), and the round is given up (AveragingError)
        when nobody can be in it: the progress view shows no other peer online for ``alone_grace``
        seconds (they left or died; live members publish heartbeats even while averaging), or none at
        this peer's epoch for ``moved_on_grace`` seconds (the others are ahead: this peer catches up)."""
        me = str(self.dht.peer_id)
        since = None
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                pass
            except concurrent.futures.CancelledError:
                raise AveragingError("the round was cancelled") from None
            others = [r for r in self.tracker.global_progress.peers if r.peer_id != me]
            heard = self.tracker.heard_within(2 * self.tracker.heartbeat)  # two heartbeats: alive for sure
            expected = 1 + sum(1 for r in others if r.peer_id in heard)
            if 2 <= expected < averager.target_group_size:
                averager.target_group_size = expected  # the departed (or silent) are not waited for
            if any(r.epoch == self.local_epoch for r in others):
                since = None
                continue
            since = time.monotonic() if since is None else since
            if time.monotonic() - since >= (self.moved_on_grace if others else self.alone_grace):
                future.cancel()
                if others:
                    raise AveragingError(f"no other peer is at epoch {self.local_epoch} any more (the others are at "
                                         f"{sorted({r.epoch for r in others})[:4]})")
                raise AveragingError("every other peer left the swarm (none is online in the progress view)")

    def _failure_level(self, e: AveragingError) -> int:
        """INFO for a failed round that is an expected event of a healthy swarm (no group formed, or no
        other online peer is at this epoch any more: they left, or moved on and this peer catches up);
        WARNING for the rest (a group formed and its round failed)."""
        me = str(self.dht.peer_id)
        if isinstance(e, MatchmakingError) or not any(
                r.epoch == self.local_epoch for r in self.tracker.global_progress.peers if r.peer_id != me):
            return logging.INFO
        return logging.WARNING

    def _record_round(self, result: Any, error: BaseException | None = None) -> None:
        """Append a round record to :attr:`rounds` (a StepResult, or the error that ended the round)."""
        if error is None:
            seconds = result.matchmaking_seconds + result.allreduce_seconds + result.recovery_seconds
            record = {"group_size": len(result.members), "seconds": seconds, "bytes_sent": result.bytes_sent,
                      "bytes_received": result.bytes_received, "result": "ok", "cause": None}
        else:
            cause = f"{type(error).__name__}: {error}"
            record = {"group_size": 0, "seconds": time.monotonic() - self._round_started, "bytes_sent": 0,
                      "bytes_received": 0, "result": "failed", "cause": cause[:300]}
        record.update(t=time.time(), epoch=self.local_epoch)
        self.round_counts[record["result"]] += 1
        self.rounds.append(record)

    def _account(self, result: Any) -> None:
        self.last_averaging = result
        self._record_round(result)
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        if self.verbose:
            logger.info("epoch %d: averaged with %d peers (%.2f s matchmaking, %.2f s all-reduce)", self.local_epoch,
                        len(result.survivors), result.matchmaking_seconds, result.allreduce_seconds)

    def _sync_epoch(self, progress: GlobalProgress) -> None:
        _, peers = self._swarm_samples(progress)
        with torch.no_grad():
            for buffer in self._buffers:
                buffer.div_(max(self.local_samples, 1))
            self.before_averaging(self._buffers)
            if not self._average(self.averager, self.averaging_weight(), peers, "gradients") and peers >= 2 \
                    and self._behind():
                return
            for p, buffer in zip(self.params, self._buffers):
                p.grad = buffer.to(device=p.device, dtype=p.dtype, copy=True)
        self.opt.step()
        for buffer in self._buffers:
            buffer.zero_()
        self._end_epoch(peers)

    def _inner_step(self, batch_size: int) -> None:
        self.opt.step()
        self.inner_step_count += 1
        if self._pending is not None and self._pending[0].done():
            self._finish_outer_round()

    def _outer_round(self, progress: GlobalProgress) -> None:
        _, peers = self._swarm_samples(progress)
        with torch.no_grad():
            for buffer, g, p in zip(self._buffers, self.global_params, self.params):
                torch.sub(g, p.detach().to("cpu", torch.float32), out=buffer)  # pseudo-gradient: old - new
            self.before_averaging(self._buffers)
        weight = self.averaging_weight()
        logger.debug("%s: epoch %d outer round with %d peers in view (state %s)", self.dht.peer_id.short(),
                     self.local_epoch, peers, (self.state_hash or "")[:8])
        if self.overlap and peers >= 2:
            self.averager.target_group_size = max(2, min(self.max_group_size, peers))
            snapshot = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
            self._hash_before_round = self.state_hash
            self._round_started = time.monotonic()
            future = self.averager.step(weight=weight, timeout=self.averaging_timeout + self.matchmaking_time,
                                        wait=False,
                                        gather=self._gather(),
                                        matchmaking_timeout=self.matchmaking_timeout, scope=f"epoch{self.local_epoch}")
            assert isinstance(future, concurrent.futures.Future)  # wait=False
            self._pending = (future, snapshot, peers)
            self.local_samples = 0
            self.inner_step_count = 0
            return
        if not self._average(self.averager, weight, peers, "pseudo-gradients") and peers >= 2 and self._behind():
            return
        self._apply_outer_step()
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params):
                p.copy_(g)
        self._end_epoch(peers)

    def _finish_outer_round(self) -> None:
        assert self._pending is not None  # called only while a round is in flight
        future, snapshot, peers = self._pending
        self._pending = None
        try:
            result = future.result()
            self._account(result)
            self._check_agreement(result)
        except AveragingError as e:
            self.last_averaging = e
            self._record_round(None, e)
            logger.log(self._failure_level(e), "averaging pseudo-gradients failed at epoch %d (%s)",
                       self.local_epoch, e)
            if self._behind():
                return
        self._apply_outer_step()
        with torch.no_grad():  # keep the inner steps taken meanwhile, on top of the new global parameters
            for p, g, s in zip(self.params, self.global_params, snapshot):
                p.copy_((g + (p.detach().to("cpu", torch.float32) - s)).to(p.dtype))
        saved_samples, saved_steps = self.local_samples, self.inner_step_count
        self._end_epoch(peers)
        # samples and inner steps of the next round, taken during the overlap (they count towards it)
        self.local_samples, self.inner_step_count = saved_samples, saved_steps

    def _apply_outer_step(self, fragment: int | None = None) -> None:
        """The outer step on the averaged pseudo-gradients; Streaming DiLoCo: on ``fragment``'s only
        (the other global parameters get no gradient, so they stay)."""
        if fragment is None:
            averager, indices, buffers = self.averager, list(range(len(self.global_params))), self._buffers
        else:
            averager = self.averagers[fragment]
            indices, buffers = self.fragment_indices[fragment], self._fragment_buffers[fragment]
        with averager.lock, torch.no_grad():
            for i, buffer in zip(indices, buffers):
                self.global_params[i].grad = buffer.clone()
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)

    # ---- Streaming DiLoCo (swarm.streaming has the schedule)

    def _streaming_step(self) -> bool:
        """One inner step, then the schedule's events at it; True if a fragment's outer step landed."""
        self.opt.step()
        self.inner_step_count += 1
        self.stream_step += 1
        finishing, starting = streaming.events(self.stream_step, self.inner_steps, self.fragment_offsets,
                                               self.fragment_overlap)
        changed = False
        epoch = self.local_epoch
        for fragment in finishing:
            if fragment in self._fragment_pending:
                changed |= self._finish_fragment(fragment)
        for fragment in starting:
            if self.local_epoch != epoch:  # a catch-up moved this peer on: the schedule restarts from the state
                break
            self._start_fragment(fragment)
            if self.fragment_overlap == 0:
                changed |= self._finish_fragment(fragment)
        return changed

    def _start_fragment(self, fragment: int) -> None:
        """Take the fragment's pseudo-gradient (global - local) and start its averaging round."""
        _, peers = self._swarm_samples(self.tracker.global_progress)
        averager, buffers = self.averagers[fragment], self._fragment_buffers[fragment]
        with averager.lock, torch.no_grad():
            for buffer, i in zip(buffers, self.fragment_indices[fragment]):
                torch.sub(self.global_params[i], self.params[i].detach().to("cpu", torch.float32), out=buffer)
            self.before_averaging(buffers)
        future: concurrent.futures.Future | None = None
        if peers >= 2:
            averager.target_group_size = max(2, min(self.max_group_size, peers))
            self._round_started = time.monotonic()
            round_ = averager.step(weight=self.averaging_weight(),
                                   timeout=self.averaging_timeout + self.matchmaking_time, wait=False,
                                   gather=self._gather(), matchmaking_timeout=self.matchmaking_timeout,
                                   scope=f"epoch{self.local_epoch}")
            assert isinstance(round_, concurrent.futures.Future)  # wait=False
            future = round_
        self._fragment_pending[fragment] = (future, peers, self.state_hash)

    def _finish_fragment(self, fragment: int) -> bool:
        """Wait for the fragment's round (if it is still running), apply the outer step to its global
        parameters and merge them into the local ones; the last fragment ends the epoch. False if a
        failed round made this peer adopt the swarm's newer state instead."""
        future, peers, hash_before = self._fragment_pending.pop(fragment)
        averager = self.averagers[fragment]
        if future is not None:
            try:
                self.averaging = True
                result = self._wait_for_round(future, averager)
                self._account(result)
                self._hash_before_round = hash_before
                self._check_agreement(result)
            except AveragingError as e:
                self.last_averaging = e
                self._record_round(None, e)
                logger.log(self._failure_level(e), "averaging fragment %d failed at epoch %d (%s)", fragment,
                           self.local_epoch, e)
                if self._behind():
                    return False
            finally:
                self.averaging = False
        self._apply_outer_step(fragment)
        alpha = self.merge_alpha
        with torch.no_grad():
            for i in self.fragment_indices[fragment]:
                p, g = self.params[i], self.global_params[i]
                merged = g if alpha == 0 else torch.lerp(g, p.detach().to("cpu", torch.float32), alpha)
                p.copy_(merged.to(p.device, p.dtype))
        if fragment == len(self.fragment_indices) - 1:
            self._end_epoch(peers)
        return True

    def _end_epoch(self, peers: int) -> None:
        self.local_epoch += 1
        self.local_samples = 0
        self.inner_step_count = 0
        if self.scheduler is not None:
            self.scheduler.step()
        if self.average_state_every and self.local_epoch % self.average_state_every == 0:
            self._average_parameters(peers)
        self._publish_state()
        self._report()

    def _check_agreement(self, result: Any) -> None:
        """After a round, compare the state hashes the members held before it (``gather``): a member
        whose hash differs from the majority's diverged (e.g. after a failed round) and re-downloads
        the state once the others announced the next epoch's. Only hashes that some member serves
        count (a client-mode peer cannot be downloaded from); ties go to the largest hash."""
        held = [g for g in result.gathered.values() if isinstance(g, dict) and g.get("epoch") == self.local_epoch
                and isinstance(g.get("hash"), str)]
        served = [g["hash"] for g in held if g.get("serves")] or [g["hash"] for g in held]
        votes = collections.Counter(served)
        if votes and len({g["hash"] for g in held}) > 1:
            majority = max(votes.items(), key=lambda kv: (kv[1], kv[0]))[0]
            if majority != self._hash_before_round:
                self._resync_epoch = self.local_epoch + 1

    def _state_to_average(self) -> list[torch.Tensor]:
        """The parameters (DiLoCo: the global ones) and the optimizer's floating-point statistics
        (e.g. Adam's moments, SGD's momentum: state tensors shaped like their parameter)."""
        opt: torch.optim.Optimizer
        if self.mode == "diloco":
            tensors = list(self.global_params)
            opt, params = self.outer_opt, self.global_params
        else:
            tensors = [p.detach() for p in self.params]
            opt, params = self.opt, self.params
        for p in params:
            for key in sorted(opt.state.get(p, {})):
                value = opt.state[p][key]
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape:
                    tensors.append(value)
        return tensors

    def _average_parameters(self, peers: int) -> None:
        live = self._state_to_average()
        if self.state_averager is None or len(self._state_tensors) != len(live):
            if self.state_averager is not None:
                self.state_averager.shutdown()
            self._state_tensors = [t.detach().to("cpu", torch.float32, copy=True) for t in live]
            self.state_averager = Averager(self._state_tensors, self.dht, prefix=f"{self.run_id}.state-avg",
                                           **self._state_averager_opts)
        with torch.no_grad():
            for t, s in zip(self._state_tensors, live):
                t.copy_(s)
            if self._average(self.state_averager, 1.0, peers, "parameters and optimizer statistics"):
                for target, t in zip(live, self._state_tensors):
                    target.copy_(t)
                if self.mode == "diloco":
                    for p, g in zip(self.params, self.global_params):
                        p.copy_(g)

    def _behind(self) -> bool:
        """After a failed round: if the swarm moved past this epoch, adopt its state (True) instead of
        stepping alone; otherwise (False) the caller proceeds with its local values."""
        progress = self.tracker.refresh()
        if progress.epoch > self.local_epoch and self._catch_up(progress):
            return True
        logger.info("proceeding with local values at epoch %d", self.local_epoch)
        return False

    def _catch_up(self, progress: GlobalProgress) -> bool:
        logger.info("the swarm is at epoch %d, this peer at %d: downloading the current state", progress.epoch,
                    self.local_epoch)
        if self.load_state_from_peers(min_epoch=self.local_epoch + 1):
            return True
        # nobody can give a state yet: the donors are still stepping, or they are gone (their records
        # outlive them by up to a minute): train on at this epoch and retry in a moment, never stall
        self._catch_up_next_try = max(self._catch_up_next_try, time.monotonic() + 1.0)
        return False

    # ---- the shared state

    def _training_state(self, include_local: bool = False) -> TrainingState:
        """The shared state (hashed, offered to joiners); ``include_local``: with this peer's
        error-feedback residuals too (checkpoints)."""
        if self.mode == "diloco":
            meta, tensors = optimizer_state_to_tensors(self.outer_opt, prefix="outer")
            tensors.update({f"param.{i}": g for i, g in enumerate(self.global_params)})
        else:
            meta, tensors = optimizer_state_to_tensors(self.opt, prefix="opt")
            tensors.update({f"param.{i}": p.detach() for i, p in enumerate(self.params)})
        schedule = None
        if self.scheduler is not None:
            schedule, schedule_tensors = scheduler_state_to_tensors(self.scheduler)
            tensors.update(schedule_tensors)
        metadata = {"epoch": self.local_epoch, "mode": self.mode, "run_id": self.run_id, "optimizer": meta,
                    "num_params": len(self.params), "scheduler": schedule}
        if include_local:
            feedback = []
            for k, (codec, ef) in enumerate(self._feedback_states()):
                if ef is not None:
                    tensors[f"local.ef.{k}"] = ef["residual"]
                    feedback.append({"averager": k, "codec": codec.name, "variant": ef.get("variant"),
                                     "decay": ef.get("decay")})
            if feedback:  # (without error feedback a checkpoint is exactly the shared state)
                metadata["error_feedback"] = feedback
        return TrainingState(metadata, tensors)

    def _feedback_states(self) -> list[tuple[Any, dict | None]]:
        """(codec, its error-feedback ``state_dict()`` or None) per averager (None: the codec keeps none)."""
        found: list[tuple[Any, dict | None]] = []
        for averager in self.averagers:
            codec = averager.codec
            state = codec.state_dict() if callable(getattr(codec, "state_dict", None)) else None
            found.append((codec, state if isinstance(state, dict) and "residual" in state else None))
        return found

    def _error_feedback_to_load(self, state: TrainingState) -> list[tuple[Any, dict]]:
        """What :meth:`_apply_state` loads into the codecs: a checkpoint's residuals (StateFormatError if
        malformed; an entry for another codec is skipped with a warning) or, for a state without
        them (downloaded from peers), empty residuals: the state this peer's residual belonged to is gone."""
        current = self._feedback_states()
        entries = state.metadata.get("error_feedback")
        if entries is None:
            return [(codec, dict(ef, residual=torch.zeros(0))) for codec, ef in current if ef is not None]
        if not isinstance(entries, list) or len(entries) > len(current):
            raise StateFormatError("the state's error_feedback is not a list of at most one entry per averager")
        loads = []
        for entry in entries:
            k = entry.get("averager") if isinstance(entry, dict) else None
            if type(k) is not int or not 0 <= k < len(current):
                raise StateFormatError(f"bad error_feedback entry {brief(entry)}")
            codec, ef = current[k]
            if ef is None or entry.get("codec") != codec.name:
                logger.warning("the state's error feedback for averager %d is for codec %s, this peer uses %s: "
                               "starting with an empty residual", k, brief(entry.get("codec")), codec.name)
                continue
            residual = state.tensors.get(f"local.ef.{k}")
            if residual is None or residual.dim() != 1 or residual.numel() > self._averaged_size(k):
                raise StateFormatError(f"error feedback {k}: missing, or not a vector of at most "
                                       f"{self._averaged_size(k)} values")
            if not bool(torch.isfinite(residual.float()).all()):
                raise StateFormatError(f"error feedback {k}: the residual holds NaN or Inf")
            loads.append((codec, {"variant": entry.get("variant"), "decay": entry.get("decay"), "residual": residual}))
        return loads

    def _averaged_size(self, k: int) -> int:
        tensors = self._fragment_buffers[k] if self.streaming else self._buffers
        return sum(t.numel() for t in tensors)

    def _apply_state(self, state: TrainingState) -> None:
        meta = state.metadata
        if meta.get("mode") != self.mode:
            raise StateFormatError(f"the state is for mode {meta.get('mode')!r}, this peer runs {self.mode!r}")
        if meta.get("num_params") != len(self.params):
            raise StateFormatError(f"the state has {meta.get('num_params')} parameters, the model {len(self.params)}")
        for i, p in enumerate(self.params):
            t = state.tensors.get(f"param.{i}")
            if t is None or t.shape != p.shape:
                raise StateFormatError(f"parameter {i}: the state holds {None if t is None else tuple(t.shape)}, "
                                       f"the model {tuple(p.shape)}")
        saved = meta.get("scheduler") if self.scheduler is not None else None
        schedule = None if saved is None else validated_scheduler_state(self.scheduler, saved, state.tensors)
        feedback = self._error_feedback_to_load(state)
        for codec, ef in feedback:
            try:
                codec.load_state_dict(ef)
            except ValueError as e:  # checked above; the codec's own check is the last word
                raise StateFormatError(f"error feedback: {e}") from None
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(state.tensors[f"param.{i}"].to(p.device, p.dtype))
            if self.mode == "diloco":
                for i, g in enumerate(self.global_params):
                    g.copy_(state.tensors[f"param.{i}"])
                optimizer_state_from_tensors(self.outer_opt, meta["optimizer"], state.tensors, prefix="outer")
            else:
                optimizer_state_from_tensors(self.opt, meta["optimizer"], state.tensors, prefix="opt")
        self.local_epoch = int(meta.get("epoch", self.local_epoch))
        if self.streaming:  # the schedule restarts right after the epoch's last fragment finished
            self._fragment_pending.clear()
            self.stream_step = self.local_epoch * self.inner_steps + self.fragment_overlap
        if self.scheduler is not None:
            self._load_scheduler(schedule if schedule is not None else self._replayed_schedule(self.local_epoch))

    def _load_scheduler(self, schedule: dict | None) -> None:
        """Adopt the scheduler ``state_dict`` ``schedule`` and the learning rates it last set (the inner
        optimizer's state is not shared in DiLoCo mode)."""
        if schedule is None or self.scheduler is None:
            return
        self.scheduler.load_state_dict(schedule)
        last = getattr(self.scheduler, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(self.opt.param_groups) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in last):
            for group, lr in zip(self.opt.param_groups, last):
                group["lr"] = lr

    def _replayed_schedule(self, epoch: int) -> dict | None:
        """For a state without the scheduler's (format 1, or a donor without a scheduler): the state of
        a fresh scheduler stepped ``epoch`` times (at most MAX_SCHEDULER_REPLAY) from the initial
        learning rates, as this optimizer steps it once per epoch. None for ReduceLROnPlateau (its
        steps need the metrics) or when the factory fails (logged): the scheduler is kept as it is."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return None
        assert self._scheduler_factory is not None  # called only for an optimizer with a scheduler
        for group in self.opt.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        try:
            fresh = self._scheduler_factory(self.opt)
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(min(max(epoch, 0), MAX_SCHEDULER_REPLAY)):
                    fresh.step()
            return fresh.state_dict()
        except Exception as e:  # noqa: BLE001 - user code
            logger.warning("could not bring the LR scheduler to epoch %d: %s: %s", epoch, type(e).__name__, e)
            return None

    def _publish_state(self, blob: bytes | None = None) -> None:
        blob = blob if blob is not None else pack_state(self._training_state())
        self.state_hash = self.sharing.publish(blob, self.local_epoch) if self.sharing.serve else state_hash(blob)
