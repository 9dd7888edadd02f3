"""The batch of quadratic programs every library solves in ``qp.py``, and its float64 reference.

Each sample is ``min 1/2 x'Qx + p'x subject to Gx <= h`` with n variables and m inequalities, no equalities (qpth,
proxsuite's QPLayer, cvxpylayers and qpax all take that form). ``Q = LL' + 0.1 I`` with a Gaussian ``L`` scaled by
``1/sqrt(n)``, so its eigenvalues lie between 0.1 and about 4; ``G`` is Gaussian scaled by ``1/sqrt(n)``;
``h = G x0 + s0`` with a Gaussian ``x0`` and ``s0`` uniform in [0.1, 1], so ``x0`` is strictly feasible; ``p`` is
Gaussian. About 38% of the constraints end up active at the solutions. The loss is ``L = sum(c * x)`` for a fixed
Gaussian ``c``.

The reference shares no code with any library measured. Clarabel solves each sample at tolerances of 1e-11;
its answer only names the active set (a constraint whose multiplier exceeds its slack). The reference solution and
gradient are then exact for that active set: NumPy's dense solver on the KKT system ``[[Q, G_A'], [G_A, 0]]``,
checked to be an optimum (multipliers positive, inactive constraints strictly satisfied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import scipy.sparse

ARGUMENTS = ("Q", "p", "G", "h")
"""The inputs differentiated, in the order of the tables."""
REFERENCE_TOL = 1e-11
"""Clarabel's gap and feasibility tolerances: at 1e-12 it stalls on some samples (InsufficientProgress)."""


@dataclass(frozen=True)
class Problem:
    """A batch of QPs in float64: ``Q`` (B, n, n), ``p`` (B, n), ``G`` (B, m, n), ``h`` (B, m), and the loss
    weights ``c`` (B, n)."""

    Q: np.ndarray
    p: np.ndarray
    G: np.ndarray
    h: np.ndarray
    c: np.ndarray

    @property
    def batch(self) -> int:
        return self.Q.shape[0]

    @property
    def n(self) -> int:
        return self.Q.shape[1]

    @property
    def m(self) -> int:
        return self.G.shape[1]


@dataclass(frozen=True)
class Reference:
    """The exact solution ``x`` (B, n) and multipliers ``lam`` (B, m) for the active set found, the gradient of
    ``sum(c * x)`` with respect to each of ``ARGUMENTS``, and how clear-cut the active set is: ``margin`` is the
    smallest, over all samples and constraints, of max(multiplier, slack) (zero would be a weakly active
    constraint, where the solution is not differentiable)."""

    x: np.ndarray
    lam: np.ndarray
    grads: dict[str, np.ndarray]
    active_share: float
    margin: float


def make_problem(batch: int = 128, n: int = 50, m: int = 50, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((batch, n, n)) / np.sqrt(n)
    Q = L @ L.transpose(0, 2, 1) + 0.1 * np.eye(n)
    G = rng.standard_normal((batch, m, n)) / np.sqrt(n)
    x0 = rng.standard_normal((batch, n))
    h = np.einsum("bmn,bn->bm", G, x0) + rng.uniform(0.1, 1.0, (batch, m))
    return Problem(Q, rng.standard_normal((batch, n)), G, h, rng.standard_normal((batch, n)))


def reference(problem: Problem) -> Reference:
    """Solve and differentiate every sample exactly for its active set (see the module docstring)."""
    import clarabel  # the benchmark environment's; imported here so that the problem can be built without it

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = REFERENCE_TOL
    settings.tol_ktratio = 1e-10
    xs, lams, grads = [], [], {name: [] for name in ARGUMENTS}
    active_count, margin = 0, np.inf
    for Q, p, G, h, c in zip(problem.Q, problem.p, problem.G, problem.h, problem.c):
        solution = clarabel.DefaultSolver(scipy.sparse.csc_matrix(np.triu(Q)), p, scipy.sparse.csc_matrix(G), h,
                                          [clarabel.NonnegativeConeT(len(h))], settings).solve()
        if str(solution.status) != "Solved":
            raise RuntimeError(f"the reference solver did not solve a sample: {solution.status}")
        active = np.asarray(solution.z) > np.asarray(solution.s)
        x, lam, sample_grads = _exact_for_active_set(Q, p, G, h, c, active)
        slack = h - G @ x
        if lam[active].min(initial=np.inf) <= 0 or slack[~active].min(initial=np.inf) <= 0:
            raise RuntimeError("the active set read off the reference solver's answer is not optimal")
        margin = min(margin, float(np.maximum(lam, slack).min()))
        active_count += int(active.sum())
        xs.append(x)
        lams.append(lam)
        for name in ARGUMENTS:
            grads[name].append(sample_grads[name])
    return Reference(np.stack(xs), np.stack(lams), {name: np.stack(v) for name, v in grads.items()},
                     active_count / (problem.batch * problem.m), margin)


def _exact_for_active_set(Q, p, G, h, c, active):
    """The optimum of one sample with the constraints ``active`` holding with equality and the others dropped, and
    the gradient of ``c'x`` there.

    With K = [[Q, G_A'], [G_A, 0]], the KKT conditions read K [x; lam_A] = [-p; h_A]; differentiating them gives
    K [dx; dlam_A] = -[dQ x + dp + dG_A' lam_A; dG_A x - dh_A]. One solve K [v; w] = [c; 0] (K is symmetric) then
    gives c'dx = -v'(dQ x + dp + dG_A' lam_A) - w'(dG_A x - dh_A), which is read off per argument. The gradient with
    respect to Q is symmetrized: only symmetric perturbations keep Q in the problem class."""
    n, G_A = len(p), G[active]
    K = np.block([[Q, G_A.T], [G_A, np.zeros((len(G_A), len(G_A)))]])
    solution = np.linalg.solve(K, np.concatenate([-p, h[active]]))
    x, lam = solution[:n], np.zeros(len(h))
    lam[active] = solution[n:]
    adjoint = np.linalg.solve(K, np.concatenate([c, np.zeros(len(G_A))]))
    v, w = adjoint[:n], np.zeros(len(h))
    w[active] = adjoint[n:]
    grads = {"Q": -0.5 * (np.outer(v, x) + np.outer(x, v)), "p": -v,
             "G": -(np.outer(lam, v) + np.outer(w, x)), "h": w}
    return x, lam, grads


def relative_errors(grads: dict[str, np.ndarray], reference_grads: dict[str, np.ndarray]) -> dict[str, float]:
    """Per argument: the largest absolute error over the batch over the largest absolute reference entry. The
    gradient with respect to Q is symmetrized first (a library may return either triangle's share)."""
    errors = {}
    for name in ARGUMENTS:
        value = np.asarray(grads[name], dtype=np.float64)
        if name == "Q":
            value = 0.5 * (value + value.transpose(0, 2, 1))
        errors[name] = float(np.max(np.abs(value - reference_grads[name])) / np.max(np.abs(reference_grads[name])))
    return errors


@dataclass(frozen=True)
class Outcome:
    """What one run returned, as NumPy arrays: the solutions (B, n) and the gradient per argument."""

    x: np.ndarray
    grads: dict[str, np.ndarray]


@dataclass(frozen=True)
class Run:
    """``call()`` is one timed forward and backward pass that returns only once the work is done (JAX results are
    blocked on); ``unpack`` turns its output into an :class:`Outcome`, outside the timing. ``compile_s`` is the
    time JAX took to compile the program (None in torch)."""

    call: Callable[[], Any]
    unpack: Callable[[Any], Outcome]
    compile_s: Optional[float] = None


@dataclass(frozen=True)
class Case:
    """One library's QP layer with one set of options. ``prepare(problem)`` builds a :class:`Run` for that
    problem's sizes; ``unavailable`` says why a peer that failed to import has no runs."""

    framework: str
    library: str
    settings: str
    prepare: Optional[Callable[[Problem], Run]] = None
    unavailable: Optional[str] = None
