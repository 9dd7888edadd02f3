"""Random QPs and independent references shared by the QP tests: CVXPY with Clarabel for solutions and
multipliers, and the exact KKT derivative of the active set, solved densely with NumPy."""

from __future__ import annotations

import cvxpy as cp
import numpy as np

SHAPES = {  # (n, m, e): variables, inequalities, equalities
    "inequalities": (8, 12, 0),
    "equalities": (8, 0, 3),
    "mixed": (8, 10, 3),
}


def random_qp(seed: int, n: int, m: int, e: int, batch: int, *, rank: int | None = None) -> dict:
    """A batch of feasible, bounded QPs as float64 NumPy arrays (A, b absent when e = 0, G, h when m = 0).

    Q = M M' / n + 0.1 I, or of rank ``rank`` (semidefinite, bounded because the inequalities include a box
    around a strictly feasible point). The constraints hold strictly at a random point x0, with equalities
    through it."""
    rng = np.random.default_rng(seed)
    if rank is None:
        M = rng.standard_normal((batch, n, n))
        Q = M @ M.transpose(0, 2, 1) / n + 0.1 * np.eye(n)
    else:
        M = rng.standard_normal((batch, n, rank))
        Q = M @ M.transpose(0, 2, 1) / n
    x0 = rng.standard_normal((batch, n))
    problem = dict(Q=Q, p=rng.standard_normal((batch, n)))
    if m:
        G = rng.standard_normal((batch, m, n))
        if rank is not None:  # a box |x - x0| <= 3 keeps the semidefinite objective bounded
            box = np.concatenate([np.eye(n), -np.eye(n)])
            G = np.concatenate([G, np.broadcast_to(box, (batch, 2 * n, n))], axis=1)
        problem.update(G=G, h=np.einsum("bmn,bn->bm", G, x0) + rng.uniform(0.1, 1.0, G.shape[:2]))
        if rank is not None:
            problem["h"][:, m:] = np.einsum("bmn,bn->bm", G[:, m:], x0) + 3.0
    if e:
        A = rng.standard_normal((batch, e, n))
        problem.update(A=A, b=np.einsum("ben,bn->be", A, x0))
    return problem


def cvxpy_solve(Q, p, G=None, h=None, A=None, b=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One QP solved by Clarabel at tight tolerances: x, the inequality multipliers and the equality ones."""
    x = cp.Variable(p.shape[0])
    constraints = []
    if G is not None:
        constraints.append(G @ x <= h)
    if A is not None:
        constraints.append(A @ x == b)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + p @ x), constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert problem.status == cp.OPTIMAL, problem.status
    lam = constraints[0].dual_value if G is not None else np.zeros(0)
    nu = constraints[-1].dual_value if A is not None else np.zeros(0)
    return x.value, lam, nu


def kkt_gradients(Q, p, G, h, A, b, x, lam, nu, g) -> dict:
    """The gradients of g'x* with respect to Q, p, G, h, A, b from the KKT conditions of the active set (the
    inequalities whose multiplier exceeds their slack), one dense solve. Any of G, h, A, b may be None."""
    n = p.shape[0]
    G = np.zeros((0, n)) if G is None else G
    h = np.zeros(0) if h is None else h
    A = np.zeros((0, n)) if A is None else A
    active = lam > h - G @ x
    Ga, k, e = G[active], int(active.sum()), A.shape[0]
    K = np.block([
        [Q, Ga.T, A.T],
        [Ga, np.zeros((k, k)), np.zeros((k, e))],
        [A, np.zeros((e, k)), np.zeros((e, e))],
    ])
    u = np.linalg.solve(K, np.concatenate([g, np.zeros(k + e)]))
    u_x, u_nu = u[:n], u[n + k:]
    u_lam = np.zeros(G.shape[0])
    u_lam[active] = u[n:n + k]
    lam = np.where(active, lam, 0.0)
    return dict(
        Q=-0.5 * (np.outer(u_x, x) + np.outer(x, u_x)),
        p=-u_x,
        G=-np.outer(lam, u_x) - np.outer(u_lam, x),
        h=u_lam,
        A=-np.outer(nu, u_x) - np.outer(u_nu, x),
        b=u_nu,
    )
