"""Newton's method on the root ``g(z) = f(z) - z = 0``, with exact per-sample Jacobians."""

from __future__ import annotations

import torch

from ._loop import Map, solve_batched
from .._validation import compute_dtype
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
        ``d f(z)[b, i] / d z[b, j]`` on flattened samples. Built from ``d`` Jacobian-vector products (forward
        mode) batched with ``torch.func.vmap``, so ``f`` runs once on a stack of ``d`` tangents; forward mode,
        unlike ``torch.func.vjp``, also works under saved-tensor hooks such as
        :func:`~implicit_layers.torch.autograd_graph_bytes`. A map that does not depend on ``z`` has a zero
        Jacobian. When autograd is recording the result stays on the graph, so Newton can be unrolled.
    """
    batch, dim = z.flatten(1).shape
    basis = torch.eye(dim, dtype=z.dtype, device=z.device).unsqueeze(1).expand(dim, batch, dim)
    fz, columns = torch.func.vmap(lambda tangent: torch.func.jvp(f, (z,), (tangent,)), out_dims=(None, 0))(
        basis.reshape(dim, *z.shape)
    )
    return fz, columns.reshape(dim, batch, dim).permute(1, 2, 0)


def newton_step(f: Map, z: torch.Tensor) -> torch.Tensor:
    """One Newton step for ``f(z) - z = 0``: ``z - (J - I)^{-1} (f(z) - z)``, batched.

    The linear system is solved in float32 at least (16-bit states are upcast for it). A sample whose matrix
    ``J - I`` is singular gets a NaN step, which the solver loop reports as a failure.
    """
    fz, jacobian = batched_jacobian(f, z)
    batch, dtype = z.shape[0], compute_dtype(z.dtype)
    jacobian = jacobian.to(dtype)
    jacobian = jacobian - torch.eye(jacobian.shape[-1], dtype=dtype, device=z.device)
    residual = (fz.to(dtype) - z.to(dtype)).reshape(batch, -1, 1)
    delta, info = torch.linalg.solve_ex(jacobian, residual)
    delta = torch.where((info == 0).view(-1, 1, 1), delta, torch.full_like(delta, float("nan")))
    return z - delta.reshape(z.shape).to(z.dtype)


def newton(
    f: Map, z0: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 20, strict: bool = False, warn: bool = True
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
    strict, warn : bool
        As in :func:`implicit_layers.torch.forward_iteration`.

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
    return solve_batched("newton", f, z0, _newton_update, tol=tol, max_iter=max_iter, strict=strict, warn=warn)


def _newton_update(f: Map, z: torch.Tensor, fz: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
    return newton_step(f, z), None
