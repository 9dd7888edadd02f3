"""PyTorch cases of the QP benchmark: our ``qp`` and the QP layers of qpth, proxsuite and cvxpylayers, on the same
float64 tensors. Every run is one forward and one backward pass of ``sum(c * x)`` to Q, p, G and h."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from qp_problem import ARGUMENTS, Case, Outcome, Problem, Run

LOWER_BOUND = -1e20
"""proxsuite's QPLayer takes two-sided inequalities l <= Gx <= u; its own code stands for "no lower bound" so."""


def cases() -> list[Case]:
    try:
        from implicit_layers.torch.optimization.qp import qp  # noqa: F401  (only whether it imports matters here)
    except Exception as error:  # an older checkout of our package has no qp; the peers still run
        result = [Case("torch", "ours", "qp", unavailable=f"import failed: {type(error).__name__}: {error}")]
    else:
        result = [Case("torch", "ours", "qp, default tol 1e-9", partial(_prepare_ours, threads=None)),
                  Case("torch", "ours", "qp, torch.set_num_threads(1)", partial(_prepare_ours, threads=1))]
    peers = (
        ("qpth", "qpth.qp", "QPFunction, defaults (eps 1e-12, 20 iterations)", _prepare_qpth),
        ("proxsuite", "proxsuite.torch.qplayer", "QPFunction, defaults (eps 1e-9, eps_backward 1e-4)",
         _prepare_proxsuite),
        ("cvxpylayers", "cvxpylayers.torch", "CvxpyLayer, defaults (diffcp: SCS, lsqr derivative)",
         partial(_prepare_cvxpylayers, {})),
        ("cvxpylayers", "cvxpylayers.torch", "CvxpyLayer, Clarabel, dense derivative",
         partial(_prepare_cvxpylayers, {"solve_method": "Clarabel", "mode": "dense"})),
    )
    for library, module, settings, prepare in peers:
        try:
            __import__(module)
        except Exception as error:  # a broken install fails in many ways; each is reported, not raised
            reason = f"import failed: {type(error).__name__}: {error}"
            result.append(Case("torch", library, settings, unavailable=reason))
            continue
        result.append(Case("torch", library, settings, prepare))
    return result


def _inputs(problem: Problem) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(getattr(problem, name), requires_grad=True) for name in ARGUMENTS}


def _run(problem: Problem, solve) -> Run:
    """``solve(Q, p, G, h) -> x`` for the batch; the run backpropagates ``sum(c * x)`` through it."""
    inputs, c = _inputs(problem), torch.tensor(problem.c)

    def call():
        for value in inputs.values():
            value.grad = None
        x = solve(**inputs)
        (x * c).sum().backward()
        return x.detach()

    def unpack(x: torch.Tensor) -> Outcome:
        return Outcome(x.numpy().copy(), {name: value.grad.numpy().copy() for name, value in inputs.items()})

    return Run(call, unpack)


@contextmanager
def _threads(count):
    """Run torch with ``count`` threads (None: leave the setting alone), then restore the setting."""
    if count is None:  # the default case times qp alone, with no call to torch.set_num_threads
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_ours(problem: Problem, threads) -> Run:
    from implicit_layers.torch.optimization.qp import qp

    def solve(Q, p, G, h):
        with _threads(threads):
            x, result = qp(Q, p, G, h)
        if not bool(result.converged.all()):
            raise RuntimeError(f"ours left samples unsolved: {sorted(set(result.status))}")
        return x

    return _run(problem, solve)


def _prepare_qpth(problem: Problem) -> Run:
    from qpth.qp import QPFunction

    empty = torch.empty(0, dtype=torch.float64)  # qpth's way of saying "no equality constraints"
    layer = QPFunction(verbose=-1)
    return _run(problem, lambda Q, p, G, h: layer(Q, p, G, h, empty, empty))


def _prepare_proxsuite(problem: Problem) -> Run:
    from proxsuite.torch.qplayer import QPFunction

    empty = torch.empty(0, dtype=torch.float64)
    lower = torch.full((problem.m,), LOWER_BOUND, dtype=torch.float64)
    layer = QPFunction()
    # It returns the solution and both sets of multipliers; only the solution enters the loss.
    return _run(problem, lambda Q, p, G, h: layer(Q, p, empty, empty, G, lower, h)[0])


def _prepare_cvxpylayers(solver_args: dict, problem: Problem) -> Run:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    # Q enters as its Cholesky factor, x'Qx = |L'x|^2: a parameter times the variable keeps the problem DPP,
    # which cvxpylayers requires, where quad_form(x, Q) with a parameter Q does not. torch differentiates the
    # factorization, so the gradient still reaches Q.
    x = cp.Variable(problem.n)
    L_transposed, p = cp.Parameter((problem.n, problem.n)), cp.Parameter(problem.n)
    G, h = cp.Parameter((problem.m, problem.n)), cp.Parameter(problem.m)
    objective = cp.Minimize(0.5 * cp.sum_squares(L_transposed @ x) + p @ x)
    layer = CvxpyLayer(cp.Problem(objective, [G @ x <= h]), parameters=[L_transposed, p, G, h], variables=[x])

    def solve(Q, p, G, h):
        L = torch.linalg.cholesky(Q)
        return layer(L.mT, p, G, h, solver_args=solver_args)[0]

    return _run(problem, solve)
