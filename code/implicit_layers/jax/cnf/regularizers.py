"""Regularizers of a flow's dynamics that make its ODE cheaper to solve (RNODE, Finlay et al. 2020). The JAX twin of
``implicit_layers.torch.cnf.regularizers``; the Jacobian's Frobenius norm comes from ``divergence``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._validation import check_batched_state


def kinetic_energy(fy: jax.Array) -> jax.Array:
    """The squared speed ``|f(t, y)|^2`` of each sample.

    The JAX twin of :func:`implicit_layers.torch.kinetic_energy`. Its integral along the trajectory is the
    kinetic-energy term of RNODE: penalizing it favours straight paths at constant speed, which an adaptive
    solver crosses in few steps.

    Parameters
    ----------
    fy : jax.Array
        Values of the field, shape (B, ...), floating point.

    Returns
    -------
    jax.Array
        Shape (B,): the sum of squares of each sample's entries.
    """
    check_batched_state("fy", fy)
    return jnp.sum(fy.reshape(fy.shape[0], -1) ** 2, axis=1)
