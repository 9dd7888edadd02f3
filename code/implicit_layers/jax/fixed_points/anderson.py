"""Anderson acceleration in JAX; the twin of :func:`implicit_layers.torch.anderson`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._checks import check_iteration_limit, check_tolerance, check_unit_interval
from ._loop import Map, flat, solve_batched
from .._validation import compute_dtype
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
    warn: bool = True,
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
    tol, max_iter, strict, warn, unroll
        As in :func:`implicit_layers.jax.forward_iteration`.

    Returns
    -------
    z : jax.Array
        The last iterate, shape of ``z0``.
    result : SolverResult
        Iterations, residual trace and convergence flags per sample.
    """
    m = check_iteration_limit("m", m)
    ridge = check_tolerance("ridge", ridge)
    damping = check_unit_interval("damping", damping)

    def init_state(z0):
        batch, dim = flat(z0).shape
        history = jnp.zeros((batch, m, dim), compute_dtype(z0.dtype))
        return history, history, jnp.zeros((batch, m), bool), jnp.zeros((), jnp.int32)

    def update(f: Map, z: jax.Array, fz: jax.Array, state):
        # The history keeps images f(x_i) and residuals g_i = f(x_i) - x_i; the iterates are their difference.
        images, residuals, valid, count = state
        slot = count % m
        image = flat(fz).astype(images.dtype)
        residual = image - flat(z).astype(images.dtype)
        images, residuals = images.at[:, slot].set(image), residuals.at[:, slot].set(residual)
        newest = jnp.arange(m) == slot
        valid = valid | newest
        alpha = _mixing_weights(residuals, valid, ridge)[:, None, :]
        # damping * sum_i alpha_i f_i + (1 - damping) * sum_i alpha_i x_i, with x_i = f_i - g_i
        mixed = alpha @ images
        plain = image
        if damping < 1.0:
            mixed = mixed - (1.0 - damping) * (alpha @ residuals)
            plain = plain - (1.0 - damping) * residual
        # Safeguard: a sample whose small system is singular takes the plain damped step and restarts its
        # history from the newest pair.
        usable = jnp.isfinite(alpha).all(axis=2)
        proposal = jnp.where(usable, mixed[:, 0], plain).reshape(z.shape).astype(z.dtype)
        valid = jnp.where(usable, valid, newest[None, :])
        return proposal, (images, residuals, valid, count + 1)

    return solve_batched(
        "anderson",
        f,
        z0,
        update,
        evaluations_per_update=0,
        tol=tol,
        max_iter=max_iter,
        strict=strict,
        warn=warn,
        unroll=unroll,
        init_state=init_state,
    )


def _mixing_weights(residuals: jax.Array, valid: jax.Array, ridge: float) -> jax.Array:
    """Anderson weights per sample, shape (B, m); the twin of the torch helper (invalid slots weigh 0, a
    converged sample gets uniform weights, a singular system gives non-finite weights)."""
    mask = valid.astype(residuals.dtype)
    gram = (residuals @ residuals.transpose(0, 2, 1)) * (mask[:, :, None] * mask[:, None, :])
    diagonal = jnp.diagonal(gram, axis1=1, axis2=2)
    scale = diagonal.sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True)
    system = gram + ridge * jnp.where(scale > 0, scale, 1.0)[:, :, None] * jnp.eye(mask.shape[1], dtype=gram.dtype)
    weights = jnp.linalg.solve(system, mask[..., None])[..., 0]
    return weights / weights.sum(axis=1, keepdims=True)
