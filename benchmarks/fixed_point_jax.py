"""JAX cases: our solvers, jaxopt's and optimistix's, each compiled whole with ``jax.jit``, on the same float32
arrays.

The peers solve one system per call, so they are ``vmap``-ed over the batch: each sample then gets its own
Anderson weights, Broyden matrix, Newton Jacobian and stopping test, as in our batched solvers. (Handing them the
whole batch as one system would change the methods themselves: one set of Anderson weights for all samples, one
dense ``Bn x Bn`` Broyden or Newton matrix, a stopping test on the batch-wide norm.) Under ``vmap`` a sample that
has stopped is frozen while the others go on, as in our solvers.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from implicit_layers import jax as ours

from fixed_point_problem import Case, Outcome, Problem, Run, Settings, describe

METHODS = ("forward_iteration", "anderson", "broyden", "newton")
JAXOPT_METHODS = ("forward_iteration", "anderson", "broyden")
OPTIMISTIX_METHODS = ("forward_iteration", "newton")

Solve = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""``solve(W, x, z0) -> (z, steps)``, traceable; differentiable with respect to ``W`` and ``x`` where asked."""


def cases(settings: Settings) -> list[Case]:
    """Our four solvers, then jaxopt's three and optimistix's two (or notes of why a peer could not be imported)."""
    result = [
        Case("jax", "ours", m, describe(settings.our_options(m)), partial(_prepare, partial(_our_solve, m)))
        for m in METHODS
    ]
    peers = {
        "jaxopt": (JAXOPT_METHODS, _jaxopt_solve, _jaxopt_description),
        "optimistix": (OPTIMISTIX_METHODS, _optimistix_solve, _optimistix_description),
    }
    for library, (methods, solve, description) in peers.items():
        try:
            __import__(library)
        except Exception as error:  # a broken install fails in many ways; every one of them is reported
            reason = f"import failed: {type(error).__name__}: {error}"
            result += [Case("jax", library, m, "", unavailable=reason) for m in methods]
            continue
        result += [
            Case("jax", library, m, description(m, settings), partial(_prepare, partial(solve, m))) for m in methods
        ]
    return result


def _prepare(build: Callable[[Settings, bool], Solve], problem: Problem, settings: Settings, task: str) -> Run:
    """Compile ``solve`` (``forward``) or the gradient of ``sum(z* * c)`` with respect to ``(W, x)``
    (``gradient``) with ``jax.jit``; the run blocks until the result is ready."""
    W, x, c, z0 = (jnp.asarray(a) for a in (problem.W, problem.x, problem.c, problem.z0))
    solve = build(settings, task == "gradient")
    if task == "forward":
        compiled = jax.jit(solve)
        return Run(
            lambda: jax.block_until_ready(compiled(W, x, z0)),
            lambda out: Outcome(np.asarray(out[0]), int(out[1])),
        )

    def loss(theta):
        z, steps = solve(*theta, z0)
        return jnp.sum(z * c), (z, steps)

    compiled = jax.jit(jax.grad(loss, has_aux=True))
    return Run(
        lambda: jax.block_until_ready(compiled((W, x))),
        lambda out: Outcome(np.asarray(out[1][0]), int(out[1][1]), tuple(np.asarray(g) for g in out[0])),
    )


def _tanh_layer(z: jax.Array, theta: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The batched layer, ``z`` of shape (B, n)."""
    W, x = theta
    return jnp.tanh(z @ W.T + x)


def _tanh_layer_one(z: jax.Array, W: jax.Array, x: jax.Array) -> jax.Array:
    """The layer for one sample, ``z`` of shape (n,), as the peers take it."""
    return jnp.tanh(W @ z + x)


def _our_solve(method: str, settings: Settings, differentiable: bool) -> Solve:
    """Our batched solver (``differentiable=False``) or ``fixed_point`` with the implicit backward pass, whose
    linear solves use the same method, options and iteration limit."""
    options = settings.our_options(method)
    # warn=False: like the peers (optimistix runs with throw=False), no convergence check after the solve;
    # the table's residual column is the check.
    limits = {"tol": settings.tol, "max_iter": settings.iterations(method), "warn": False}

    def solve(W, x, z0):
        if differentiable:
            z, result = ours.fixed_point(
                _tanh_layer,
                z0,
                (W, x),
                solver=method,
                backward="implicit",
                backward_tol=settings.backward_rtol,
                backward_max_iter=limits["max_iter"],
                solver_options=options,
                backward_solver_options=options,
                **limits,
            )
        else:
            z, result = getattr(ours, method)(lambda z: _tanh_layer(z, (W, x)), z0, **options, **limits)
        return z, result.num_steps

    return solve


JAXOPT_SOLVERS = {"forward_iteration": "FixedPointIteration", "anderson": "AndersonAcceleration", "broyden": "Broyden"}


def _jaxopt_options(method: str, settings: Settings) -> dict:
    """jaxopt's options beyond tolerance and limits. Its Broyden finds a root, here of ``f(z) - z``, whose Jacobian
    is about ``-I``: hence ``gamma=-1`` (with its default 1 the first step goes the wrong way). ``stepsize=1``
    turns off its line search, which neither ours nor torchdeq's (by default) has."""
    if method == "anderson":
        return {"history_size": settings.anderson_m, "ridge": settings.peer_anderson_ridge}
    if method == "broyden":
        return {"history_size": settings.broyden_m, "gamma": -1.0, "stepsize": 1.0}
    return {}


def _jaxopt_description(method: str, settings: Settings) -> str:
    return describe(_jaxopt_options(method, settings), "vmap")


def _jaxopt_solve(method: str, settings: Settings, differentiable: bool) -> Solve:
    """jaxopt's solver, ``vmap``-ed; its ``run`` is differentiable either way (implicit differentiation).

    Its test ``error <= tol`` is on the ``l2`` norm of ``f(z) - z`` (for Broyden, of the root function), per sample
    under ``vmap``: the same test as ours. Its implicit derivative solves the linear system by conjugate
    gradients on the normal equations (its default), here to ``backward_rtol`` relative to the right-hand side,
    as ours does.
    """
    import jaxopt
    from jaxopt.linear_solve import solve_normal_cg

    function = _tanh_layer_one if method != "broyden" else lambda z, W, x: _tanh_layer_one(z, W, x) - z
    solver = getattr(jaxopt, JAXOPT_SOLVERS[method])(
        function,
        maxiter=settings.iterations(method),
        tol=settings.tol,
        implicit_diff_solve=partial(solve_normal_cg, tol=settings.backward_rtol),
        **_jaxopt_options(method, settings),
    )
    run = jax.vmap(solver.run, in_axes=(0, None, 0))

    def solve(W, x, z0):
        z, state = run(z0, W, x)
        return z, state.iter_num.max()

    return solve


def _optimistix_solve(method: str, settings: Settings, differentiable: bool) -> Solve:
    """optimistix's ``fixed_point``, ``vmap``-ed, with ``ImplicitAdjoint`` (its default: a dense LU solve of the
    linear system); differentiable either way.

    optimistix stops when ``norm(step / (atol + rtol * |z|)) < 1``, by default in the max norm; ``rtol=0``,
    ``atol=tol`` and the two-norm make that ``||f(z) - z||_2 < tol`` for forward iteration, our test. Newton
    also asks ``||f(z) - z||_2 < tol`` at the point its last step started from, so it stops one step later.
    """
    import optimistix as optx

    solver_type = optx.FixedPointIteration if method == "forward_iteration" else optx.Newton
    solver = solver_type(rtol=0.0, atol=settings.tol, norm=optx.two_norm)

    def solve_one(z0, W, x):
        solution = optx.fixed_point(
            lambda z, args: _tanh_layer_one(z, *args),
            solver,
            z0,
            args=(W, x),
            max_steps=settings.iterations(method),
            adjoint=optx.ImplicitAdjoint(),
            throw=False,  # a sample that does not converge shows in the residual column instead
        )
        return solution.value, solution.stats["num_steps"]

    run = jax.vmap(solve_one, in_axes=(0, None, 0))

    def solve(W, x, z0):
        z, steps = run(z0, W, x)
        return z, steps.max()

    return solve


def _optimistix_description(method: str, settings: Settings) -> str:
    return describe({"rtol": 0.0, "atol": settings.tol, "norm": "two_norm"}, "vmap")
