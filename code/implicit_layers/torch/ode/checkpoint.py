"""gradient="checkpoint": each step is recomputed under autograd in the backward pass instead of stored."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint

from ._loop import rk_step


def checkpointed_step(f, t, y, f0, dt, tableau):
    """``rk_step`` under ``torch.utils.checkpoint``: the forward pass keeps each step's inputs (the state and
    its derivative, which the loop holds anyway) and drops its stages, which the backward pass recomputes. The
    gradient is that of the discrete solver, equal to backpropagation's to round-off, in memory that grows with
    the number of steps by two states per step rather than by every stage."""
    return checkpoint(rk_step, f, t, y, f0, dt, tableau, use_reentrant=False)
