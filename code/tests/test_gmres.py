"""GMRES, the Krylov solver of the implicit backward system, in both frameworks."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt
from implicit_layers.errors import ConvergenceError, ConvergenceWarning

from conftest import tanh_problem

jax.config.update("jax_enable_x64", True)


def non_normal_jacobians(batch=3, n=8, seed=0):
    """Upper-triangular J per sample with diagonal entries up to 1.6 in magnitude and a large strictly upper
    part: spectral radius above one (forward iteration on g = J^T g + v diverges), far from normal, and
    I - J invertible since no diagonal entry is 1."""
    generator = np.random.default_rng(seed)
    diagonal = generator.choice([-1.6, -1.3, 1.4, 1.6, 0.5, -0.4], size=(batch, n))
    upper = np.triu(generator.standard_normal((batch, n, n)), k=1)
    return upper + diagonal[:, :, None] * np.eye(n)


def batched_affine_problem(batch=4, n=10, scale=0.6, seed=1):
    generator = np.random.default_rng(seed)
    return scale * generator.standard_normal((batch, n, n)), generator.standard_normal((batch, n))


def dense_fixed_point(A, b):
    return np.linalg.solve(np.eye(A.shape[-1]) - A, b[..., None])[..., 0]


def torch_affine(A, b):
    A_t, b_t = torch.from_numpy(A), torch.from_numpy(b)
    return lambda z: torch.einsum("bij,bj->bi", A_t, z) + b_t


def jax_affine(A, b):
    return lambda z: jnp.einsum("bij,bj->bi", A, z) + b


# The solver on its own


@pytest.mark.parametrize("restart", [4, 10, 50])
def test_gmres_matches_a_dense_float64_solve_in_both_frameworks(restart):
    A, b = batched_affine_problem(scale=0.3)
    expected = dense_fixed_point(A, b)
    z_t, result_t = ilt.gmres(torch_affine(A, b), torch.zeros(4, 10, dtype=torch.float64), restart=restart,
                              tol=1e-13, max_iter=400)
    z_j, result_j = ilj.gmres(jax_affine(A, b), jnp.zeros((4, 10)), restart=restart, tol=1e-13, max_iter=400)
    assert result_t.status == result_j.status == "converged"
    np.testing.assert_allclose(z_t.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(z_j), expected, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(result_t.iterations.numpy(), np.asarray(result_j.iterations))
    assert result_t.nfe == int(result_j.nfe)


def test_gmres_converges_on_a_non_normal_system_where_forward_iteration_diverges():
    J = non_normal_jacobians()
    assert np.abs(np.linalg.eigvals(J)).max() > 1.5
    b = np.random.default_rng(2).standard_normal((3, 8))
    expected = dense_fixed_point(J, b)
    z0 = torch.zeros(3, 8, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="forward_iteration did not converge"):
        ilt.forward_iteration(torch_affine(J, b), z0, tol=1e-10, max_iter=200)
    z_t, result_t = ilt.gmres(torch_affine(J, b), z0, restart=8, tol=1e-12)
    z_j, result_j = ilj.gmres(jax_affine(J, b), jnp.zeros((3, 8)), restart=8, tol=1e-12)
    np.testing.assert_allclose(z_t.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(z_j), expected, rtol=0, atol=1e-10)
    # A full Krylov space of an 8-dimensional state: at most 8 steps, in one cycle.
    assert int(result_t.iterations.max()) <= 8 and int(result_j.iterations.max()) <= 8


def test_each_step_evaluates_the_map_once_and_the_last_residual_is_true():
    A, b = batched_affine_problem(scale=0.3)
    calls = 0

    def counted(z):
        nonlocal calls
        calls += 1
        return torch_affine(A, b)(z)

    z, result = ilt.gmres(counted, torch.zeros(4, 10, dtype=torch.float64), restart=3, tol=1e-11, max_iter=300)
    cycles = math.ceil(result.num_steps / 3)  # every cycle but possibly the last runs all 3 steps
    assert calls == result.nfe == 2 + result.num_steps + cycles
    true_residual = (counted(z) - z).norm(dim=1)
    torch.testing.assert_close(result.residual, true_residual, rtol=1e-6, atol=1e-14)
    assert bool((result.residuals[0] == torch.from_numpy(b).norm(dim=1)).all())


def test_converged_samples_stop_changing_and_the_batch_equals_each_sample_alone():
    A, b = batched_affine_problem(batch=3, scale=0.3)
    A[0] *= 0.01  # nearly the identity system: converges in a few steps while the others run on
    z, result = ilt.gmres(torch_affine(A, b), torch.zeros(3, 10, dtype=torch.float64), restart=4, tol=1e-12,
                          max_iter=300)
    assert int(result.iterations[0]) < int(result.iterations[1:].min())
    for k in range(3):
        alone, alone_result = ilt.gmres(torch_affine(A[k : k + 1], b[k : k + 1]),
                                        torch.zeros(1, 10, dtype=torch.float64), restart=4, tol=1e-12, max_iter=300)
        torch.testing.assert_close(z[k : k + 1], alone, rtol=0, atol=1e-13)
        assert int(alone_result.iterations[0]) == int(result.iterations[k])
    # After its last step the trace holds that step's estimate until its cycle ends, then its true residual,
    # which no later cycle changes.
    after_stop = result.residuals[int(result.iterations[0]) :, 0].tolist()
    assert len(set(after_stop)) <= 2 and after_stop[-1] == float(result.residual[0])


def test_jax_gmres_composes_with_jit_and_vmap():
    A, b = batched_affine_problem(scale=0.3)
    z, _ = jax.jit(lambda b: ilj.gmres(jax_affine(A, b), jnp.zeros((4, 10)), restart=5, tol=1e-12))(b)
    np.testing.assert_allclose(np.asarray(z), dense_fixed_point(A, b), rtol=0, atol=1e-10)
    stacked = jnp.stack([jnp.asarray(b), -2.0 * jnp.asarray(b)])
    zs, results = jax.vmap(lambda b: ilj.gmres(jax_affine(A, b), jnp.zeros((4, 10)), restart=5, tol=1e-12))(stacked)
    np.testing.assert_allclose(np.asarray(zs[1]), -2.0 * dense_fixed_point(A, b), rtol=0, atol=1e-10)
    assert bool(results.converged.all())


def test_non_convergence_warns_with_the_true_residual_and_strict_raises():
    J = non_normal_jacobians()
    b = np.random.default_rng(2).standard_normal((3, 8))
    for gmres, f, z0 in [(ilt.gmres, torch_affine(J, b), torch.zeros(3, 8, dtype=torch.float64)),
                         (ilj.gmres, jax_affine(J, b), jnp.zeros((3, 8)))]:
        with pytest.warns(ConvergenceWarning, match="gmres did not converge for 3 of 3 samples") as record:
            z, result = gmres(f, z0, restart=8, max_iter=2, tol=1e-12)
        largest = float(np.max(np.asarray(result.residual)))
        assert f"largest residual reached {largest:.3g}" in str(record[0].message)
        true_residual = np.linalg.norm(np.asarray(f(z)) - np.asarray(z), axis=1)
        np.testing.assert_allclose(np.asarray(result.residual), true_residual, rtol=1e-8)
        with pytest.raises(ConvergenceError, match="gmres did not converge"):
            gmres(f, z0, restart=8, max_iter=2, tol=1e-12, strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            gmres(f, z0, restart=8, max_iter=2, tol=1e-12, warn=False)


def test_a_singular_system_is_reported_as_failed():
    A = np.stack([np.eye(3), 0.5 * np.eye(3)])  # I - A is zero for sample 0
    b = np.ones((2, 3))
    for gmres, f, z0 in [(ilt.gmres, torch_affine(A, b), torch.zeros(2, 3, dtype=torch.float64)),
                         (ilj.gmres, jax_affine(A, b), jnp.zeros((2, 3)))]:
        with pytest.warns(ConvergenceWarning, match="1 stopped because a step gave NaN/Inf or a singular"):
            z, result = gmres(f, z0, tol=1e-12)
        assert np.asarray(result.failed).tolist() == [True, False]
        np.testing.assert_allclose(np.asarray(z)[1], 2.0 * np.ones(3), atol=1e-12)
        np.testing.assert_array_equal(np.asarray(z)[0], np.zeros(3))  # keeps its last finite iterate


@pytest.mark.parametrize("gmres, zeros", [(ilt.gmres, lambda *shape: torch.zeros(shape, dtype=torch.float64)),
                                          (ilj.gmres, lambda *shape: jnp.zeros(shape))], ids=["torch", "jax"])
def test_gmres_arguments_name_themselves(gmres, zeros):
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    for restart in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match=f"restart must be a positive integer, got {restart!r}"):
            gmres(f, zeros(2, 3), restart=restart)
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        gmres(f, zeros(2, 3), tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        gmres(f, zeros(2, 3), max_iter=0)
    with pytest.raises(ValueError, match="z0 must have shape \\(B, ...\\)"):
        gmres(f, zeros(3))
    with pytest.raises(ValueError, match=r"f\(z\) must return an? (tensor|array) of z's shape"):
        gmres(lambda z: z[:, :2], zeros(2, 3))


def test_an_empty_batch_solves():
    for gmres, z0 in [(ilt.gmres, torch.zeros(0, 3, dtype=torch.float64)), (ilj.gmres, jnp.zeros((0, 3)))]:
        z, result = gmres(lambda z: 0.5 * z + 1.0, z0)
        assert tuple(z.shape) == (0, 3) and result.status == "converged"


# Through fixed_point


def torch_tanh_solution(x, W, **options):
    return ilt.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), tol=1e-12, max_iter=100,
                           backward_solver="gmres", backward_tol=1e-13, **options)[0]


def jax_tanh_solution(theta, **options):
    return ilj.fixed_point(lambda z, theta: jnp.tanh(z @ theta[0].T + theta[1]), jnp.zeros(theta[1].shape), theta,
                           tol=1e-12, max_iter=100, backward_solver="gmres", backward_tol=1e-13, **options)[0]


def expansive_tanh(batch=4, n=12):
    """tanh(W z + x) with a symmetric W of spectral norm 1.5 and small inputs: Newton finds the fixed point
    near 0, where J is close to W, so forward iteration on the adjoint system diverges."""
    generator = torch.Generator().manual_seed(5)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    W = 1.5 * (A + A.T) / torch.linalg.matrix_norm(A + A.T, ord=2)
    return W, 0.01 * torch.randn(batch, n, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("restart", [3, 20])
def test_torch_gradcheck_through_fixed_point_with_gmres(restart):
    W, x = tanh_problem(batch=3, n=5)
    inputs = (x.requires_grad_(), W.requires_grad_())
    options = dict(backward_solver_options={"restart": restart}, backward_max_iter=200)
    assert torch.autograd.gradcheck(lambda x, W: torch_tanh_solution(x, W, **options), inputs)


def test_jax_check_grads_through_fixed_point_with_gmres():
    """Second derivatives through GMRES are checked against a closed form in test_semantics.py."""
    W, x = tanh_problem(batch=3, n=5)
    theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
    solution = lambda theta: jax_tanh_solution(theta, backward_solver_options={"restart": 3})  # noqa: E731
    check_grads(solution, (theta,), order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(solution), (theta,), order=1, modes=("rev",))


def test_gradients_match_dense_solves_and_each_other_where_the_adjoint_iteration_diverges():
    W, x = expansive_tanh()
    upstream = np.random.default_rng(3).standard_normal(tuple(x.shape))
    # Reference: g = (I - J^T)^{-1} v and dL/dx = D g with J = D W, D = diag(1 - z*^2), in dense float64.
    with torch.no_grad():
        z_star, _ = ilt.newton(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), tol=1e-14)
    D = torch.diag_embed(1 - z_star**2)
    J = (D @ W).numpy()
    adjoint = np.linalg.solve(np.eye(12) - np.swapaxes(J, 1, 2), upstream[..., None])
    expected = (D.numpy() @ adjoint)[..., 0]
    assert np.abs(np.linalg.eigvals(J)).max() > 1.2

    x_t = x.clone().requires_grad_()
    results = []
    z_t = ilt.fixed_point(lambda z: torch.tanh(z @ W.T + x_t), torch.zeros_like(x), tol=1e-13, backward_solver="gmres",
                          backward_solver_options={"restart": 12}, backward_tol=1e-14,
                          backward_callback=results.append)[0]
    (grad_t,) = torch.autograd.grad(z_t, x_t, torch.from_numpy(upstream))
    assert results[0].status == "converged" and int(results[0].iterations.max()) <= 12

    def loss(x):
        z = ilj.fixed_point(lambda z, x: jnp.tanh(z @ jnp.asarray(W.numpy()).T + x), jnp.zeros(x.shape), x,
                            tol=1e-13, backward_solver="gmres", backward_solver_options={"restart": 12},
                            backward_tol=1e-14)[0]
        return jnp.sum(z * upstream)

    grad_j = jax.grad(loss)(jnp.asarray(x.numpy()))
    np.testing.assert_allclose(grad_t.numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(grad_j), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(grad_t.numpy(), np.asarray(grad_j), rtol=0, atol=1e-12)

    z_t = ilt.fixed_point(lambda z: torch.tanh(z @ W.T + x_t), torch.zeros_like(x), tol=1e-13,
                          backward_solver="forward_iteration")[0]
    with pytest.warns(ConvergenceWarning, match="forward_iteration did not converge"):
        torch.autograd.grad(z_t, x_t, torch.from_numpy(upstream))


def test_jax_gradients_with_gmres_under_jit_and_vmap():
    W, x = tanh_problem(batch=3, n=5)
    theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
    loss = lambda theta: jnp.sum(jnp.sin(jax_tanh_solution(theta)))  # noqa: E731
    reference = jax.grad(loss)(theta)
    under_jit = jax.jit(jax.grad(loss))(theta)
    per_input = jax.vmap(jax.grad(lambda x: loss((theta[0], x))))(jnp.stack([theta[1], 2.0 * theta[1]]))
    np.testing.assert_allclose(np.asarray(under_jit[1]), np.asarray(reference[1]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(per_input[0]), np.asarray(reference[1]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(per_input[1]),
                               np.asarray(jax.grad(lambda x: loss((theta[0], x)))(2.0 * theta[1])), atol=1e-12)


def test_backward_non_convergence_warns_and_strict_raises_in_both_frameworks():
    W, x = expansive_tanh()
    x_t = x.clone().requires_grad_()
    options = dict(backward_solver_options={"restart": 2}, backward_max_iter=2)
    with pytest.warns(ConvergenceWarning, match="gmres did not converge"):
        torch.autograd.grad(torch_tanh_solution(x_t, W, **options).sum(), x_t)
    with pytest.raises(ConvergenceError, match="gmres did not converge"):
        torch.autograd.grad(torch_tanh_solution(x_t, W, strict=True, **options).sum(), x_t)
    theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
    with pytest.warns(ConvergenceWarning, match="gmres did not converge"):
        jax.grad(lambda theta: jax_tanh_solution(theta, **options).sum())(theta)


BAD_GMRES_OPTIONS = [
    (dict(backward_solver="gmres", backward_solver_options={"restart": 0}), ValueError,
     "backward_solver_options: restart must be a positive integer, got 0"),
    (dict(backward_solver="gmres", backward_solver_options={"restart": 2.5}), ValueError,
     "backward_solver_options: restart must be a positive integer, got 2.5"),
    (dict(backward_solver="gmres", backward_solver_options={"m": 3}), ValueError,
     "option 'm' that the 'gmres' solver does not take; it takes 'restart'"),
    (dict(backward_solver="gmres", backward_solver_options={"max_iter": 3}), ValueError,
     "argument 'backward_max_iter'"),
    (dict(solver="gmres"), ValueError, "solver 'gmres' solves linear systems only.*backward_solver='gmres'"),
    (dict(solver="anderson", solver_options={"m": 0}), ValueError,
     "solver_options: m must be a positive integer, got 0"),
    (dict(backward_solver="krylov"), ValueError, "unknown backward_solver 'krylov'.*'gmres'"),
]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("options, error, message", BAD_GMRES_OPTIONS)
def test_gmres_options_are_checked_when_fixed_point_is_called(framework, options, error, message):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match=message):
        if framework == "torch":
            ilt.fixed_point(lambda z: torch.tanh(0.5 * z + x), torch.zeros_like(x), **options)
        else:
            ilj.fixed_point(lambda z, x: jnp.tanh(0.5 * z + x), jnp.zeros((2, 3)), jnp.ones((2, 3)), **options)


def test_an_empty_batch_differentiates_through_gmres_in_both_frameworks():
    W = torch.eye(3, dtype=torch.float64) * 0.5
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    z = torch_tanh_solution(x, W)
    (grad_t,) = torch.autograd.grad(z.sum(), x)
    grad_j = jax.grad(lambda x: jax_tanh_solution((jnp.asarray(W.numpy()), x)).sum())(jnp.zeros((0, 3)))
    assert tuple(grad_t.shape) == tuple(grad_j.shape) == (0, 3)


def test_float32_gradient_through_gmres_is_close_to_float64():
    W, x = tanh_problem(batch=3, n=5)
    gradients = []
    for dtype in (torch.float32, torch.float64):
        x_d = x.to(dtype).requires_grad_()
        z = ilt.fixed_point(lambda z: torch.tanh(z @ W.to(dtype).T + x_d), torch.zeros_like(x_d), tol=1e-6,
                            backward_solver="gmres", backward_tol=1e-6)[0]
        gradients.append(torch.autograd.grad(z.sum(), x_d)[0].double())
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-5)
