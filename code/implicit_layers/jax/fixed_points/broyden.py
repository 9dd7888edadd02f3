"""Limited-memory Broyden in JAX; the twin of :func:`implicit_layers.torch.broyden`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._checks import check_iteration_limit
from ._loop import Map, flat, solve_batched
from .._validation import compute_dtype
from .result import SolverResult


def broyden(
    f: Map,
    z0: jax.Array,
    *,
    m: int = 30,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
    unroll: bool = False,
) -> tuple[jax.Array, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map with limited-memory ("good") Broyden.

    The same method as :func:`implicit_layers.torch.broyden`: ``H = -I + sum_i u_i v_i^T`` estimates the
    inverse Jacobian of ``f(z) - z`` from secant updates, at most ``m`` of them, restarting from ``-I`` when
    the memory is full.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape and dtype, acting on each sample
        independently.
    z0 : jax.Array
        Initial guess, shape (B, ...), floating point.
    m : int
        Number of rank-one updates kept.
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

    def init_state(z0):
        batch, dim = flat(z0).shape
        dtype = compute_dtype(z0.dtype)
        vectors = jnp.zeros((batch, dim), dtype)
        pairs = jnp.zeros((batch, m, dim), dtype)
        return vectors, vectors, pairs, pairs, jnp.zeros((), jnp.int32)

    def update(f: Map, z: jax.Array, fz: jax.Array, state):
        previous_z, previous_g, us, vs, count = state
        zf = flat(z).astype(us.dtype)
        g = flat(fz).astype(us.dtype) - zf
        has_previous = count > 0
        slot = (count - 1) % m
        restart = has_previous & (slot == 0)
        us, vs = jnp.where(restart, 0.0, us), jnp.where(restart, 0.0, vs)
        dz, dg = zf - previous_z, g - previous_g
        h_dg = _apply(us, vs, dg)
        denominator = jnp.sum(dz * h_dg, axis=1, keepdims=True)
        eps = jnp.finfo(us.dtype).eps
        # A sample that did not move (it has stopped) or whose secant is degenerate keeps its H.
        fine = has_previous & (
            jnp.abs(denominator)
            > eps * jnp.linalg.norm(dz, axis=1, keepdims=True) * jnp.linalg.norm(h_dg, axis=1, keepdims=True)
        )
        u = jnp.where(fine, (dz - h_dg) / jnp.where(fine, denominator, 1.0), 0.0)
        v = _apply(vs, us, dz)
        us, vs = us.at[:, slot].set(u), vs.at[:, slot].set(v)
        step = -_apply(us, vs, g)
        return (zf + step).reshape(z.shape).astype(z.dtype), (zf, g, us, vs, count + 1)

    return solve_batched(
        "broyden",
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


def _apply(us: jax.Array, vs: jax.Array, x: jax.Array) -> jax.Array:
    """``H x`` for ``H = -I + sum_i u_i v_i^T``, batched; with the roles of ``us`` and ``vs`` swapped it is
    ``H^T x``."""
    return -x + jnp.einsum("bm,bmd->bd", jnp.einsum("bmd,bd->bm", vs, x), us)
