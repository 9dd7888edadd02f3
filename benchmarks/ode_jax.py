"""JAX cases of the ODE benchmark: our ``odeint`` and diffrax's ``diffeqsolve``, jitted, on the same float32
arrays. The first call of a case is its compilation plus one run; the driver reports it apart."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from implicit_layers import jax as ours

from ode_problem import PARAMETER_NAMES, Problem
from ode_settings import Case, Outcome, Run, Settings

DIFFRAX_MAX_STEPS = 4096
CHECKPOINT_MAX_STEPS = 256
"""Our JAX "checkpoint" allocates its buffer of step starts for ``max_steps`` rows up front: with the default
10 000 it runs several times longer than with this bound, which covers the longest integration the benchmark runs,
as ``odeint``'s docstring asks of a user of that mode. "backprop" runs at the default: its scan skips idle chunks
of about ``sqrt(max_steps)`` steps."""


def mlp(params: dict, y: jax.Array) -> jax.Array:
    h = jnp.tanh(y @ params["W1"].T + params["b1"])
    h = jnp.tanh(h @ params["W2"].T + params["b2"])
    return h @ params["W3"].T + params["b3"]


def cases(settings: Settings) -> list[Case]:
    result = [Case("jax", "ours", f"dopri5, {control} steps", mode, partial(_prepare_ours, control, mode))
              for control in ("per_sample", "shared", "shared_rms") for mode in (None, *settings.our_gradients)]
    try:
        import diffrax  # noqa: F401  (only whether it imports matters here)
    except Exception as error:  # a broken install fails in many ways; each is reported, not raised
        reason = f"import failed: {type(error).__name__}: {error}"
        return result + [Case("jax", "diffrax", "Dopri5", mode, unavailable=reason)
                         for mode in (None, "backprop", "adjoint")]
    for batching in ("batch as one state", "vmap over samples"):
        result += [Case("jax", "diffrax", f"Dopri5, {batching}", mode, partial(_prepare_diffrax, batching, mode))
                   for mode in (None, "backprop", "adjoint")]
    return result


def _inputs(problem: Problem) -> tuple[dict, jax.Array, jax.Array]:
    params = {name: jnp.asarray(problem.params[name], jnp.float32) for name in PARAMETER_NAMES}
    return params, jnp.asarray(problem.y0, jnp.float32), jnp.asarray(problem.c, jnp.float32)


def _run(solve, params, y0, c, gradient: bool) -> Run:
    """``solve(params, y0) -> (y1, nfe)`` jitted; with ``gradient``, the gradient of ``sum(y1 * c)`` too."""
    if gradient:
        def loss(params):
            y1, nfe = solve(params, y0)
            return jnp.sum(y1 * c), (y1, nfe)

        compiled = jax.jit(jax.grad(loss, has_aux=True))
        call = lambda: jax.block_until_ready(compiled(params))  # noqa: E731
        unpack = lambda out: Outcome(np.asarray(out[1][0], np.float64), int(out[1][1]),  # noqa: E731
                                     {k: np.asarray(v, np.float64) for k, v in out[0].items()})
    else:
        compiled = jax.jit(solve)
        call = lambda: jax.block_until_ready(compiled(params, y0))  # noqa: E731
        unpack = lambda out: Outcome(np.asarray(out[0], np.float64), int(out[1]))  # noqa: E731
    return Run(call, unpack)


def _prepare_ours(control: str, mode, problem: Problem, settings: Settings) -> Run:
    params, y0, c = _inputs(problem)
    t = jnp.array([0.0, problem.t1], jnp.float32)
    options = dict(method="dopri5", rtol=settings.rtol, atol=settings.atol, step_control=control, warn=False)
    if mode is not None:
        options["gradient"] = mode
    if mode == "adjoint" and settings.adjoint_tol is not None:
        options.update(adjoint_rtol=settings.adjoint_tol, adjoint_atol=settings.adjoint_tol)
    if mode == "checkpoint":
        options["max_steps"] = CHECKPOINT_MAX_STEPS

    def solve(params, y0):
        ys, result = ours.odeint(lambda t, y, p: mlp(p, y), y0, t, params, **options)
        return ys[-1], jnp.max(result.nfe)  # every step evaluates the whole batch: the batched count is the max

    return _run(solve, params, y0, c, gradient=mode is not None)


def _prepare_diffrax(batching: str, mode, problem: Problem, settings: Settings) -> Run:
    import diffrax

    params, y0, c = _inputs(problem)
    adjoint = diffrax.BacksolveAdjoint() if mode == "adjoint" else diffrax.RecursiveCheckpointAdjoint()

    def solve_one_state(params, y0):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, p: mlp(p, y)), diffrax.Dopri5(), t0=0.0, t1=problem.t1, dt0=None, y0=y0,
            args=params, stepsize_controller=diffrax.PIDController(rtol=settings.rtol, atol=settings.atol),
            saveat=diffrax.SaveAt(t1=True), adjoint=adjoint, max_steps=DIFFRAX_MAX_STEPS, throw=False)
        # Dopri5 evaluates f six times per step (first-same-as-last) plus once at the start and twice to choose
        # the initial step; diffrax counts steps, not evaluations
        return solution.ys[-1], 6 * solution.stats["num_steps"] + 3

    if batching == "vmap over samples":
        def solve(params, y0):
            y1, nfe = jax.vmap(lambda y: solve_one_state(params, y[None]))(y0)
            return y1[:, 0], jnp.max(nfe)
    else:
        solve = solve_one_state
    return _run(solve, params, y0, c, gradient=mode is not None)
