import pytest
import torch

from implicit_layers.torch import (
    ConvergenceError,
    ConvergenceWarning,
    batched_jacobian,
    forward_iteration,
    newton,
)

from conftest import DEVICES, tanh_problem

SOLVER_FUNCTIONS = {"forward_iteration": forward_iteration, "newton": newton}


def tanh_map(W, x):
    return lambda z: torch.tanh(z @ W.T + x)


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_reach_the_fixed_point(name, device, dtype):
    W, x = tanh_problem(dtype=dtype, device=device)
    f = tanh_map(W, x)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    z, result = SOLVER_FUNCTIONS[name](f, torch.zeros_like(x), tol=tol, max_iter=200)
    assert z.dtype == dtype and z.device == x.device
    assert result.status == "converged"
    assert bool(result.converged.all())
    assert float((f(z) - z).norm(dim=1).max()) < tol
    assert torch.equal(result.residual, result.residuals[-1])
    assert result.residuals.shape == (result.num_steps + 1, x.shape[0])


def test_solvers_agree_and_newton_is_faster(problem):
    W, x = problem
    z_iter, iter_result = forward_iteration(tanh_map(W, x), torch.zeros_like(x), tol=1e-12, max_iter=500)
    z_newton, newton_result = newton(tanh_map(W, x), torch.zeros_like(x), tol=1e-12)
    torch.testing.assert_close(z_iter, z_newton, atol=1e-11, rtol=0)
    assert int(newton_result.iterations.max()) < int(iter_result.iterations.min())


def test_residual_trace_and_function_counts(problem):
    W, x = problem
    f = tanh_map(W, x)
    z0 = torch.zeros_like(x)
    _, result = forward_iteration(f, z0, tol=1e-8)
    torch.testing.assert_close(result.residuals[0], (f(z0) - z0).norm(dim=1))
    # For a contraction, forward iteration's residuals never grow.
    assert bool((result.residuals[1:] <= result.residuals[:-1] + 1e-15).all())
    assert result.nfe == result.num_steps + 1
    _, newton_result = newton(f, z0, tol=1e-8)
    assert newton_result.nfe == 2 * newton_result.num_steps + 1


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_batch_equals_per_sample_and_stops_per_sample(name):
    W, x = tanh_problem(batch=6, scale=0.8)
    x = x * torch.linspace(0.01, 3.0, 6, dtype=x.dtype).unsqueeze(1)  # samples of different difficulty
    solve = SOLVER_FUNCTIONS[name]
    z_batch, batch_result = solve(tanh_map(W, x), torch.zeros_like(x), tol=1e-9, max_iter=300)
    assert len(set(batch_result.iterations.tolist())) > 1
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        zi, ri = solve(tanh_map(W, xi), torch.zeros_like(xi), tol=1e-9, max_iter=300)
        torch.testing.assert_close(z_batch[i : i + 1], zi, atol=1e-14, rtol=0)
        assert int(ri.iterations[0]) == int(batch_result.iterations[i])


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_states_of_any_shape(name):
    generator = torch.Generator().manual_seed(1)
    A = 0.3 * torch.randn(6, 6, generator=generator, dtype=torch.float64) / 6**0.5
    x = torch.randn(3, 2, 3, generator=generator, dtype=torch.float64)

    def f(z):
        return torch.tanh((z.reshape(3, 6) @ A.T).reshape(3, 2, 3) + x)

    z, result = SOLVER_FUNCTIONS[name](f, torch.zeros_like(x), tol=1e-10)
    assert z.shape == x.shape and result.status == "converged"
    torch.testing.assert_close(f(z), z, atol=1e-9, rtol=0)


def test_batched_jacobian_matches_autograd(problem):
    W, x = problem
    f = tanh_map(W, x)
    z = 0.1 * torch.ones_like(x)
    fz, jacobian = batched_jacobian(f, z)
    torch.testing.assert_close(fz, f(z))
    for b in range(x.shape[0]):
        expected = torch.autograd.functional.jacobian(lambda zb: torch.tanh(W @ zb + x[b]), z[b])
        torch.testing.assert_close(jacobian[b], expected)


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_non_convergence_warns_with_the_residual(name, problem):
    W, x = problem
    W = W * 1.8  # slower: one step is not enough
    with pytest.warns(ConvergenceWarning, match=r"did not converge for \d+ of 5 samples.*largest residual reached"):
        _, result = SOLVER_FUNCTIONS[name](tanh_map(W, x), torch.zeros_like(x), tol=1e-12, max_iter=1)
    assert result.status == "max_iter"
    assert not bool(result.converged.all())
    with pytest.raises(ConvergenceError, match="largest residual reached"):
        SOLVER_FUNCTIONS[name](tanh_map(W, x), torch.zeros_like(x), tol=1e-12, max_iter=1, strict=True)


def test_diverging_iteration_is_reported():
    z0 = torch.zeros(3, 2)
    with pytest.warns(ConvergenceWarning, match="NaN/Inf"):
        z, result = forward_iteration(lambda z: 10.0 * z + 1.0, z0, max_iter=200)
    assert result.status == "diverged"
    assert bool(result.failed.all())
    assert bool(torch.isfinite(z).all())


def test_singular_newton_system_is_reported():
    # f(z) = z + 1 has no fixed point and J - I = 0 is singular.
    with pytest.warns(ConvergenceWarning, match="singular"):
        _, result = newton(lambda z: z + 1.0, torch.zeros(2, 3))
    assert result.status == "diverged"


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_bad_inputs_name_the_argument(name, problem):
    W, x = problem
    f = tanh_map(W, x)
    solve = SOLVER_FUNCTIONS[name]
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor"):
        solve(f, x.numpy())
    with pytest.raises(ValueError, match="z0 must have a leading batch dimension"):
        solve(f, torch.tensor(0.0))
    with pytest.raises(TypeError, match="z0 must have a floating-point dtype"):
        solve(f, torch.zeros(5, 8, dtype=torch.int64))
    nan_start = torch.zeros_like(x)
    nan_start[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        solve(f, nan_start)
    with pytest.raises(ValueError, match="same shape"):
        solve(lambda z: z[:, :4], torch.zeros_like(x))
    with pytest.raises(ValueError, match="same dtype"):
        solve(lambda z: z.float(), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"f\(z0\) contains NaN or Inf"):
        solve(lambda z: z + float("inf"), torch.zeros_like(x))
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        solve(f, torch.zeros_like(x), tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        solve(f, torch.zeros_like(x), max_iter=0)
