"""The batched primal-dual interior-point method behind ``qp``: Mehrotra's predictor-corrector on the homogeneous
self-dual embedding of the QP, so that one loop either solves a sample or finds a certificate that it is primal or
dual infeasible.

The embedding (as in Clarabel: Goulart and Chen, 2024) adds two scalars, tau and kappa, to the iterate
(x, s, lam, nu) and drives to zero

    r_x   = Qx + G'lam + A'nu + p tau
    r_lam = Gx + s - h tau
    r_nu  = Ax - b tau
    r_tau = kappa + p'x + h'lam + b'nu + x'Qx / tau

with s, lam, tau, kappa > 0 and s * lam, tau * kappa following the central path down to zero. If tau stays away
from zero, (x, s, lam, nu) / tau solves the QP; if it goes to zero, (lam, nu) or x becomes a certificate of
infeasibility. Each iteration factors one Newton matrix (``_kkt.factor_kkt``) and solves with it twice: once for
two right-hand sides together (the direction's part along tau and the affine predictor), once for the corrector.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._batch import per_sample
from ._kkt import bmtv, bmv, factor_kkt, largest, regularization, solve_kkt

SOLVED, MAX_ITER, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE, FAILED = range(5)
STEP_TO_BOUNDARY = 0.99  # the fraction of the longest step that keeps s, lam, tau, kappa positive


class Iterate(NamedTuple):
    x: torch.Tensor  # (B, n)
    s: torch.Tensor  # (B, m)
    lam: torch.Tensor  # (B, m)
    nu: torch.Tensor  # (B, e)
    tau: torch.Tensor  # (B,)
    kappa: torch.Tensor  # (B,)


class PDIPMOutput(NamedTuple):
    iterate: Iterate  # the final iterate, not yet divided by tau
    status: torch.Tensor  # (B,) int64, one of the codes above
    iterations: torch.Tensor  # (B,) int64
    num_factorizations: int


class Residuals(NamedTuple):
    x: torch.Tensor  # r_x (B, n)
    lam: torch.Tensor  # r_lam (B, m)
    nu: torch.Tensor  # r_nu (B, e)
    tau: torch.Tensor  # r_tau (B,)
    Qx: torch.Tensor  # Q x (B, n)
    xQx: torch.Tensor  # x'Qx (B,)


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(dim=-1)


def _largest_each(*vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``largest`` of each of several (B, k) tensors of one width k, in one pass over them all."""
    stacked = torch.stack(vectors, dim=1)
    if not stacked.shape[2]:
        return stacked.new_zeros(stacked.shape[:2]).unbind(1)
    return stacked.abs().amax(dim=2).unbind(1)


def _shift_into_cone(v: torch.Tensor) -> torch.Tensor:
    """Move each sample's vector into the positive orthant, with its smallest entry at least 1 if it was not
    already comfortably positive (Clarabel's start)."""
    if not v.shape[1]:
        return v
    smallest = v.amin(dim=1, keepdim=True)
    return torch.where(smallest < v.new_tensor(torch.finfo(v.dtype).eps ** 0.5), v + 1 - smallest, v)


def _row_scale(M: torch.Tensor) -> torch.Tensor:
    """One over the Euclidean norm of each row of M (B, r, n), shape (B, r); one for a zero row."""
    norms = torch.linalg.vector_norm(M, dim=2)
    return torch.where(norms > 0, 1 / norms, torch.ones_like(norms))


def _longest_step(iterate: Iterate, step: Iterate) -> torch.Tensor:
    """The largest alpha in (0, 1] per sample that keeps s, lam, tau and kappa positive along ``step``."""
    values = torch.cat([iterate.s, iterate.lam, iterate.tau[:, None], iterate.kappa[:, None]], dim=1)
    directions = torch.cat([step.s, step.lam, step.tau[:, None], step.kappa[:, None]], dim=1)
    ratios = torch.where(directions < 0, -values / directions, torch.ones_like(values))
    return ratios.amin(dim=1).clamp(max=1.0)


def _scaled(eta, value: torch.Tensor) -> torch.Tensor:
    """-eta * value per sample, where ``eta`` None stands for one (the predictor's, spared the multiplications)."""
    return -value if eta is None else -per_sample(eta, value) * value


def _solve_stacked(factor, iterate, residuals, p, h, b, r_s_lam, *, eta):
    """Solve the Newton matrix for the residuals' right-hand side (scaled by ``eta``, None for one, with the
    complementarity target ``r_s_lam``), preceded, when ``p`` is given, by the constant right-hand side
    [-p; h; b]."""
    sides = [(_scaled(eta, residuals.x), _scaled(eta, residuals.lam) + r_s_lam / iterate.lam, _scaled(eta, residuals.nu))]
    if p is not None:
        sides.insert(0, (-p, h, b))
    blocks = solve_kkt(factor, *(torch.stack(block, dim=1) for block in zip(*sides)))
    return [tuple(block[:, k] for block in blocks) for k in range(len(sides))]


def _complete(along_tau, direction, iterate, residuals, p, h, b, r_s_lam, r_tau_kappa, *, eta) -> Iterate:
    """The full step from a solve of the Newton matrix: dtau from the linearized r_tau row, then ds and dkappa
    from the linearized complementarity products."""
    x, s, lam, nu, tau, kappa = iterate
    # The gradient of x'Qx / tau in x, and minus its derivative in tau, enter the linearized r_tau row.
    slope = p + 2 * residuals.Qx / tau[:, None]
    numerator = (_scaled(eta, residuals.tau) + r_tau_kappa / tau
                 - _dot(slope, direction[0]) - _dot(h, direction[1]) - _dot(b, direction[2]))
    denominator = (_dot(slope, along_tau[0]) + _dot(h, along_tau[1]) + _dot(b, along_tau[2])
                   - kappa / tau - residuals.xQx / tau**2)
    dtau = numerator / denominator
    dx, dlam, dnu = (v + dtau[:, None] * u for v, u in zip(direction, along_tau))
    ds = -(r_s_lam + s * dlam) / lam
    dkappa = -(r_tau_kappa + kappa * dtau) / tau
    return Iterate(dx, ds, dlam, dnu, dtau, dkappa)


def initial_iterate(Q, p, G, h, A, b, delta: float) -> Iterate:
    """Clarabel's start: solve the KKT system with W = I, then shift s and lam into the positive orthant."""
    factor = factor_kkt(Q, G, A, torch.ones_like(h), delta)
    x, lam, nu = (v.squeeze(1) for v in solve_kkt(factor, -p.unsqueeze(1), h.unsqueeze(1), b.unsqueeze(1)))
    ones = torch.ones_like(p[:, 0])
    return Iterate(x, _shift_into_cone(-lam), _shift_into_cone(lam), nu, ones, ones.clone())


def _newton_step(Q, p, G, h, A, b, iterate: Iterate, residuals: Residuals, delta: float, smallest_W: float):
    """One predictor-corrector step from ``iterate``: the stepped iterate, and per sample whether the step could
    be taken (its factorization held and the stepped iterate is finite)."""
    x, s, lam, nu, tau, kappa = iterate
    factor = factor_kkt(Q, G, A, lam / (s + smallest_W * lam), delta)
    # One solve for two right-hand sides: [-p; h; b] gives each direction's part along tau, the residuals give
    # the affine (predictor) direction.
    along_tau, affine = _solve_stacked(factor, iterate, residuals, p, h, b, s * lam, eta=None)
    predictor = _complete(along_tau, affine, iterate, residuals, p, h, b, s * lam, tau * kappa, eta=None)
    alpha = _longest_step(iterate, predictor)
    mu = (_dot(s, lam) + tau * kappa) / (s.shape[1] + 1)
    sigma_mu = (1 - alpha) ** 3 * mu
    eta = 1 - (1 - alpha) ** 3
    # Mehrotra's corrector: aim at the central path, mu shrunk by sigma, and cancel the predictor's second-order
    # term in the complementarity products.
    r_s_lam = s * lam + predictor.s * predictor.lam - sigma_mu[:, None]
    r_tau_kappa = tau * kappa + predictor.tau * predictor.kappa - sigma_mu
    (corrector,) = _solve_stacked(factor, iterate, residuals, None, None, None, r_s_lam, eta=eta)
    step = _complete(along_tau, corrector, iterate, residuals, p, h, b, r_s_lam, r_tau_kappa, eta=eta)
    alpha = STEP_TO_BOUNDARY * _longest_step(iterate, step)
    stepped = Iterate(*(v + per_sample(alpha, v) * dv for v, dv in zip(iterate, step)))
    # A NaN or an infinity anywhere shows in the smallest or the largest entry.
    smallest, biggest = torch.aminmax(torch.cat([*stepped[:4], (stepped.tau * stepped.kappa)[:, None]], dim=1), dim=1)
    finite = ~factor.singular & torch.isfinite(smallest) & torch.isfinite(biggest)
    return stepped, finite


def pdipm(Q, p, G, h, A, b, *, tol: float, max_iter: int) -> PDIPMOutput:
    """Run the interior-point method on a batch of broadcast QPs (Q (B, n, n), p (B, n), G (B, m, n), h (B, m),
    A (B, e, n), b (B, e)). Samples stop one by one: a finished sample's iterate is frozen, and the loop ends when
    every sample has stopped (one read from the device per iteration). The iterations work on the samples still
    running only: a sample that stops leaves the working set, with its iterate, status and iteration count
    written back to the batch's, so the later factorizations and solves are not spent on it (each sample's
    arithmetic is its own, so which others share its batch changes none of its numbers).

    The method runs on the problem with every inequality row scaled to unit Euclidean norm (its right-hand side
    with it), and the iterate it returns is mapped back to the problem as given. Without that, a row much shorter
    than its right-hand side (a constraint far from the origin, written with small coefficients) could stall the
    iterations, for example at |g| = 0.06, h = 1 in two variables. Equality rows are left as given: scaled to
    unit norm, the learned equalities of the Sudoku layer (chapter 6) no longer converged in float32, the fixed
    regularization of the Schur complement then weighing more against its entries."""
    G_scale = _row_scale(G)
    G, h = G * G_scale[..., None], h * G_scale
    batch = p.shape[0]
    delta, smallest_W = regularization(p.dtype)
    iterate = initial_iterate(Q, p, G, h, A, b, delta)
    status = torch.full((batch,), MAX_ITER, dtype=torch.int64, device=p.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=p.device)
    running = torch.ones(batch, dtype=torch.bool, device=p.device)
    problem = (Q, p, G, h, A, b, largest(p), largest(h), largest(b))
    index = torch.arange(batch, device=p.device)  # each working sample's place in the batch
    # The batch's results, each sample's written when it leaves the working set, which every sample does once.
    final = [torch.empty_like(v) for v in (*iterate, status, iterations)]
    num_factorizations = 1
    for _ in range(max_iter + 1):
        Q, p, G, h, A, b, p_size, h_size, b_size = problem
        x, s, lam, nu, tau, kappa = iterate
        Qx, Gx, Ax = bmv(Q, x), bmv(G, x), bmv(A, x)
        Gt_lam, At_nu = bmtv(G, lam), bmtv(A, nu)
        xQx, p_x, h_lam, b_nu = _dot(x, Qx), _dot(p, x), _dot(h, lam), _dot(b, nu)
        residuals = Residuals(
            Qx + Gt_lam + At_nu + p * tau[:, None],
            Gx + s - h * tau[:, None],
            Ax - b * tau[:, None],
            kappa + p_x + h_lam + b_nu + xQx / tau,
            Qx,
            xQx,
        )

        # Stopping tests, on the candidate solution (divided by tau) and on the certificates (not divided).
        Gt_lam_At_nu, Gx_s = Gt_lam + At_nu, Gx + s
        largest_r_x, largest_Qx, largest_Gt_lam_At_nu, largest_x = _largest_each(residuals.x, Qx, Gt_lam_At_nu, x)
        largest_r_lam, largest_Gx, largest_s, largest_lam, largest_Gx_s = _largest_each(residuals.lam, Gx, s, lam, Gx_s)
        largest_r_nu, largest_Ax, largest_nu = _largest_each(residuals.nu, Ax, nu)
        primal_residual = torch.maximum(largest_r_lam, largest_r_nu) / tau
        dual_residual = largest_r_x / tau
        primal_objective = (0.5 * xQx / tau + p_x) / tau
        dual_objective = (-0.5 * xQx / tau - h_lam - b_nu) / tau
        gap = (primal_objective - dual_objective).abs()
        solved = (
            (primal_residual <= tol * (1 + torch.maximum(torch.maximum(largest_Gx, largest_Ax) / tau,
                                                         torch.maximum(torch.maximum(largest_s / tau, h_size), b_size))))
            & (dual_residual <= tol * (1 + torch.maximum(torch.maximum(largest_Qx, largest_Gt_lam_At_nu) / tau, p_size)))
            & (gap <= tol * (1 + torch.minimum(primal_objective.abs(), dual_objective.abs())))
        )
        h_lam_b_nu = h_lam + b_nu
        primal_infeasible = (h_lam_b_nu < -tol * torch.maximum(largest_lam, largest_nu)) & (
            largest_Gt_lam_At_nu <= -tol * h_lam_b_nu
        )
        dual_infeasible = (p_x < -tol * largest_x) & (
            torch.maximum(largest_Qx, torch.maximum(largest_Gx_s, largest_Ax)) <= -tol * p_x
        )
        for code, flag in ((DUAL_INFEASIBLE, dual_infeasible), (PRIMAL_INFEASIBLE, primal_infeasible), (SOLVED, solved)):
            status = torch.where(running & flag, code, status)
        running = running & ~(solved | primal_infeasible | dual_infeasible)
        kept = running.nonzero().squeeze(1)
        if kept.numel() < running.numel() or _ == max_iter:
            for value, working in zip(final, (*iterate, status, iterations)):
                value.index_copy_(0, index, working)
            if not kept.numel() or _ == max_iter:
                break
            index, status, iterations, running = (v.index_select(0, kept) for v in (index, status, iterations, running))
            problem = tuple(v.index_select(0, kept) for v in problem)
            iterate, residuals = (type(v)(*(w.index_select(0, kept) for w in v)) for v in (iterate, residuals))

        stepped, finite = _newton_step(*problem[:6], iterate, residuals, delta, smallest_W)
        num_factorizations += 1
        status = torch.where(running & ~finite, FAILED, status)
        running = running & finite
        iterate = Iterate(*(torch.where(per_sample(running, new), new, old) for new, old in zip(stepped, iterate)))
        iterations = iterations + running
    iterate = Iterate(*final[:6])
    iterate = iterate._replace(s=iterate.s / G_scale, lam=iterate.lam * G_scale)
    return PDIPMOutput(iterate, *final[6:], num_factorizations)
