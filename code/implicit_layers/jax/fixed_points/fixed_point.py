"""Differentiable fixed points in JAX: implicit forward- and reverse-mode rules, their phantom and Jacobian-free
approximations, or unrolled iterations."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ..._checks import check_fixed_point_options
from ._loop import flat, per_sample
from .anderson import anderson
from .broyden import broyden
from .forward_iteration import forward_iteration
from .gmres import gmres
from .newton import newton
from .result import SolverResult

SOLVERS = {"forward_iteration": forward_iteration, "newton": newton, "anderson": anderson, "broyden": broyden}
"""The fixed-point solvers by name; each is usable forward and for the linear systems of the derivatives."""

BACKWARD_SOLVERS = {**SOLVERS, "gmres": gmres}
"""The solvers of the derivatives' linear systems by name: the fixed-point solvers and GMRES, which needs an
affine map."""

BACKWARD_MODES = ("implicit", "unrolled", "phantom", "jacobian_free")


def fixed_point(
    f: Callable[[jax.Array, Any], jax.Array],
    z0: jax.Array,
    theta: Any,
    *,
    solver: str = "newton",
    backward: str = "implicit",
    backward_solver: Optional[str] = None,
    tol: float = 1e-5,
    max_iter: Optional[int] = None,
    backward_tol: Optional[float] = None,
    backward_max_iter: int = 200,
    strict: bool = False,
    warn: bool = True,
    solver_options: Optional[dict[str, Any]] = None,
    backward_solver_options: Optional[dict[str, Any]] = None,
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
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

    Two cheaper modes approximate the implicit derivative; neither is the exact derivative. Both solve with
    ``theta`` and ``z0`` behind ``stop_gradient``, then apply ``f`` a few more times from the solution ``z*``,
    itself behind ``stop_gradient``, and let autodiff see only those applications. With
    ``backward="phantom"`` (Geng et al., 2021) they are ``k = phantom_steps`` damped steps
    ``z <- (1 - lam) z + lam f(z, theta)`` (``lam = phantom_damping``), a ``lax.fori_loop``. At the fixed
    point this replaces ``(I - J^T)^{-1}`` by the truncated series ``lam * sum_{i<k} ((1 - lam) I + lam J^T)^i``,
    whose error shrinks like ``rho((1 - lam) I + lam J)^k``; reverse mode stores O(k) states, with the steps
    and not with the solver's iterations. With ``backward="jacobian_free"`` (Fung et al., 2022) the output is
    ``f(z*, theta)``: the identity replaces ``(I - J^T)^{-1}``, at O(1) memory, and the derivative is that of
    phantom with ``k = 1`` and ``lam = 1``. No setting makes it more accurate; Fung et al. give conditions (a
    contraction ``f`` whose derivative in ``theta`` is well conditioned) under which it is still a descent
    direction.

    Parameters
    ----------
    f : callable
        ``f(z, theta)`` maps a batch of states (B, ...) to a batch of the same shape, acting on each sample
        independently.
    z0 : jax.Array
        Initial guess, shape (B, ...). It gets no derivative in the implicit, phantom and jacobian_free modes.
    theta : pytree
        What the fixed point is differentiated with respect to (inputs, parameters).
    solver : {"newton", "forward_iteration", "anderson", "broyden"}
        Forward solver.
    backward : {"implicit", "unrolled", "phantom", "jacobian_free"}
        How derivatives are computed.
    backward_solver : {"forward_iteration", "newton", "anderson", "broyden", "gmres"}, optional
        Solver for the linear fixed points of the derivative rules; by default the forward solver. GMRES
        (:func:`gmres`) serves these linear systems only.
    tol, max_iter : float, int or None
        Forward tolerance and iteration limit (``None``: the solver's default).
    backward_tol : float, optional
        Tolerance of the derivative's linear solves relative to each sample's right-hand side; by default the
        square root of the dtype's machine epsilon.
    backward_max_iter : int
        Iteration limit of the derivative's linear solves.
    strict : bool
        Raise instead of warning when a solve does not converge; under ``jit`` see
        :func:`implicit_layers.jax.forward_iteration` for what changes. The linear solves of a derivative are
        always traced (inside ``lax.custom_linear_solve``), so their failures arrive that way even without
        ``jit``: as a ``jax.errors.JaxRuntimeError`` quoting the ``ConvergenceError``.
    warn : bool
        Warn when a solve does not converge; ``False`` leaves the check out (see
        :func:`implicit_layers.jax.forward_iteration` for its cost under ``jit``).
    solver_options, backward_solver_options : dict, optional
        Extra keyword arguments of the forward and the linear solvers (for example ``{"m": 6}`` for Anderson,
        ``{"restart": 30}`` for GMRES).
    phantom_steps : int
        Number ``k`` of damped steps in phantom mode (checked in every mode).
    phantom_damping : float
        Damping ``lam`` in (0, 1] of the phantom steps (checked in every mode).

    Returns
    -------
    z : jax.Array
        The fixed point: the solver's ``z*`` in implicit mode, ``f(z*, theta)`` in jacobian_free mode and the
        last damped step in phantom mode (equal to ``z*`` within the solver's tolerance).
    result : SolverResult
        The forward solver's record.

    Notes
    -----
    In implicit mode derivatives of every order are exact: the rule's inputs pass through the rule again, so a
    second differentiation (``jax.hessian``, a Hessian-vector product, ``grad`` of ``grad``) sees the solution
    move with ``theta`` inside the Jacobians and in the linear solve. In the phantom and jacobian_free modes
    autodiff differentiates the recorded applications of ``f`` as it would any function, so a second
    derivative is the exact derivative of the approximate first one, with ``z*`` held constant.

    ``f`` must act on each sample independently: sample ``b`` of ``f(z, theta)`` may depend on ``z[b]`` and
    on ``theta``, not on other samples. Every step evaluates ``f`` on the whole batch, so a map that mixes
    samples shows up as samples that lose their convergence, which the warning names.

    A sample whose forward solve or linear solve failed (a NaN/Inf step or a singular system, reported by a
    :class:`~implicit_layers.errors.ConvergenceWarning`) gets a zero derivative in every mode but unrolled: the
    implicit function theorem, and the approximations built on it, say nothing at a point that is not a fixed
    point.

    References
    ----------
    Z. Geng, X.-Y. Zhang, S. Bai, Y. Wang and Z. Lin, "On training implicit models", NeurIPS 2021.
    S. W. Fung, H. Heaton, Q. Li, D. McKenzie, S. Osher and W. Yin, "JFB: Jacobian-free backpropagation for
    implicit networks", AAAI 2022.
    """
    forward_options, derivative = check_fixed_point_options(
        SOLVERS,
        BACKWARD_MODES,
        BACKWARD_SOLVERS,
        solver=solver,
        backward=backward,
        backward_solver=backward_solver,
        tol=tol,
        max_iter=max_iter,
        backward_tol=backward_tol,
        backward_max_iter=backward_max_iter,
        strict=strict,
        warn=warn,
        solver_options=solver_options,
        backward_solver_options=backward_solver_options,
        phantom_steps=phantom_steps,
        phantom_damping=phantom_damping,
    )
    if backward == "unrolled":
        return SOLVERS[solver](lambda z: f(z, theta), z0, unroll=True, **forward_options)

    frozen_theta = jax.lax.stop_gradient(theta)
    z_star, result = SOLVERS[solver](lambda z: f(z, frozen_theta), jax.lax.stop_gradient(z0), **forward_options)
    if backward in ("phantom", "jacobian_free"):
        z_star = jax.lax.stop_gradient(z_star)
        if backward == "jacobian_free":
            z = f(z_star, theta)
        else:
            damping = derivative["phantom_damping"]
            z = jax.lax.fori_loop(
                0, derivative["phantom_steps"], lambda _, z: (1 - damping) * z + damping * f(z, theta), z_star
            )
        # Failed samples keep their values and lose their derivative, as in implicit mode.
        return jnp.where(per_sample(result.failed, z), jax.lax.stop_gradient(z), z), result
    linear_solve = partial(
        _solve_linear_fixed_point,
        BACKWARD_SOLVERS[derivative["solver"]],
        options=derivative["options"],
        tol=derivative["tol"] or float(jnp.finfo(z_star.dtype).eps) ** 0.5,
        max_iter=derivative["max_iter"],
        strict=derivative["strict"],
        warn=derivative["warn"],
    )
    return _implicit_solution(f, linear_solve, z_star, result.failed, theta), result


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_solution(f, linear_solve, z_star, failed, theta):
    return z_star


@_implicit_solution.defjvp
def _implicit_solution_jvp(f, linear_solve, primals, tangents):
    z_star, failed, theta = primals
    theta_dot = tangents[2]  # the solution does not depend on where the solver started
    # The rule's own inputs go through the rule again: differentiated once more (a Hessian, a Hessian-vector
    # product), z* then carries its implicit derivative into the Jacobians below instead of being a constant.
    z_star = _implicit_solution(f, linear_solve, z_star, failed, theta)
    _, rhs = jax.jvp(lambda th: f(z_star, th), (theta,), (theta_dot,))

    def one_minus_jacobian(t):
        return t - jax.jvp(lambda z: f(z, theta), (z_star,), (t,))[1]

    z_dot = jax.lax.custom_linear_solve(
        one_minus_jacobian, rhs, solve=linear_solve, transpose_solve=linear_solve
    )
    return z_star, jnp.where(per_sample(failed, z_dot), 0.0, z_dot)


def _solve_linear_fixed_point(solver, one_minus_a, b, *, options, tol, max_iter, strict, warn):
    """Solve ``(I - A) x = b`` as the fixed point ``x = A x + b``, given ``x -> (I - A) x``; the same function
    serves the transposed system, for which JAX passes ``x -> (I - A)^T x``.

    The system is solved for ``b / ||b||`` per sample, which makes ``tol`` relative to each right-hand side;
    samples whose solve failed get zero.
    """
    norms = jnp.linalg.norm(flat(b), axis=1)
    scale = per_sample(jnp.where(norms > 0, norms, 1.0), b)
    rhs = b / scale
    x, result = solver(
        lambda x: x - one_minus_a(x) + rhs, rhs, **options, tol=tol, max_iter=max_iter, strict=strict, warn=warn
    )
    return jnp.where(per_sample(result.failed, x), 0.0, x * scale)

