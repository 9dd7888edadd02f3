"""Anderson acceleration: extrapolate from the last ``m`` iterates instead of taking the newest image alone."""

from __future__ import annotations

import torch

from ..._checks import check_iteration_limit, check_tolerance, check_unit_interval
from ._loop import Map, records_graph, solve_batched
from .._validation import compute_dtype
from .result import SolverResult


def anderson(
    f: Map,
    z0: torch.Tensor,
    *,
    m: int = 5,
    ridge: float = 1e-4,
    damping: float = 1.0,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
) -> tuple[torch.Tensor, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map with Anderson acceleration.

    With the last ``n <= m`` iterates ``x_i`` and images ``f_i = f(x_i)``, residuals ``g_i = f_i - x_i``, the
    weights ``alpha`` minimize ``||sum_i alpha_i g_i||^2 + lambda ||alpha||^2`` subject to ``sum_i alpha_i = 1``,
    and the next iterate is ``damping * sum_i alpha_i f_i + (1 - damping) * sum_i alpha_i x_i``.

    The ridge ``lambda`` is ``ridge`` times the mean squared residual in the history, so it shrinks with the
    residuals: a fixed ridge comes to dominate the tiny Gram matrix near convergence and turns the method into
    slow plain iteration. A sample whose small system is singular or gives non-finite weights falls back to
    the damped plain step for that iteration.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape, dtype and device, acting on each
        sample independently.
    z0 : torch.Tensor
        Initial guess, shape (B, ...), floating point, finite.
    m : int
        History size.
    ridge : float
        Relative Tikhonov regularization of the least-squares problem for the weights.
    damping : float
        Mixing parameter ``beta`` in (0, 1]; 1 takes the extrapolated images only.
    tol : float
        Absolute tolerance on each sample's residual ``||f(z) - z||_2``.
    max_iter : int
        Most steps per sample.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` instead of warning when a sample does not converge.
    warn : bool
        As in :func:`implicit_layers.torch.forward_iteration`.

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
    m = check_iteration_limit("m", m)
    ridge = check_tolerance("ridge", ridge)
    damping = check_unit_interval("damping", damping)

    def update(f: Map, z: torch.Tensor, fz: torch.Tensor, state):
        batch, dtype = z.shape[0], compute_dtype(z.dtype)
        if state is None:
            history = torch.zeros(batch, m, z.flatten(1).shape[1], dtype=dtype, device=z.device)
            slot_masks = torch.eye(m, dtype=torch.bool, device=z.device)
            state = (history, history.clone(), torch.zeros(batch, m, dtype=torch.bool, device=z.device), slot_masks, 0)
        # The history keeps images f(x_i) and residuals g_i = f(x_i) - x_i; the iterates are their difference.
        images, residuals, valid, slot_masks, count = state
        slot = count % m
        image = fz.reshape(batch, -1).to(dtype)
        residual = image - z.reshape(batch, -1).to(dtype)
        if records_graph(z, fz):
            index = torch.tensor([slot], device=z.device)
            images = images.index_copy(1, index, image.unsqueeze(1))
            residuals = residuals.index_copy(1, index, residual.unsqueeze(1))
        else:  # no graph to keep intact: update the history in place instead of copying it every step
            images[:, slot] = image
            residuals[:, slot] = residual
        newest = slot_masks[slot]
        valid = valid | newest
        alpha = _mixing_weights(residuals, valid, ridge).unsqueeze(1)
        # damping * sum_i alpha_i f_i + (1 - damping) * sum_i alpha_i x_i, with x_i = f_i - g_i
        mixed = alpha @ images
        plain = image
        if damping < 1.0:
            mixed = mixed - (1.0 - damping) * (alpha @ residuals)
            plain = plain - (1.0 - damping) * residual
        # Safeguard: a sample whose small system is singular takes the plain damped step and restarts its
        # history from the newest pair.
        usable = torch.isfinite(alpha).all(dim=2)
        proposal = torch.where(usable, mixed.squeeze(1), plain).reshape(z.shape).to(z.dtype)
        valid = torch.where(usable, valid, newest)
        return proposal, (images, residuals, valid, slot_masks, count + 1)

    return solve_batched(
        "anderson", f, z0, update, tol=tol, max_iter=max_iter, strict=strict, warn=warn, state=None
    )


def _mixing_weights(residuals: torch.Tensor, valid: torch.Tensor, ridge: float) -> torch.Tensor:
    """Anderson weights per sample, shape (B, m): minimize ``||sum_i alpha_i g_i||^2 + lambda ||alpha||^2``
    subject to ``sum_i alpha_i = 1`` over the valid history slots; invalid slots get weight 0.

    The minimizer is ``alpha = (G G^T + lambda I)^{-1} 1`` normalized to sum to one, with ``lambda`` equal to
    ``ridge`` times the mean squared residual of the valid slots (1 when they are all zero, so a converged
    sample gets uniform weights instead of 0/0). Rows and columns of invalid slots are zeroed and their
    right-hand side is 0, which gives them weight 0. A singular system gives non-finite weights.
    """
    mask = valid.to(residuals.dtype)
    gram = torch.bmm(residuals, residuals.transpose(1, 2)) * (mask.unsqueeze(2) * mask.unsqueeze(1))
    diagonal = gram.diagonal(dim1=1, dim2=2)
    scale = diagonal.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
    diagonal += ridge * torch.where(scale > 0, scale, 1.0)
    weights = torch.linalg.solve_ex(gram, mask.unsqueeze(-1))[0].squeeze(-1)
    return weights / weights.sum(dim=1, keepdim=True)
