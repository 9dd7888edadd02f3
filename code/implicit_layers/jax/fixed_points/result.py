"""The record every JAX solver returns beside its solution (a pytree, so it passes through ``jit``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class SolverResult(NamedTuple):
    """What a batched solver did, per sample; the JAX twin of the torch record.

    Attributes
    ----------
    iterations : jax.Array
        Steps taken by each sample, shape (B,).
    residuals : jax.Array
        Residual trace, shape (max_iter + 1, B), float32 for 16-bit states: row 0 at the initial guess, row k
        after k steps, each from evaluating ``f`` on the whole batch as it stood (so the last row is every
        sample's true final residual). Shapes are fixed under ``jit``, so rows after the last step repeat the
        final residuals; ``num_steps`` says where the real trace ends.
    converged : jax.Array
        Whether each sample's final residual is below the tolerance, shape (B,).
    failed : jax.Array
        Whether a sample stopped because a step produced NaN or Inf or a linear solve was singular, shape (B,).
    nfe : jax.Array
        Number of batched evaluations of the map.
    num_steps : jax.Array
        Number of loop steps run for the batch (the most steps any sample took).
    """

    iterations: jax.Array
    residuals: jax.Array
    converged: jax.Array
    failed: jax.Array
    nfe: jax.Array
    num_steps: jax.Array

    @property
    def residual(self) -> jax.Array:
        """Final residual of each sample, shape (B,)."""
        return self.residuals[-1]

    @property
    def status(self) -> str:
        """``"converged"``, ``"diverged"`` (some step failed) or ``"max_iter"``; needs concrete values."""
        if bool(np.all(self.converged)):
            return "converged"
        return "diverged" if bool(np.any(self.failed)) else "max_iter"
