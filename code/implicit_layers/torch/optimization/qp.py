"""``qp``: a batch of convex quadratic programs solved by an interior-point method and differentiated through their
KKT conditions (OptNet)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_qp_options, check_qp_shapes
from ...errors import UnsupportedDerivativeError, report_qp_status
from .._validation import all_finite
from ._kkt import bmv, factor_kkt, kkt_residual, regularization, solve_kkt_refined
from .pdipm import DUAL_INFEASIBLE, PRIMAL_INFEASIBLE, largest, pdipm
from .result import QPResult

DEFAULT_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
BACKWARD_REFINEMENTS = 3  # iterative-refinement rounds that take the regularization out of the backward solve


def qp(
    Q: torch.Tensor,
    p: torch.Tensor,
    G: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None,
    A: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    tol: Optional[float] = None,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
) -> tuple[torch.Tensor, QPResult]:
    """Solve ``min 1/2 x'Qx + p'x subject to Gx <= h, Ax = b`` for each sample of a batch, differentiably.

    Parameters
    ----------
    Q : torch.Tensor
        Symmetric positive semidefinite, shape (n, n) or (B, n, n).
    p : torch.Tensor
        Shape (n,) or (B, n).
    G, h : torch.Tensor, optional
        Inequalities ``G x <= h``: shapes (m, n) or (B, m, n), and (m,) or (B, m). Both or neither.
    A, b : torch.Tensor, optional
        Equalities ``A x = b``: shapes (e, n) or (B, e, n), and (e,) or (B, e). Both or neither.
    tol : float, optional
        Stopping tolerance on the residuals and the duality gap, each relative to the size of its terms (plus
        one); also the tolerance of the infeasibility certificates. Defaults to 1e-9 in float64, 1e-5 in float32.
    max_iter : int
        Interior-point iterations before a sample is reported as ``"max_iter"``.
    strict : bool
        Raise :class:`ConvergenceError` instead of warning when a sample is not solved.
    warn : bool
        Warn (``ConvergenceWarning``) naming the samples not solved and why.

    Returns
    -------
    x : torch.Tensor
        The solutions, shape (B, n) (B = 1 when no argument has a batch dimension). NaN for a sample found
        infeasible or unbounded, which has no solution.
    result : QPResult
        Multipliers, slacks, iterations, residuals and gap reached, and each sample's status.

    Notes
    -----
    Every argument may be shared by the batch or given per sample. Each sample runs Mehrotra's predictor-corrector
    on the homogeneous self-dual embedding (see ``pdipm``) until it is solved or certified infeasible; finished
    samples are frozen while the others go on.

    Gradients reach every argument through the implicit function theorem applied to the KKT conditions at the
    solution (Amos and Kolter, 2017): one factorization of the Newton matrix there, one solve per backward pass.
    The backward pass reads the active set off the solution (a constraint whose multiplier exceeds its slack
    holds with equality) and is exact for it. Where a constraint is weakly active (its multiplier and its slack
    both zero) the solution is not differentiable; the gradient returned there is that of the active set the
    solution shows, one of the one-sided derivatives. A constraint whose multiplier is below about the square
    root of the tolerance reached cannot be told apart from a weakly active one. Second derivatives raise
    :class:`UnsupportedDerivativeError`. Samples found infeasible get NaN gradients.
    """
    tensors = dict(Q=Q, p=p, G=G, h=h, A=A, b=b)
    batch, n, m, e = check_qp_shapes({name: None if v is None else _shape(name, v) for name, v in tensors.items()})
    dtype, device = _check_dtype_and_device(tensors)
    options = check_qp_options(tol=DEFAULT_TOL[dtype] if tol is None else tol, max_iter=max_iter, strict=strict, warn=warn)
    for name, value in tensors.items():
        if value is not None and not all_finite(value):
            raise ValueError(f"{name} contains NaN or Inf")
    _check_positive_semidefinite(Q)

    def batched(value: Optional[torch.Tensor], rows: int, vector: bool) -> torch.Tensor:
        if value is None:
            return torch.zeros((batch, rows) if vector else (batch, rows, n), dtype=dtype, device=device)
        return value.expand(batch, *value.shape[-(1 if vector else 2):])

    Q, p, G, h, A, b = (batched(v, size, vector) for v, size, vector in
                        ((Q, n, False), (p, n, True), (G, m, False), (h, m, True), (A, e, False), (b, e, True)))
    with torch.no_grad():
        Q_symmetric = 0.5 * (Q + Q.mT)
        output = pdipm(Q_symmetric, p, G, h, A, b, tol=options["tol"], max_iter=options["max_iter"])
        x, slack, lam, nu, tau, _ = output.iterate
        x, slack, lam, nu = (v / tau[:, None] for v in (x, slack, lam, nu))
        residual = kkt_residual(Q_symmetric, p, G, h, A, b, x, lam, nu, slack)
        gap = ((x * bmv(Q_symmetric, x)).sum(1) + (p * x).sum(1) + (h * lam).sum(1)
               + (b * nu).sum(1)).abs()
        certificate = output.iterate.lam, output.iterate.nu
        scale = torch.maximum(largest(certificate[0]), largest(certificate[1]))[:, None]
        primal_infeasible = (output.status == PRIMAL_INFEASIBLE)[:, None]
        infeasible = primal_infeasible | (output.status == DUAL_INFEASIBLE)[:, None]
        nan = torch.tensor(float("nan"), dtype=dtype, device=device)
        x, slack = torch.where(infeasible, nan, x), torch.where(infeasible, nan, slack)
        lam = torch.where(primal_infeasible, certificate[0] / scale, torch.where(infeasible, nan, lam))
        nu = torch.where(primal_infeasible, certificate[1] / scale, torch.where(infeasible, nan, nu))
        primal_residual, dual_residual, gap = (torch.where(infeasible[:, 0], nan, v) for v in
                                               (residual.primal, residual.dual, gap))
    result = QPResult(lam, nu, slack, output.iterations, primal_residual, dual_residual, gap, output.status,
                      output.num_factorizations)
    if options["warn"] or options["strict"]:
        report_qp_status(output.status.cpu().numpy(), *(v.cpu().numpy() for v in (primal_residual, dual_residual, gap)),
                         max_iter=options["max_iter"], strict=options["strict"])
    if torch.is_grad_enabled() and any(v.requires_grad for v in (Q, p, G, h, A, b)):
        x = _KKTGradient.apply(Q, p, G, h, A, b, x, lam, nu, slack, infeasible[:, 0], Q_symmetric)
    return x, result


class _KKTGradient(torch.autograd.Function):
    """Passes the solution through and differentiates the KKT conditions at it in the backward pass.

    With the complementarity rows divided by lam, the linearized KKT conditions read J [dx; dlam; dnu] = -[dQ x +
    dp + dG' lam + dA' nu; dG x - dh; dA x - db] with the symmetric J = [[Q, G', A'], [G, -W, 0], [A, 0, 0]],
    W = slack / lam, the interior-point Newton matrix at the solution. So one solve J u = [g; 0; 0] for the
    incoming gradient g gives every input's gradient as an outer product (OptNet's, with d_x = -u_x).
    """

    @staticmethod
    def forward(ctx, Q, p, G, h, A, b, x, lam, nu, slack, infeasible, Q_symmetric):
        ctx.save_for_backward(Q_symmetric, G, A, x, lam, nu, slack, infeasible)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise UnsupportedDerivativeError(
                "qp's gradient comes from the KKT conditions with the solution held fixed, so differentiating it "
                "again (create_graph=True) would miss how the solution moves: a wrong second derivative. qp is "
                "differentiable once."
            )
        Q, G, A, x, lam, nu, slack, infeasible = ctx.saved_tensors
        # The active set, read off the solution: a constraint whose multiplier exceeds its slack holds with
        # equality (W = 0), the others drop out (their rows zeroed, their multipliers' part of u zero). This is
        # the exact KKT derivative for that active set, where W = slack / lam at a finite tolerance would leave an
        # error of the order of the complementarity reached.
        active = lam > slack
        G = torch.where(active[..., None], G, 0.0)
        lam = torch.where(active, lam, 0.0)
        W = torch.where(active, 0.0, 1.0)
        delta, smallest_W = regularization(g.dtype)
        factor = factor_kkt(Q, G, A, 1 / (W + smallest_W), delta)
        zeros = [v.new_zeros(v.shape[0], 1, v.shape[1]) for v in (lam, nu)]
        u = solve_kkt_refined(factor, Q, W, g[:, None], *zeros, refinements=BACKWARD_REFINEMENTS)
        # Every gradient is a product with u, so a NaN u marks all of an infeasible sample's gradients NaN.
        nan = torch.tensor(float("nan"), dtype=g.dtype, device=g.device)
        u_x, u_lam, u_nu = (torch.where(infeasible[:, None], nan, v[:, 0]) for v in u)

        def outer_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            """a b' + c d' per sample, written once as a product of depth two."""
            return torch.bmm(torch.stack([a, c], dim=2), torch.stack([b, d], dim=1))

        gradients = (
            lambda: outer_sum(-0.5 * u_x, x, x, -0.5 * u_x),
            lambda: -u_x,
            lambda: outer_sum(lam, -u_x, u_lam, -x),
            lambda: u_lam,
            lambda: outer_sum(nu, -u_x, u_nu, -x),
            lambda: u_nu,
        )
        return (*(gradient() if needed else None for gradient, needed in zip(gradients, ctx.needs_input_grad)),
                None, None, None, None, None, None)


def _shape(name: str, value) -> tuple:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return tuple(value.shape)


def _check_dtype_and_device(tensors: dict) -> tuple[torch.dtype, torch.device]:
    dtype, device = tensors["Q"].dtype, tensors["Q"].device
    if dtype not in DEFAULT_TOL:
        raise TypeError(f"Q must be float32 or float64 (the interior-point method needs their precision), got {dtype}")
    for name, value in tensors.items():
        if value is None:
            continue
        if value.dtype != dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but Q has {dtype}: give every argument the same dtype")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but Q is on {device}: put every argument on one device")
    return dtype, device


def _check_positive_semidefinite(Q: torch.Tensor) -> None:
    """Raise unless every sample of Q is symmetric and positive semidefinite, to a tolerance relative to its
    size (a Cholesky factorization of Q + sqrt(eps) * scale * I must exist)."""
    eps = torch.finfo(Q.dtype).eps
    batched = Q if Q.dim() == 3 else Q[None]
    scale = batched.abs().flatten(1).amax(1).clamp(min=1.0)
    asymmetry = (batched - batched.mT).abs().flatten(1).amax(1)
    bad = torch.nonzero(asymmetry > 100 * eps * scale).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"Q must be symmetric: sample {i} has max |Q - Q'| = {float(asymmetry[i]):.3g}")
    shifted = batched + (eps**0.5 * scale)[:, None, None] * torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    bad = torch.nonzero(torch.linalg.cholesky_ex(shifted).info).flatten()
    if bad.numel():
        i = int(bad[0])
        smallest = float(torch.linalg.eigvalsh(batched[i]).min())
        raise ValueError(f"Q must be positive semidefinite: sample {i} has an eigenvalue {smallest:.3g}")

