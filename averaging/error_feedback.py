"""Error feedback for biased codecs (top-k, low-bit): what a round did not send is sent later.

Variant: **EF** (error compensation: Seide et al. 2014; Stich & Karimireddy 2019; the rule
SparseLoCo and DeMo use), not EF21 proper. Per flat position ``p`` each peer keeps a residual
``e``; a round compresses ``c = x + decay * e`` (``decay`` = 1.0 by default: nothing is forgotten),
sends ``C(c)`` and keeps ``e <- c - D(C(c))`` (``D``: the decoder). So what a round drops is
conserved exactly: ``residual + decoded == input + decay * previous residual`` (float32 rounding).

Why not EF21 (Richtárik et al. 2021): EF21 sends ``C(x - g_i)`` and the aggregate is the mean of
every peer's running estimate ``g_i``, so each receiver must hold the sender's estimate (or the
group's mean of them) from all earlier rounds. In a swarm the groups change every round (Moshpit),
peers join, leave and miss rounds, so no receiver has that state; EF needs only the sender's own
residual, any group decodes any contribution, and a peer that misses a round keeps its residual
and sends it later. (EF21's advantage, convergence without bounded-gradient assumptions, matters
less for DiLoCo's pseudo-gradients, which are bounded by the inner steps.)

The residual is one float32 vector over the averaged flat vector (grown on demand); it is part of
the training state: :meth:`state_dict` / :meth:`load_state_dict` save and restore it (checkpoints),
:meth:`snapshot` / :meth:`restore` undo a round that failed (its contribution was never applied).
Non-finite values are never carried on: a NaN/Inf input is sent (the receivers exclude it) and the
residual at those positions becomes 0.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """The EF residual of one peer, per position of the flat vector. ``decay`` in (0, 1]: the
    share of the previous residual carried into the next round (1.0: all of it)."""

    variant = "ef"

    def __init__(self, decay: float = 1.0):
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self.residual = torch.zeros(0, dtype=torch.float32)
        self.lock = threading.Lock()  # chunks may be encoded in several threads at once

    def _span(self, start: int, n: int) -> torch.Tensor:
        if self.residual.numel() < start + n:
            grown = torch.zeros(start + n, dtype=torch.float32)
            grown[:self.residual.numel()] = self.residual
            self.residual = grown
        return self.residual[start:start + n]

    def corrected(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``x + decay * residual`` for the chunk at offset ``start`` (a new float32 tensor)."""
        residual = self._span(start, x.numel())
        if self.decay == 1.0:
            return x.to(torch.float32) + residual
        return torch.add(x.to(torch.float32), residual, alpha=self.decay)

    def update(self, start: int, corrected: torch.Tensor, decoded: torch.Tensor) -> None:
        """Keep what was not sent: ``residual = corrected - decoded`` (non-finite values -> 0)."""
        residual = self._span(start, corrected.numel())
        torch.sub(corrected, decoded, out=residual)
        residual.nan_to_num_(0.0, 0.0, 0.0)

    def snapshot(self) -> torch.Tensor:
        """A copy of the residual, for :meth:`restore`."""
        with self.lock:
            return self.residual.clone()

    def restore(self, snapshot: torch.Tensor) -> None:
        with self.lock:
            self.residual = snapshot.clone()

    def state_dict(self) -> dict[str, Any]:
        """``{"variant": "ef", "decay": float, "residual": float32 tensor}`` (a copy)."""
        return {"variant": self.variant, "decay": self.decay, "residual": self.snapshot()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError (nothing changed) if it is not one."""
        if not isinstance(state, dict) or state.get("variant") != self.variant:
            raise ValueError("not an error-feedback state of variant 'ef'")
        residual, decay = state.get("residual"), state.get("decay")
        if (not isinstance(residual, torch.Tensor) or residual.dim() != 1 or not residual.is_floating_point()
                or not isinstance(decay, (int, float)) or not 0 < decay <= 1 or not math.isfinite(decay)):
            raise ValueError("error-feedback state: 'residual' must be a 1-D float tensor, 'decay' in (0, 1]")
        residual = residual.detach().to(torch.float32).clone()
        if not bool(torch.isfinite(residual).all()):
            raise ValueError("error-feedback state: the residual holds NaN or Inf")
        with self.lock:
            self.decay, self.residual = float(decay), residual

    def __repr__(self) -> str:
        return f"ErrorFeedback(decay={self.decay}, positions={self.residual.numel()})"
