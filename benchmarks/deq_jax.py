"""JAX cases: the training step with our ``fixed_point``, jaxopt's AndersonAcceleration and optimistix's
``fixed_point``, each step (solve, implicit backward, gradients of every parameter) compiled whole with ``jax.jit``.

The peers solve one system per call, so they are ``vmap``-ed over the batch, each sample with its own Anderson
weights and stopping test, as in our batched solver (the cell acts on each sample alone).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from implicit_layers import jax as ours

from deq_problem import PARAMETERS, Case, Outcome, Problem, Run, Settings

CELL_PARAMETERS = ("conv1", "conv2", "norm1_scale", "norm1_offset", "norm2_scale", "norm2_offset", "norm3_scale",
                   "norm3_offset")

Solve = Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, jax.Array]]
"""``solve(z0, x, cell_params) -> (z*, forward steps)``, differentiable with respect to ``x`` and the params."""


def cases(settings: Settings) -> list[Case]:
    """Ours, jaxopt's Anderson and optimistix's fixed-point iteration (or notes of why a peer did not import)."""
    m, ridge, rtol = settings.anderson_m, settings.anderson_ridge, settings.backward_rtol
    descriptions = {
        "ours": ("anderson", f"m={m}, ridge={ridge:g} (relative), forward and backward"),
        "jaxopt": ("anderson", f"vmap; history_size={m}, ridge={ridge:g}; implicit_diff_solve=solve_normal_cg "
                               f"(its default) with tol={rtol:g}"),
        "optimistix": ("forward_iteration", "vmap; FixedPointIteration (optimistix has no Anderson), rtol=0, "
                                            f"atol=tol, norm=two_norm; ImplicitAdjoint with lineax NormalCG "
                                            f"(rtol={rtol:g}, atol=0) instead of its default dense LU (GMRES "
                                            "with restart 20 broke down)"),
    }
    builders = {"ours": _our_solve, "jaxopt": _jaxopt_solve, "optimistix": _optimistix_solve}
    result = []
    for library, (method, text) in descriptions.items():
        if library != "ours":
            try:
                __import__(library)
            except Exception as error:  # a broken install fails in many ways; every one of them is reported
                result.append(Case("jax", library, method, "", unavailable=f"import failed: {error}"))
                continue
        result.append(Case("jax", library, method, text, partial(_prepare, builders[library])))
    return result


def _prepare(build: Callable[[Settings], Solve], problem: Problem, settings: Settings) -> Run:
    """Compile the step, ``jax.value_and_grad`` of the loss with respect to every parameter, with ``jax.jit``."""
    params = {name: jnp.asarray(value) for name, value in problem.params.items()}
    images, labels, z0 = jnp.asarray(problem.images), jnp.asarray(problem.labels), jnp.asarray(problem.z0)
    solve = build(settings)

    def loss(params):
        x = _group_norm(_conv3x3(images, params["stem_conv"]), params["stem_norm_scale"],
                        params["stem_norm_offset"], settings.groups)
        z, steps = solve(z0, x, {name: params[name] for name in CELL_PARAMETERS})
        logits = z.mean(axis=(2, 3)) @ params["head_weight"].T + params["head_bias"]
        log_probabilities = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probabilities, labels[:, None], axis=1).mean(), (z, steps)

    step = jax.jit(jax.grad(loss, has_aux=True))

    def unpack(out) -> Outcome:
        grads, (z, steps) = out
        # No library here reports its backward iterations from inside a compiled gradient.
        return Outcome(np.asarray(z), {name: np.asarray(grads[name]) for name in PARAMETERS}, int(steps), None)

    return Run(lambda: jax.block_until_ready(step(params)), unpack)


def _conv3x3(inputs: jax.Array, weight: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(inputs, weight, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _group_norm(inputs: jax.Array, scale: jax.Array, offset: jax.Array, groups: int, eps: float = 1e-5) -> jax.Array:
    """The stem's torch.nn.GroupNorm (the cell's own is inside ``conv_deq_cell``)."""
    batch, channels, height, width = inputs.shape
    grouped = inputs.reshape(batch, groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    variance = jnp.square(grouped - mean).mean(axis=2, keepdims=True)
    normalized = ((grouped - mean) * lax.rsqrt(variance + eps)).reshape(inputs.shape)
    return normalized * scale[:, None, None] + offset[:, None, None]


def _our_solve(settings: Settings) -> Solve:
    options = {"m": settings.anderson_m, "ridge": settings.anderson_ridge}

    def cell(z, theta):
        x, cell_params = theta
        return ours.conv_deq_cell(z, x, cell_params, settings.groups)

    def solve(z0, x, cell_params):
        z, result = ours.fixed_point(
            cell,
            z0,
            (x, cell_params),
            solver="anderson",
            backward="implicit",
            tol=settings.tol,
            max_iter=settings.max_iter,
            backward_tol=settings.backward_rtol,
            backward_max_iter=settings.backward_max_iter,
            solver_options=options,
            backward_solver_options=options,
            warn=False,  # like the peers: the table's residual column is the check
        )
        return z, result.num_steps

    return solve


def _one_sample_cell(settings: Settings):
    """The cell on one sample (C, H, W), as the peers take it: ``cell(z, x, cell_params)``."""
    return lambda z, x, cell_params: ours.conv_deq_cell(z[None], x[None], cell_params, settings.groups)[0]


def _jaxopt_solve(settings: Settings) -> Solve:
    """jaxopt's AndersonAcceleration, ``vmap``-ed; its ``run`` is differentiated implicitly, the linear system
    solved by conjugate gradients on the normal equations (its default) to ``backward_rtol`` relative to the
    right-hand side, as ours. Its test ``error <= tol`` is on the l2 norm of ``f(z) - z`` per sample: ours."""
    import jaxopt
    from jaxopt.linear_solve import solve_normal_cg

    solver = jaxopt.AndersonAcceleration(
        _one_sample_cell(settings),
        history_size=settings.anderson_m,
        ridge=settings.anderson_ridge,
        maxiter=settings.max_iter,
        tol=settings.tol,
        implicit_diff_solve=partial(solve_normal_cg, tol=settings.backward_rtol),
    )
    run = jax.vmap(solver.run, in_axes=(0, 0, None))

    def solve(z0, x, cell_params):
        z, state = run(z0, x, cell_params)
        return z, state.iter_num.max()

    return solve


def _optimistix_solve(settings: Settings) -> Solve:
    """optimistix's ``fixed_point`` with FixedPointIteration, ``vmap``-ed. It stops when
    ``norm(step / (atol + rtol * |z|)) < 1``; ``rtol=0``, ``atol=tol`` and the two-norm make that our test."""
    import lineax as lx
    import optimistix as optx

    cell = _one_sample_cell(settings)
    solver = optx.FixedPointIteration(rtol=0.0, atol=settings.tol, norm=optx.two_norm)
    adjoint = optx.ImplicitAdjoint(linear_solver=lx.NormalCG(rtol=settings.backward_rtol, atol=0.0))

    def solve_one(z0, x, cell_params):
        solution = optx.fixed_point(
            lambda z, args: cell(z, *args),
            solver,
            z0,
            args=(x, cell_params),
            max_steps=settings.max_iter,
            adjoint=adjoint,
            throw=False,  # a sample that does not converge shows in the residual column instead
        )
        return solution.value, solution.stats["num_steps"]

    run = jax.vmap(solve_one, in_axes=(0, 0, None))

    def solve(z0, x, cell_params):
        z, steps = run(z0, x, cell_params)
        return z, steps.max()

    return solve
