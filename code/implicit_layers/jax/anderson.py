"""Anderson acceleration in JAX; the twin of :func:`implicit_layers.torch.anderson`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._checks import check_iteration_limit, check_tolerance, check_unit_interval
from ._loop import Map, per_sample, solve_batched
from .result import SolverResult


def anderson(
    f: Map,
    z0: jax.Array,
    *,
    m: int = 5,
    ridge: float = 1e-4,
    damping: float = 1.0,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    unroll: bool = False,
) -> tuple[jax.Array, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map with Anderson acceleration.

    The same method as :func:`implicit_layers.torch.anderson`: weights minimizing the regularized combination
    of the last ``m`` residuals (ridge relative to their mean square), the damped extrapolated step, and for a
    sample whose small system is singular the plain damped step and a restart of its history. Under ``jit`` the
    history has a fixed size and unused slots are masked out.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape and dtype, acting on each sample
        independently.
    z0 : jax.Array
        Initial guess, shape (B, ...), floating point.
    m : int
        History size.
    ridge : float
        Relative Tikhonov regularization of the least-squares problem for the weights.
    damping : float
        Mixing parameter ``beta`` in (0, 1].
    tol, max_iter, strict, unroll
        As in :func:`implicit_layers.jax.forward_iteration`.

    Returns
    -------
    z : jax.Array
        The last iterate, shape of ``z0``.
    result : SolverResult
        Iterations, residual trace and convergence flags per sample.
    """
    check_iteration_limit("m", m)
    check_tolerance("ridge", ridge)
    check_unit_interval("damping", damping)

    def init_state(z0):
        history = jnp.zeros((z0.shape[0], m, z0[0].size), z0.dtype)
        return history, history, jnp.zeros((z0.shape[0], m), bool), jnp.zeros((), jnp.int32)

    def update(f: Map, z: jax.Array, fz: jax.Array, state):
        iterates, images, valid, count = state
        batch = z.shape[0]
        slot = count % m
        iterates = iterates.at[:, slot].set(z.reshape(batch, -1))
        images = images.at[:, slot].set(fz.reshape(batch, -1))
        newest = jnp.arange(m) == slot
        valid = valid | newest
        alpha = _mixing_weights(images - iterates, valid, ridge)
        mixed = damping * jnp.einsum("bm,bmd->bd", alpha, images)
        if damping < 1.0:
            mixed = mixed + (1.0 - damping) * jnp.einsum("bm,bmd->bd", alpha, iterates)
        # Safeguard: a sample whose small system is singular takes the plain damped step and restarts its
        # history from the newest pair.
        usable = jnp.isfinite(alpha).all(axis=1)
        plain = damping * fz + (1.0 - damping) * z
        proposal = jnp.where(per_sample(usable, z), mixed.reshape(z.shape), plain)
        valid = jnp.where(usable[:, None], valid, newest[None, :])
        return proposal, (iterates, images, valid, count + 1)

    return solve_batched(
        "anderson",
        f,
        z0,
        update,
        evaluations_per_update=0,
        tol=tol,
        max_iter=max_iter,
        strict=strict,
        unroll=unroll,
        init_state=init_state,
    )


def _mixing_weights(residuals: jax.Array, valid: jax.Array, ridge: float) -> jax.Array:
    """Anderson weights per sample, shape (B, m); the twin of the torch helper (invalid slots weigh 0, a
    singular system gives non-finite weights)."""
    mask = valid.astype(residuals.dtype)
    residuals = residuals * mask[..., None]
    gram = residuals @ residuals.transpose(0, 2, 1)
    scale = jnp.trace(gram, axis1=1, axis2=2) / mask.sum(axis=1)
    diagonal = jnp.where(valid, ridge * scale[:, None], 1.0)
    weights = jnp.linalg.solve(gram + jax.vmap(jnp.diag)(diagonal), mask[..., None])[..., 0]
    return weights / weights.sum(axis=1, keepdims=True)
