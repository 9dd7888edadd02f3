"""The batched loop every fixed-point solver shares: per-sample stopping, residual trace, warnings."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import report_convergence
from .._checks import check_iteration_limit, check_tolerance
from ._validation import check_batched_state, check_map_output
from .result import SolverResult

Map = Callable[[torch.Tensor], torch.Tensor]
Update = Callable[[Map, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]
"""``update(f, z, f(z), state) -> (proposal, state)``: one step of a method; ``state`` carries its memory."""


def residual_norm(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm of ``f(z) - z`` over all but the batch dimension.

    Computed on detached tensors: residuals only steer the loop, and recording them would make unrolled
    differentiation keep two extra batches of states per step.
    """
    return (fz.detach() - z.detach()).flatten(1).norm(dim=1)


def solve_batched(
    name: str,
    f: Map,
    z0: torch.Tensor,
    update: Update,
    *,
    tol: float,
    max_iter: int,
    strict: bool,
    state: Any = None,
) -> tuple[torch.Tensor, SolverResult]:
    """Iterate ``z <- update(f, z, f(z), state)`` on each sample until its residual ``||f(z) - z||`` drops
    below ``tol``; ``state`` starts as given (methods with memory allocate it on their first update) and is
    threaded through the updates.

    Stopped samples are frozen with ``torch.where`` rather than removed from the batch, so shapes stay fixed and
    the only host synchronization per step is the check whether any sample is still running.
    """
    check_batched_state("z0", z0)
    check_tolerance("tol", tol)
    check_iteration_limit("max_iter", max_iter)

    nfe = 0

    def counted(state: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return f(state)

    z = z0
    fz = counted(z)
    check_map_output(fz, z0)
    residual = residual_norm(fz, z)
    trace = [residual]
    iterations = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
    failed = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    active = residual >= tol

    # Record the steps only if the map's output needs gradients at all; otherwise Newton's Jacobians would
    # build graphs that nothing uses.
    with torch.set_grad_enabled(fz.requires_grad):
        for _ in range(max_iter):
            if not bool(active.any()):
                break
            proposal, state = update(counted, z, fz, state)
            finite = torch.isfinite(proposal.detach()).flatten(1).all(dim=1)
            failed = failed | (active & ~finite)
            stepping = active & finite
            z = torch.where(per_sample(stepping, z), proposal, z)
            fz = counted(z)
            new_residual = residual_norm(fz, z)
            failed = failed | (stepping & ~torch.isfinite(new_residual))
            stepping = stepping & ~failed
            residual = torch.where(stepping, new_residual, residual)
            iterations = iterations + stepping
            trace.append(residual)
            active = stepping & (residual >= tol)

    result = SolverResult(
        iterations=iterations,
        residuals=torch.stack(trace),
        converged=residual < tol,
        failed=failed,
        nfe=nfe,
    )
    _report(name, result, tol=tol, max_iter=max_iter, strict=strict)
    return z, result


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View per-sample ``values`` of shape (B,) so they broadcast against ``like`` of shape (B, ...)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _report(name: str, result: SolverResult, *, tol: float, max_iter: int, strict: bool) -> None:
    report_convergence(
        name,
        result.converged.cpu().numpy(),
        result.residual.cpu().numpy(),
        result.failed.cpu().numpy(),
        tol=tol,
        max_iter=max_iter,
        strict=strict,
        stacklevel=4,
    )
