"""The JAX QP layer: solutions and multipliers against CVXPY, gradients against the exact KKT derivative and
finite differences, infeasible, unbounded and degenerate problems, batching, composition with jit, vmap and grad,
the refusal of second derivatives, and every refusal of a bad argument. Float64 throughout.

The solve compiles once per shape and dtype, so the random problems share a batch of four where they can."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from qp_problems import SHAPES, cvxpy_solve, kkt_gradients, random_qp

import implicit_layers.jax as ilj
from implicit_layers.errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from implicit_layers.jax import qp
from implicit_layers.jax.optimization._kkt import kkt_residual

jax.config.update("jax_enable_x64", True)
# A program identical to one compiled earlier in the session (the gradient of a new lambda) is loaded instead of
# compiled again; the cache is a fresh temporary directory, so every run compiles afresh.
ilj.cache_compilations()

NAMES = ("Q", "p", "G", "h", "A", "b")
OPTIONS = ("tol", "max_iter", "strict", "warn")
solve = jax.jit(qp, static_argnames=OPTIONS)


def as_jax(problem: dict) -> dict:
    return {name: jnp.asarray(value) for name, value in problem.items()}


def sample(problem: dict, i: int) -> list:
    """The arguments of sample ``i`` in NAMES order, None where the problem has no such argument."""
    return [problem[name][i] if name in problem else None for name in NAMES]


def relative_error(value, reference) -> float:
    return float(np.abs(np.asarray(value) - reference).max() / max(np.abs(reference).max(), 1e-300))


def kinds() -> dict:
    return {
        **{kind: random_qp(0, *SHAPES[kind], batch=4) for kind in SHAPES},
        "semidefinite": random_qp(1, 8, 6, 2, batch=4, rank=3),
        "linear program": random_qp(2, 8, 6, 2, batch=4, rank=0),
    }


@pytest.mark.parametrize("kind", sorted(SHAPES) + ["semidefinite", "linear program"])
def test_solutions_and_multipliers_match_cvxpy(kind):
    problem = kinds()[kind]
    x, result = qp(**as_jax(problem))
    assert result.status == ("solved",) * 4 and bool(result.converged.all())
    for i in range(4):
        reference = cvxpy_solve(*sample(problem, i))
        for value, expected in zip((x[i], result.lam[i], result.nu[i]), reference):
            np.testing.assert_allclose(value, expected, atol=1e-7 * max(1.0, np.abs(expected).max(initial=0)))
    # The record's residuals are those of the returned point.
    batched = {name: jnp.asarray(problem.get(name, np.zeros((4, 0, 8) if name in "GA" else (4, 0)))) for name in NAMES}
    residual = kkt_residual(*batched.values(), x, result.lam, result.nu, result.slack)
    np.testing.assert_allclose(residual.primal, result.primal_residual, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(residual.dual, result.dual_residual, rtol=1e-7, atol=1e-12)
    assert bool((result.slack >= 0).all() and (result.lam >= 0).all())
    assert int(result.nfe) == int(result.iterations.max()) + 1


def test_tolerance_sets_the_accuracy():
    problem = random_qp(3, *SHAPES["mixed"], batch=4)
    references = [cvxpy_solve(*sample(problem, i))[0] for i in range(4)]
    errors = []
    for tol in (1e-4, 1e-7, 1e-10):
        x, result = qp(**as_jax(problem), tol=tol)
        errors.append(max(relative_error(x[i], references[i]) for i in range(4)))
        assert float(result.gap.max()) < 100 * tol * (1 + float(np.abs(problem["p"]).max()) ** 2)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_gradients_match_the_exact_kkt_derivative(kind):
    problem = kinds()[kind]
    inputs = as_jax(problem)
    g = jax.random.normal(jax.random.key(0), (4, 8), dtype=jnp.float64)

    def loss(inputs):
        x, result = qp(**inputs)
        return jnp.sum(g * x), (x, result)

    gradients, (x, result) = jax.grad(loss, has_aux=True)(inputs)
    for i in range(4):
        reference = kkt_gradients(*sample(problem, i), np.asarray(x[i]), np.asarray(result.lam[i]),
                                  np.asarray(result.nu[i]), np.asarray(g[i]))
        scale = max(np.abs(reference[name]).max(initial=0) for name in inputs)
        for name in inputs:
            np.testing.assert_allclose(gradients[name][i], reference[name], atol=1e-7 * scale, err_msg=name)


def test_gradients_match_the_implicit_function_theorem_on_the_kkt_map():
    """An oracle independent of the outer-product formulas: JAX differentiates the KKT map F(z, theta) =
    [Qx + p + G'lam + A'nu; lam * (Gx - h); Ax - b] at the solution z = (x, lam, nu), and the implicit function
    theorem gives dL/dtheta = -(dF/dtheta)' u with (dF/dz)' u = dL/dz (jaxopt's root_vjp). The map keeps the
    slack and multiplier left at the tolerance (qp's backward zeroes them by the active set), an error that grows
    as a multiplier nears zero: 3e-7 relative on these samples, hence 1e-6."""
    problem = random_qp(13, *SHAPES["mixed"], batch=4)
    g = jax.random.normal(jax.random.key(1), (4, 8), dtype=jnp.float64)
    gradients, (x, result) = jax.grad(
        lambda inputs: (jnp.sum(g * qp(**inputs)[0]), qp(**inputs)), has_aux=True)(as_jax(problem))

    @jax.jit
    def implicit_gradient(z, theta, g):
        def kkt_map(z, theta):
            x, lam, nu = jnp.split(z, [8, 18])
            Q, p, G, h, A, b = theta
            Q = 0.5 * (Q + Q.T)  # qp reads the symmetric part of Q, so its gradient is symmetric
            return jnp.concatenate([Q @ x + p + G.T @ lam + A.T @ nu, lam * (G @ x - h), A @ x - b])

        dF_dz = jax.jacobian(kkt_map)(z, theta)
        u = jnp.linalg.solve(dF_dz.T, jnp.concatenate([g, jnp.zeros(13)]))
        return jax.vjp(lambda theta: kkt_map(z, theta), theta)[1](-u)[0]

    for i in range(4):
        z = jnp.concatenate([x[i], result.lam[i], result.nu[i]])
        expected = implicit_gradient(z, tuple(jnp.asarray(problem[name][i]) for name in NAMES), g[i])
        scale = max(float(jnp.abs(v).max()) for v in expected)
        for name, value in zip(NAMES, expected):
            np.testing.assert_allclose(gradients[name][i], value, atol=1e-6 * scale, err_msg=name)


def test_check_grads_of_every_argument():
    problem = as_jax(random_qp(5, *SHAPES["mixed"], batch=4))

    def solution(Q, p, G, h, A, b):
        return qp(0.5 * (Q + jnp.swapaxes(Q, -1, -2)), p, G, h, A, b, tol=1e-12)[0]

    check_grads(solution, tuple(problem[name] for name in NAMES), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


def test_shared_arguments_receive_the_sum_of_the_per_sample_gradients():
    """Q, G, h, A, b shared by the batch (those of sample 0, so every sample is feasible), p per sample."""
    problem = random_qp(6, *SHAPES["mixed"], batch=4)
    shared = {name: jnp.asarray(problem[name][0]) for name in NAMES if name != "p"}
    p = jnp.asarray(problem["p"])

    def loss(shared, p):
        x, _ = qp(p=p, **shared)
        return jnp.sum(x**2), x

    gradients, x = jax.grad(loss, has_aux=True)(shared, p)
    total = {name: 0.0 for name in shared}
    for i in range(4):
        alone, x_i = jax.grad(loss, has_aux=True)(shared, p[i])
        np.testing.assert_allclose(x_i[0], x[i], rtol=0, atol=1e-12)
        total = {name: total[name] + alone[name] for name in shared}
    for name in shared:
        np.testing.assert_allclose(gradients[name], total[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_batched_equals_per_sample():
    problem = random_qp(7, *SHAPES["mixed"], batch=4)
    x, result = qp(**as_jax(problem))
    for i in range(4):
        x_i, result_i = qp(**{name: jnp.asarray(value[i]) for name, value in problem.items()})
        np.testing.assert_allclose(x_i[0], x[i], rtol=0, atol=1e-12)
        assert int(result_i.iterations[0]) == int(result.iterations[i])


def infeasible_and_unbounded():
    """Sample 0: feasible. 1: x1 <= -1 and x1 >= 1. 2: x1 + x2 = 1 and x1 + x2 = 2. 3: min -x2 with only x1
    bounded."""
    Q = np.array([[1.0, 0.0], [0.0, 0.0]])
    p = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    G = np.array([[[1.0, 0.0], [-1.0, 0.0]]] * 4)
    h = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    A = np.array([[[1.0, 1.0], [1.0, 1.0]]] * 4)
    b = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    A[3] = 0.0
    b[3] = 0.0
    return dict(Q=Q, p=p, G=G, h=h, A=A, b=b)


def test_infeasible_and_unbounded_samples_are_certified_and_named():
    problem = infeasible_and_unbounded()
    inputs = as_jax(problem)

    def total(p, inputs):
        x, result = qp(**{**inputs, "p": p})
        return jnp.sum(x), (x, result)

    with pytest.warns(ConvergenceWarning, match=r"2 primal infeasible .*samples 1, 2; 1 dual infeasible .*sample 3"):
        gradient, (x, result) = jax.grad(total, has_aux=True)(inputs["p"], inputs)
    assert result.status == ("solved", "primal_infeasible", "primal_infeasible", "dual_infeasible")
    np.testing.assert_allclose(x[0], [0.0, 1.0], atol=1e-8, rtol=0)
    assert bool(jnp.isnan(x[1:]).all())
    for i in (1, 2):  # Farkas certificates: lam >= 0, G'lam + A'nu = 0, h'lam + b'nu < 0
        lam, nu = np.asarray(result.lam[i]), np.asarray(result.nu[i])
        assert (lam >= 0).all()
        assert np.abs(problem["G"][i].T @ lam + problem["A"][i].T @ nu).max() < 1e-8
        assert problem["h"][i] @ lam + problem["b"][i] @ nu < -1e-3
    assert bool(jnp.isfinite(gradient[0]).all()) and bool(jnp.isnan(gradient[1:]).all())
    with pytest.raises(ConvergenceError, match="primal infeasible"):
        qp(**inputs, strict=True)


def test_stopping_at_max_iter_warns_with_the_residuals_reached():
    problem = as_jax(random_qp(8, *SHAPES["mixed"], batch=4))
    with pytest.warns(ConvergenceWarning, match=r"4 not solved within max_iter=2 iterations .*primal residual"):
        _, result = qp(**problem, max_iter=2)
    assert result.status == ("max_iter",) * 4 and result.iterations.tolist() == [2] * 4 and int(result.nfe) == 3
    with pytest.raises(ConvergenceError, match="max_iter=2"):
        qp(**problem, max_iter=2, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qp(**problem, max_iter=2, warn=False)


def test_weakly_active_constraint():
    """min 1/2 x^2 + p x subject to -x <= h at p = h = 0: the constraint is active with a zero multiplier, and
    x*(p, h) = max(-p, -h) has a kink there. The solution is accurate to about the square root of the tolerance,
    and the gradient is one of the two one-sided derivatives, (dx/dp, dx/dh) = (-1, 0) or (0, -1). No argument
    has a batch dimension, so the batch is one."""

    def solution(p, h):
        x, result = qp(jnp.ones((1, 1)), p, -jnp.ones((1, 1)), h)
        return x.sum(), (x, result)

    (dp, dh), (x, result) = jax.grad(solution, argnums=(0, 1), has_aux=True)(jnp.zeros(1), jnp.zeros(1))
    assert x.shape == (1, 1) and result.lam.shape == (1, 1) and result.nu.shape == (1, 0)
    assert result.status == ("solved",) and abs(float(x[0, 0])) < 1e-4
    assert (float(dp[0]), float(dh[0])) in ((-1.0, 0.0), (0.0, -1.0))


def test_float32():
    problem = random_qp(9, *SHAPES["mixed"], batch=4)
    x64, _ = qp(**as_jax(problem))
    inputs = {name: jnp.asarray(value, dtype=jnp.float32) for name, value in problem.items()}
    x32, result = qp(**inputs)
    assert x32.dtype == jnp.float32 and result.status == ("solved",) * 4
    np.testing.assert_allclose(x32, x64, atol=1e-3, rtol=1e-3)
    gradients = jax.grad(lambda inputs: qp(**inputs)[0].sum())(inputs)
    assert all(value.dtype == jnp.float32 and bool(jnp.isfinite(value).all()) for value in gradients.values())


def test_second_derivatives_are_refused():
    """grad of grad and the Hessian raise when traced; forward mode is JAX's own refusal of a custom_vjp. The
    gradient differentiated with respect to what only the incoming cotangent depends on stays allowed, and exact:
    d/dw of the gradient of w x*(p) with respect to p is dx*/dp."""
    inputs = as_jax(random_qp(10, *SHAPES["mixed"], batch=4))
    p = inputs.pop("p")

    def total(p):
        return qp(p=p, **inputs)[0].sum()

    for derivative in (jax.grad(lambda p: jax.grad(total)(p).sum()), jax.hessian(total),
                       jax.jit(jax.grad(lambda p: jax.grad(total)(p).sum()))):
        with pytest.raises(UnsupportedDerivativeError, match="differentiable once"):
            derivative(p)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(total, (p,), (jnp.ones_like(p),))
    mixed = jax.grad(lambda w: jax.grad(lambda p: w * total(p))(p).sum())(2.0)
    np.testing.assert_allclose(mixed, jax.grad(total)(p).sum(), rtol=1e-12)


def loss_and_solution(problem: dict):
    x, result = qp(**problem)
    return jnp.sum(x**2), (x, result)


def test_under_jit_the_warning_and_the_strict_error_come_from_the_device():
    problem = as_jax(infeasible_and_unbounded())
    with pytest.warns(ConvergenceWarning, match=r"2 primal infeasible .*samples 1, 2; 1 dual infeasible .*sample 3"):
        jax.block_until_ready(solve(**problem))
        jax.effects_barrier()
    with warnings.catch_warnings():  # the same program on four copies of the feasible sample: no warning
        warnings.simplefilter("error")
        feasible = {name: value if name == "Q" else jnp.broadcast_to(value[0], value.shape)
                    for name, value in problem.items()}
        jax.block_until_ready(solve(**feasible))
        jax.effects_barrier()
    with pytest.raises(jax.errors.JaxRuntimeError, match="ConvergenceError.*primal infeasible"):
        jax.block_until_ready(solve(**problem, strict=True))
        jax.effects_barrier()


def test_jit_of_vmap_over_single_problems_equals_the_batch():
    """jit, vmap and grad composed: a vmap over unbatched problems gives each its batch of one, x of shape
    (V, 1, n), with the solutions, iterations and gradients of the batch solved at once, operation by operation
    (one compiled program for all of it)."""
    problem = as_jax(random_qp(12, *SHAPES["mixed"], batch=4))
    gradients, (x, result) = jax.grad(loss_and_solution, has_aux=True)(problem)
    per_sample = jax.jit(jax.vmap(jax.grad(loss_and_solution, has_aux=True)))
    gradients_vmap, (x_vmap, result_vmap) = per_sample(problem)
    assert x_vmap.shape == (4, 1, 8)
    np.testing.assert_allclose(x_vmap[:, 0], x, rtol=0, atol=1e-12)
    assert result_vmap.iterations[:, 0].tolist() == result.iterations.tolist()
    assert result_vmap.status_code[:, 0].tolist() == result.status_code.tolist()
    for name in NAMES:
        np.testing.assert_allclose(gradients_vmap[name], gradients[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_value_checks_run_on_concrete_values_only():
    """Under jit a NaN argument cannot be seen before the solve (tracing it raises nothing); the shape and dtype
    checks still run."""
    Q, p = jnp.eye(2), jnp.array([0.0, jnp.nan])
    with pytest.raises(ValueError, match="p contains NaN or Inf"):
        qp(Q, p)
    jax.jit(lambda Q, p: qp(Q, p)).trace(Q, p)
    with pytest.raises(ValueError, match=r"p must have shape \(n,\)"):
        jax.jit(lambda Q, p: qp(Q, p)).trace(Q, jnp.zeros(3))
    with pytest.raises(TypeError, match="p has dtype float32 but Q has float64"):
        jax.jit(lambda Q, p: qp(Q, p)).trace(Q, jnp.zeros(2, dtype=jnp.float32))


_Q, _p = jnp.eye(2), jnp.zeros(2)
_G, _h = jnp.eye(2), jnp.ones(2)
BAD_ARGUMENTS = {
    "Q not square": (dict(Q=jnp.ones((2, 3)), p=_p), ValueError, r"Q must have shape \(n, n\)"),
    "p of the wrong size": (dict(Q=_Q, p=jnp.zeros(3)), ValueError, r"p must have shape \(n,\)"),
    "G without h": (dict(Q=_Q, p=_p, G=_G), ValueError, "G is given without h"),
    "h of the wrong size": (dict(Q=_Q, p=_p, G=_G, h=jnp.ones(3)), ValueError, r"h must have shape \(m,\)"),
    "batch sizes disagree": (dict(Q=jnp.broadcast_to(_Q, (3, 2, 2)), p=jnp.broadcast_to(_p, (4, 2))), ValueError,
                             "Q has 3, p has 4"),
    "not an array": (dict(Q=[[1.0, 0.0], [0.0, 1.0]], p=_p), TypeError, "Q must be a JAX array"),
    "integer dtype": (dict(Q=jnp.eye(2, dtype=jnp.int32), p=_p), TypeError, "Q must be float32 or float64"),
    "mixed dtypes": (dict(Q=_Q, p=_p.astype(jnp.float32)), TypeError, "p has dtype float32 but Q has float64"),
    "NaN": (dict(Q=_Q, p=jnp.array([0.0, jnp.nan])), ValueError, "p contains NaN or Inf"),
    "not symmetric": (dict(Q=jnp.array([[1.0, 1.0], [0.0, 1.0]]), p=_p), ValueError, "Q must be symmetric"),
    "indefinite": (dict(Q=jnp.diag(jnp.array([1.0, -1.0])), p=_p), ValueError,
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
