"""The KKT system of a batch of QPs, written once: its residual, and the factorization and solve of its Newton
matrix, which the interior-point iterations and the backward pass share.

For min 1/2 x'Qx + p'x subject to Gx + s = h, s >= 0 and Ax = b, with multipliers lam >= 0 and nu, the Newton
matrix in (x, lam, nu) with the complementarity rows divided by lam is

    K = [[Q, G', A'], [G, -W, 0], [A, 0, 0]],    W = diag(s / lam),

symmetric and the same at every iterate up to ``W``. Eliminating ``lam`` leaves H = Q + G' D G with D = lam / s,
and eliminating ``x`` from the equality rows leaves the Schur complement A H^-1 A'. Both are factored by
Cholesky after a small regularization (H + delta I and the Schur complement + delta I): a quasi-definite matrix,
factorable even when Q is only semidefinite or A lacks full row rank.

Vectors enter the products as rows: right-hand sides are stacked as (B, k, r), and a matrix-vector product is
computed as a row vector times the transposed matrix. MKL, which runs torch's batched products on the CPU, is
several times slower at the same product with the vector as a column on the right (measured for (128, 50, 50)
float64 matrices). The Cholesky factors are kept in the column-major layout ``cholesky_ex`` returns them in, the
one LAPACK wants, so that no solve copies them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def bmv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product: (B, r, c) x (B, c) -> (B, r)."""
    return torch.bmm(vector.unsqueeze(1), matrix.mT).squeeze(1)


def bmtv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Batched transposed product: (B, r, c)' x (B, r) -> (B, c)."""
    return torch.bmm(vector.unsqueeze(1), matrix).squeeze(1)


def cholesky_solve_rows(rows: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """Solve L L' X' = rows' for a batch of lower factors L (B, r, r) and rows (B, k, r); returns X (B, k, r).

    Two triangular solves rather than ``torch.cholesky_solve``, which copies the factor on every call (even for
    no right-hand side at all); ``solve_triangular`` uses a column-major factor, and its transpose, in place."""
    forward = torch.linalg.solve_triangular(cholesky, rows.mT, upper=False)
    return torch.linalg.solve_triangular(cholesky.mT, forward, upper=True).mT


def _cholesky_in_place(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factors of a fresh batch of symmetric row-major matrices (B, r, r), computed in their
    own memory, and the failure flags (``info`` of ``cholesky_ex``, nonzero where a factorization broke down).

    Given a new tensor, ``cholesky_ex`` on the CPU first copies the matrices into column-major ones, through a
    per-entry strided loop that cost a third as much as the factorization itself (measured, (128, 50, 50)
    float64). The transpose of a row-major matrix is the same matrix, up to rounding, stored column-major, so it
    is factored where it lies, as its own output: LAPACK reads the matrix's upper triangle (as in the JAX twin)
    and the copy shrinks to zeroing the other one."""
    transposed = matrix.mT
    info = torch.empty(matrix.shape[:-2], dtype=torch.int32, device=matrix.device)
    return torch.linalg.cholesky_ex(transposed, out=(transposed, info))


def regularization(dtype: torch.dtype) -> tuple[float, float]:
    """The regularization of the Newton matrix in ``dtype``: ``delta``, added to H and to the Schur complement,
    and the smallest W (= slack / lam) used in H, which bounds D = 1 / W.

    Rounding in the Cholesky factorization of H is about eps times its largest entries, which grow like
    1 / smallest_W; with smallest_W = eps^(1/2) that is eps^(1/2), far below delta = eps^(1/3), so the
    factorization cannot break down however close the iterate is to the boundary (measured: at eps^(1/2) for both,
    the Cholesky factorization failed on linear programs at tolerances of 1e-9 and below)."""
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 3), eps**0.5


class KKTFactor(NamedTuple):
    """A factored Newton matrix: the pieces that each solve needs."""

    G: torch.Tensor  # (B, m, n)
    A: torch.Tensor  # (B, e, n)
    D: torch.Tensor  # (B, m): lam / s
    cholesky_H: torch.Tensor  # (B, n, n): H + delta I = L L'
    A_H_inverse: torch.Tensor  # (B, e, n)
    cholesky_S: torch.Tensor  # (B, e, e): A H^-1 A' + delta I = L L'
    singular: torch.Tensor  # (B,) bool: a Cholesky factorization broke down


def factor_kkt(Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, D: torch.Tensor, delta: float) -> KKTFactor:
    """Factor the Newton matrix with ``D = lam / s`` (shape (B, m)) and regularization ``delta``."""
    H = torch.baddbmm(Q, G.mT * D.unsqueeze(1), G)
    H.diagonal(dim1=-2, dim2=-1).add_(delta)
    cholesky_H, info_H = _cholesky_in_place(H)
    A_H_inverse = cholesky_solve_rows(A, cholesky_H)
    S = torch.bmm(A_H_inverse, A.mT)
    S.diagonal(dim1=-2, dim2=-1).add_(delta)
    cholesky_S, info_S = _cholesky_in_place(S)
    return KKTFactor(G, A, D, cholesky_H, A_H_inverse, cholesky_S, (info_H != 0) | (info_S != 0))


def solve_kkt(
    factor: KKTFactor, r_x: torch.Tensor, r_lam: torch.Tensor, r_nu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the regularized system K [dx; dlam; dnu] = [r_x; r_lam; r_nu] for k right-hand sides at once.

    The right-hand sides are rows, of shapes (B, k, n), (B, k, m), (B, k, e); so are the three returned blocks.
    """
    G, A, D = factor.G, factor.A, factor.D.unsqueeze(1)
    reduced = r_x + torch.bmm(D * r_lam, G)
    x_free = cholesky_solve_rows(reduced, factor.cholesky_H)
    dnu = cholesky_solve_rows(torch.bmm(x_free, A.mT) - r_nu, factor.cholesky_S)
    dx = x_free - torch.bmm(dnu, factor.A_H_inverse)
    dlam = D * (torch.bmm(dx, G.mT) - r_lam)
    return dx, dlam, dnu


def kkt_matvec(
    Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, W: torch.Tensor, vx: torch.Tensor, vlam: torch.Tensor, vnu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unregularized K applied to the rows (vx, vlam, vnu), shapes (B, k, n), (B, k, m), (B, k, e); W is
    (B, m)."""
    return (
        torch.bmm(vx, Q.mT) + torch.bmm(vlam, G) + torch.bmm(vnu, A),
        torch.bmm(vx, G.mT) - W.unsqueeze(1) * vlam,
        torch.bmm(vx, A.mT),
    )


def solve_kkt_refined(
    factor: KKTFactor,
    Q: torch.Tensor,
    W: torch.Tensor,
    r_x: torch.Tensor,
    r_lam: torch.Tensor,
    r_nu: torch.Tensor,
    refinements: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the unregularized system K v = r: the regularized solve, corrected ``refinements`` times by solving
    for the residual left in K (iterative refinement), which removes the error the regularization made."""
    solution = solve_kkt(factor, r_x, r_lam, r_nu)
    for _ in range(refinements):
        applied = kkt_matvec(Q, factor.G, factor.A, W, *solution)
        correction = solve_kkt(factor, *(r - a for r, a in zip((r_x, r_lam, r_nu), applied)))
        solution = tuple(v + c for v, c in zip(solution, correction))
    return solution


def largest(value: torch.Tensor) -> torch.Tensor:
    """Per-sample infinity norm of a (B, k) tensor, zero when k = 0."""
    return value.abs().amax(dim=1) if value.shape[1] else value.new_zeros(value.shape[0])


class KKTResidual(NamedTuple):
    """How far (x, lam, nu, s) is from satisfying the KKT conditions, per sample (infinity norms, shape (B,))."""

    primal: torch.Tensor  # max(|Gx + s - h|, |Ax - b|)
    dual: torch.Tensor  # |Qx + p + G'lam + A'nu|
    complementarity: torch.Tensor  # max |s * lam|


def kkt_residual(Q, p, G, h, A, b, x, lam, nu, s) -> KKTResidual:
    """The KKT residual of a candidate solution (all arguments batched, as ``qp`` broadcasts them)."""

    primal = torch.maximum(largest(bmv(G, x) + s - h), largest(bmv(A, x) - b))
    dual = largest(bmv(Q, x) + p + bmtv(G, lam) + bmtv(A, nu))
    return KKTResidual(primal, dual, largest(s * lam))
