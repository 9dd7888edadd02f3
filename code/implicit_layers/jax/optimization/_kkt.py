"""The KKT system of a batch of QPs, written once: its residual, and the factorization and solve of its Newton
matrix, which the interior-point iterations and the backward pass share. The JAX twin of the torch module.

For min 1/2 x'Qx + p'x subject to Gx + s = h, s >= 0 and Ax = b, with multipliers lam >= 0 and nu, the Newton
matrix in (x, lam, nu) with the complementarity rows divided by lam is

    K = [[Q, G', A'], [G, -W, 0], [A, 0, 0]],    W = diag(s / lam),

symmetric and the same at every iterate up to ``W``. Eliminating ``lam`` leaves H = Q + G' D G with D = lam / s,
and eliminating ``x`` from the equality rows leaves the Schur complement A H^-1 A'. Both are factored by
Cholesky after a small regularization (H + delta I and the Schur complement + delta I): a quasi-definite matrix,
factorable even when Q is only semidefinite or A lacks full row rank.

JAX's Cholesky factorization has no failure flag: a factorization that breaks down returns NaN, so a breakdown is
read off non-finite factors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


def bmv(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    """Batched matrix-vector product: (B, r, c) x (B, c) -> (B, r)."""
    return jnp.matmul(matrix, vector[..., None])[..., 0]


def bmtv(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    """Batched transposed product: (B, r, c)' x (B, r) -> (B, c)."""
    return jnp.matmul(vector[:, None, :], matrix)[:, 0, :]


def cholesky_solve(rhs: jax.Array, cholesky: jax.Array) -> jax.Array:
    """Solve L L' X = rhs for a batch of lower factors L (B, k, k) and right-hand sides (B, k, c), as
    ``torch.cholesky_solve`` does: forward substitution with L, then back substitution with L'."""
    forward = solve_triangular(cholesky, rhs, lower=True)
    return solve_triangular(cholesky, forward, lower=True, trans="T")


def _cholesky(matrix: jax.Array) -> jax.Array:
    """The lower Cholesky factor of a batch of symmetric matrices, read from one triangle only, as torch's is.

    ``jnp.linalg.cholesky`` first symmetrizes its argument, a pass over the batch with a transposed read; and
    LAPACK, which factors on the CPU, wants each matrix column-major, which costs XLA another transposing copy of
    a row-major one. The transpose of a row-major matrix is the same matrix column-major, so factoring the
    transpose, which is the matrix itself up to rounding, avoids both: LAPACK reads its lower triangle, the
    matrix's upper one, in place."""
    return jax.lax.linalg.cholesky(jnp.swapaxes(matrix, -1, -2), symmetrize_input=False)


def _add_to_diagonal(matrix: jax.Array, value: float) -> jax.Array:
    return matrix + value * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)


def _finite_factor(cholesky: jax.Array) -> jax.Array:
    """Per sample, whether a Cholesky factor (B, k, k) is finite, read off its diagonal: each entry of the
    factor enters the diagonal entry of its row (L_ii^2 = M_ii - sum_j<i L_ij^2), so a NaN or Inf anywhere in
    the factor makes its row's diagonal entry NaN or Inf, and reading the diagonal spares a pass over the batch."""
    return jnp.isfinite(jnp.diagonal(cholesky, axis1=-2, axis2=-1)).all(axis=1)


def regularization(dtype) -> tuple[float, float]:
    """The regularization of the Newton matrix in ``dtype``: ``delta``, added to H and to the Schur complement,
    and the smallest W (= slack / lam) used in H, which bounds D = 1 / W.

    Rounding in the Cholesky factorization of H is about eps times its largest entries, which grow like
    1 / smallest_W; with smallest_W = eps^(1/2) that is eps^(1/2), far below delta = eps^(1/3), so the
    factorization cannot break down however close the iterate is to the boundary (the torch twin's docstring
    records the measurement behind the choice)."""
    eps = float(jnp.finfo(dtype).eps)
    return eps ** (1 / 3), eps**0.5


class KKTFactor(NamedTuple):
    """A factored Newton matrix: the pieces that each solve needs."""

    G: jax.Array  # (B, m, n)
    G_transposed: jax.Array  # (B, n, m): G' as an array of its own (see ``factor_kkt``)
    A: jax.Array  # (B, e, n)
    D: jax.Array  # (B, m): lam / s
    cholesky_H: jax.Array  # (B, n, n): H + delta I = L L'
    H_inverse_At: jax.Array  # (B, n, e)
    cholesky_S: jax.Array  # (B, e, e): A H^-1 A' + delta I = L L'
    singular: jax.Array  # (B,) bool: a Cholesky factorization broke down (its factor is not finite)


def factor_kkt(
    Q: jax.Array, G: jax.Array, G_transposed: jax.Array, A: jax.Array, D: jax.Array, delta: float
) -> KKTFactor:
    """Factor the Newton matrix with ``D = lam / s`` (shape (B, m)) and regularization ``delta``.

    ``G_transposed`` is ``G'`` (B, n, m), made once before the interior-point loop: an array of its own there,
    where ``jnp.swapaxes(G, -1, -2)`` here would be a transposed read of G inside every product with it, which
    XLA's CPU matrix products take much longer over (forming H at a batch of 128 with n = m = 50 in a loop, on a
    2-core Intel Xeon: 2.7 ms against 1.5 ms)."""
    H = _add_to_diagonal(Q + jnp.matmul(G_transposed * D[:, None, :], G), delta)
    cholesky_H = _cholesky(H)
    H_inverse_At = cholesky_solve(jnp.swapaxes(A, -1, -2), cholesky_H)
    S = _add_to_diagonal(jnp.matmul(A, H_inverse_At), delta)
    cholesky_S = _cholesky(S)
    singular = ~(_finite_factor(cholesky_H) & _finite_factor(cholesky_S))
    return KKTFactor(G, G_transposed, A, D, cholesky_H, H_inverse_At, cholesky_S, singular)


def solve_kkt(
    factor: KKTFactor, r_x: jax.Array, r_lam: jax.Array, r_nu: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Solve the regularized system K [dx; dlam; dnu] = [r_x; r_lam; r_nu] for k right-hand sides at once.

    The right-hand sides have shapes (B, n, k), (B, m, k), (B, e, k); so do the three returned blocks.
    """
    G, A, D = factor.G, factor.A, factor.D[..., None]
    reduced = r_x + jnp.matmul(factor.G_transposed, D * r_lam)
    x_free = cholesky_solve(reduced, factor.cholesky_H)
    dnu = cholesky_solve(jnp.matmul(A, x_free) - r_nu, factor.cholesky_S)
    dx = x_free - jnp.matmul(factor.H_inverse_At, dnu)
    dlam = D * (jnp.matmul(G, dx) - r_lam)
    return dx, dlam, dnu


def kkt_matvec(
    Q: jax.Array, G: jax.Array, A: jax.Array, W: jax.Array, vx: jax.Array, vlam: jax.Array, vnu: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The unregularized K applied to (vx, vlam, vnu), shapes (B, n, k), (B, m, k), (B, e, k); W is (B, m)."""
    return (
        jnp.matmul(Q, vx) + jnp.matmul(jnp.swapaxes(G, -1, -2), vlam) + jnp.matmul(jnp.swapaxes(A, -1, -2), vnu),
        jnp.matmul(G, vx) - W[..., None] * vlam,
        jnp.matmul(A, vx),
    )


def solve_kkt_refined(
    factor: KKTFactor,
    Q: jax.Array,
    W: jax.Array,
    r_x: jax.Array,
    r_lam: jax.Array,
    r_nu: jax.Array,
    refinements: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Solve the unregularized system K v = r: the regularized solve, corrected ``refinements`` times by solving
    for the residual left in K (iterative refinement), which removes the error the regularization made."""
    solution = solve_kkt(factor, r_x, r_lam, r_nu)
    for _ in range(refinements):
        applied = kkt_matvec(Q, factor.G, factor.A, W, *solution)
        correction = solve_kkt(factor, *(r - a for r, a in zip((r_x, r_lam, r_nu), applied)))
        solution = tuple(v + c for v, c in zip(solution, correction))
    return solution


class KKTResidual(NamedTuple):
    """How far (x, lam, nu, s) is from satisfying the KKT conditions, per sample (infinity norms, shape (B,))."""

    primal: jax.Array  # max(|Gx + s - h|, |Ax - b|)
    dual: jax.Array  # |Qx + p + G'lam + A'nu|
    complementarity: jax.Array  # max |s * lam|


def largest(value: jax.Array) -> jax.Array:
    """Per-sample infinity norm of a (B, k) array, zero when k = 0."""
    return jnp.abs(value).max(axis=1) if value.shape[1] else jnp.zeros(value.shape[:1], value.dtype)


def kkt_residual(Q, p, G, h, A, b, x, lam, nu, s) -> KKTResidual:
    """The KKT residual of a candidate solution (all arguments batched, as ``qp`` broadcasts them)."""
    primal = jnp.maximum(largest(bmv(G, x) + s - h), largest(bmv(A, x) - b))
    dual = largest(bmv(Q, x) + p + bmtv(G, lam) + bmtv(A, nu))
    return KKTResidual(primal, dual, largest(s * lam))
