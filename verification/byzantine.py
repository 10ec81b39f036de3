"""Byzantine behaviour for tests and ``swarm join --byzantine ATTACK``: a peer that attacks its own run.

The attacks are those of :mod:`averaging.attacks` (``sign_flip``, ``random_direction``, ``zero``,
``scaling``, ``alie``, ``ipm``, ...) applied to this peer's contribution right before it is averaged
(:meth:`swarm.Optimizer.before_averaging`), plus two that are not update transforms:

- ``label_flip``: train on flipped labels ``y -> C - 1 - y`` (C: the model's number of outputs) and
  send that honest-looking gradient;
- ``wrong_aggregate``: a lying part owner: contribute honestly, but return the aggregate of its part
  shifted by ``shift`` (default 1.0) times the part's norm along a fixed random direction.

``scaling`` defaults to x10 here (the catalogue's x1000 is :data:`averaging.attacks` ``scaling``'s
default; ``--byzantine scaling`` means the issue's "x10 scaling"). Attacks that need the other
peers' updates (ALIE, IPM, min-max...) are not omniscient here: the attacker estimates the honest
mean and spread from its own last :data:`HISTORY` contributions. The attacker's data, batch names
and claims are honest-looking (it still signs what it sends): the verification layer catches it by
recomputing its gradient, robust aggregation bounds the damage until then.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Callable

import torch

from averaging import attacks

__all__ = ["EXTRA_ATTACKS", "HISTORY", "Byzantine", "attack_names"]

EXTRA_ATTACKS = ("label_flip", "wrong_aggregate")
HISTORY = 8  # own past contributions kept as the attacker's estimate of the honest ones
_PARAMS: dict[str, dict[str, Any]] = {"scaling": {"scale": 10.0}}


def attack_names() -> list[str]:
    """Every name ``--byzantine`` accepts."""
    return [n for n in attacks.names() if n not in ("stale", "collude_on_part")] + list(EXTRA_ATTACKS)


class Byzantine:
    """One attacker's behaviour (``name``: one of :func:`attack_names`; ValueError otherwise)."""

    def __init__(self, name: str, *, seed: int = 0, shift: float = 1.0):
        if name not in attack_names():
            raise ValueError(f"unknown attack {name!r} for --byzantine; known: {', '.join(attack_names())}")
        self.name, self.seed, self.shift = name, seed, float(shift)
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=HISTORY)
        self._attack = None if name in EXTRA_ATTACKS else attacks.get(name, **_PARAMS.get(name, {}))
        self.num_classes: int | None = None  # label_flip: set from the model's output size
        self.attacked_rounds = 0

    def warning(self) -> str:
        """The start-up banner (several lines, impossible to miss)."""
        line = "!" * 78
        return (f"{line}\n!!! BYZANTINE PEER: this daemon ATTACKS its run with {self.name!r} (--byzantine).\n"
                "!!! It is for testing the run's defences only: never use it on a run you do not own.\n"
                f"{line}")

    def announce(self) -> None:
        print(self.warning(), file=sys.stderr, flush=True)
        print(self.warning(), flush=True)

    # ---- update attacks (before_averaging)

    def transform(self, tensors: list[torch.Tensor]) -> None:
        """Replace the contribution ``tensors`` (in place) by the attack's output."""
        if self._attack is None:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        honest = torch.stack([flat, *[h for h in self.history if h.shape == flat.shape]])
        self.history.append(flat.clone())
        generator = torch.Generator().manual_seed(self.seed + self.attacked_rounds)
        if self.name in ("alie", "ipm", "min_max", "centered_clip_adaptive") and honest.shape[0] < 2:
            sent = -flat  # no estimate of the spread yet (first round): a sign flip
        else:
            sent = self._attack(honest, 1, generator=generator)[0]
        self.attacked_rounds += 1
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(sent[offset:offset + n].reshape(t.shape).to(t.dtype))
                offset += n

    # ---- label flipping (the training loop)

    def flip(self, batch: Any) -> Any:
        """``label_flip``: the batch with flipped integer labels (other attacks: the batch as it is)."""
        if self.name != "label_flip" or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return batch
        labels = batch[1]
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            return batch
        classes = self.num_classes or int(labels.max()) + 1
        flipped = (classes - 1 - labels).clamp(min=0)
        return type(batch)([batch[0], flipped, *batch[2:]])

    def learn_classes(self, model: torch.nn.Module, batch: Any) -> None:
        """Take the number of classes from the model's output size on ``batch`` (label_flip only)."""
        if self.name != "label_flip" or not isinstance(batch, (tuple, list)):
            return
        with torch.no_grad():
            out = model(batch[0])
        if isinstance(out, torch.Tensor) and out.dim() >= 1:
            self.num_classes = int(out.shape[-1])

    # ---- a lying part owner (the all-reduce's reducer)

    def reducer(self, honest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``wrong_aggregate``: ``honest`` (the run's reducer) plus ``shift x ‖result‖`` along a fixed
        random unit direction; named ``name`` so that the group's settings still match."""

        def lying(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            result = honest(x, weights)
            g = torch.Generator().manual_seed(self.seed)
            u = torch.randn(result.shape, generator=g, dtype=torch.float32)
            u = u / u.norm().clamp(min=1e-30)
            return result + self.shift * max(float(result.norm()), 1e-3) * u.to(result.dtype)

        lying.__name__ = name  # not chunkwise: the owner shifts each whole part once
        return lying
