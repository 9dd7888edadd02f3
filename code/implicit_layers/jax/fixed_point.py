"""Differentiable fixed points in JAX: implicit forward- and reverse-mode rules, or unrolled iterations."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax

from .._checks import check_choice
from .anderson import anderson
from .broyden import broyden
from .forward_iteration import forward_iteration
from .newton import newton
from .result import SolverResult

SOLVERS = {"forward_iteration": forward_iteration, "newton": newton, "anderson": anderson, "broyden": broyden}
"""The fixed-point solvers by name; each is usable forward and for the linear systems of the derivatives."""

BACKWARD_MODES = ("implicit", "unrolled")


def fixed_point(
    f: Callable[[jax.Array, Any], jax.Array],
    z0: jax.Array,
    theta: Any,
    *,
    solver: str = "newton",
    backward: str = "implicit",
    backward_solver: str = "forward_iteration",
    tol: float = 1e-5,
    max_iter: Optional[int] = None,
    backward_tol: float = 1e-8,
    backward_max_iter: int = 200,
    strict: bool = False,
    solver_options: Optional[dict[str, Any]] = None,
    backward_solver_options: Optional[dict[str, Any]] = None,
) -> tuple[jax.Array, SolverResult]:
    """Solve ``z = f(z, theta)`` and make the solution differentiable with respect to ``theta``.

    The JAX twin of :func:`implicit_layers.torch.fixed_point`. JAX functions are pure, so what the torch
    version finds in ``f``'s closure is passed here as ``theta``, any pytree of arrays.

    With ``backward="implicit"`` the solution carries a ``custom_jvp`` rule from the implicit function theorem,
    ``dz* = (I - d_z f)^{-1} d_theta f dtheta``, whose linear system goes through ``lax.custom_linear_solve``.
    JAX transposes that rule for reverse mode, which then solves the adjoint fixed point
    ``g = (d_z f)^T g + dL/dz*``: ``jvp``, ``grad``, ``jit`` and ``vmap`` all work and memory does not grow with
    the number of iterations. With ``backward="unrolled"`` the solver runs as a ``lax.scan`` of ``max_iter``
    steps and autodiff goes through every step.

    Parameters
    ----------
    f : callable
        ``f(z, theta)`` maps a batch of states (B, ...) to a batch of the same shape, acting on each sample
        independently.
    z0 : jax.Array
        Initial guess, shape (B, ...). It gets no derivative in implicit mode.
    theta : pytree
        What the fixed point is differentiated with respect to (inputs, parameters).
    solver : {"newton", "forward_iteration", "anderson", "broyden"}
        Forward solver.
    backward : {"implicit", "unrolled"}
        How derivatives are computed.
    backward_solver : {"forward_iteration", "newton", "anderson", "broyden"}
        Solver for the linear fixed points of the derivative rules.
    tol, max_iter : float, int or None
        Forward tolerance and iteration limit (``None``: the solver's default).
    backward_tol, backward_max_iter : float, int
        Tolerance and iteration limit of the derivative's linear solves.
    strict : bool
        Raise instead of warning when a solve does not converge.
    solver_options, backward_solver_options : dict, optional
        Extra keyword arguments of the forward and the linear solvers (for example ``{"m": 6}`` for Anderson).

    Returns
    -------
    z : jax.Array
        The fixed point.
    result : SolverResult
        The forward solver's record.
    """
    check_choice("solver", solver, SOLVERS)
    check_choice("backward", backward, BACKWARD_MODES)
    check_choice("backward_solver", backward_solver, SOLVERS)
    forward_options = {**(solver_options or {}), "tol": tol, "strict": strict}
    if max_iter is not None:
        forward_options["max_iter"] = max_iter

    if backward == "unrolled":
        return SOLVERS[solver](lambda z: f(z, theta), z0, unroll=True, **forward_options)

    frozen_theta = jax.lax.stop_gradient(theta)
    z_star, result = SOLVERS[solver](lambda z: f(z, frozen_theta), jax.lax.stop_gradient(z0), **forward_options)
    linear_solve = partial(
        _solve_linear_fixed_point,
        SOLVERS[backward_solver],
        options=backward_solver_options or {},
        tol=backward_tol,
        max_iter=backward_max_iter,
        strict=strict,
    )
    return _implicit_solution(f, linear_solve, z_star, theta), result


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_solution(f, linear_solve, z_star, theta):
    return z_star


@_implicit_solution.defjvp
def _implicit_solution_jvp(f, linear_solve, primals, tangents):
    z_star, theta = primals
    _, theta_dot = tangents  # the solution does not depend on where the solver started
    _, rhs = jax.jvp(lambda th: f(z_star, th), (theta,), (theta_dot,))

    def one_minus_jacobian(t):
        return t - jax.jvp(lambda z: f(z, theta), (z_star,), (t,))[1]

    z_dot = jax.lax.custom_linear_solve(
        one_minus_jacobian, rhs, solve=linear_solve, transpose_solve=linear_solve
    )
    return z_star, z_dot


def _solve_linear_fixed_point(solver, one_minus_a, b, *, options, tol, max_iter, strict):
    """Solve ``(I - A) x = b`` as the fixed point ``x = A x + b``, given ``x -> (I - A) x``; the same function
    serves the transposed system, for which JAX passes ``x -> (I - A)^T x``."""
    x, _ = solver(lambda x: x - one_minus_a(x) + b, b, **options, tol=tol, max_iter=max_iter, strict=strict)
    return x
