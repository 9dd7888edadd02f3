"""The record ``odeint`` returns beside its solution (a pytree, so it passes through ``jit`` and ``vmap``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class ODEResult(NamedTuple):
    """What the batched ODE solver did, per sample; the JAX twin of the torch record.

    Attributes
    ----------
    nfe : jax.Array
        Evaluations of ``f`` made for each sample while it was integrating, shape (B,), int32: the initial
        derivative, the initial step selection's trial, and every stage of every attempted step.
    num_accepted : jax.Array
        Steps each sample accepted, shape (B,), int32.
    num_rejected : jax.Array
        Steps each sample rejected, shape (B,), int32 (fixed-step methods reject none).
    final_dt : jax.Array
        The last step size each sample used, signed in the direction of ``t``, shape (B,).
    t_reached : jax.Array
        The time each sample got to, shape (B,): ``t[-1]`` for a sample that finished.
    converged : jax.Array
        Whether each sample reached ``t[-1]``, shape (B,), bool.
    failed : jax.Array
        Whether a sample stopped because its state became NaN/Inf or its step size underflowed, shape (B,), bool.
    """

    nfe: jax.Array
    num_accepted: jax.Array
    num_rejected: jax.Array
    final_dt: jax.Array
    t_reached: jax.Array
    converged: jax.Array
    failed: jax.Array

    @property
    def status(self) -> str:
        """``"converged"`` if every sample reached ``t[-1]``, ``"failed"`` if some sample stopped on NaN/Inf or a
        step size underflow, else ``"max_steps"``; needs concrete values."""
        if bool(np.all(self.converged)):
            return "converged"
        return "failed" if bool(np.any(self.failed)) else "max_steps"
