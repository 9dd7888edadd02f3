import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import implicit_layers.torch as ilt
from implicit_layers.jax import (
    ConvergenceError,
    ConvergenceWarning,
    anderson,
    batched_jacobian,
    broyden,
    cache_compilations,
    fixed_point,
    forward_iteration,
    newton,
)

from conftest import tanh_problem

jax.config.update("jax_enable_x64", True)

SOLVER_FUNCTIONS = {"forward_iteration": forward_iteration, "newton": newton, "anderson": anderson, "broyden": broyden}


def tanh_cell(z, theta):
    W, x = theta
    return jnp.tanh(z @ W.T + x)


def jax_problem(**kwargs):
    W, x = tanh_problem(**kwargs)
    return jnp.asarray(W.numpy()), jnp.asarray(x.numpy())


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_solvers_reach_the_fixed_point_and_match_torch(name):
    W, x = tanh_problem(batch=5, n=8, scale=0.8)
    theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
    z, result = SOLVER_FUNCTIONS[name](lambda z: tanh_cell(z, theta), jnp.zeros(x.shape), tol=1e-11, max_iter=300)
    assert result.status == "converged"
    assert float(jnp.abs(tanh_cell(z, theta) - z).max()) < 1e-11
    torch_solver = getattr(ilt, name)
    z_torch, torch_result = torch_solver(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), tol=1e-11, max_iter=300)
    np.testing.assert_allclose(np.asarray(z), z_torch.numpy(), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(result.iterations), torch_result.iterations.numpy())
    assert int(result.nfe) == torch_result.nfe
    steps = int(result.num_steps)
    np.testing.assert_allclose(np.asarray(result.residuals[: steps + 1]), torch_result.residuals.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(result.residuals[steps:]), np.asarray(result.residual)[None].repeat(301 - steps, 0))


@pytest.mark.parametrize("name", SOLVER_FUNCTIONS)
def test_jit_vmap_and_per_sample_stopping(name):
    W, x = jax_problem(batch=6, scale=0.8)
    x = x * jnp.linspace(0.01, 3.0, 6)[:, None]
    solve = SOLVER_FUNCTIONS[name]
    run = jax.jit(lambda x: solve(lambda z: tanh_cell(z, (W, x)), jnp.zeros_like(x), tol=1e-10, max_iter=300))
    z, result = run(x)
    assert len(set(np.asarray(result.iterations).tolist())) > 1
    for i in range(6):
        zi, ri = run(x[i : i + 1])
        np.testing.assert_allclose(np.asarray(zi[0]), np.asarray(z[i]), atol=1e-14)
        assert int(ri.iterations[0]) == int(result.iterations[i])
    z_vmapped, _ = jax.vmap(run)(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(z_vmapped[0]), np.asarray(z), atol=1e-14)


def test_batched_jacobian_matches_jacfwd():
    W, x = jax_problem()
    z = 0.1 * jnp.ones_like(x)
    fz, jacobian = batched_jacobian(lambda z: tanh_cell(z, (W, x)), z)
    for b in range(x.shape[0]):
        expected = jax.jacfwd(lambda zb: jnp.tanh(W @ zb + x[b]))(z[b])
        np.testing.assert_allclose(np.asarray(jacobian[b]), np.asarray(expected), atol=1e-14)


@pytest.mark.parametrize(
    "solver, backward_solver",
    [("newton", "forward_iteration"), ("forward_iteration", "newton"), ("anderson", "anderson"), ("broyden", "broyden")],
)
def test_check_grads_forward_and_reverse(solver, backward_solver):
    W, x = jax_problem(batch=3, n=5)

    def solution(theta):
        return fixed_point(
            tanh_cell, jnp.zeros(x.shape), theta, solver=solver, backward_solver=backward_solver,
            tol=1e-12, max_iter=300, backward_tol=1e-13, backward_max_iter=500,
        )[0]

    check_grads(solution, ((W, x),), order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(solution), ((W, x),), order=1, modes=("rev",))


def test_implicit_equals_unrolled_and_torch_gradient():
    W_t, x_t = tanh_problem(batch=4, n=6, scale=0.7)
    theta = (jnp.asarray(W_t.numpy()), jnp.asarray(x_t.numpy()))
    upstream = np.random.default_rng(0).standard_normal(x_t.shape)

    def loss(theta, backward):
        z, _ = fixed_point(tanh_cell, jnp.zeros(x_t.shape), theta, backward=backward, tol=1e-12, backward_tol=1e-13)
        return jnp.sum(z * upstream)

    implicit = jax.grad(loss)(theta, "implicit")
    unrolled = jax.grad(loss)(theta, "unrolled")
    W_r, x_r = W_t.clone().requires_grad_(), x_t.clone().requires_grad_()
    z_torch, _ = ilt.fixed_point(lambda z: torch.tanh(z @ W_r.T + x_r), torch.zeros_like(x_t), tol=1e-12, backward_tol=1e-13)
    torch_grads = torch.autograd.grad((z_torch * torch.from_numpy(upstream)).sum(), (W_r, x_r))
    for i in range(2):
        np.testing.assert_allclose(np.asarray(implicit[i]), np.asarray(unrolled[i]), atol=1e-11)
        np.testing.assert_allclose(np.asarray(implicit[i]), torch_grads[i].numpy(), atol=1e-11)


def test_non_convergence_warns_eagerly_and_under_jit():
    W, x = jax_problem()
    f = lambda z: tanh_cell(z, (1.8 * W, x))  # noqa: E731
    with pytest.warns(ConvergenceWarning, match="largest residual reached"):
        _, result = forward_iteration(f, jnp.zeros(x.shape), tol=1e-12, max_iter=1)
    assert result.status == "max_iter"
    with pytest.raises(ConvergenceError, match="largest residual reached"):
        newton(f, jnp.zeros(x.shape), tol=1e-12, max_iter=1, strict=True)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        jax.block_until_ready(jax.jit(lambda z0: forward_iteration(f, z0, tol=1e-12, max_iter=1)[0])(jnp.zeros(x.shape)))


def test_unrolled_accelerated_solvers_match_implicit():
    W, x = jax_problem(batch=3, n=5, scale=0.8)

    def loss(theta, solver, backward):
        z, _ = fixed_point(tanh_cell, jnp.zeros(x.shape), theta, solver=solver, backward=backward,
                           tol=1e-12, max_iter=60, backward_tol=1e-13)
        return jnp.sum(z**2)

    for solver in ("anderson", "broyden"):
        implicit = jax.grad(loss)((W, x), solver, "implicit")
        unrolled = jax.grad(loss)((W, x), solver, "unrolled")
        for a, b in zip(implicit, unrolled):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)


def test_solver_options_are_checked():
    W, x = jax_problem()
    f = lambda z: tanh_cell(z, (W, x))  # noqa: E731
    with pytest.raises(ValueError, match="m must be a positive integer"):
        anderson(f, jnp.zeros(x.shape), m=0)
    with pytest.raises(ValueError, match="damping must lie in"):
        anderson(f, jnp.zeros(x.shape), damping=0.0)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        broyden(f, jnp.zeros(x.shape), m=-2)
    z, result = fixed_point(tanh_cell, jnp.zeros(x.shape), (W, x), solver="anderson",
                            solver_options={"m": 2, "damping": 0.7}, tol=1e-10)
    assert result.status == "converged"


def test_failures_are_reported():
    with pytest.warns(ConvergenceWarning, match="NaN/Inf"):
        _, result = forward_iteration(lambda z: 10.0 * z + 1.0, jnp.zeros((3, 2), jnp.float32), max_iter=200)
    assert result.status == "diverged"
    with pytest.warns(ConvergenceWarning, match="singular"):
        _, result = newton(lambda z: z + 1.0, jnp.zeros((2, 3)))
    assert result.status == "diverged"


def test_bad_inputs_name_the_argument():
    W, x = jax_problem()
    f = lambda z: tanh_cell(z, (W, x))  # noqa: E731
    with pytest.raises(TypeError, match="z0 must be a JAX array"):
        forward_iteration(f, [0.0])
    with pytest.raises(ValueError, match=r"z0 must have shape \(B, \.\.\.\)"):
        forward_iteration(f, jnp.zeros(()))
    with pytest.raises(TypeError, match="z0 must have a floating-point dtype"):
        newton(f, jnp.zeros(x.shape, jnp.int32))
    with pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        forward_iteration(f, jnp.full(x.shape, jnp.nan))
    with pytest.raises(ValueError, match="array of z's shape"):
        forward_iteration(lambda z: z[:, :3], jnp.zeros(x.shape))
    with pytest.raises(TypeError, match=r"f\(z\) must return a JAX array, got float"):
        forward_iteration(lambda z: 1.0, jnp.zeros(x.shape))
    with pytest.raises(ValueError, match=r"f\(z0\) contains NaN or Inf"):
        newton(lambda z: z + jnp.inf, jnp.zeros(x.shape))
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        forward_iteration(f, jnp.zeros(x.shape), tol=-1.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        newton(f, jnp.zeros(x.shape), max_iter=0)
    with pytest.raises(ValueError, match="unknown solver 'lbfgs'"):
        fixed_point(tanh_cell, jnp.zeros(x.shape), (W, x), solver="lbfgs")
    with pytest.raises(ValueError, match="unknown backward 'neumann'"):
        fixed_point(tanh_cell, jnp.zeros(x.shape), (W, x), backward="neumann")


def test_torch_and_jax_mirror_each_other():
    import implicit_layers.jax as ilj

    shared = {"SOLVERS", "ConvergenceError", "ConvergenceWarning", "SolverResult", "anderson", "batched_jacobian",
              "broyden", "fixed_point", "forward_iteration", "newton", "project_simplex", "soft_topk", "sparsemax",
              "qp", "QPResult", "QP_STATUSES", "cnf_dynamics", "cnf_log_likelihood", "cnf_sample", "divergence",
              "flow_matching_loss", "flow_matching_path", "hutchinson_probe", "kinetic_energy",
              "standard_normal_log_prob"}
    assert shared <= set(ilt.__all__) and shared <= set(ilj.__all__)
    assert set(ilt.SOLVERS) == set(ilj.SOLVERS)
    torch_only = set(ilt.__all__) - set(ilj.__all__)
    assert torch_only == {"ConvDEQCell", "FixedPointLayer", "autograd_graph_bytes", "default_device",
                          "peak_memory_bytes", "seed_everything"}
    assert set(ilj.__all__) - set(ilt.__all__) == {"cache_compilations", "compiled_memory_bytes", "conv_deq_cell",
                                                   "conv_deq_cell_init"}


def test_torch_and_jax_mirror_file_for_file():
    """One subpackage per family, one module per algorithm, the same files on both sides."""
    import implicit_layers

    root = Path(implicit_layers.__file__).parent

    def modules(framework):
        return {path.relative_to(root / framework).as_posix() for path in (root / framework).rglob("*.py")}

    assert modules("torch") == modules("jax")
    assert "fixed_points/fixed_point.py" in modules("torch")
    assert "optimization/projections.py" in modules("torch")
    assert "optimization/qp.py" in modules("torch")
    assert "cnf/flow.py" in modules("torch") and "cnf/flow.py" in modules("jax")


def test_derivative_defaults_and_failed_samples():
    # Near 0 the Jacobian is close to W, spectral radius 1.5: plain iteration of the linear systems diverges,
    # the default linear solver (Newton, like the forward one) still gives the gradient.
    generator = np.random.default_rng(5)
    A = generator.standard_normal((12, 12))
    W = jnp.asarray(1.5 * (A + A.T) / np.linalg.norm(A + A.T, 2))
    x = jnp.asarray(0.01 * generator.standard_normal((4, 12)))
    gradient = jax.grad(lambda x: fixed_point(tanh_cell, jnp.zeros(x.shape), (W, x), tol=1e-12)[0].sum())(x)
    W_t, x_t = torch.tensor(np.asarray(W)), torch.tensor(np.asarray(x), requires_grad=True)
    z_t, _ = ilt.fixed_point(lambda z: torch.tanh(z @ W_t.T + x_t), torch.zeros_like(x_t), tol=1e-12)
    (expected,) = torch.autograd.grad(z_t.sum(), x_t)
    np.testing.assert_allclose(np.asarray(gradient), expected.numpy(), rtol=1e-7, atol=1e-10)
    with pytest.warns(ConvergenceWarning):
        jax.grad(lambda x: fixed_point(tanh_cell, jnp.zeros(x.shape), (W, x), backward_solver="forward_iteration")[0].sum())(x)

    broken = jnp.array([True, False, False])[:, None]

    def f(z, theta):
        W, x = theta
        return jnp.where(broken, z + 1.0 + 0.0 * x, jnp.tanh(z @ W.T + x))

    W3, x3 = jax_problem(batch=3, n=4)
    with pytest.warns(ConvergenceWarning, match="singular"):
        gradient = jax.grad(lambda x: fixed_point(f, jnp.zeros(x.shape), (W3, x), tol=1e-12)[0].sum())(x3)
    assert bool((gradient[0] == 0).all())
    healthy = jax.grad(lambda x: fixed_point(tanh_cell, jnp.zeros(x.shape), (W3, x), tol=1e-12)[0].sum())(x3[1:])
    np.testing.assert_allclose(np.asarray(gradient[1:]), np.asarray(healthy), atol=1e-12)


def test_compilation_cache_serves_a_repeated_solve_outside_jit(tmp_path):
    """Outside jit, each call builds a new closure, so only the persistent cache can reuse its program. JAX's
    cache settings are global and fixed at the first compilation, hence a fresh interpreter."""
    script = f"""
import jax, jax.numpy as jnp, os
import implicit_layers.jax as ilj
assert ilj.cache_compilations({str(tmp_path)!r}) == {str(tmp_path)!r}
x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
def solve():
    return ilj.fixed_point(lambda z, x: jnp.tanh(0.5 * z + x), jnp.zeros_like(x), x, solver="anderson")[0]
first = solve()
entries = set(os.listdir({str(tmp_path)!r}))
second = solve()
assert entries, "the first solve wrote no compiled program"
assert set(os.listdir({str(tmp_path)!r})) == entries, "the second solve compiled a new program"
assert bool(jnp.all(first == second))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(TypeError, match="directory must be a path or None"):
        cache_compilations(3)
