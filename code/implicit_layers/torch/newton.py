"""Newton's method on the root ``g(z) = f(z) - z = 0``, with exact per-sample Jacobians."""

from __future__ import annotations

import torch

from ._loop import Map, solve_batched
from .result import SolverResult


def batched_jacobian(f: Map, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate a batched map and its per-sample Jacobians.

    Parameters
    ----------
    f : callable
        Maps (B, ...) to (B, ...), acting on each sample independently (so the Jacobian of the batch is block
        diagonal and the blocks are all that is computed).
    z : torch.Tensor
        Where to evaluate, shape (B, ...).

    Returns
    -------
    fz : torch.Tensor
        ``f(z)``, shape of ``z``.
    jacobian : torch.Tensor
        Shape (B, d, d) with ``d`` the number of elements of one sample: ``jacobian[b, i, j]`` is
        ``d f(z)[b, i] / d z[b, j]`` on flattened samples. Built from ``d`` vector-Jacobian products batched with
        ``vmap``; it stays on the autograd graph when autograd is recording, so Newton can be unrolled.
    """
    differentiable = torch.is_grad_enabled()
    batch, dim = z.shape[0], z[0].numel()
    with torch.enable_grad():
        point = z if z.requires_grad else z.detach().requires_grad_()
        fz = f(point)
        basis = torch.eye(dim, dtype=z.dtype, device=z.device).unsqueeze(1).expand(dim, batch, dim)
        rows = torch.autograd.grad(
            fz.reshape(batch, dim),
            point,
            basis,
            is_grads_batched=True,
            create_graph=differentiable,
            allow_unused=True,
        )[0]
    if rows is None:  # f does not depend on z at all
        rows = torch.zeros(dim, *z.shape, dtype=z.dtype, device=z.device)
    jacobian = rows.reshape(dim, batch, dim).transpose(0, 1)
    return (fz if differentiable else fz.detach()), (jacobian if differentiable else jacobian.detach())


def newton_step(f: Map, z: torch.Tensor) -> torch.Tensor:
    """One Newton step for ``f(z) - z = 0``: ``z - (J - I)^{-1} (f(z) - z)``, batched.

    A sample whose matrix ``J - I`` is singular gets a NaN step, which the solver loop reports as a failure.
    """
    fz, jacobian = batched_jacobian(f, z)
    batch = z.shape[0]
    identity = torch.eye(jacobian.shape[-1], dtype=z.dtype, device=z.device)
    residual = (fz - z).reshape(batch, -1, 1)
    delta, info = torch.linalg.solve_ex(jacobian - identity, residual)
    delta = torch.where((info == 0).view(-1, 1, 1), delta, torch.full_like(delta, float("nan")))
    return z - delta.reshape(z.shape)


def newton(
    f: Map, z0: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 20, strict: bool = False
) -> tuple[torch.Tensor, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map with Newton's method.

    Each step builds every sample's Jacobian by automatic differentiation and solves a ``d x d`` linear system,
    so it suits states of up to a few hundred elements per sample. Near a fixed point where ``I - J`` is
    invertible it converges quadratically; far from one it may diverge (no line search). Each sample stops on its
    own once ``||f(z) - z||_2 < tol``. Gradients flow through the steps, Jacobians included, when autograd is
    recording (unrolled Newton); wrap the call in ``torch.no_grad()`` otherwise.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape, dtype and device, acting on each
        sample independently.
    z0 : torch.Tensor
        Initial guess, shape (B, ...), floating point, finite.
    tol : float
        Absolute tolerance on each sample's residual ``||f(z) - z||_2``.
    max_iter : int
        Most Newton steps per sample.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` instead of warning when a sample does not converge.

    Returns
    -------
    z : torch.Tensor
        The last iterate, shape of ``z0``.
    result : SolverResult
        Iterations, residual trace and convergence flags per sample. ``nfe`` counts every evaluation of ``f``:
        two per step, one for the Jacobian and one for the new residual.

    Warns
    -----
    ConvergenceWarning
        When some sample does not reach ``tol``; the message gives the largest residual reached.
    """
    return solve_batched("newton", f, z0, _newton_update, tol=tol, max_iter=max_iter, strict=strict)


def _newton_update(f: Map, z: torch.Tensor, fz: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
    return newton_step(f, z), None
