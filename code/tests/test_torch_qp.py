"""The PyTorch QP layer: solutions and multipliers against CVXPY, gradients against the exact KKT derivative and
finite differences, infeasible, unbounded and degenerate problems, batching, and every refusal."""

import numpy as np
import pytest
import torch
from qp_problems import SHAPES, cvxpy_solve, kkt_gradients, random_qp

from implicit_layers.errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from implicit_layers.torch.optimization._kkt import kkt_residual
from implicit_layers.torch.optimization.qp import qp

NAMES = ("Q", "p", "G", "h", "A", "b")


def as_torch(problem: dict, requires_grad: bool = False) -> dict:
    return {name: torch.tensor(value, requires_grad=requires_grad) for name, value in problem.items()}


def relative_error(value, reference) -> float:
    return float(np.abs(np.asarray(value) - reference).max() / max(np.abs(reference).max(), 1e-300))


@pytest.mark.parametrize("kind", sorted(SHAPES) + ["semidefinite", "linear program"])
def test_solutions_and_multipliers_match_cvxpy(kind):
    if kind == "semidefinite":
        problem = random_qp(1, 8, 6, 2, batch=4, rank=3)
    elif kind == "linear program":
        problem = random_qp(2, 8, 6, 2, batch=4, rank=0)
    else:
        problem = random_qp(0, *SHAPES[kind], batch=4)
    x, result = qp(**as_torch(problem), tol=1e-11)
    assert result.status == ("solved",) * 4
    for i in range(4):
        reference = cvxpy_solve(*(problem[name][i] if name in problem else None for name in NAMES))
        for value, expected in zip((x[i], result.lam[i], result.nu[i]), reference):
            np.testing.assert_allclose(value.numpy(), expected, atol=1e-8 * max(1.0, np.abs(expected).max(initial=0)))
    # The record's residuals are those of the returned point.
    batched = {name: torch.tensor(problem.get(name, np.zeros((4, 0, 8) if name in "GA" else (4, 0)))) for name in NAMES}
    residual = kkt_residual(*batched.values(), x, result.lam, result.nu, result.slack)
    torch.testing.assert_close(residual.primal, result.primal_residual)
    torch.testing.assert_close(residual.dual, result.dual_residual)
    assert bool((result.slack >= 0).all() and (result.lam >= 0).all())


def test_tolerance_sets_the_accuracy():
    problem = random_qp(3, *SHAPES["mixed"], batch=3)
    references = [cvxpy_solve(*(problem[name][i] for name in NAMES))[0] for i in range(3)]
    errors = []
    for tol in (1e-4, 1e-7, 1e-10):
        x, result = qp(**as_torch(problem), tol=tol)
        errors.append(max(relative_error(x[i], references[i]) for i in range(3)))
        assert float(result.gap.max()) < 100 * tol * (1 + float(torch.tensor(problem["p"]).abs().max()) ** 2)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_gradients_match_the_exact_kkt_derivative(kind):
    problem = random_qp(4, *SHAPES[kind], batch=6)
    inputs = as_torch(problem, requires_grad=True)
    x, result = qp(**inputs)
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    gradients = dict(zip(inputs, torch.autograd.grad((g * x).sum(), list(inputs.values()))))
    for i in range(6):
        reference = kkt_gradients(
            *(problem[name][i] if name in problem else None for name in NAMES),
            x[i].detach().numpy(), result.lam[i].numpy(), result.nu[i].numpy(), g[i].numpy(),
        )
        scale = max(np.abs(reference[name]).max(initial=0) for name in inputs)
        for name in inputs:
            np.testing.assert_allclose(gradients[name][i].numpy(), reference[name], atol=1e-7 * scale)


def test_gradcheck_of_every_argument():
    problem = random_qp(5, 4, 5, 2, batch=2)
    inputs = as_torch(problem, requires_grad=True)

    def solution(Q, p, G, h, A, b):
        return qp(0.5 * (Q + Q.mT), p, G, h, A, b, tol=1e-12)[0]

    assert torch.autograd.gradcheck(solution, tuple(inputs.values()), atol=1e-6, rtol=1e-5)


def test_shared_arguments_receive_the_sum_of_the_per_sample_gradients():
    problem = random_qp(6, *SHAPES["mixed"], batch=3)
    shared = {name: torch.tensor(problem[name][0], requires_grad=True) for name in ("Q", "G", "A")}
    own = {name: torch.tensor(problem[name]) for name in ("p", "h", "b")}
    x, _ = qp(**shared, **own)
    (x**2).sum().backward()
    for i in range(3):
        alone = {name: torch.tensor(problem[name][0], requires_grad=True) for name in ("Q", "G", "A")}
        x_i, _ = qp(**alone, **{name: value[i] for name, value in own.items()})
        torch.testing.assert_close(x_i[0], x[i].detach(), rtol=0, atol=1e-12)
        (x_i**2).sum().backward()
        if i == 0:
            total = {name: value.grad.clone() for name, value in alone.items()}
        else:
            for name, value in alone.items():
                total[name] += value.grad
    for name, value in shared.items():
        torch.testing.assert_close(value.grad, total[name], rtol=1e-10, atol=1e-12)


def test_batched_equals_per_sample():
    problem = random_qp(7, *SHAPES["mixed"], batch=5)
    x, result = qp(**as_torch(problem))
    for i in range(5):
        x_i, result_i = qp(**{name: torch.tensor(value[i]) for name, value in problem.items()})
        torch.testing.assert_close(x_i[0], x[i], rtol=0, atol=1e-12)
        assert int(result_i.iterations[0]) == int(result.iterations[i])


def test_infeasible_and_unbounded_samples_are_certified_and_named():
    # Sample 0: feasible. 1: x <= -1 and x >= 1. 2: x1 + x2 = 1 and x1 + x2 = 2. 3: min -x2 with only x1 bounded.
    Q = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    G = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]] * 4, dtype=torch.float64)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    A = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]] * 4, dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    A[3] = 0.0
    b[3] = 0.0
    Q_, p_, G_, h_ = (v.clone().requires_grad_() for v in (Q, p, G, h))
    with pytest.warns(ConvergenceWarning, match=r"2 primal infeasible .*samples 1, 2; 1 dual infeasible .*sample 3"):
        x, result = qp(Q_, p_, G_, h_, A, b)
    assert result.status == ("solved", "primal_infeasible", "primal_infeasible", "dual_infeasible")
    torch.testing.assert_close(x[0].detach(), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-8, rtol=0)
    assert bool(torch.isnan(x[1:]).all())
    for i in (1, 2):  # Farkas certificates: lam >= 0, G'lam + A'nu = 0, h'lam + b'nu < 0
        lam, nu = result.lam[i], result.nu[i]
        assert bool((lam >= 0).all())
        assert float((G[i].T @ lam + A[i].T @ nu).abs().max()) < 1e-8
        assert float(h[i] @ lam + b[i] @ nu) < -1e-3
    x.sum().backward()
    assert bool(torch.isfinite(p_.grad[0]).all()) and bool(torch.isnan(p_.grad[1:]).all())
    with pytest.raises(ConvergenceError, match="primal infeasible"):
        qp(Q, p, G, h, A, b, strict=True)


def test_stopping_at_max_iter_warns_with_the_residuals_reached():
    problem = as_torch(random_qp(8, *SHAPES["mixed"], batch=2))
    with pytest.warns(ConvergenceWarning, match=r"2 not solved within max_iter=2 iterations .*primal residual"):
        _, result = qp(**problem, max_iter=2)
    assert result.status == ("max_iter", "max_iter")
    with pytest.raises(ConvergenceError, match="max_iter=2"):
        qp(**problem, max_iter=2, strict=True)


def test_weakly_active_constraint():
    """min 1/2 x^2 + p x subject to -x <= h at p = h = 0: the constraint is active with a zero multiplier, and
    x*(p, h) = max(-p, -h) has a kink there. The solution is accurate to about the square root of the tolerance,
    and the gradient is one of the two one-sided derivatives, (dx/dp, dx/dh) = (-1, 0) or (0, -1)."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    x, result = qp(torch.ones(1, 1, dtype=torch.float64), p, -torch.ones(1, 1, dtype=torch.float64), h)
    assert result.status == ("solved",)
    assert abs(float(x.detach())) < 1e-4
    x.sum().backward()
    assert (float(p.grad), float(h.grad)) in ((-1.0, 0.0), (0.0, -1.0))


def test_float32():
    problem = random_qp(9, *SHAPES["mixed"], batch=4)
    x64, _ = qp(**as_torch(problem))
    inputs = {name: torch.tensor(value, dtype=torch.float32, requires_grad=True) for name, value in problem.items()}
    x32, result = qp(**inputs)
    assert x32.dtype == torch.float32 and result.status == ("solved",) * 4
    torch.testing.assert_close(x32.double(), x64, atol=1e-3, rtol=1e-3)
    x32.sum().backward()
    assert all(bool(torch.isfinite(value.grad).all()) for value in inputs.values())


def test_second_derivatives_are_refused():
    inputs = as_torch(random_qp(10, 4, 3, 0, batch=1), requires_grad=True)
    x, _ = qp(**inputs)
    with pytest.raises(UnsupportedDerivativeError, match="differentiable once"):
        torch.autograd.grad(x.sum(), inputs["p"], create_graph=True)


def test_unbatched_arguments_give_a_batch_of_one():
    x, result = qp(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert x.shape == (1, 2) and result.lam.shape == (1, 0) and result.nu.shape == (1, 0)
    torch.testing.assert_close(x[0], torch.tensor([-1.0, 1.0], dtype=torch.float64))


_Q, _p = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
_G, _h = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
BAD_ARGUMENTS = {
    "Q not square": (dict(Q=torch.ones(2, 3, dtype=torch.float64), p=_p), ValueError, r"Q must have shape \(n, n\)"),
    "p of the wrong size": (dict(Q=_Q, p=torch.zeros(3, dtype=torch.float64)), ValueError, r"p must have shape \(n,\)"),
    "G without h": (dict(Q=_Q, p=_p, G=_G), ValueError, "G is given without h"),
    "h of the wrong size": (dict(Q=_Q, p=_p, G=_G, h=torch.ones(3, dtype=torch.float64)), ValueError, r"h must have shape \(m,\)"),
    "batch sizes disagree": (dict(Q=_Q.expand(3, 2, 2), p=_p.expand(4, 2)), ValueError, "Q has 3, p has 4"),
    "not a tensor": (dict(Q=_Q.numpy(), p=_p), TypeError, "Q must be a torch.Tensor"),
    "integer dtype": (dict(Q=torch.eye(2, dtype=torch.int64), p=_p), TypeError, "Q must be float32 or float64"),
    "mixed dtypes": (dict(Q=_Q, p=_p.float()), TypeError, "p has dtype torch.float32 but Q has torch.float64"),
    "NaN": (dict(Q=_Q, p=torch.tensor([0.0, float("nan")], dtype=torch.float64)), ValueError, "p contains NaN or Inf"),
    "not symmetric": (dict(Q=torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64), p=_p), ValueError,
                      "Q must be symmetric"),
    "indefinite": (dict(Q=torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)), p=_p), ValueError,
                   "Q must be positive semidefinite: sample 0 has an eigenvalue -1"),
    "tol": (dict(Q=_Q, p=_p, tol=0.0), ValueError, "tol must be a positive finite number"),
    "max_iter": (dict(Q=_Q, p=_p, max_iter=0), ValueError, "max_iter must be a positive integer"),
    "strict": (dict(Q=_Q, p=_p, strict=1), TypeError, "strict must be True or False"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_by_name(case):
    arguments, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        qp(**arguments)


def test_a_short_constraint_row_far_from_the_origin_does_not_stall_the_solver():
    """Row 0 has norm 0.06 and right-hand side 1, and y lies well inside every constraint, so the projection of y
    is y itself. Unscaled, the iterations stalled here (max_iter, gap 1.7); the solver scales each row to unit
    norm."""
    G = torch.tensor([[0.02799426, -0.05486312], [1.90345359, -0.58765119], [-0.45304108, 0.16031675],
                      [-1.09224713, 1.89159846], [-0.03226286, -0.05942997], [0.99260569, 0.71157515],
                      [-1.69207501, -0.0930732], [1.08901119, -0.21631205]], dtype=torch.float64)
    h = torch.tensor([1.0, 0.73522645, 1.1887058, 4.1226182, 1.92215967, 0.91433185, 1.45689583, 1.26318228],
                     dtype=torch.float64)
    y = torch.tensor([-0.16501614, -0.66874224], dtype=torch.float64)
    x, result = qp(torch.eye(2, dtype=torch.float64), -y, G, h)
    assert result.status == ("solved",)
    torch.testing.assert_close(x[0], y, atol=1e-9, rtol=0)
    assert float(result.lam.abs().max()) < 1e-8
