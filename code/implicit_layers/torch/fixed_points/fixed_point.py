"""Differentiable fixed points: the implicit-function-theorem backward pass, its phantom and Jacobian-free
approximations, or unrolled backpropagation."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..._checks import check_fixed_point_options
from ...errors import UnsupportedDerivativeError
from ._loop import Map, per_sample
from .._validation import check_batched_state
from .anderson import anderson
from .broyden import broyden
from .forward_iteration import forward_iteration
from .gmres import gmres
from .newton import newton
from .result import SolverResult

SOLVERS = {"forward_iteration": forward_iteration, "newton": newton, "anderson": anderson, "broyden": broyden}
"""The fixed-point solvers by name; each is usable forward and, for the adjoint system, backward."""

BACKWARD_SOLVERS = {**SOLVERS, "gmres": gmres}
"""The solvers of the adjoint system by name: the fixed-point solvers and GMRES, which needs an affine map."""

BACKWARD_MODES = ("implicit", "unrolled", "phantom", "jacobian_free")


def fixed_point(
    f: Map,
    z0: torch.Tensor,
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
    backward_callback: Optional[Callable[[SolverResult], None]] = None,
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
) -> tuple[torch.Tensor, SolverResult]:
    """Solve ``z = f(z)`` and make the solution differentiable with respect to whatever ``f`` uses.

    With ``backward="implicit"`` the forward solve runs without recording autograd, and the gradient comes from
    the implicit function theorem: for a loss ``L`` of the solution ``z*``, the vector ``g`` solving the linear
    fixed point ``g = J^T g + dL/dz*`` (``J = df/dz`` at ``z*``) is pushed through one application of ``f``.
    Memory does not grow with the number of iterations. With ``backward="unrolled"`` autograd records every
    iteration of the solver and backpropagates through them all.

    Two cheaper modes approximate the implicit gradient; neither is the exact gradient. Both solve without
    recording autograd, as the implicit mode does, and then record a few applications of ``f`` from the
    solution ``z*``, which is held constant. With ``backward="phantom"`` (Geng et al., 2021) autograd records
    ``k = phantom_steps`` damped steps ``z <- (1 - lam) z + lam f(z)`` (``lam = phantom_damping``) and
    backpropagates through them. At the fixed point this replaces ``(I - J^T)^{-1}`` by the truncated series
    ``lam * sum_{i<k} ((1 - lam) I + lam J^T)^i``, whose error shrinks like ``rho((1 - lam) I + lam J)^k``;
    memory grows as O(k), with the steps and not with the solver's iterations. With
    ``backward="jacobian_free"`` (Fung et al., 2022) the output is one recorded application ``f(z*)``: the
    identity replaces ``(I - J^T)^{-1}``, at O(1) memory, and the gradient is that of phantom with ``k = 1``
    and ``lam = 1``. No setting makes it more accurate; Fung et al. give conditions (a contraction ``f`` whose
    derivative in the parameters is well conditioned) under which it is still a descent direction.

    Parameters
    ----------
    f : callable
        Maps a batch of states (B, ...) to a batch of the same shape, acting on each sample independently. It
        may close over tensors that require gradients (inputs, parameters); they receive gradients.
    z0 : torch.Tensor
        Initial guess, shape (B, ...). It receives no gradient in the implicit, phantom and jacobian_free
        modes: the fixed point does not depend on where the search started.
    solver : {"newton", "forward_iteration", "anderson", "broyden"}
        Forward solver.
    backward : {"implicit", "unrolled", "phantom", "jacobian_free"}
        How gradients are computed.
    backward_solver : {"forward_iteration", "newton", "anderson", "broyden", "gmres"}, optional
        Solver for the adjoint fixed point ``g = J^T g + dL/dz*`` (implicit mode); by default the forward
        solver. Forward iteration, Anderson, Broyden and GMRES cost one vector-Jacobian product per step;
        Newton builds ``J`` and solves the linear system exactly in one step. Forward iteration converges only
        where ``J``'s spectral radius is below one, which Newton's forward solve does not require; GMRES
        (:func:`gmres`, backward only) needs only ``I - J`` invertible and keeps ``restart`` vectors per sample.
    tol, max_iter : float, int or None
        Forward tolerance and iteration limit (``None``: the solver's default).
    backward_tol : float, optional
        Tolerance of the adjoint solve relative to each sample's incoming gradient ``||dL/dz*||``; by default
        the square root of the dtype's machine epsilon (about 3e-4 in float32, 1.5e-8 in float64).
    backward_max_iter : int
        Iteration limit of the adjoint solve.
    strict : bool
        Raise instead of warning when the forward or the adjoint solve does not converge.
    warn : bool
        Warn when the forward or the adjoint solve does not converge; ``False`` skips the check (see
        :func:`forward_iteration`).
    solver_options, backward_solver_options : dict, optional
        Extra keyword arguments of the forward and adjoint solvers (for example ``{"m": 6}`` for Anderson,
        ``{"restart": 30}`` for GMRES).
    backward_callback : callable, optional
        Called with the :class:`SolverResult` of each adjoint solve.
    phantom_steps : int
        Number ``k`` of recorded damped steps in phantom mode (checked in every mode).
    phantom_damping : float
        Damping ``lam`` in (0, 1] of the phantom steps (checked in every mode).

    Returns
    -------
    z : torch.Tensor
        The fixed point. When autograd records, it is ``f(z*)`` in the implicit and jacobian_free modes and the
        last phantom step in phantom mode; under ``torch.no_grad()`` these three modes return the solver's
        ``z*`` and skip the extra applications of ``f``.
    result : SolverResult
        The forward solver's record.

    Raises
    ------
    UnsupportedDerivativeError
        When a gradient of the implicit backward pass is differentiated again (a second derivative): this
        route is first order, and the error replaces a wrong number. ``backward="unrolled"`` and
        :func:`implicit_layers.jax.fixed_point` give exact higher derivatives. The phantom and jacobian_free
        modes raise nothing here: their gradients are plain autograd through the recorded steps, so
        differentiating them again gives the exact derivative of that approximate gradient.

    Notes
    -----
    ``f`` must act on each sample independently: sample ``b`` of ``f(z)`` may depend on ``z[b]`` and on the
    parameters, not on other samples (batch normalization in training mode breaks this). The solver evaluates
    ``f`` on the whole batch at every step, so a map that mixes samples shows up as samples that lose their
    convergence, which the warning names.

    A sample whose forward or adjoint solve failed (a NaN/Inf step or a singular system, reported by a
    :class:`~implicit_layers.errors.ConvergenceWarning`) passes a zero gradient on in every mode but unrolled:
    the implicit function theorem, and the approximations built on it, say nothing at a point that is not a
    fixed point.

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
        return SOLVERS[solver](f, z0, **forward_options)

    with torch.no_grad():
        z_star, result = SOLVERS[solver](f, z0, **forward_options)
    # A solver that takes no step hands z0 itself back, which may require gradients.
    z_star = z_star.detach()
    if not torch.is_grad_enabled():
        return z_star, result
    if backward in ("phantom", "jacobian_free"):
        if backward == "jacobian_free":
            z = f(z_star)
        else:
            z, damping = z_star, derivative["phantom_damping"]
            for _ in range(derivative["phantom_steps"]):
                z = (1 - damping) * z + damping * f(z)
        # Failed samples keep their values and lose their gradient, as in implicit mode.
        return torch.where(per_sample(result.failed, z), z.detach(), z), result

    # One recorded application of f connects the solution to everything f uses; the hook then replaces the
    # gradient flowing into it by the solution of the adjoint fixed point.
    z = f(z_star)
    if not z.requires_grad:
        return z, result
    z_leaf = z_star.detach().requires_grad_()
    f_leaf = f(z_leaf)
    relative_tol = derivative["tol"] or torch.finfo(z.dtype).eps ** 0.5

    def transposed_jacobian_product(h: torch.Tensor) -> torch.Tensor:
        if not f_leaf.requires_grad:  # f does not depend on the state: its Jacobian is zero
            return torch.zeros_like(h)
        # A Newton backward solve needs no create_graph here: it differentiates this map in forward mode.
        (vjp,) = torch.autograd.grad(f_leaf, z_leaf, h, retain_graph=True, allow_unused=True)
        return torch.zeros_like(h) if vjp is None else vjp

    def adjoint_gradient(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if grad is None:  # autograd passes None when the output's gradient is undefined
            return None
        differentiable = torch.is_grad_enabled()  # the caller asked for create_graph=True
        # The adjoint system is linear, so solving it for grad / ||grad|| per sample turns the solver's absolute
        # tolerance into one relative to each sample's gradient.
        grad = grad.detach()
        scale = per_sample(grad.flatten(1).norm(dim=1), grad)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        rhs = grad / scale
        with torch.no_grad():
            h, adjoint_result = BACKWARD_SOLVERS[derivative["solver"]](
                lambda h: transposed_jacobian_product(h) + rhs,
                rhs,
                **derivative["options"],
                tol=relative_tol,
                max_iter=derivative["max_iter"],
                strict=derivative["strict"],
                warn=derivative["warn"],
            )
        if backward_callback is not None:
            backward_callback(adjoint_result)
        failed = per_sample(result.failed | adjoint_result.failed, h)
        gradient = torch.where(failed, torch.zeros_like(h), h * scale)
        return _FirstOrderOnly.apply(gradient, f_leaf) if differentiable else gradient

    z.register_hook(adjoint_gradient)
    return z, result


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the implicit gradient on and refuses to be differentiated.

    The gradient is computed at the solution with the solution and the adjoint treated as constants, so its
    derivative would miss how both move with the parameters: a silently wrong second derivative. The closure
    API cannot hand the parameters that ``f`` uses to an exact second-order rule, so differentiating again is
    an error instead. ``anchor`` (``f`` applied at the solution) links this node to every tensor ``f`` uses, so
    any second derivative with respect to them passes through it, even when the incoming gradient is constant.
    """

    @staticmethod
    def forward(ctx, gradient: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return gradient.clone()

    @staticmethod
    def backward(ctx, _: torch.Tensor) -> tuple[None, None]:
        raise UnsupportedDerivativeError(
            "fixed_point's implicit backward pass in PyTorch is first order: differentiating its gradient "
            "again (torch.autograd.grad(..., create_graph=True) followed by another backward pass) would "
            "return a wrong number. Use backward='unrolled' for higher derivatives, or "
            "implicit_layers.jax.fixed_point, whose implicit rule is exact to every order."
        )


class FixedPointLayer(nn.Module):
    """A layer whose output is the fixed point ``z* = f(z*, x)`` of a module ``f``.

    Parameters
    ----------
    f : nn.Module
        Called as ``f(z, x)``; maps a batch of states and inputs to a batch of states shaped like ``z``, acting
        on each sample independently. Its parameters are the layer's parameters.
    solver, backward, backward_solver, tol, max_iter, backward_tol, backward_max_iter, strict, warn
        As in :func:`fixed_point`.
    solver_options, backward_solver_options, phantom_steps, phantom_damping
        As in :func:`fixed_point`.

    Attributes
    ----------
    last_result : SolverResult or None
        The forward solver's record from the latest call.
    last_backward_result : SolverResult or None
        The adjoint solver's record from the latest implicit backward pass.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class TanhCell(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.linear = nn.Linear(n, n, bias=False)
    ...     def forward(self, z, x):
    ...         return torch.tanh(self.linear(z) + x)
    >>> layer = FixedPointLayer(TanhCell(8))
    >>> z = layer(torch.randn(4, 8))
    >>> layer.last_result.status
    'converged'
    """

    def __init__(
        self,
        f: nn.Module,
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
    ) -> None:
        super().__init__()
        self.f = f
        self.options = dict(
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
        check_fixed_point_options(SOLVERS, BACKWARD_MODES, BACKWARD_SOLVERS, **self.options)
        self.last_result: Optional[SolverResult] = None
        self.last_backward_result: Optional[SolverResult] = None

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return the fixed point for input ``x``, starting from ``z0`` (zeros shaped like ``x`` by default)."""
        check_batched_state("x", x)
        if z0 is None:
            z0 = torch.zeros_like(x)
        z, self.last_result = fixed_point(
            lambda z: self.f(z, x), z0, backward_callback=self._record_backward, **self.options
        )
        return z

    def _record_backward(self, result: SolverResult) -> None:
        self.last_backward_result = result

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
