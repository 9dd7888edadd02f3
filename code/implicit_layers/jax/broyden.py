"""Limited-memory Broyden in JAX; the twin of :func:`implicit_layers.torch.broyden`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._checks import check_iteration_limit
from ._loop import Map, solve_batched
from .result import SolverResult


def broyden(
    f: Map,
    z0: jax.Array,
    *,
    m: int = 30,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
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

    def init_state(z0):
        batch, dim = z0.shape[0], z0[0].size
        flat = jnp.zeros((batch, dim), z0.dtype)
        pairs = jnp.zeros((batch, m, dim), z0.dtype)
        return flat, flat, pairs, pairs, jnp.zeros((), jnp.int32)

    def update(f: Map, z: jax.Array, fz: jax.Array, state):
        previous_z, previous_g, us, vs, count = state
        batch = z.shape[0]
        zf, g = z.reshape(batch, -1), (fz - z).reshape(batch, -1)
        has_previous = count > 0
        slot = (count - 1) % m
        restart = has_previous & (slot == 0)
        us, vs = jnp.where(restart, 0.0, us), jnp.where(restart, 0.0, vs)
        dz, dg = zf - previous_z, g - previous_g
        h_dg = _apply(us, vs, dg)
        denominator = jnp.sum(dz * h_dg, axis=1, keepdims=True)
        eps = jnp.finfo(z.dtype).eps
        # A sample that did not move (it has stopped) or whose secant is degenerate keeps its H.
        fine = has_previous & (
            jnp.abs(denominator)
            > eps * jnp.linalg.norm(dz, axis=1, keepdims=True) * jnp.linalg.norm(h_dg, axis=1, keepdims=True)
        )
        u = jnp.where(fine, (dz - h_dg) / jnp.where(fine, denominator, 1.0), 0.0)
        v = _apply_transposed(us, vs, dz)
        us, vs = us.at[:, slot].set(u), vs.at[:, slot].set(v)
        step = -_apply(us, vs, g)
        return (zf + step).reshape(z.shape), (zf, g, us, vs, count + 1)

    return solve_batched(
        "broyden",
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


def _apply(us: jax.Array, vs: jax.Array, x: jax.Array) -> jax.Array:
    """``H x`` for ``H = -I + sum_i u_i v_i^T``, batched."""
    return -x + jnp.einsum("bmd,bm->bd", us, jnp.einsum("bmd,bd->bm", vs, x))


def _apply_transposed(us: jax.Array, vs: jax.Array, x: jax.Array) -> jax.Array:
    """``H^T x``, batched."""
    return -x + jnp.einsum("bmd,bm->bd", vs, jnp.einsum("bmd,bd->bm", us, x))
