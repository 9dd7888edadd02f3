"""The batched loop every JAX fixed-point solver shares: per-sample stopping on the device, residual trace,
warnings. The twin of ``implicit_layers.torch._loop``."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._checks import check_iteration_limit, check_tolerance
from ..errors import report_convergence
from ._validation import check_batched_state, check_map_output, is_concrete
from .result import SolverResult

Map = Callable[[jax.Array], jax.Array]
Update = Callable[[Map, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
"""``update(f, z, f(z), state) -> (proposal, state)``: one step of a method; ``state`` carries its memory."""


def residual_norm(fz: jax.Array, z: jax.Array) -> jax.Array:
    """Per-sample Euclidean norm of ``f(z) - z`` over all but the batch dimension."""
    return jnp.linalg.norm((fz - z).reshape(z.shape[0], -1), axis=1)


def solve_batched(
    name: str,
    f: Map,
    z0: jax.Array,
    update: Update,
    *,
    evaluations_per_update: int,
    tol: float,
    max_iter: int,
    strict: bool,
    unroll: bool,
    init_state: Callable[[jax.Array], Any] = lambda z0: None,
) -> tuple[jax.Array, SolverResult]:
    """Iterate ``z <- update(f, z, f(z), state)`` on each sample until its residual drops below ``tol``;
    ``state`` starts as ``init_state(z0)`` (a pytree of fixed shapes) and is threaded through the updates.

    The loop runs on the device (``lax.while_loop``), so there is no host synchronization per step. With
    ``unroll`` it runs as a ``lax.scan`` of ``max_iter`` steps instead, which reverse-mode autodiff can
    traverse; stopped samples are frozen either way, so both give the same iterates.
    """
    check_batched_state("z0", z0)
    check_tolerance("tol", tol)
    check_iteration_limit("max_iter", max_iter)
    batch = z0.shape[0]

    fz = f(z0)
    check_map_output(fz, z0)
    residual = residual_norm(fz, z0)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        z=z0,
        fz=fz,
        residual=residual,
        active=residual >= tol,
        failed=jnp.zeros(batch, bool),
        iterations=jnp.zeros(batch, jnp.int32),
        trace=jnp.zeros((max_iter + 1, batch), residual.dtype).at[0].set(residual),
        memory=init_state(z0),
    )

    def step(state):
        active = state["active"]
        proposal, memory = update(f, state["z"], state["fz"], state["memory"])
        finite = jnp.isfinite(proposal).reshape(batch, -1).all(axis=1)
        failed = state["failed"] | (active & ~finite)
        stepping = active & finite
        z = jnp.where(per_sample(stepping, proposal), proposal, state["z"])
        fz = f(z)
        new_residual = residual_norm(fz, z)
        failed = failed | (stepping & ~jnp.isfinite(new_residual))
        stepping = stepping & ~failed
        residual = jnp.where(stepping, new_residual, state["residual"])
        count = state["step"] + jnp.any(active).astype(jnp.int32)
        return dict(
            step=count,
            z=z,
            fz=fz,
            residual=residual,
            active=stepping & (residual >= tol),
            failed=failed,
            iterations=state["iterations"] + stepping,
            trace=state["trace"].at[count].set(residual),
            memory=memory,
        )

    if unroll:
        state, _ = jax.lax.scan(lambda s, _: (step(s), None), state, None, length=max_iter)
    else:
        state = jax.lax.while_loop(lambda s: (s["step"] < max_iter) & jnp.any(s["active"]), step, state)

    rows = jnp.arange(max_iter + 1)[:, None]
    trace = jnp.where(rows > state["step"], state["residual"][None, :], state["trace"])
    result = SolverResult(
        iterations=state["iterations"],
        residuals=trace,
        converged=state["residual"] < tol,
        failed=state["failed"],
        nfe=1 + state["step"] * (1 + evaluations_per_update),
        num_steps=state["step"],
    )
    _report(name, result, tol=tol, max_iter=max_iter, strict=strict)
    return state["z"], result


def per_sample(values: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape per-sample ``values`` of shape (B,) so they broadcast against ``like`` of shape (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _report(name: str, result: SolverResult, *, tol: float, max_iter: int, strict: bool) -> None:
    report = partial(report_convergence, name, tol=tol, max_iter=max_iter, strict=strict)
    flags = (result.converged, result.residual, result.failed)
    if all(is_concrete(a) for a in flags):
        report(*flags, stacklevel=4)
    else:
        # Under jit the values exist only on the device: report from there once the solve has run. With
        # strict=True the ConvergenceError then surfaces wrapped in a JaxRuntimeError.
        jax.debug.callback(report, *flags)
