"""The JAX CNF toolkit: the exact divergence against the full Jacobian, Hutchinson's estimator against its
theoretical mean and variance, log-likelihoods and regularizers against closed forms on a linear field and against
the log-determinant of the flow map, sampling and likelihood as inverses, gradients in every mode of ``odeint``,
flow matching by hand, every refusal, and the torch twin on the same weights. Float64 throughout.

Solves go through a few jitted functions whose options are static, so a repeated configuration compiles once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats
import torch
from jax.test_util import check_grads

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt

jax.config.update("jax_enable_x64", True)
ilj.cache_compilations()

FLOW_OPTIONS = ("t0", "t1", "kinetic", "frobenius", "base_log_prob", "method", "rtol", "atol", "num_steps",
                "max_steps", "gradient")
log_likelihood = jax.jit(ilj.cnf_log_likelihood, static_argnums=0, static_argnames=FLOW_OPTIONS)
sample = jax.jit(ilj.cnf_sample, static_argnums=0, static_argnames=FLOW_OPTIONS)
divergence = jax.jit(ilj.divergence, static_argnums=0)
TIGHT = dict(method="dopri5", rtol=1e-10, atol=1e-10)
REGULARIZED = dict(kinetic=0.5, frobenius=0.1)


def mlp_weights(sizes=(2, 16, 16, 2), seed=0):
    """Weights of an MLP field whose first layer also reads the time, as NumPy arrays (both frameworks use them)."""
    rng = np.random.default_rng(seed)
    weights = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        fan_in += index == 0
        weights.append((rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in), 0.1 * rng.standard_normal(fan_out)))
    return weights


def mlp(t, y, theta):
    """A tanh MLP field ``f(t, y, theta)`` on (B, D) states."""
    hidden = jnp.concatenate([y, t[:, None]], axis=1)
    for index, (W, b) in enumerate(theta):
        hidden = hidden @ W + b
        if index < len(theta) - 1:
            hidden = jnp.tanh(hidden)
    return hidden


def torch_mlp(weights):
    """The same field in torch, ``f(t, y)`` closing over the weights."""
    theta = [(torch.tensor(W), torch.tensor(b)) for W, b in weights]

    def field(t, y):
        hidden = torch.cat([y, t[:, None]], dim=1)
        for index, (W, b) in enumerate(theta):
            hidden = hidden @ W + b
            if index < len(theta) - 1:
                hidden = torch.tanh(hidden)
        return hidden

    return field


def linear(t, y, A):
    return y @ A.T


def jax_weights(weights):
    return [(jnp.asarray(W), jnp.asarray(b)) for W, b in weights]


def points(batch, dimension, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, dimension)))


def numpy_mlp(t, y, weights):
    """The field and its Jacobian in NumPy for one sample, for SciPy's independent solves."""
    hidden, jacobian = np.concatenate([y, [t]]), np.eye(len(y) + 1)[:, : len(y)]
    for index, (W, b) in enumerate(weights):
        hidden, jacobian = hidden @ W + b, W.T @ jacobian
        if index < len(weights) - 1:
            hidden = np.tanh(hidden)
            jacobian = (1 - hidden**2)[:, None] * jacobian
    return hidden, jacobian


def test_exact_divergence_is_the_trace_and_frobenius_norm_of_the_jacobian():
    theta = jax_weights(mlp_weights(sizes=(3, 8, 3)))
    y, t = points(5, 3, seed=1), jnp.linspace(0.0, 1.0, 5)
    fy, div, frobenius = divergence(mlp, t, y, theta)

    @jax.jit
    def jacobians(t, y):
        return jax.vmap(lambda t_i, y_i: jax.jacrev(lambda v: mlp(t_i[None], v[None], theta)[0])(y_i))(t, y)

    np.testing.assert_allclose(fy, mlp(t, y, theta), rtol=1e-14)
    np.testing.assert_allclose(div, jnp.trace(jacobians(t, y), axis1=1, axis2=2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(frobenius, jnp.sum(jacobians(t, y) ** 2, axis=(1, 2)), rtol=1e-12)
    # One number for the time is shared by the batch.
    np.testing.assert_allclose(ilj.divergence(mlp, 0.25, y, theta)[1], divergence(mlp, jnp.full(5, 0.25), y, theta)[1],
                               rtol=1e-14)
    # Both outputs are differentiable in y and theta: reverse mode against finite differences.
    check_grads(jax.jit(lambda y, theta: divergence(mlp, t, y, theta)[1:]), (y, theta), order=1, modes=["rev"])


@pytest.mark.parametrize("kind", ("rademacher", "gaussian"))
def test_hutchinson_is_unbiased_with_the_theoretical_variance(kind):
    # A linear field has the same Jacobian A for every sample, so a batch of N gives N independent estimates.
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 4))
    count = 20_000
    y = points(count, 4, seed=3)
    probe = ilj.hutchinson_probe(y, jax.random.PRNGKey(4), kind=kind)
    assert probe.shape == y.shape and probe.dtype == y.dtype
    if kind == "rademacher":
        assert set(np.unique(probe)) == {-1.0, 1.0}
    _, div, frobenius = divergence(linear, jnp.zeros(count), y, jnp.asarray(A), probe)

    def variance(S):
        """Var[e^T S e] for a symmetric S: 2 ||S||_F^2, less the diagonal's share for Rademacher signs."""
        return 2 * (np.sum(S**2) - (np.sum(np.diag(S) ** 2) if kind == "rademacher" else 0.0))

    # div estimates trace(A), with S the symmetric part of A; frobenius = |A^T e|^2 = e^T A A^T e estimates
    # ||A||_F^2, with S = A A^T.
    for estimates, mean, S in ((div, np.trace(A), (A + A.T) / 2), (frobenius, np.sum(A**2), A @ A.T)):
        estimates = np.asarray(estimates)
        assert abs(estimates.mean() - mean) < 4 * math.sqrt(variance(S) / count)
        # The sample variance's relative standard error is a few percent at this count.
        np.testing.assert_allclose(estimates.var(), variance(S), rtol=0.1)


def laplace_log_prob(z):
    """A base distribution other than the default: independent standard Laplace entries."""
    return -jnp.sum(jnp.abs(z), axis=1) - z.shape[1] * math.log(2.0)


@pytest.mark.parametrize("t0, t1", ((0.0, 1.0), (1.0, 0.5)))
def test_linear_field_log_prob_and_regularization_in_closed_form(t0, t1):
    # y' = A y: z = expm(-A (t1 - t0)) x, the divergence is trace(A) everywhere and ||df/dy||_F^2 = ||A||_F^2;
    # the kinetic term is integrated by SciPy. The second case runs the other way in time, with a Gaussian
    # probe, whose estimates e^T A e and |A^T e|^2 are constant along the path, and a Laplace base.
    rng = np.random.default_rng(5)
    A = 0.8 * rng.standard_normal((3, 3))
    x = points(4, 3, seed=6)
    span = t1 - t0
    z = np.asarray(x) @ scipy.linalg.expm(-A * span).T
    kinetic = scipy.integrate.quad_vec(
        lambda s: np.sum((np.asarray(x) @ scipy.linalg.expm(A * (s - t1)).T @ A.T) ** 2, axis=1),
        min(t0, t1), max(t0, t1), epsabs=1e-13, epsrel=1e-12,
    )[0]
    if t0 < t1:
        probe, base = None, None
        trace, frobenius = np.trace(A), np.sum(A**2)
        base_log_prob = -0.5 * np.sum(z**2, axis=1) - 1.5 * math.log(2 * math.pi)
    else:
        probe, base = ilj.hutchinson_probe(x, jax.random.PRNGKey(7), kind="gaussian"), laplace_log_prob
        trace, frobenius = np.einsum("bi,ij,bj->b", probe, A, probe), np.sum((np.asarray(probe) @ A) ** 2, axis=1)
        base_log_prob = -np.sum(np.abs(z), axis=1) - 3 * math.log(2.0)
    log_prob, regularization, result = log_likelihood(
        linear, x, jnp.asarray(A), t0=t0, t1=t1, probe=probe, base_log_prob=base, **REGULARIZED, **TIGHT
    )
    assert result.status == "converged"
    np.testing.assert_allclose(log_prob, base_log_prob - span * trace, rtol=1e-9)
    assert np.all(np.asarray(regularization) > 0)
    np.testing.assert_allclose(regularization, 0.5 * kinetic + 0.1 * abs(span) * frobenius, rtol=1e-8)


def test_sampling_and_likelihood_are_inverses_and_match_the_flow_maps_log_determinant():
    weights = mlp_weights()
    theta = jax_weights(weights)
    z = points(6, 2, seed=8)
    x, sample_log_prob, result = sample(mlp, z, theta, **TIGHT)
    assert result.status == "converged"
    log_prob, regularization, _ = log_likelihood(mlp, x, theta, **REGULARIZED, **TIGHT)
    np.testing.assert_allclose(log_prob, sample_log_prob, rtol=1e-8)
    assert np.all(np.asarray(regularization) > 0)
    # The discrete change of variables with the exact log-determinant of the flow map z -> x, from SciPy's
    # solve of the flow with its variational equation J' = (df/dy) J, J(t0) = I.
    for z_i, x_i, log_prob_i in zip(np.asarray(z), np.asarray(x), np.asarray(sample_log_prob)):
        def flow_and_jacobian(t, state):
            f, jacobian = numpy_mlp(t, state[:2], weights)
            return np.concatenate([f, (jacobian @ state[2:].reshape(2, 2)).ravel()])

        solution = scipy.integrate.solve_ivp(flow_and_jacobian, (0.0, 1.0), np.concatenate([z_i, np.eye(2).ravel()]),
                                             method="DOP853", rtol=1e-12, atol=1e-12)
        end = solution.y[:, -1]
        np.testing.assert_allclose(x_i, end[:2], rtol=1e-8, atol=1e-10)
        discrete = -0.5 * z_i @ z_i - math.log(2 * math.pi) - np.linalg.slogdet(end[2:].reshape(2, 2))[1]
        np.testing.assert_allclose(log_prob_i, discrete, rtol=1e-8)


def tanh_cell(t, y, theta):
    """A one-layer field, small enough that the gradient programs compile quickly."""
    W, b = theta
    return jnp.tanh(y @ W + t[:, None] * b)


def test_gradients_agree_across_odeint_gradient_modes():
    theta = (jnp.asarray([[0.5, -1.0], [0.8, 0.2]]), jnp.asarray([0.3, -0.4]))
    x = points(4, 2, seed=9)
    probe = ilj.hutchinson_probe(x, jax.random.PRNGKey(10))

    def loss(theta, x, probe, gradient, method="dopri5", **options):
        log_prob, regularization, _ = ilj.cnf_log_likelihood(
            tanh_cell, x, theta, probe=probe, **REGULARIZED, method=method, gradient=gradient, **options
        )
        return regularization - log_prob

    # Backpropagation through the solver and the continuous adjoint agree to the solver's tolerance; the
    # checkpointed gradient of a fixed-step solve, an explicit computation, against finite differences.
    adaptive = dict(rtol=1e-9, atol=1e-9, max_steps=60)
    gradients = {
        mode: jax.jit(jax.grad(lambda *args: jnp.sum(loss(*args, mode, **adaptive)), argnums=(0, 1)))(theta, x, probe)
        for mode in ("backprop", "adjoint")
    }
    flat = {mode: jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(g)])
            for mode, g in gradients.items()}
    np.testing.assert_allclose(flat["adjoint"], flat["backprop"], rtol=1e-6, atol=1e-7)
    fixed = jax.jit(lambda theta, x: loss(theta, x, probe, "checkpoint", method="euler", num_steps=2, max_steps=2))
    check_grads(fixed, (theta, x), order=1, modes=["rev"])


def test_entry_points_compose_with_vmap():
    # Samples are independent and the steps fixed, so mapping over groups of samples changes nothing.
    theta = (jnp.asarray([[0.5, -1.0], [0.8, 0.2]]), jnp.asarray([0.3, -0.4]))
    x = points(6, 2, seed=11)
    probe = ilj.hutchinson_probe(x, jax.random.PRNGKey(12))

    def log_prob(x, probe):
        return ilj.cnf_log_likelihood(tanh_cell, x, theta, probe=probe, method="euler", num_steps=2)[0]

    grouped = jax.jit(jax.vmap(log_prob))(x.reshape(2, 3, 2), probe.reshape(2, 3, 2))
    np.testing.assert_allclose(grouped.ravel(), jax.jit(log_prob)(x, probe), rtol=1e-13)


def test_augmented_field_kinetic_energy_and_standard_normal_log_prob():
    np.testing.assert_array_equal(ilj.kinetic_energy(jnp.asarray([[3.0, 4.0], [0.0, -1.0]])), [25.0, 1.0])
    z = points(5, 3, seed=14)
    expected = scipy.stats.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(np.asarray(z))
    np.testing.assert_allclose(ilj.standard_normal_log_prob(z), expected, rtol=1e-14)
    # The augmented field reads y from the state, ignores the log-density and regularizer entries, and
    # returns [A y, -trace(A), kinetic |A y|^2 + frobenius |A^T e|^2] for the probe e.
    A = np.asarray([[0.5, -1.0, 0.0], [2.0, 0.3, 1.0], [0.0, 0.2, -0.7]])
    probe = ilj.hutchinson_probe(z, jax.random.PRNGKey(15))
    state = jnp.concatenate([z, jnp.full((5, 2), 7.0)], axis=1)
    g = ilj.cnf_dynamics(linear, probe, kinetic=0.5, frobenius=0.1)(jnp.zeros(5), state, jnp.asarray(A))
    speed = np.asarray(z) @ A.T
    np.testing.assert_allclose(g[:, :3], speed, rtol=1e-15)
    np.testing.assert_allclose(g[:, 3], -np.einsum("bi,ij,bj->b", probe, A, probe), rtol=1e-15)
    np.testing.assert_allclose(g[:, 4], 0.5 * np.sum(speed**2, axis=1)
                               + 0.1 * np.sum((np.asarray(probe) @ A) ** 2, axis=1), rtol=1e-14)


def test_flow_matching_by_hand():
    x0, x1 = points(5, 2, seed=15), points(5, 2, seed=16)
    t = jnp.asarray(np.random.default_rng(17).uniform(size=5))
    A = jnp.asarray([[0.2, -1.0], [0.5, 0.3]])
    xt, ut = ilj.flow_matching_path(x0, x1, t, sigma_min=0.1)
    x0_, x1_, t_ = np.asarray(x0), np.asarray(x1), np.asarray(t)[:, None]
    np.testing.assert_allclose(xt, (1 - 0.9 * t_) * x0_ + t_ * x1_, rtol=1e-15)
    np.testing.assert_allclose(ut, x1_ - 0.9 * x0_, rtol=1e-15)
    # The target is the path's derivative in t.
    tangent = jax.jvp(lambda t: ilj.flow_matching_path(x0, x1, t, sigma_min=0.1)[0], (t,), (jnp.ones(5),))[1]
    np.testing.assert_allclose(tangent, ut, rtol=1e-14)

    def velocity(t, x, A):
        return x @ A.T + t[:, None]

    loss = jax.jit(lambda A: ilj.flow_matching_loss(velocity, x0, x1, t, A, sigma_min=0.1))
    by_hand = np.mean(np.sum((np.asarray(xt) @ np.asarray(A).T + t_ - np.asarray(ut)) ** 2, axis=1))
    np.testing.assert_allclose(loss(A), by_hand, rtol=1e-14)
    check_grads(loss, (A,), order=2)
    # Rectified flow (sigma_min = 0): a field equal to the target everywhere has zero loss.
    assert ilj.flow_matching_loss(lambda t, x, d: jnp.broadcast_to(d, x.shape), x0, x0 + 1.0, t, jnp.ones(2)) == 0.0


def test_bad_arguments_are_named():
    x = points(3, 2, seed=18)
    A = jnp.eye(2)
    with pytest.raises(ValueError, match="unknown kind 'uniform'"):
        ilj.hutchinson_probe(x, jax.random.PRNGKey(0), kind="uniform")
    with pytest.raises(TypeError, match="like must have a floating-point dtype"):
        ilj.hutchinson_probe(jnp.ones((3, 2), int), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"y must have shape \(B, D\)"):
        ilj.divergence(linear, 0.0, x[None], A)
    with pytest.raises(ValueError, match="probe must have the shape of y"):
        ilj.divergence(linear, 0.0, x, A, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="probe must have the dtype of y"):
        ilj.divergence(linear, 0.0, x, A, jnp.ones((3, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"t must be one number or have shape \(B,\)"):
        ilj.divergence(linear, jnp.zeros(4), x, A)
    with pytest.raises(TypeError, match="t must be a number"):
        ilj.divergence(linear, "0", x, A)
    with pytest.raises(ValueError, match=r"f\(t, y, theta\) must return an array of y's shape"):
        ilj.divergence(lambda t, y, A: y[:, :1], 0.0, x, A)
    with pytest.raises(ValueError, match="fy contains NaN"):
        ilj.kinetic_energy(jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match="kinetic must be a non-negative finite number"):
        ilj.cnf_dynamics(linear, kinetic=-1.0)
    with pytest.raises(ValueError, match="frobenius must be a non-negative finite number"):
        ilj.cnf_log_likelihood(linear, x, A, frobenius=float("nan"))
    with pytest.raises(ValueError, match=r"probe must have shape \(B, D\)"):
        ilj.cnf_dynamics(linear, jnp.ones(3))
    with pytest.raises(ValueError, match=r"augmented state must have shape \(B, D \+ 2\)"):
        ilj.cnf_dynamics(linear)(jnp.zeros(3), x, A)
    with pytest.raises(ValueError, match="t0 and t1 must differ"):
        ilj.cnf_log_likelihood(linear, x, A, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match="t1 must be a finite number"):
        ilj.cnf_sample(linear, x, A, t1=float("inf"))
    with pytest.raises(ValueError, match="x contains NaN"):
        ilj.cnf_log_likelihood(linear, x.at[0, 0].set(jnp.nan), A)
    with pytest.raises(ValueError, match="probe must have the shape of x"):
        ilj.cnf_log_likelihood(linear, x, A, probe=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="probe must have the shape of z"):
        ilj.cnf_sample(linear, x, A, probe=jnp.ones((3, 1)))
    with pytest.raises(ValueError, match=r"base_log_prob\(z\) must return shape \(B,\) = \(3,\)"):
        ilj.cnf_sample(linear, x, A, base_log_prob=jnp.sum)
    with pytest.raises(TypeError, match="base_log_prob must be a callable"):
        ilj.cnf_log_likelihood(linear, x, A, base_log_prob=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        ilj.cnf_sample(linear, x, A, method="leapfrog")
    with pytest.raises(ValueError, match=r"z must have shape \(B, D\)"):
        ilj.standard_normal_log_prob(jnp.ones(3))
    with pytest.raises(ValueError, match=r"sigma_min must lie in \[0, 1\)"):
        ilj.flow_matching_path(x, x, jnp.zeros(3), sigma_min=1.0)
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        ilj.flow_matching_path(x, x[:2], jnp.zeros(3))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(3,\)"):
        ilj.flow_matching_loss(linear, x, x, jnp.zeros((3, 1)), A)
    with pytest.raises(ValueError, match="t must have the dtype of x0"):
        ilj.flow_matching_path(x, x, jnp.zeros(3, jnp.float32))
    with pytest.raises(ValueError, match=r"v\(t, x, theta\) must return an array of x's shape"):
        ilj.flow_matching_loss(lambda t, x, A: x[:, 0], x, x, jnp.zeros(3), A)


def test_torch_twin_gives_the_same_values_and_steps():
    weights = mlp_weights()
    theta, field = jax_weights(weights), torch_mlp(weights)
    x = points(6, 2, seed=19)
    x_t = torch.tensor(np.asarray(x))
    probe = ilj.hutchinson_probe(x, jax.random.PRNGKey(20), kind="gaussian")
    probe_t = torch.tensor(np.asarray(probe))
    t = jnp.linspace(0.0, 1.0, 6)
    for e, e_t in ((None, None), (probe, probe_t)):
        ours = divergence(mlp, t, x, theta, e)
        theirs = ilt.divergence(field, torch.tensor(np.asarray(t)), x_t, e_t)
        for mine, twin in zip(ours, theirs):
            np.testing.assert_allclose(mine, twin.detach().numpy(), rtol=1e-13, atol=1e-14)
        # The same solves (and compilations) as the round trip's, with and without the probe.
        log_prob, regularization, result = log_likelihood(mlp, x, theta, probe=e, **REGULARIZED, **TIGHT)
        log_prob_t, regularization_t, result_t = ilt.cnf_log_likelihood(field, x_t, probe=e_t, **REGULARIZED,
                                                                         **TIGHT)
        np.testing.assert_allclose(log_prob, log_prob_t.detach().numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(regularization, regularization_t.detach().numpy(), rtol=0, atol=1e-10)
        np.testing.assert_array_equal(result.num_accepted, result_t.num_accepted.numpy())
    samples, sample_log_prob, result = sample(mlp, x, theta, **TIGHT)
    samples_t, sample_log_prob_t, result_t = ilt.cnf_sample(field, x_t, **TIGHT)
    np.testing.assert_allclose(samples, samples_t.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sample_log_prob, sample_log_prob_t.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(result.num_accepted, result_t.num_accepted.numpy())
    times = jnp.asarray(np.random.default_rng(21).uniform(size=6))
    loss = ilj.flow_matching_loss(mlp, probe, x, times, theta, sigma_min=0.05)
    loss_t = ilt.flow_matching_loss(field, probe_t, x_t, torch.tensor(np.asarray(times)), sigma_min=0.05)
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-13)
