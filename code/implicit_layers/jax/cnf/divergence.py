"""The divergence of a batched vector field, exact or by Hutchinson's estimator, with the squared Frobenius norm of
its Jacobian from the same vector-Jacobian products. The JAX twin of
``implicit_layers.torch.cnf.divergence``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ..._checks import check_probe_kind
from .._validation import check_flat_state, check_probe, check_returns_like

Field = Callable[[jax.Array, jax.Array, Any], jax.Array]


def hutchinson_probe(like: jax.Array, key: jax.Array, *, kind: str = "rademacher") -> jax.Array:
    """Draw one probe vector per sample for Hutchinson's trace estimator.

    The JAX twin of :func:`implicit_layers.torch.hutchinson_probe`. Both distributions have ``E[e e^T] = I``, so
    ``e^T A e`` is an unbiased estimate of ``trace(A)`` for every matrix ``A``. Its variance is
    ``2 (||S||_F^2 - sum_i S_ii^2)`` for Rademacher signs and ``2 ||S||_F^2`` for Gaussian probes, ``S`` the
    symmetric part of ``A``: Rademacher probes never do worse.

    Parameters
    ----------
    like : jax.Array
        The states to be probed, shape (B, D), floating point: the probe takes its shape and dtype.
    key : jax.Array
        PRNG key of the draw.
    kind : str
        ``"rademacher"`` (entries +1 or -1 with equal probability) or ``"gaussian"`` (standard normal entries).

    Returns
    -------
    jax.Array
        Shape and dtype of ``like``.
    """
    kind = check_probe_kind(kind)
    check_flat_state("like", like)
    if kind == "rademacher":
        return jax.random.rademacher(key, like.shape, dtype=like.dtype)
    return jax.random.normal(key, like.shape, dtype=like.dtype)


def divergence(
    f: Field, t: jax.Array, y: jax.Array, theta: Any, probe: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Evaluate ``f(t, y, theta)`` with, per sample, the trace and the squared Frobenius norm of its Jacobian
    ``df/dy``.

    The JAX twin of :func:`implicit_layers.torch.divergence`. ``f`` is linearized once. Without a probe, the
    ``D`` vector-Jacobian products with the basis vectors (the rows of each sample's Jacobian) run as one
    ``vmap``, and give the exact trace and norm. With a probe ``e``, one product ``e^T J`` gives Hutchinson's
    ``(e^T J) e`` and ``|e^T J|^2``, both unbiased because ``E[e e^T] = I``. Composes with ``jit``, ``vmap``
    and ``grad``: both outputs are differentiable in ``y`` and ``theta``, so they can be trained through.

    Parameters
    ----------
    f : callable
        ``f(t, y, theta)`` returning an array of ``y``'s shape and dtype; each sample's output must depend on
        that sample's state alone (the Jacobian is taken per sample).
    t : jax.Array or float
        The time, of shape (B,) as ``odeint`` passes it, or one number (or 0-d array) shared by the batch.
    y : jax.Array
        States, shape (B, D), floating point.
    theta : pytree
        What ``f`` depends on besides ``t`` and ``y``.
    probe : jax.Array, optional
        Shape and dtype of ``y`` (see :func:`hutchinson_probe`); None for the exact divergence.

    Returns
    -------
    fy : jax.Array
        ``f(t, y, theta)``, shape (B, D).
    div : jax.Array
        Shape (B,): ``trace(df/dy)`` per sample, exact or estimated.
    frobenius : jax.Array
        Shape (B,): ``||df/dy||_F^2`` per sample, exact or estimated (non-negative either way).
    """
    check_flat_state("y", y)
    t = _batch_times(t, y)
    if probe is not None:
        check_probe(probe, y)
    fy, vjp = jax.vjp(lambda state: f(t, state, theta), y)
    check_returns_like(fy, y, call="f(t, y, theta)", name="y")
    if probe is not None:
        (row,) = vjp(probe)
        return fy, jnp.sum(row * probe, axis=1), jnp.sum(row**2, axis=1)
    # Cotangent i is the i-th basis vector in every sample; its product is row i of each sample's Jacobian.
    dimension = y.shape[1]
    basis = jnp.broadcast_to(jnp.eye(dimension, dtype=y.dtype)[:, None, :], (dimension,) + y.shape)
    (rows,) = jax.vmap(vjp)(basis)
    return fy, jnp.einsum("ibi->b", rows), jnp.sum(rows**2, axis=(0, 2))


def _batch_times(t: Any, y: jax.Array) -> jax.Array:
    """``t`` as an array of shape (B,): one number, of ``y``'s dtype, is shared by the batch."""
    if not hasattr(t, "shape"):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be a number or a JAX array of shape (B,), got {type(t).__name__}")
        t = jnp.asarray(t, dtype=y.dtype)
    if t.ndim == 0:
        return jnp.broadcast_to(t.astype(y.dtype), y.shape[:1])
    if tuple(t.shape) != y.shape[:1]:
        raise ValueError(f"t must be one number or have shape (B,) = ({y.shape[0]},), got shape {tuple(t.shape)}")
    return t
