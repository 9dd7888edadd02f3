"""Restarted GMRES for the fixed point of an affine map, in JAX; the twin of
:func:`implicit_layers.torch.gmres`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..._checks import check_flag, check_iteration_limit, check_tolerance
from ._loop import Map, _report, final_result, flat
from .._validation import check_batched_state, check_map_output, compute_dtype
from .result import SolverResult


def gmres(
    f: Map,
    z0: jax.Array,
    *,
    restart: int = 20,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
) -> tuple[jax.Array, SolverResult]:
    """Find the fixed point ``z = f(z)`` of a batched affine map ``f(z) = A z + b`` with restarted GMRES.

    The same method as :func:`implicit_layers.torch.gmres`: each sample builds its own Krylov basis from its
    residual ``f(x) - x`` and takes the correction in it that minimizes its residual for ``(I - A) z = b``,
    ``b = f(0)``, with a restart every ``restart`` steps; converges whenever ``I - A`` is invertible (within
    ``d`` steps for a d-dimensional state when ``restart >= d``), where forward iteration needs the spectral
    radius of ``A`` below one. Both loops run on the device (``lax.while_loop``), so it composes with ``jit``
    and ``vmap``; it is not differentiable itself, but ``fixed_point`` calls it inside
    ``lax.custom_linear_solve``, which differentiates a linear solve without looking inside the solver (so
    ``backward_solver="gmres"`` gives derivatives of every order).

    Parameters
    ----------
    f : callable
        Affine map from a batch of states (B, ...) to a batch of the same shape and dtype, acting on each
        sample independently; evaluated once per step, on the whole batch.
    z0 : jax.Array
        Initial guess, shape (B, ...), floating point.
    restart : int
        Most Krylov vectors per sample before a restart; capped at the number of elements of one sample.
    tol : float
        Absolute tolerance on each sample's residual ``||f(z) - z||_2``.
    max_iter : int
        Most Arnoldi steps per sample, over all restarts.
    strict, warn : bool
        As in :func:`implicit_layers.jax.forward_iteration`.

    Returns
    -------
    z : jax.Array
        The last iterate, shape of ``z0``.
    result : SolverResult
        As in :func:`implicit_layers.torch.gmres`: rows of ``residuals`` inside a restart cycle are GMRES's
        estimates, the row ending each cycle (and the last row) the true residual; rows after ``num_steps``
        repeat the final residuals. Samples whose least-squares system turns singular are marked failed.

    Warns
    -----
    ConvergenceWarning
        When some sample does not reach ``tol``; the message gives the largest true residual reached.
    """
    check_batched_state("z0", z0)
    restart = check_iteration_limit("restart", restart)
    tol = check_tolerance("tol", tol)
    max_iter = check_iteration_limit("max_iter", max_iter)
    strict = check_flag("strict", strict)
    warn = check_flag("warn", warn)

    batch, dim = z0.shape[0], math.prod(z0.shape[1:])
    dtype = compute_dtype(z0.dtype)
    basis_size = min(restart, dim)

    def evaluate(x: jax.Array) -> jax.Array:
        return flat(f(x.reshape(z0.shape).astype(z0.dtype))).astype(dtype)

    offset = f(jnp.zeros_like(z0))
    check_map_output(offset, z0)
    offset = flat(offset).astype(dtype)
    offset_norm, eps = jnp.linalg.norm(offset, axis=1), float(jnp.finfo(dtype).eps)

    x = flat(z0).astype(dtype)
    residual_vector = evaluate(x) - x
    residual = jnp.linalg.norm(residual_vector, axis=1)
    failed = ~jnp.isfinite(residual)
    met = residual < tol
    state = dict(
        step=jnp.zeros((), jnp.int32),
        cycles=jnp.zeros((), jnp.int32),
        x=x,
        residual_vector=residual_vector,
        residual=residual,
        active=~failed & ~met,
        failed=failed,
        met=met,
        iterations=jnp.zeros(batch, jnp.int32),
        trace=jnp.zeros((max_iter + 1, batch), residual.dtype).at[0].set(residual),
    )

    def arnoldi_step(cycle):
        j = cycle["j"]
        basis, in_cycle = cycle["basis"], cycle["in_cycle"]
        direction = basis[:, j]
        direction_image = evaluate(direction)
        image = direction - direction_image + offset  # (I - A) v
        # The rounding error of v - f(v) + b, below which a pivot of R cannot be told from zero.
        noise = 8 * eps * (1 + jnp.linalg.norm(direction_image, axis=1) + offset_norm)
        column = jnp.zeros((batch, basis_size + 1), dtype)
        # Vectors past j are still zero, so projecting on the whole basis projects on the first j + 1; a second
        # classical Gram-Schmidt pass restores the orthogonality that one pass loses.
        for _ in range(2):
            coefficients = jnp.einsum("bkd,bd->bk", basis, image)
            image = image - jnp.einsum("bk,bkd->bd", coefficients, basis)
            column = column + coefficients
        length = jnp.linalg.norm(image, axis=1)
        column = column.at[:, j + 1].set(length)
        # A zero length means the Krylov space is invariant: the correction is then exact.
        basis = basis.at[:, j + 1].set(image / jnp.where(length > 0, length, 1.0)[:, None])

        rotations = cycle["rotations"]
        column = jnp.einsum("bij,bj->bi", rotations, column)
        head, tail = column[:, j], column[:, j + 1]
        norm = jnp.hypot(head, tail)
        safe = jnp.where(norm > 0, norm, 1.0)
        cosine = jnp.where(norm > 0, head / safe, 1.0)[:, None]
        sine = jnp.where(norm > 0, tail / safe, 0.0)[:, None]
        column = column.at[:, j].set(norm).at[:, j + 1].set(0.0)
        row, next_row = rotations[:, j], rotations[:, j + 1]
        rotating = in_cycle[:, None]
        rotations = rotations.at[:, j].set(jnp.where(rotating, cosine * row + sine * next_row, row))
        rotations = rotations.at[:, j + 1].set(jnp.where(rotating, cosine * next_row - sine * row, next_row))
        estimate = cycle["start"] * jnp.abs(rotations[:, j + 1, 0])
        singular = cycle["singular"] | (in_cycle & (norm <= noise))
        step = cycle["step"] + 1
        previous = jax.lax.dynamic_index_in_dim(cycle["trace"], step - 1, 0, keepdims=False)
        return dict(
            j=j + 1,
            step=step,
            basis=basis,
            rotated=cycle["rotated"].at[:, :, j].set(jnp.where(in_cycle[:, None], column, 0.0)),
            rotations=rotations,
            start=cycle["start"],
            in_cycle=in_cycle & (estimate >= tol) & ~singular,
            singular=singular,
            cycle_steps=cycle["cycle_steps"] + in_cycle,
            iterations=cycle["iterations"] + in_cycle,
            trace=jax.lax.dynamic_update_index_in_dim(
                cycle["trace"], jnp.where(in_cycle, estimate, previous), step, 0
            ),
        )

    def restart_cycle(state):
        active = state["active"]
        start = jnp.where(active, state["residual"], 0.0)
        basis = jnp.zeros((batch, basis_size + 1, dim), dtype)
        basis = basis.at[:, 0].set(state["residual_vector"] / jnp.where(start > 0, start, 1.0)[:, None])
        cycle = dict(
            j=jnp.zeros((), jnp.int32),
            step=state["step"],
            basis=basis,
            rotated=jnp.zeros((batch, basis_size + 1, basis_size), dtype),
            # The product of the Givens rotations so far, which turn the Hessenberg matrix into the triangle R:
            # one batched product rotates a new column, and ||r|| times its first column is the rotated
            # right-hand side ||r|| e_1, whose entry past the last column is the residual of the minimizing
            # correction.
            rotations=jnp.broadcast_to(jnp.eye(basis_size + 1, dtype=dtype), (batch, basis_size + 1, basis_size + 1)),
            start=start,
            in_cycle=active,
            singular=jnp.zeros_like(active),
            cycle_steps=jnp.zeros(batch, jnp.int32),
            iterations=state["iterations"],
            trace=state["trace"],
        )
        cycle = jax.lax.while_loop(
            lambda c: (c["j"] < basis_size) & (c["step"] < max_iter) & jnp.any(c["in_cycle"]), arnoldi_step, cycle
        )
        candidate = state["x"] + _least_squares_correction(cycle)
        candidate_vector = evaluate(candidate) - candidate
        candidate_residual = jnp.linalg.norm(candidate_vector, axis=1)
        broke = active & (cycle["singular"] | ~jnp.isfinite(candidate_residual))
        keep = broke[:, None]
        residual = jnp.where(broke, state["residual"], candidate_residual)
        return dict(
            step=cycle["step"],
            cycles=state["cycles"] + 1,
            x=jnp.where(keep, state["x"], candidate),
            residual_vector=jnp.where(keep, state["residual_vector"], candidate_vector),
            residual=residual,
            active=active & ~broke & (residual >= tol),
            failed=state["failed"] | broke,
            met=state["met"] | (residual < tol),
            iterations=cycle["iterations"],
            trace=jax.lax.dynamic_update_index_in_dim(cycle["trace"], residual, cycle["step"], 0),
        )

    state = jax.lax.while_loop(lambda s: (s["step"] < max_iter) & jnp.any(s["active"]), restart_cycle, state)

    result = final_result(state, tol=tol, max_iter=max_iter, nfe=2 + state["step"] + state["cycles"])
    if warn or strict:
        drifted = state["met"] & ~result.converged & ~result.failed
        _report("gmres", result, drifted, tol=tol, max_iter=max_iter, strict=strict, stacklevel=3)
    return state["x"].reshape(z0.shape).astype(z0.dtype), result


def _least_squares_correction(cycle: dict) -> jax.Array:
    """Each sample's correction ``V y`` with ``R y = g`` over the ``cycle_steps`` columns it built; columns it
    did not build get a unit diagonal and a zero right-hand side, hence ``y = 0``. An exactly singular ``R``
    gives a non-finite correction, which the caller reports as a failure."""
    basis, rotated, cycle_steps = cycle["basis"], cycle["rotated"], cycle["cycle_steps"]
    projected = cycle["start"][:, None] * cycle["rotations"][:, :, 0]
    size = rotated.shape[2]
    built = jnp.arange(size) < cycle_steps[:, None]
    triangle = rotated[:, :size, :]
    diagonal = jnp.where(built, jnp.diagonal(triangle, axis1=1, axis2=2), 1.0)
    triangle = triangle.at[:, jnp.arange(size), jnp.arange(size)].set(diagonal)
    rhs = jnp.where(built, projected[:, :size], 0.0)
    coefficients = jax.lax.linalg.triangular_solve(triangle, rhs[..., None], left_side=True, lower=False)[..., 0]
    # Masked, so that a vector of a basis a sample did not use cannot bring a NaN into its correction.
    return jnp.einsum("bk,bkd->bd", coefficients, jnp.where(built[..., None], basis[:, :size], 0.0))
