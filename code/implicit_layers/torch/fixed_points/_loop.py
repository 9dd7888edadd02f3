"""The batched loop every fixed-point solver shares: per-sample stopping, residual trace, warnings."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..._checks import check_flag, check_iteration_limit, check_tolerance
from ...errors import report_convergence
from .._batch import per_sample
from .._validation import check_batched_state, check_map_output, compute_dtype
from .result import SolverResult

Map = Callable[[torch.Tensor], torch.Tensor]
Update = Callable[[Map, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]
"""``update(f, z, f(z), state) -> (proposal, state)``: one step of a method; ``state`` carries its memory."""


def residual_norm(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm of ``f(z) - z`` over all but the batch dimension, in float32 at least.

    Computed on detached tensors: residuals only steer the loop, and recording them would make unrolled
    differentiation keep two extra batches of states per step.
    """
    dtype = compute_dtype(z.dtype)
    return (fz.detach().flatten(1).to(dtype) - z.detach().flatten(1).to(dtype)).norm(dim=1)


def solve_batched(
    name: str,
    f: Map,
    z0: torch.Tensor,
    update: Update,
    *,
    tol: float,
    max_iter: int,
    strict: bool,
    warn: bool = True,
    state: Any = None,
) -> tuple[torch.Tensor, SolverResult]:
    """Iterate ``z <- update(f, z, f(z), state)`` on each sample until its residual ``||f(z) - z||`` drops
    below ``tol``; ``state`` starts as given (methods with memory allocate it on their first update) and is
    threaded through the updates.

    Stopped samples are frozen with ``torch.where`` rather than removed from the batch, so shapes stay fixed and
    the only host synchronization per step is the check whether any sample is still running. Every evaluation
    of ``f`` covers the whole batch, so each recorded residual is that of the batch as it stands: a map that
    mixes samples cannot make a frozen sample look converged. A sample whose step makes ``f`` non-finite keeps
    its last finite iterate and is marked failed.
    """
    check_batched_state("z0", z0)
    tol = check_tolerance("tol", tol)
    max_iter = check_iteration_limit("max_iter", max_iter)
    strict = check_flag("strict", strict)
    warn = check_flag("warn", warn)

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
            running = int(active.sum())  # the loop's one host synchronization per step
            if running == 0:
                break
            proposal, state = update(counted, z, fz, state)
            candidate = proposal if running == len(active) else torch.where(per_sample(active, z), proposal, z)
            image = counted(candidate)
            new_residual = residual_norm(image, candidate)
            # A non-finite proposal or image makes the residual non-finite: one check covers both.
            broke = ~torch.isfinite(new_residual)
            failed = failed | (active & broke)
            keep = per_sample(broke, z)
            z = torch.where(keep, z, candidate)
            fz = torch.where(keep, fz, image)
            residual = torch.where(broke, residual, new_residual)
            stepping = active & ~broke
            iterations = iterations + stepping
            trace.append(residual)
            active = stepping & (residual >= tol)

    residuals = torch.stack(trace)
    converged = (residual < tol) & ~failed
    drifted = (residuals < tol).any(dim=0) & ~converged & ~failed
    result = SolverResult(
        iterations=iterations,
        residuals=residuals,
        converged=converged,
        failed=failed,
        nfe=nfe,
    )
    if not (warn or strict):
        return z, result
    report_convergence(
        name,
        *(flags.cpu().numpy() for flags in (converged, residual, failed, drifted)),
        tol=tol,
        max_iter=max_iter,
        strict=strict,
        stacklevel=3,
    )
    return z, result


def records_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd is recording operations on ``tensors``: a solver's memory must then be copied, not
    updated in place, so that the graph keeps the values it saved."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)

