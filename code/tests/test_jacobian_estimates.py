"""The Jacobian estimates of both frameworks against exact Jacobians: Hutchinson's squared Frobenius norm (its
mean and its gradient within standard errors computed from the exact Jacobian) and the power-iteration
spectral norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import implicit_layers.jax as ilj
from implicit_layers.torch import (
    autograd_graph_bytes,
    batched_jacobian,
    jacobian_frobenius_estimate,
    jacobian_spectral_norm,
)

from conftest import DEVICES, tanh_problem

jax.config.update("jax_enable_x64", True)

# Enough independent probes that a standard error is a few percent of the mean, in one batched product.
PROBES = 4000
# Each comparison below is a z-score against an exact standard error: under a correct estimator each exceeds 4.5
# with probability below 1e-5, and the seeds are fixed, so the tests are deterministic.
Z_LIMIT = 4.5


def tanh_map(W, x):
    return lambda z: torch.tanh(z @ W.T + x)


def problem(batch=3, n=6, seed=0):
    """A tanh layer at a random state; ``W`` has spectral norm 1.2, so the Jacobians are far from zero."""
    W, x = tanh_problem(batch=batch, n=n, scale=1.2, seed=seed)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    return W, x, z


def closed_form_jacobian(W, x, z):
    """``diag(1 - tanh(W z + x)^2) W`` per sample, shape (B, n, n)."""
    return (1 - torch.tanh(z @ W.T + x) ** 2)[:, :, None] * W


def independent_estimates(W, x, z, probes, generator):
    """``probes`` single-probe estimates per sample, shape (probes, B), from one vector-Jacobian product: the map
    acts on each sample alone, so copies of the batch are independent draws."""
    copies = jacobian_frobenius_estimate(
        tanh_map(W, x.repeat(probes, 1)), z.repeat(probes, 1), generator=generator
    )
    return copies.reshape(probes, -1)


def test_frobenius_estimate_is_unbiased_with_the_gaussian_variance():
    W, x, z = problem()
    _, jacobian = batched_jacobian(tanh_map(W, x), z)
    exact = jacobian.pow(2).sum(dim=(1, 2))
    gram = jacobian @ jacobian.transpose(1, 2)
    variance = 2 * gram.pow(2).sum(dim=(1, 2))  # of v^T (J J^T) v for a Gaussian v
    samples = independent_estimates(W, x, z, PROBES, torch.Generator().manual_seed(7))
    z_scores = (samples.mean(0) - exact) / (variance / PROBES).sqrt()
    assert z_scores.abs().max() < Z_LIMIT, z_scores
    # The spread is that of Gaussian probes: Rademacher probes would give 2 (||JJ^T||_F^2 - sum diag(JJ^T)^2),
    # 13% to 20% of it here. A sample variance has relative standard error sqrt((kurtosis - 1) / N), and a
    # Gaussian quadratic form has kurtosis at most 15 (rank one), so at most 6% for N = 4000: 20% is over three.
    torch.testing.assert_close(samples.var(0), variance, rtol=0.2, atol=0)


def test_frobenius_probes_average_single_probe_estimates():
    W, x, z = problem()
    f = tanh_map(W, x)
    averaged = jacobian_frobenius_estimate(f, z, probes=3, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    singles = [jacobian_frobenius_estimate(f, z, generator=generator) for _ in range(3)]
    torch.testing.assert_close(averaged, sum(singles) / 3, rtol=1e-14, atol=0)


def test_frobenius_gradient_matches_the_exact_gradient_within_standard_errors():
    W, x, z = problem()
    W.requires_grad_()
    x.requires_grad_()
    estimate = independent_estimates(W, x, z, PROBES, torch.Generator().manual_seed(11)).mean(0).sum()
    estimated = torch.autograd.grad(estimate, (W, x))
    exact = batched_jacobian(tanh_map(W, x), z)[1].pow(2).sum()
    expected = torch.autograd.grad(exact, (W, x))

    # Each gradient entry, d/dtheta v^T A v = v^T (dA/dtheta) v with A = J J^T, is itself a Gaussian quadratic
    # form: its variance is 2 ||dA/dtheta||_F^2, summed over the independent samples.
    def grams(W, x):
        jacobian = closed_form_jacobian(W, x, z)
        return jacobian @ jacobian.transpose(1, 2)

    sensitivities = torch.autograd.functional.jacobian(grams, (W.detach(), x.detach()))
    for got, want, sensitivity in zip(estimated, expected, sensitivities):
        variance = 2 * sensitivity.pow(2).sum(dim=(1, 2)).sum(dim=0)
        z_scores = (got - want) / (variance / PROBES).sqrt()
        assert z_scores.abs().max() < Z_LIMIT, z_scores


def test_frobenius_gradcheck_and_no_grad():
    W, x, z = problem(batch=2, n=4)
    inputs = (W.requires_grad_(), z.requires_grad_())

    def estimate(W, z):
        return jacobian_frobenius_estimate(tanh_map(W, x), z, probes=2, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(estimate, inputs)
    with_graph = estimate(W, z)
    with torch.no_grad():
        without = estimate(W, z)
    assert with_graph.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-14, atol=0)


def test_maps_without_a_jacobian_give_zero():
    z = torch.randn(3, 4, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for f in (lambda z: torch.zeros_like(z), lambda z: scale * torch.ones_like(z)):
        assert (jacobian_frobenius_estimate(f, z, probes=2) == 0).all()
        assert (jacobian_spectral_norm(f, z, iterations=2) == 0).all()


def test_estimates_run_under_saved_tensor_hooks():
    # What autograd_graph_bytes uses to measure a training step's memory; torch.func.vjp refuses these hooks.
    W, x, z = problem()
    W.requires_grad_()
    f = tanh_map(W, x)
    penalty, nbytes = autograd_graph_bytes(lambda: jacobian_frobenius_estimate(f, z).sum())
    assert penalty.requires_grad and nbytes > 0
    norms, _ = autograd_graph_bytes(lambda: jacobian_spectral_norm(f, z))
    torch.testing.assert_close(norms, jacobian_spectral_norm(f, z, iterations=40), rtol=1e-7, atol=0)


def linear_maps_with_singular_values(singular_values, generator):
    """Per-sample matrices ``M_b = U_b diag(s_b) V_b^T`` with the given singular values (B, n) and random
    orthogonal ``U_b``, ``V_b``; returns ``M`` and the map ``z -> M_b z_b``."""
    batch, n = singular_values.shape
    U = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(batch, n, n, generator=generator, dtype=torch.float64))[0]
    M = U @ torch.diag_embed(singular_values) @ V.transpose(1, 2)
    return M, lambda z: torch.einsum("bij,bj->bi", M, z)


@pytest.mark.parametrize("device", DEVICES)
def test_spectral_norm_of_known_singular_values(device):
    generator = torch.Generator().manual_seed(0)
    # Top two singular values 3 and 1.5 for sample 0, 0.8 and 0.4 for sample 1: ratio 1/2 for both, so 20 steps
    # leave an error of order 2^-80, far below round-off; the scales differ, so the steps must normalize per sample.
    singular_values = torch.tensor([[3.0, 1.5, 1.0, 0.5, 0.1], [0.8, 0.4, 0.3, 0.2, 0.0]], dtype=torch.float64)
    M, f = linear_maps_with_singular_values(singular_values, generator)
    M = M.to(device)
    z = torch.randn(2, 5, generator=generator, dtype=torch.float64).to(device)
    start = torch.Generator(device=device).manual_seed(1)
    estimate = jacobian_spectral_norm(lambda z: torch.einsum("bij,bj->bi", M, z), z, generator=start)
    torch.testing.assert_close(estimate.cpu(), singular_values[:, 0], rtol=1e-13, atol=0)


def test_spectral_norm_of_a_tanh_layer_is_a_nondecreasing_lower_bound():
    W, x, z = problem()
    W.requires_grad_()
    f = tanh_map(W, x)
    singular_values = torch.linalg.svdvals(batched_jacobian(f, z)[1].detach())
    exact = singular_values[:, 0]
    gap = singular_values[:, 1] / singular_values[:, 0]
    assert gap.max() < 0.8  # after 20 steps the error is of order 0.8^80 ~ 2e-8 at worst

    def estimate(iterations):
        return jacobian_spectral_norm(f, z, iterations=iterations, generator=torch.Generator().manual_seed(4))

    twenty = estimate(20)
    assert not twenty.requires_grad
    torch.testing.assert_close(twenty, exact, rtol=1e-7, atol=0)
    # Each step's estimate is a ratio of consecutive moments of J^T J along the start, which can only grow
    # toward the largest singular value.
    steps = torch.stack([estimate(k) for k in (1, 2, 3, 5, 20)])
    assert (steps.diff(dim=0) >= -1e-12).all() and (steps <= exact * (1 + 1e-12)).all()


def test_bad_arguments_are_named():
    W, x, z = problem()
    f = tanh_map(W, x)
    with pytest.raises(ValueError, match="probes"):
        jacobian_frobenius_estimate(f, z, probes=0)
    with pytest.raises(ValueError, match="iterations"):
        jacobian_spectral_norm(f, z, iterations=0)
    for estimate in (jacobian_frobenius_estimate, jacobian_spectral_norm):
        with pytest.raises(ValueError, match="^z must have shape"):
            estimate(f, z[0])
        with pytest.raises(ValueError, match="f\\(z\\) must return"):
            estimate(lambda z: z[:, :2], z)
    key = jax.random.PRNGKey(0)
    for estimate in (ilj.jacobian_frobenius_estimate, ilj.jacobian_spectral_norm):
        with pytest.raises(ValueError, match="^z must have shape"):
            estimate(jnp.tanh, jnp.ones(3), key)
    with pytest.raises(ValueError, match="probes"):
        ilj.jacobian_frobenius_estimate(jnp.tanh, jnp.ones((2, 3)), key, probes=0)
    with pytest.raises(ValueError, match="iterations"):
        ilj.jacobian_spectral_norm(jnp.tanh, jnp.ones((2, 3)), key, iterations=0)


def jax_problem():
    W, x, z = problem()
    return tuple(jnp.asarray(a.numpy()) for a in (W, x, z))


def jax_tanh_map(W, x):
    return lambda z: jnp.tanh(z @ W.T + x)


def exact_spectral_norms(W, x, z):
    """The exact per-sample spectral norms, from NumPy, to keep JAX compilations out of the references."""
    W, x, z = (np.asarray(a) for a in (W, x, z))
    return np.linalg.norm((1 - np.tanh(z @ W.T + x) ** 2)[:, :, None] * W, 2, axis=(1, 2))


@pytest.fixture(scope="module")
def jax_results():
    """Everything the JAX tests check, from one compiled program (each compilation costs seconds here): the
    estimates under ``jit``, ``vmap`` and ``grad`` together."""
    return jax.jit(jax_estimates)(*jax_problem())


def jax_estimates(W, x, z):
    def estimate(W, x):
        values = ilj.jacobian_frobenius_estimate(jax_tanh_map(W, x), z, jax.random.PRNGKey(3), probes=PROBES)
        return values.sum(), values

    def exact(W, x):
        jacobian = ilj.batched_jacobian(jax_tanh_map(W, x), z)[1]
        return jnp.sum(jacobian**2), (jacobian, jnp.sum(jacobian**2, axis=(1, 2)))

    def grams(W, x):
        jacobian = (1 - jnp.tanh(z @ W.T + x) ** 2)[:, :, None] * W
        return jacobian @ jacobian.transpose(0, 2, 1)

    def penalty(W):
        return ilj.jacobian_frobenius_estimate(jax_tanh_map(W, x), z, jax.random.PRNGKey(0), probes=2).sum()

    def spectral(W, z):
        return ilj.jacobian_spectral_norm(jax_tanh_map(W, x), z, jax.random.PRNGKey(0))

    estimated, values = jax.grad(estimate, argnums=(0, 1), has_aux=True)(W, x)
    expected, (jacobian, exact_values) = jax.grad(exact, argnums=(0, 1), has_aux=True)(W, x)
    gram = jacobian @ jacobian.transpose(0, 2, 1)
    # A fixed direction for a central difference of the 2-probe penalty (same probes at every W).
    direction = jnp.cos(jnp.arange(W.size, dtype=W.dtype)).reshape(W.shape)
    step = 1e-5
    return dict(
        frobenius=values,
        exact=exact_values,
        standard_error=jnp.sqrt(2 * jnp.sum(gram**2, axis=(1, 2)) / PROBES),
        gradients=(estimated, expected),
        gradient_standard_errors=[
            jnp.sqrt(2 * jnp.sum(sensitivity**2, axis=(0, 1, 2)) / PROBES)
            for sensitivity in jax.jacobian(grams, argnums=(0, 1))(W, x)
        ],
        directional_derivative=jnp.sum(jax.grad(penalty)(W) * direction),
        central_difference=(penalty(W + step * direction) - penalty(W - step * direction)) / (2 * step),
        states=jnp.stack([z, 2 * z]),
        spectral=jax.vmap(spectral, in_axes=(None, 0))(W, jnp.stack([z, 2 * z])),
        spectral_gradient=jax.grad(lambda W: spectral(W, z).sum())(W),
    )


def test_jax_frobenius_estimate_mean_and_gradient_match_the_exact_ones(jax_results):
    r = jax_results
    assert jnp.abs((r["frobenius"] - r["exact"]) / r["standard_error"]).max() < Z_LIMIT
    for got, want, standard_error in zip(*r["gradients"], r["gradient_standard_errors"]):
        assert jnp.abs((got - want) / standard_error).max() < Z_LIMIT


def test_jax_estimates_compose_with_jit_vmap_and_grad(jax_results):
    r = jax_results
    # The gradient of a fixed-probe estimate against a central difference (error of order step^2 ~ 1e-10).
    np.testing.assert_allclose(r["directional_derivative"], r["central_difference"], rtol=1e-8)
    W, x, _ = jax_problem()
    for row, state in zip(r["spectral"], r["states"]):
        np.testing.assert_allclose(row, exact_spectral_norms(W, x, state), rtol=1e-7)
    # The spectral norm is a diagnostic: no gradient flows through it.
    assert not r["spectral_gradient"].any()


def test_torch_and_jax_estimate_the_same_norms(jax_results):
    W, x, z = problem()
    _, jacobian = batched_jacobian(tanh_map(W, x), z)
    torch_spectral = jacobian_spectral_norm(tanh_map(W, x), z, generator=torch.Generator().manual_seed(0))
    torch_frobenius = independent_estimates(W, x, z, PROBES, torch.Generator().manual_seed(5)).mean(0).detach()
    np.testing.assert_allclose(np.asarray(jax_results["spectral"][0]), torch_spectral.numpy(), rtol=1e-7)
    # Different random streams, so the Frobenius estimates agree only statistically: their difference has twice
    # the variance of each.
    gram = jacobian @ jacobian.transpose(1, 2)
    standard_error = (2 * 2 * gram.pow(2).sum(dim=(1, 2)) / PROBES).sqrt().numpy()
    z_scores = (torch_frobenius.numpy() - np.asarray(jax_results["frobenius"])) / standard_error
    assert np.abs(z_scores).max() < Z_LIMIT, z_scores
