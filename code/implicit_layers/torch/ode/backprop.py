"""gradient="backprop": autograd records every operation of the solver."""

from __future__ import annotations

from ._loop import integrate, rk_step


def backprop_integrate(field, y0, grid, **settings):
    """Integrate as ``integrate`` does, with autograd recording every step as it runs: the exact gradient of the
    discrete solver, in memory that grows with the number of steps by every stage's saved activations.

    PyTorch differentiates the Python loop as it executes, rejected steps and frozen samples included (their
    ``torch.where`` passes no gradient to the discarded branch), so nothing more is needed here; the JAX twin
    has to give reverse mode a bounded scan in place of its while loop.
    """
    return integrate(field, y0, grid, step=rk_step, **settings)
