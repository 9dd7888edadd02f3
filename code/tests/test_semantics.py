"""What both frameworks must agree on beyond first-order answers: higher derivatives, which batches a solver
accepts and what a batched map must satisfy, 16-bit states, strictness under ``jit``, argument checks at call
time, and maps that ignore the state."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt
from implicit_layers.errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError

jax.config.update("jax_enable_x64", True)

SOLVERS = ("forward_iteration", "newton", "anderson", "broyden")
SCALAR_SLOPE, SCALAR_INPUT = 0.5, 0.3


def scalar_layer_derivatives():
    """Closed forms for ``z = tanh(a z + b)``: with ``s = 1 - z^2``, ``dz/db = s / (1 - a s)`` and
    ``d2z/db2 = -2 z s / (1 - a s)^3`` (differentiate ``z' (1 - a s) = s`` once more)."""
    z = 0.0
    for _ in range(200):
        z = math.tanh(SCALAR_SLOPE * z + SCALAR_INPUT)
    s = 1.0 - z * z
    return z, s / (1 - SCALAR_SLOPE * s), -2.0 * z * s / (1 - SCALAR_SLOPE * s) ** 3


def test_the_closed_forms_match_finite_differences():
    def solution(b):
        z = 0.0
        for _ in range(300):
            z = math.tanh(SCALAR_SLOPE * z + b)
        return z

    _, first, second = scalar_layer_derivatives()
    h = 1e-4
    b = SCALAR_INPUT
    assert abs((solution(b + h) - solution(b - h)) / (2 * h) - first) < 1e-7
    assert abs((solution(b + h) - 2 * solution(b) + solution(b - h)) / h**2 - second) < 1e-5


# Higher derivatives


def jax_scalar_solution(b, solver, backward="implicit"):
    z, _ = ilj.fixed_point(
        lambda z, b: jnp.tanh(SCALAR_SLOPE * z + b), jnp.zeros((1, 1)), b, solver=solver, backward=backward,
        tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=400,
    )
    return z.sum()


@pytest.mark.parametrize("solver", SOLVERS)
def test_jax_second_derivatives_are_exact(solver):
    """Before, jax.hessian returned -1.9185 for the exact -3.0676."""
    _, first, second = scalar_layer_derivatives()
    b = jnp.full((1, 1), SCALAR_INPUT)
    assert float(jax.grad(jax_scalar_solution)(b, solver)[0, 0]) == pytest.approx(first, rel=1e-10)
    assert float(jax.hessian(jax_scalar_solution)(b, solver).ravel()[0]) == pytest.approx(second, rel=1e-8)
    reverse_over_reverse = jax.grad(lambda b: jax.grad(jax_scalar_solution)(b, solver).sum())(b)
    assert float(reverse_over_reverse[0, 0]) == pytest.approx(second, rel=1e-8)


def test_jax_second_derivatives_through_gmres_are_exact():
    """GMRES solves the derivative rule's linear systems inside lax.custom_linear_solve, so the rule's recursion
    gives exact second derivatives with it as with the fixed-point solvers."""
    _, first, second = scalar_layer_derivatives()

    def solution(b):
        z, _ = ilj.fixed_point(lambda z, b: jnp.tanh(SCALAR_SLOPE * z + b), jnp.zeros((1, 1)), b, tol=1e-13,
                               max_iter=300, backward_solver="gmres", backward_tol=1e-13)
        return z.sum()

    b = jnp.full((1, 1), SCALAR_INPUT)
    assert float(jax.grad(solution)(b)[0, 0]) == pytest.approx(first, rel=1e-10)
    assert float(jax.hessian(solution)(b).ravel()[0]) == pytest.approx(second, rel=1e-8)
    reverse_over_reverse = jax.grad(lambda b: jax.grad(solution)(b).sum())(b)
    assert float(reverse_over_reverse[0, 0]) == pytest.approx(second, rel=1e-8)


def test_jax_third_derivative_matches_a_difference_of_exact_second_derivatives():
    b = jnp.full((1, 1), SCALAR_INPUT)
    second = jax.jit(lambda b: jax.hessian(jax_scalar_solution)(b, "newton").sum())
    third = jax.grad(second)(b)
    h = 1e-4
    assert float(third[0, 0]) == pytest.approx((float(second(b + h)) - float(second(b - h))) / (2 * h), rel=1e-6)


def vector_problem(batch=3, n=5, seed=3):
    generator = np.random.default_rng(seed)
    A = generator.standard_normal((n, n))
    return 0.8 * A / np.linalg.norm(A, 2), generator.standard_normal((batch, n)), generator.standard_normal((batch, n))


def test_jax_hessian_vector_products_match_finite_differences_and_unrolling():
    W, x, c = (jnp.asarray(a) for a in vector_problem())

    def loss(x, backward="implicit"):
        z, _ = ilj.fixed_point(lambda z, x: jnp.tanh(z @ W.T + x), jnp.zeros_like(x), x, tol=1e-13,
                               backward=backward)
        return jnp.sum(jnp.sin(z) * c)

    direction = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape))
    hvp = jax.jvp(jax.grad(loss), (x,), (direction,))[1]
    h = 1e-5
    finite_difference = (jax.grad(loss)(x + h * direction) - jax.grad(loss)(x - h * direction)) / (2 * h)
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(finite_difference), rtol=1e-6, atol=1e-8)
    unrolled = jax.jvp(jax.grad(lambda x: loss(x, "unrolled")), (x,), (direction,))[1]
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(unrolled), rtol=1e-9, atol=1e-11)


def torch_scalar_solution(b, backward, solver="newton"):
    z, _ = ilt.fixed_point(
        lambda z: torch.tanh(SCALAR_SLOPE * z + b), torch.zeros(1, 1, dtype=torch.float64), solver=solver,
        backward=backward, tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=400,
    )
    return z


@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_unrolled_second_derivative_is_exact(solver):
    _, first, second = scalar_layer_derivatives()
    b = torch.full((1, 1), SCALAR_INPUT, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(torch_scalar_solution(b, "unrolled", solver).sum(), b, create_graph=True)
    (curvature,) = torch.autograd.grad(gradient.sum(), b)
    assert float(gradient.detach()) == pytest.approx(first, rel=1e-10)
    assert float(curvature) == pytest.approx(second, rel=1e-8)


@pytest.mark.parametrize("loss", ["linear", "nonlinear"])
def test_torch_implicit_second_derivative_refuses_instead_of_lying(loss):
    """Before, the double backward returned -1.9185 for the exact -3.0676. With a loss linear in z the incoming
    gradient is a constant and the refusal must still happen."""
    _, first, _ = scalar_layer_derivatives()
    b = torch.full((1, 1), SCALAR_INPUT, dtype=torch.float64, requires_grad=True)
    z = torch_scalar_solution(b, "implicit")
    output = z.sum() if loss == "linear" else (z**3).sum()
    (gradient,) = torch.autograd.grad(output, b, create_graph=True)
    expected = first if loss == "linear" else 3 * float(z.detach()) ** 2 * first
    assert float(gradient.detach()) == pytest.approx(expected, rel=1e-10)  # create_graph alone is fine
    with pytest.raises(UnsupportedDerivativeError, match="first order"):
        torch.autograd.grad(gradient.sum(), b)


def test_torch_layer_second_derivative_refuses():
    layer = ilt.FixedPointLayer(TanhCell(4)).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(UnsupportedDerivativeError):
        gradient.sum().backward()


def test_torch_unrolled_and_jax_implicit_second_derivatives_agree():
    W, x, c = vector_problem()
    direction = np.random.default_rng(1).standard_normal(x.shape)
    W_t, c_t = torch.tensor(W), torch.tensor(c)
    x_t = torch.tensor(x, requires_grad=True)
    z, _ = ilt.fixed_point(lambda z: torch.tanh(z @ W_t.T + x_t), torch.zeros_like(x_t), backward="unrolled",
                           tol=1e-13)
    (gradient,) = torch.autograd.grad((torch.sin(z) * c_t).sum(), x_t, create_graph=True)
    (hvp_torch,) = torch.autograd.grad(gradient, x_t, torch.tensor(direction))

    def loss(x):
        z, _ = ilj.fixed_point(lambda z, x: jnp.tanh(z @ jnp.asarray(W).T + x), jnp.zeros_like(x), x, tol=1e-13)
        return jnp.sum(jnp.sin(z) * c)

    hvp_jax = jax.jvp(jax.grad(loss), (jnp.asarray(x),), (jnp.asarray(direction),))[1]
    np.testing.assert_allclose(hvp_torch.numpy(), np.asarray(hvp_jax), rtol=1e-9, atol=1e-11)


class TanhCell(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


# Maps that mix the batch: the residual reported is the true one


MIXING_RATES = np.array([0.0, 0.9, 0.9, 0.9])[:, None]


def mixing_start(zeros):
    """Sample 0 starts at its fixed point for this batch (its residual is exactly 0), the others at 0."""
    return zeros.at[0].set(1.0) if isinstance(zeros, jax.Array) else zeros.index_fill(0, torch.tensor([0]), 1.0)


def torch_batch_mixing(z):
    """Every sample is pulled towards 1 + half the mean of samples 1 to 3: sample 0 at once, the others slowly,
    so they move the target of sample 0 after it has stopped."""
    rates = torch.tensor(MIXING_RATES, dtype=z.dtype)
    return rates * z + (1 - rates) * (1 + 0.5 * z[1:].mean(dim=0))


def jax_batch_mixing(z):
    rates = jnp.asarray(MIXING_RATES, z.dtype)
    return rates * z + (1 - rates) * (1 + 0.5 * z[1:].mean(axis=0))


def mixing_problem(framework):
    if framework == "torch":
        return mixing_start(torch.zeros(4, 3, dtype=torch.float64)), torch_batch_mixing, ilt
    return mixing_start(jnp.zeros((4, 3))), jax_batch_mixing, ilj


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_map_that_mixes_the_batch_gets_its_true_final_residual(framework, solver):
    z0, f, module = mixing_problem(framework)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        z, result = getattr(module, solver)(f, z0, tol=1e-8, max_iter=30)
    true_residual = np.linalg.norm(np.asarray(f(z)) - np.asarray(z), axis=1)
    np.testing.assert_allclose(np.asarray(result.residual), true_residual, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(result.converged), true_residual < 1e-8)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_sample_that_loses_convergence_is_reported(framework):
    """Before, sample 0 was reported converged with its initial residual, 0, while its true final residual was
    about 0.5 (1e7 times the tolerance)."""
    z0, f, module = mixing_problem(framework)
    with pytest.warns(ConvergenceWarning, match="1 met the tolerance and lost it.*mixes the samples"):
        _, result = module.forward_iteration(f, z0, tol=1e-8, max_iter=30)
    assert float(result.residuals[0, 0]) == 0.0
    assert not bool(result.converged[0]) and float(result.residual[0]) > 0.1


# Batch semantics


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_the_state_needs_a_batch_and_a_state_dimension(framework, solver):
    """Before, a 1-D z0 was an IndexError in torch and silently n samples of size 1 in JAX."""
    if framework == "torch":
        vector, solve = torch.zeros(5), getattr(ilt, solver)
    else:
        vector, solve = jnp.zeros(5), getattr(ilj, solver)
    for z0 in (vector, vector[0], vector[:0]):
        with pytest.raises(ValueError, match=r"z0 must have shape \(B, \.\.\.\).*z0\[None\]"):
            solve(lambda z: 0.5 * z, z0)
    empty_samples = torch.zeros(5, 0) if framework == "torch" else jnp.zeros((5, 0))
    with pytest.raises(ValueError, match="z0 has samples with no elements"):
        solve(lambda z: 0.5 * z, empty_samples)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_empty_batch_solves_and_differentiates_in_both_frameworks(solver):
    """Before, an empty batch worked in torch and was a ZeroDivisionError in JAX."""
    W, _, _ = vector_problem()
    x_t = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    W_t = torch.tensor(W, requires_grad=True)
    z_t, result_t = ilt.fixed_point(lambda z: torch.tanh(z @ W_t.T + x_t), torch.zeros_like(x_t), solver=solver)
    z_t.sum().backward()
    assert z_t.shape == (0, 5) and result_t.status == "converged" and float(W_t.grad.abs().sum()) == 0.0

    def loss(theta):
        z, result = ilj.fixed_point(lambda z, th: jnp.tanh(z @ th[0].T + th[1]), jnp.zeros((0, 5)), theta,
                                    solver=solver)
        return z.sum(), result

    (value, result_j), gradient = jax.value_and_grad(loss, has_aux=True)((jnp.asarray(W), jnp.zeros((0, 5))))
    assert result_j.status == "converged" and float(value) == 0.0 and float(jnp.abs(gradient[0]).sum()) == 0.0
    z_jit, _ = jax.jit(lambda z0: getattr(ilj, solver)(lambda z: 0.5 * z, z0))(jnp.zeros((0, 2, 3)))
    assert z_jit.shape == (0, 2, 3)


# 16-bit states


LOW_PRECISION = {"float16": (torch.float16, jnp.float16, 2e-2), "bfloat16": (torch.bfloat16, jnp.bfloat16, 1e-1)}


@pytest.mark.parametrize("precision", LOW_PRECISION)
@pytest.mark.parametrize("solver", SOLVERS)
def test_16_bit_states_solve_in_both_frameworks(precision, solver):
    """Before, forward iteration and Broyden crashed in torch after solving and Newton and Anderson failed with
    backend errors. The state stays in 16 bits; residual norms and small linear systems run in float32."""
    torch_dtype, jax_dtype, tol = LOW_PRECISION[precision]
    W, x, _ = vector_problem(batch=4, n=6)
    reference = np.zeros_like(x)
    for _ in range(200):
        reference = np.tanh(reference @ W.T + x)

    W_t, x_t = torch.tensor(W, dtype=torch_dtype), torch.tensor(x, dtype=torch_dtype)
    z_t, result_t = getattr(ilt, solver)(lambda z: torch.tanh(z @ W_t.T + x_t), torch.zeros_like(x_t), tol=tol)
    W_j, x_j = jnp.asarray(W, jax_dtype), jnp.asarray(x, jax_dtype)
    z_j, result_j = getattr(ilj, solver)(lambda z: jnp.tanh(z @ W_j.T + x_j), jnp.zeros_like(x_j), tol=tol)
    for z, result in ((z_t, result_t), (np.asarray(z_j), result_j)):
        assert str(z.dtype) == f"torch.{precision}" or str(z.dtype) == precision
        assert result.status == "converged"
        assert str(result.residuals.dtype).endswith("float32")
        np.testing.assert_allclose(np.asarray(z, dtype=np.float64) if not isinstance(z, torch.Tensor)
                                   else z.double().numpy(), reference, atol=5 * tol)


@pytest.mark.parametrize("precision", LOW_PRECISION)
def test_16_bit_implicit_gradients_are_close_to_float64(precision):
    torch_dtype, jax_dtype, tol = LOW_PRECISION[precision]
    W, x, c = vector_problem(batch=4, n=6)

    def torch_gradient(dtype):
        x_t = torch.tensor(x, dtype=dtype, requires_grad=True)
        W_t = torch.tensor(W, dtype=dtype)
        z, _ = ilt.fixed_point(lambda z: torch.tanh(z @ W_t.T + x_t), torch.zeros_like(x_t),
                               tol=tol if dtype != torch.float64 else 1e-12)
        (z.double() * torch.tensor(c)).sum().backward()
        return x_t.grad.double().numpy()

    def jax_gradient(dtype):
        def loss(x):
            z, _ = ilj.fixed_point(lambda z, x: jnp.tanh(z @ jnp.asarray(W, dtype).T + x), jnp.zeros_like(x), x,
                                   tol=tol if dtype != jnp.float64 else 1e-12)
            return jnp.sum(z.astype(jnp.float64) * c)

        return np.asarray(jax.grad(loss)(jnp.asarray(x, dtype)), dtype=np.float64)

    exact = torch_gradient(torch.float64)
    np.testing.assert_allclose(jax_gradient(jnp.float64), exact, rtol=1e-9)
    scale = np.abs(exact).max()
    assert np.abs(torch_gradient(torch_dtype) - exact).max() < 5 * tol * scale
    assert np.abs(jax_gradient(jax_dtype) - exact).max() < 5 * tol * scale


# Strictness and status under jit


def test_jax_strict_and_status_with_and_without_jit():
    f = lambda z: 0.99 * z + 0.01  # noqa: E731 (converges slowly: 3 steps are far from enough)
    z0 = jnp.zeros((2, 3))
    with pytest.raises(ConvergenceError, match="did not converge for 2 of 2 samples"):
        ilj.forward_iteration(f, z0, max_iter=3, strict=True)
    with pytest.raises(jax.errors.JaxRuntimeError, match="ConvergenceError: forward_iteration did not converge"):
        jax.block_until_ready(jax.jit(lambda z0: ilj.forward_iteration(f, z0, max_iter=3, strict=True))(z0))
    with pytest.raises(ValueError, match="z0 contains NaN"):
        ilj.forward_iteration(f, jnp.full((2, 3), jnp.nan))
    # Under jit the NaN cannot be seen before the solve: it is reported as a failure, not as max_iter.
    with pytest.warns(ConvergenceWarning, match="2 stopped because a step gave NaN"):
        _, result = jax.jit(lambda z0: ilj.forward_iteration(f, z0))(jnp.full((2, 3), jnp.nan))
        jax.block_until_ready(result)
    assert result.status == "diverged" and bool(result.failed.all())


# Arguments are checked when fixed_point is called


def torch_call(**options):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    return ilt.fixed_point(lambda z: torch.tanh(0.5 * z + x), torch.zeros_like(x), **options)


def jax_call(**options):
    return ilj.fixed_point(lambda z, x: jnp.tanh(0.5 * z + x), jnp.zeros((2, 3)), jnp.ones((2, 3)), **options)


BAD_OPTIONS = [
    (dict(backward_tol=-1.0), ValueError, "backward_tol must be a positive finite number"),
    (dict(backward_max_iter=0), ValueError, "backward_max_iter must be a positive integer"),
    (dict(backward_max_iter=2.5), ValueError, "backward_max_iter must be a positive integer"),
    (dict(strict="yes"), TypeError, "strict must be True or False"),
    (dict(warn=None), TypeError, "warn must be True or False"),
    (dict(solver_options={"warn": False}), ValueError, "argument 'warn'"),
    (dict(solver_options={"tol": 1e-3}), ValueError, "solver_options may not set 'tol'.*argument 'tol'"),
    (dict(solver_options={"max_iter": 3}), ValueError, "solver_options may not set 'max_iter'"),
    (dict(backward_solver_options={"tol": 1e-3}), ValueError, "argument 'backward_tol'"),
    (dict(solver="anderson", solver_options={"history": 3}), ValueError, "option 'history'.*takes 'm', 'ridge'"),
    (dict(solver="newton", solver_options={"m": 3}), ValueError, "'newton' solver does not take"),
    (dict(backward_solver="broyden", backward_solver_options={"ridge": 1.0}), ValueError, "'broyden'"),
    (dict(solver_options=[("m", 3)]), TypeError, "solver_options must be a dict"),
]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_every_option_is_checked_when_fixed_point_is_called(framework, options, error, message):
    """Before, backward_tol and backward_max_iter were checked only when a backward pass ran (and the message
    named the wrong argument) and a tol inside solver_options was silently overridden."""
    call = torch_call if framework == "torch" else jax_call
    with pytest.raises(error, match=message):
        call(**options)
    if framework == "torch":
        with pytest.raises(error, match=message):
            ilt.FixedPointLayer(TanhCell(3), **options)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_numpy_scalars_are_accepted(framework):
    options = dict(tol=np.float32(1e-6), max_iter=np.int64(50), backward_tol=np.float64(1e-8),
                   backward_max_iter=np.int32(100), solver="anderson",
                   solver_options={"m": np.int64(4), "ridge": np.float32(1e-4), "damping": np.float64(0.9)},
                   strict=np.bool_(False))
    _, result = (torch_call if framework == "torch" else jax_call)(**options)
    assert result.status == "converged"


# Maps that ignore the state


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_map_that_ignores_the_state_solves_and_differentiates(solver, backward):
    """f(z) = c(theta): before, torch's Newton crashed in the forward pass and every implicit backward pass
    crashed; JAX handled it."""
    theta = np.array([[0.5, -1.0, 2.0]])
    c_t = torch.tensor(theta, requires_grad=True)
    z_t, result_t = ilt.fixed_point(lambda z: torch.sin(c_t) + 0 * c_t, torch.zeros(1, 3, dtype=torch.float64),
                                    solver=solver, backward=backward)
    z_t.sum().backward()

    def loss(c):
        z, _ = ilj.fixed_point(lambda z, c: jnp.sin(c), jnp.zeros((1, 3)), c, solver=solver, backward=backward)
        return z.sum()

    gradient_j = jax.grad(loss)(jnp.asarray(theta))
    assert result_t.status == "converged"
    np.testing.assert_allclose(z_t.detach().numpy(), np.sin(theta), atol=1e-12)
    np.testing.assert_allclose(c_t.grad.numpy(), np.cos(theta), atol=1e-12)
    np.testing.assert_allclose(np.asarray(gradient_j), np.cos(theta), atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_warn_false_leaves_the_check_out_and_strict_still_raises(solver):
    def f(z):  # one step of any method is far from a fixed point to 1e-12
        return 0.9 * (torch.tanh(z) if isinstance(z, torch.Tensor) else jnp.tanh(z)) + 0.5

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, result_t = getattr(ilt, solver)(f, torch.zeros(2, 3), max_iter=1, tol=1e-12, warn=False)
        _, result_j = jax.jit(lambda z0: getattr(ilj, solver)(f, z0, max_iter=1, tol=1e-12, warn=False))(
            jnp.zeros((2, 3))
        )
        x = torch.ones(2, 3, requires_grad=True)
        z, _ = ilt.fixed_point(lambda z: f(z) * x, torch.zeros(2, 3), solver=solver, max_iter=1, tol=1e-12,
                               backward_max_iter=1, backward_tol=1e-12, warn=False)
        z.sum().backward()
    assert result_t.status == result_j.status == "max_iter"
    with pytest.raises(ConvergenceError):
        getattr(ilt, solver)(f, torch.zeros(2, 3), max_iter=1, tol=1e-12, warn=False, strict=True)


def test_newtons_jacobian_evaluates_the_map_once():
    """Before, the legacy batched-gradient path fell back to one backward call per row (257 calls at n = 256)
    for maps such as tanh; torch.func evaluates the map once on a stack of tangents."""
    calls = 0
    W = torch.randn(16, 16, dtype=torch.float64)

    def f(z):
        nonlocal calls
        calls += 1
        return torch.tanh(z @ W.T)

    ilt.batched_jacobian(f, torch.randn(3, 16, dtype=torch.float64))
    assert calls == 1
