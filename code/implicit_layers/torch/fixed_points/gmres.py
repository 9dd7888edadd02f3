"""Restarted GMRES for the fixed point of an affine map: the Krylov solver of the implicit backward pass."""

from __future__ import annotations

import torch

from ..._checks import check_flag, check_iteration_limit, check_tolerance
from ...errors import report_convergence
from ._loop import Map
from .._validation import check_batched_state, check_map_output, compute_dtype
from .result import SolverResult


def gmres(
    f: Map,
    z0: torch.Tensor,
    *,
    restart: int = 20,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
) -> tuple[torch.Tensor, SolverResult]:
    """Find the fixed point ``z = f(z)`` of a batched affine map ``f(z) = A z + b`` with restarted GMRES.

    The fixed point solves the linear system ``(I - A) z = b``, with ``b = f(0)`` and ``(I - A) v = v - f(v)
    + b``. From the residual ``r = f(x) - x`` of the current iterate, each sample builds its own Krylov basis
    ``r, (I - A) r, (I - A)^2 r, ...`` (Arnoldi with classical Gram-Schmidt applied twice) and takes the
    correction in it that minimizes its residual; after ``restart`` steps the basis is dropped and rebuilt from
    the new residual. Unlike forward iteration on the same map, which needs the spectral radius of ``A`` below
    one, GMRES converges whenever ``I - A`` is invertible (within ``restart`` steps of a d-dimensional state
    when ``restart >= d``); restarts can stall on hard non-normal systems, which a larger ``restart`` cures.

    ``fixed_point`` uses it as ``backward_solver="gmres"`` for the adjoint system, whose map is affine; a
    nonlinear ``f`` gets no meaningful answer, so it is not a forward solver. It records no autograd graph
    (its output does not require gradients): differentiate a linear solve through ``fixed_point``'s implicit
    backward pass instead.

    Parameters
    ----------
    f : callable
        Affine map from a batch of states (B, ...) to a batch of the same shape, dtype and device, acting on
        each sample independently. Each step evaluates it once, on the whole batch (one vector-Jacobian product
        per step in the implicit backward pass).
    z0 : torch.Tensor
        Initial guess, shape (B, ...), floating point, finite.
    restart : int
        Most Krylov vectors per sample before a restart; capped at the number of elements of one sample, where
        the Krylov space is complete. Memory grows as ``B * (restart + 1) * d``.
    tol : float
        Absolute tolerance on each sample's residual ``||f(z) - z||_2``.
    max_iter : int
        Most Arnoldi steps (evaluations of ``f`` inside the Krylov bases) per sample, over all restarts.
    strict, warn : bool
        As in :func:`implicit_layers.torch.forward_iteration`.

    Returns
    -------
    z : torch.Tensor
        The last iterate, shape of ``z0``.
    result : SolverResult
        ``iterations`` counts each sample's Arnoldi steps. Row 0 of ``residuals`` is the true initial residual;
        a row inside a restart cycle holds GMRES's own estimate of the residual (the least-squares residual,
        equal to the true one in exact arithmetic); the row that ends a cycle, and therefore the last row, is the
        true residual ``||f(z) - z||`` of the whole batch, recomputed from ``f``. A sample converges when its
        true residual is below ``tol``; a sample whose estimate met ``tol`` and whose true residual did not
        starts a new cycle. A sample whose least-squares system turns singular (a pivot no larger than the
        rounding error of ``v - f(v) + b``: ``I - A`` is singular on its Krylov space) or whose correction is
        not finite keeps its previous iterate and is marked failed. ``nfe`` counts ``f(0)``, ``f(z0)``, one
        evaluation per step and one per cycle.

    Warns
    -----
    ConvergenceWarning
        When some sample does not reach ``tol``; the message gives the largest true residual reached.
    """
    check_batched_state("z0", z0)
    restart = check_iteration_limit("restart", restart)
    tol = check_tolerance("tol", tol)
    max_iter = check_iteration_limit("max_iter", max_iter)
    strict = check_flag("strict", strict)
    warn = check_flag("warn", warn)
    with torch.no_grad():
        z, result, drifted = _restarted_gmres(f, z0, restart=restart, tol=tol, max_iter=max_iter)
    if warn or strict:
        report_convergence(
            "gmres",
            *(flags.cpu().numpy() for flags in (result.converged, result.residual, result.failed, drifted)),
            tol=tol,
            max_iter=max_iter,
            strict=strict,
            stacklevel=2,
        )
    return z, result


def _restarted_gmres(
    f: Map, z0: torch.Tensor, *, restart: int, tol: float, max_iter: int
) -> tuple[torch.Tensor, SolverResult, torch.Tensor]:
    """The solve of :func:`gmres` on checked arguments; also returns which samples met ``tol`` and lost it."""
    batch, dim = z0.flatten(1).shape
    dtype, device = compute_dtype(z0.dtype), z0.device
    basis_size = min(restart, dim)
    nfe = 0

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return f(x.reshape(z0.shape).to(z0.dtype)).flatten(1).to(dtype)

    offset = f(torch.zeros_like(z0))
    nfe += 1
    check_map_output(offset, z0)
    offset = offset.flatten(1).to(dtype)
    offset_norm, eps = offset.norm(dim=1), torch.finfo(dtype).eps

    x = z0.flatten(1).to(dtype)
    residual_vector = evaluate(x) - x
    residual = residual_vector.norm(dim=1)
    trace = [residual]
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    failed = ~torch.isfinite(residual)
    met = residual < tol
    active = ~failed & ~met
    steps = 0
    while steps < max_iter and int(active.sum()) > 0:  # one host synchronization per cycle
        basis = torch.zeros(batch, basis_size + 1, dim, dtype=dtype, device=device)
        rotated = torch.zeros(batch, basis_size + 1, basis_size, dtype=dtype, device=device)
        # The product of the Givens rotations so far, which turn the Hessenberg matrix into the triangle R: one
        # batched product rotates a new column, and ||r|| times its first column is the rotated right-hand side
        # ||r|| e_1, whose entry past the last column is the residual of the minimizing correction.
        rotations = torch.eye(basis_size + 1, dtype=dtype, device=device).repeat(batch, 1, 1)
        start = torch.where(active, residual, torch.zeros_like(residual))
        basis[:, 0] = residual_vector / torch.where(start > 0, start, torch.ones_like(start)).unsqueeze(1)
        in_cycle = active.clone()
        singular = torch.zeros_like(active)
        cycle_steps = torch.zeros(batch, dtype=torch.int64, device=device)
        taken = 0
        for j in range(min(basis_size, max_iter - steps)):
            if j > 0 and int(in_cycle.sum()) == 0:  # the loop's one host synchronization per step
                break
            direction = basis[:, j]
            direction_image = evaluate(direction)
            image = direction - direction_image + offset
            # The rounding error of v - f(v) + b, below which a pivot of R cannot be told from zero.
            noise = 8 * eps * (1 + direction_image.norm(dim=1) + offset_norm)
            column = torch.zeros(batch, basis_size + 1, dtype=dtype, device=device)
            for _ in range(2):  # a second pass restores the orthogonality that one classical pass loses
                coefficients = torch.bmm(basis[:, : j + 1], image.unsqueeze(2)).squeeze(2)
                image = image - torch.bmm(coefficients.unsqueeze(1), basis[:, : j + 1]).squeeze(1)
                column[:, : j + 1] += coefficients
            length = image.norm(dim=1)
            column[:, j + 1] = length
            # A zero length means the Krylov space is invariant: the correction below is exact.
            basis[:, j + 1] = image / torch.where(length > 0, length, torch.ones_like(length)).unsqueeze(1)
            column = torch.bmm(rotations, column.unsqueeze(2)).squeeze(2)
            norm = torch.hypot(column[:, j], column[:, j + 1])
            safe = torch.where(norm > 0, norm, torch.ones_like(norm))
            cosine = torch.where(norm > 0, column[:, j] / safe, torch.ones_like(norm)).unsqueeze(1)
            sine = torch.where(norm > 0, column[:, j + 1] / safe, torch.zeros_like(norm)).unsqueeze(1)
            column[:, j], column[:, j + 1] = norm, 0.0
            rotated[:, :, j] = torch.where(in_cycle.unsqueeze(1), column, torch.zeros_like(column))
            row, next_row = rotations[:, j], rotations[:, j + 1]
            rotated_row, rotated_next_row = cosine * row + sine * next_row, cosine * next_row - sine * row
            rotations[:, j] = torch.where(in_cycle.unsqueeze(1), rotated_row, row)
            rotations[:, j + 1] = torch.where(in_cycle.unsqueeze(1), rotated_next_row, next_row)
            estimate = start * rotations[:, j + 1, 0].abs()
            iterations = iterations + in_cycle
            cycle_steps = cycle_steps + in_cycle
            trace.append(torch.where(in_cycle, estimate, trace[-1]))
            singular = singular | (in_cycle & (norm <= noise))
            in_cycle = in_cycle & (estimate >= tol) & ~singular
            taken = j + 1
        steps += taken

        projected = start.unsqueeze(1) * rotations[:, :, 0]
        correction = _least_squares_correction(basis, rotated, projected, cycle_steps, taken)
        candidate = x + correction
        candidate_residual_vector = evaluate(candidate) - candidate
        candidate_residual = candidate_residual_vector.norm(dim=1)
        broke = active & (singular | ~torch.isfinite(candidate_residual))
        failed = failed | broke
        x = torch.where(broke.unsqueeze(1), x, candidate)
        residual_vector = torch.where(broke.unsqueeze(1), residual_vector, candidate_residual_vector)
        residual = torch.where(broke, residual, candidate_residual)
        trace[-1] = residual
        met = met | (residual < tol)
        active = active & ~broke & (residual >= tol)

    converged = (residual < tol) & ~failed
    result = SolverResult(
        iterations=iterations, residuals=torch.stack(trace), converged=converged, failed=failed, nfe=nfe
    )
    return x.reshape(z0.shape).to(z0.dtype), result, met & ~converged & ~failed


def _least_squares_correction(
    basis: torch.Tensor, rotated: torch.Tensor, projected: torch.Tensor, cycle_steps: torch.Tensor, taken: int
) -> torch.Tensor:
    """Each sample's correction ``V y`` with ``R y = g`` over the ``cycle_steps`` columns it built.

    Columns a sample did not build are zero in ``R``; a unit diagonal and a zero right-hand side there give
    them ``y = 0``, so one batched triangular solve serves samples with different numbers of steps. An exactly
    singular ``R`` gives a non-finite correction, which the caller reports as a failure.
    """
    triangle = rotated[:, :taken, :taken]
    built = torch.arange(taken, device=basis.device) < cycle_steps.unsqueeze(1)
    diagonal = torch.where(built, triangle.diagonal(dim1=1, dim2=2), torch.ones_like(built, dtype=triangle.dtype))
    triangle = triangle.clone()
    triangle.diagonal(dim1=1, dim2=2).copy_(diagonal)
    rhs = torch.where(built, projected[:, :taken], torch.zeros_like(projected[:, :taken]))
    coefficients = torch.linalg.solve_triangular(triangle, rhs.unsqueeze(2), upper=True).squeeze(2)
    # Masked, so that a vector of a basis a sample did not use cannot bring a NaN into its correction.
    used = torch.where(built.unsqueeze(2), basis[:, :taken], torch.zeros_like(basis[:, :taken]))
    return torch.bmm(coefficients.unsqueeze(1), used).squeeze(1)
