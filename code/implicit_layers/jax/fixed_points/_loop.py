"""The batched loop every JAX fixed-point solver shares: per-sample stopping on the device, residual trace,
warnings. The twin of ``implicit_layers.torch.fixed_points._loop``."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..._checks import check_flag, check_iteration_limit, check_tolerance
from ...errors import report_convergence
from .._batch import flat, per_sample
from .._validation import check_batched_state, check_map_output, compute_dtype, is_concrete
from .result import SolverResult

Map = Callable[[jax.Array], jax.Array]
Update = Callable[[Map, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
"""``update(f, z, f(z), state) -> (proposal, state)``: one step of a method; ``state`` carries its memory."""


def residual_norm(fz: jax.Array, z: jax.Array) -> jax.Array:
    """Per-sample Euclidean norm of ``f(z) - z`` over all but the batch dimension, in float32 at least.

    Outside autodiff: residuals only steer the loop, and the norm's derivative at a zero residual is NaN, which
    the zero cotangents of an unrolled loop would turn into NaN gradients."""
    dtype = compute_dtype(z.dtype)
    difference = jax.lax.stop_gradient(flat(fz).astype(dtype) - flat(z).astype(dtype))
    return jnp.linalg.norm(difference, axis=1)


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
    warn: bool,
    unroll: bool,
    init_state: Callable[[jax.Array], Any] = lambda z0: None,
) -> tuple[jax.Array, SolverResult]:
    """Iterate ``z <- update(f, z, f(z), state)`` on each sample until its residual drops below ``tol``;
    ``state`` starts as ``init_state(z0)`` (a pytree of fixed shapes) and is threaded through the updates.

    The loop runs on the device (``lax.while_loop``), so there is no host synchronization per step. With
    ``unroll`` it runs as a ``lax.scan`` of ``max_iter`` steps instead, which reverse-mode autodiff can
    traverse; stopped samples are frozen either way, so both give the same iterates. As in the torch loop,
    every evaluation covers the whole batch and every recorded residual is that of the batch as it stands; a
    sample whose step makes ``f`` non-finite keeps its last finite iterate and is marked failed, and so is a
    sample whose initial residual is not finite (which only ``jit`` lets through the argument checks).
    """
    check_batched_state("z0", z0)
    tol = check_tolerance("tol", tol)
    max_iter = check_iteration_limit("max_iter", max_iter)
    strict = check_flag("strict", strict)
    warn = check_flag("warn", warn)
    unroll = check_flag("unroll", unroll)
    batch = z0.shape[0]

    fz = f(z0)
    check_map_output(fz, z0)
    residual = residual_norm(fz, z0)
    failed = ~jnp.isfinite(residual)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        z=z0,
        fz=fz,
        residual=residual,
        active=~failed & (residual >= tol),
        failed=failed,
        iterations=jnp.zeros(batch, jnp.int32),
        trace=jnp.zeros((max_iter + 1, batch), residual.dtype).at[0].set(residual),
        memory=init_state(z0),
    )

    def step(state):
        active = state["active"]
        proposal, memory = update(f, state["z"], state["fz"], state["memory"])
        candidate = jnp.where(per_sample(active, proposal), proposal, state["z"])
        image = f(candidate)
        new_residual = residual_norm(image, candidate)
        # A non-finite proposal or image makes the residual non-finite: one check covers both.
        broke = ~jnp.isfinite(new_residual)
        keep = per_sample(broke, candidate)
        residual = jnp.where(broke, state["residual"], new_residual)
        stepping = active & ~broke
        count = state["step"] + jnp.any(active).astype(jnp.int32)
        return dict(
            step=count,
            z=jnp.where(keep, state["z"], candidate),
            fz=jnp.where(keep, state["fz"], image),
            residual=residual,
            active=stepping & (residual >= tol),
            failed=state["failed"] | (active & broke),
            iterations=state["iterations"] + stepping,
            # A dynamic-update-slice, which XLA can do in place; .at[count].set would lower to a scatter.
            trace=jax.lax.dynamic_update_index_in_dim(state["trace"], residual, count, 0),
            memory=memory,
        )

    if unroll:
        state, _ = jax.lax.scan(lambda s, _: (step(s), None), state, None, length=max_iter)
    else:
        state = jax.lax.while_loop(lambda s: (s["step"] < max_iter) & jnp.any(s["active"]), step, state)

    result = final_result(state, tol=tol, max_iter=max_iter, nfe=1 + state["step"] * (1 + evaluations_per_update))
    if warn or strict:
        drifted = (result.residuals < tol).any(axis=0) & ~result.converged & ~result.failed
        _report(name, result, drifted, tol=tol, max_iter=max_iter, strict=strict)
    return state["z"], result


def final_result(state: dict, *, tol: float, max_iter: int, nfe: jax.Array) -> SolverResult:
    """The result record of a finished loop's ``state``: rows of the trace after the last step repeat each
    sample's final residual, so the trace has its fixed length ``max_iter + 1`` under ``jit``."""
    rows = jnp.arange(max_iter + 1)[:, None]
    trace = jnp.where(rows > state["step"], state["residual"][None, :], state["trace"])
    return SolverResult(
        iterations=state["iterations"],
        residuals=trace,
        converged=(state["residual"] < tol) & ~state["failed"],
        failed=state["failed"],
        nfe=nfe,
        num_steps=state["step"],
    )


def _report(
    name: str, result: SolverResult, drifted: jax.Array, *, tol: float, max_iter: int, strict: bool, stacklevel=4
) -> None:
    report = partial(report_convergence, name, tol=tol, max_iter=max_iter, strict=strict)
    flags = (result.converged, result.residual, result.failed, drifted)
    if all(is_concrete(a) for a in flags):
        report(*flags, stacklevel=stacklevel)
    else:
        # Under jit the values exist only on the device: report from there once the solve has run, and only
        # when some sample missed, so a converged solve does not pay for a trip to the host. A warning is
        # issued as usual; with strict=True the ConvergenceError raised in the callback reaches the caller
        # wrapped in a jax.errors.JaxRuntimeError that quotes its message (the solver docstrings say so).
        jax.lax.cond(
            jnp.all(result.converged), lambda *_: None, lambda *a: jax.debug.callback(report, *a), *flags
        )
