"""Forward (Picard) iteration ``z <- f(z)``."""

from __future__ import annotations

import torch

from ._loop import Map, solve_batched
from .result import SolverResult


def forward_iteration(
    f: Map, z0: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 100, strict: bool = False, warn: bool = True
) -> tuple[torch.Tensor, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map by iterating it.

    Converges linearly when ``f`` is a contraction; each sample stops on its own once its residual
    ``||f(z) - z||_2`` is below ``tol``. Gradients flow through the iterations when autograd is recording
    (that is unrolled differentiation); wrap the call in ``torch.no_grad()`` otherwise.

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
        Most steps per sample.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` instead of warning when a sample does not converge.
    warn : bool
        Check convergence after the solve and warn about samples that missed (the check costs one transfer of
        four small per-sample arrays to the host). ``False`` skips it; the result record still says which
        samples converged. ``strict=True`` checks regardless.

    Returns
    -------
    z : torch.Tensor
        The last iterate, shape of ``z0``.
    result : SolverResult
        Iterations, residual trace and convergence flags per sample.

    Warns
    -----
    ConvergenceWarning
        When some sample does not reach ``tol``; the message gives the largest residual reached.
    """
    return solve_batched(
        "forward_iteration", f, z0, _picard_update, tol=tol, max_iter=max_iter, strict=strict, warn=warn
    )


def _picard_update(f: Map, z: torch.Tensor, fz: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
    return fz, None
