import pytest
import torch

from implicit_layers.torch import (
    ConvergenceError,
    ConvergenceWarning,
    anderson,
    batched_jacobian,
    broyden,
    forward_iteration,
    newton,
)

from conftest import DEVICES, tanh_problem

SOLVER_FUNCTIONS = {"forward_iteration": forward_iteration, "newton": newton, "anderson": anderson, "broyden": broyden}
ONE_EVALUATION_PER_STEP = ("forward_iteration", "anderson", "broyden")


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


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_accelerated_solvers_agree_with_newton(name, problem):
    W, x = problem
    z, _ = SOLVER_FUNCTIONS[name](tanh_map(W, x), torch.zeros_like(x), tol=1e-12)
    z_newton, _ = newton(tanh_map(W, x), torch.zeros_like(x), tol=1e-12)
    torch.testing.assert_close(z, z_newton, atol=1e-11, rtol=0)


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
    for name in ONE_EVALUATION_PER_STEP:
        _, result = SOLVER_FUNCTIONS[name](f, z0, tol=1e-8)
        assert result.nfe == result.num_steps + 1
    _, newton_result = newton(f, z0, tol=1e-8)
    assert newton_result.nfe == 2 * newton_result.num_steps + 1


def symmetric_problem(scale, n=64, batch=16):
    """A tanh map with symmetric W: slow for plain iteration when the spectral norm nears 1."""
    generator = torch.Generator().manual_seed(4)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    W = scale * (A + A.T) / torch.linalg.matrix_norm(A + A.T, ord=2)
    return tanh_map(W, torch.randn(batch, n, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_acceleration_beats_plain_iteration(name):
    f = symmetric_problem(0.95)
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    _, plain = forward_iteration(f, z0, tol=1e-10, max_iter=1000)
    _, accelerated = SOLVER_FUNCTIONS[name](f, z0, tol=1e-10, max_iter=1000)
    assert accelerated.status == "converged"
    assert int(accelerated.iterations.max()) < 0.6 * int(plain.iterations.max())


def test_accelerated_methods_converge_where_iteration_does_not():
    f = symmetric_problem(1.5)  # not a contraction
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning):
        forward_iteration(f, z0, tol=1e-10, max_iter=50)
    for name in ("anderson", "broyden", "newton"):
        _, result = SOLVER_FUNCTIONS[name](f, z0, tol=1e-10, max_iter=200)
        assert result.status == "converged", name


@pytest.mark.parametrize("m", [1, 3, 30])
def test_small_memories_still_converge(m):
    f = symmetric_problem(0.9)
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    for solve in (anderson, broyden):
        _, result = solve(f, z0, m=m, tol=1e-10, max_iter=500)
        assert result.status == "converged"


def test_anderson_ridge_scales_with_the_residuals():
    # A fixed ridge of 1e-4 would dominate the Gram matrix once residuals are ~1e-3 and stall near plain
    # iteration; the relative ridge keeps Anderson's advantage at tight tolerances.
    f = symmetric_problem(0.95)
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    _, loose = anderson(f, z0, ridge=1e-4, tol=1e-12, max_iter=1000)
    _, tiny = anderson(f, z0, ridge=1e-10, tol=1e-12, max_iter=1000)
    assert int(loose.iterations.max()) <= int(tiny.iterations.max()) + 5


def test_anderson_damping_and_singular_history_fall_back_safely():
    f = symmetric_problem(0.9)
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    _, damped = anderson(f, z0, damping=0.5, tol=1e-10, max_iter=500)
    assert damped.status == "converged"
    # A constant map makes every residual in the history identical: a singular least-squares system.
    target = torch.ones(4, 3, dtype=torch.float64)
    z, result = anderson(lambda z: target, torch.zeros(4, 3, dtype=torch.float64), tol=1e-12)
    assert result.status == "converged"
    torch.testing.assert_close(z, target)


def test_anderson_restarts_a_sample_whose_system_is_singular():
    from implicit_layers.torch.fixed_points.anderson import _mixing_weights

    residuals = torch.zeros(3, 3, 4, dtype=torch.float64)
    residuals[1] = torch.randn(3, 4, dtype=torch.float64)
    residuals[2] = 1e300  # its Gram matrix overflows: no usable weights
    alpha = _mixing_weights(residuals, torch.ones(3, 3, dtype=torch.bool), ridge=1e-4)
    # An all-zero history (a converged sample) gets uniform weights rather than 0/0.
    torch.testing.assert_close(alpha[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(alpha[1].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert not bool(torch.isfinite(alpha[2]).any())
    # In a batch, a sample that is already at its fixed point (zero residuals, singular systems at every
    # step) must not disturb the others.
    W, x = tanh_problem(batch=2, n=4)
    at_rest = torch.tensor([True, False]).view(-1, 1)
    z, result = anderson(lambda z: torch.where(at_rest, z, torch.tanh(z @ W.T + x)), torch.zeros_like(x), tol=1e-12)
    assert result.status == "converged" and bool(torch.isfinite(z).all())
    z_alone, _ = anderson(lambda z: torch.tanh(z @ W.T + x[1:]), torch.zeros_like(x[1:]), tol=1e-12)
    torch.testing.assert_close(z[1:], z_alone, atol=1e-14, rtol=0)


def test_solver_options_are_checked():
    f = symmetric_problem(0.5)
    z0 = torch.zeros(16, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        anderson(f, z0, m=0)
    with pytest.raises(ValueError, match="ridge must be a positive finite number"):
        anderson(f, z0, ridge=-1.0)
    with pytest.raises(ValueError, match="damping must lie in"):
        anderson(f, z0, damping=1.5)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        broyden(f, z0, m=0)


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
    with pytest.raises(ValueError, match=r"z0 must have shape \(B, \.\.\.\)"):
        solve(f, torch.tensor(0.0))
    with pytest.raises(TypeError, match="z0 must have a floating-point dtype"):
        solve(f, torch.zeros(5, 8, dtype=torch.int64))
    nan_start = torch.zeros_like(x)
    nan_start[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        solve(f, nan_start)
    with pytest.raises(ValueError, match="tensor of z's shape"):
        solve(lambda z: z[:, :4], torch.zeros_like(x))
    with pytest.raises(ValueError, match="tensor of z's dtype"):
        solve(lambda z: z.float(), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"f\(z0\) contains NaN or Inf"):
        solve(lambda z: z + float("inf"), torch.zeros_like(x))
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        solve(f, torch.zeros_like(x), tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        solve(f, torch.zeros_like(x), max_iter=0)
