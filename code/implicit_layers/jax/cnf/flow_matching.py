"""Conditional flow matching (Lipman et al. 2023) with the optimal-transport path: a regression loss that trains a
flow's field without solving an ODE. The JAX twin of ``implicit_layers.torch.cnf.flow_matching``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..._checks import check_flow_matching_shapes, check_sigma_min
from .._validation import check_flat_state, check_returns_like
from .divergence import Field


def flow_matching_path(
    x0: jax.Array, x1: jax.Array, t: jax.Array, *, sigma_min: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """The point at time ``t`` on the straight path from a base sample to a data point, and its velocity.

    The JAX twin of :func:`implicit_layers.torch.flow_matching_path`: ``xt = (1 - (1 - sigma_min) t) x0 + t x1``
    and ``ut = x1 - (1 - sigma_min) x0 = d xt / dt``. At ``t = 0`` the path starts at ``x0``; at ``t = 1`` it
    ends at ``x1 + sigma_min x0``, a Gaussian of width ``sigma_min`` around the data point when ``x0`` is
    standard normal. With ``sigma_min = 0`` the paths are those of rectified flow (Liu et al. 2023).

    Parameters
    ----------
    x0 : jax.Array
        Base samples, shape (B, D), floating point.
    x1 : jax.Array
        Data points paired with them, shape (B, D), same dtype.
    t : jax.Array
        Times in [0, 1], shape (B,), one per pair.
    sigma_min : float
        In [0, 1): the width the path keeps at ``t = 1``.

    Returns
    -------
    xt : jax.Array
        Shape (B, D): the points on the paths.
    ut : jax.Array
        Shape (B, D): the paths' velocities, the regression target of the field.
    """
    sigma_min = _check_pairs(x0, x1, t, sigma_min)
    shrink = 1.0 - sigma_min
    times = t[:, None]
    return (1.0 - shrink * times) * x0 + times * x1, x1 - shrink * x0


def flow_matching_loss(
    v: Field, x0: jax.Array, x1: jax.Array, t: jax.Array, theta: Any, *, sigma_min: float = 0.0
) -> jax.Array:
    """The conditional flow-matching loss of the field ``v`` on a batch of pairs.

    The JAX twin of :func:`implicit_layers.torch.flow_matching_loss`: the batch mean of
    ``|v(t, xt, theta) - ut|^2`` summed over the D entries, ``(xt, ut)`` from :func:`flow_matching_path`. Its
    minimizer over all fields is the marginal field that carries the base distribution to the data, so a field
    trained on it is a continuous normalizing flow trained without solving an ODE. Composes with ``jit``,
    ``vmap`` and ``grad``; differentiable in ``theta``.

    Parameters
    ----------
    v : callable
        The field ``v(t, x, theta)``, ``t`` of shape (B,), ``x`` of shape (B, D), returning an array of ``x``'s
        shape and dtype.
    x0 : jax.Array
        Base samples, shape (B, D), floating point.
    x1 : jax.Array
        Data points (or the ends of a reflow's pairs), shape (B, D), same dtype.
    t : jax.Array
        Times in [0, 1], shape (B,), drawn by the caller (typically uniformly).
    theta : pytree
        What ``v`` depends on besides ``t`` and ``x``.
    sigma_min : float
        In [0, 1): see :func:`flow_matching_path`.

    Returns
    -------
    jax.Array
        A scalar of the dtype of ``x0``.
    """
    xt, ut = flow_matching_path(x0, x1, t, sigma_min=sigma_min)
    vt = v(t, xt, theta)
    check_returns_like(vt, xt, call="v(t, x, theta)", name="x")
    return jnp.mean(jnp.sum((vt - ut) ** 2, axis=1))


def _check_pairs(x0: Any, x1: Any, t: Any, sigma_min: Any) -> float:
    sigma_min = check_sigma_min(sigma_min)
    check_flat_state("x0", x0)
    check_flat_state("x1", x1)
    if not hasattr(t, "shape"):
        raise TypeError(f"t must be a JAX array of shape (B,), got {type(t).__name__}")
    check_flow_matching_shapes(tuple(x0.shape), tuple(x1.shape), tuple(t.shape))
    for name, value in (("x1", x1), ("t", t)):
        # A mixed-precision pair would be promoted silently, and the field would then see another dtype.
        if value.dtype != x0.dtype:
            raise ValueError(f"{name} must have the dtype of x0: x0 has dtype {x0.dtype}, {name} has {value.dtype}")
    return sigma_min
