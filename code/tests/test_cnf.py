"""The PyTorch CNF toolkit: divergence against full Jacobians and Hutchinson's theory, the flow's likelihood
against the closed form of a linear field and the discrete change of variables, sampling as its inverse, every
gradient mode of odeint, flow matching by hand, and the refusals of bad arguments."""

import math

import numpy as np
import pytest
import torch

from implicit_layers.torch.cnf import (
    cnf_dynamics,
    cnf_log_likelihood,
    cnf_sample,
    divergence,
    flow_matching_loss,
    flow_matching_path,
    hutchinson_probe,
    kinetic_energy,
    standard_normal_log_prob,
)
from implicit_layers.torch.ode import odeint

DTYPE = torch.float64
# Each comparison of a Monte Carlo mean with its exact value is a z-score: under a correct estimator it exceeds
# 4.5 with probability below 1e-5, and the seeds are fixed, so the tests are deterministic.
Z_LIMIT = 4.5


class TimeField(torch.nn.Module):
    """A small MLP field ``f(t, y) = W2 tanh(W1 [y, t] + b1) + b2``: nonlinear in y, time-dependent."""

    def __init__(self, dim=3, hidden=8, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W1 = torch.nn.Parameter(torch.randn(hidden, dim + 1, generator=generator, dtype=DTYPE))
        self.b1 = torch.nn.Parameter(0.5 * torch.randn(hidden, generator=generator, dtype=DTYPE))
        self.W2 = torch.nn.Parameter(torch.randn(dim, hidden, generator=generator, dtype=DTYPE) / 2)
        self.b2 = torch.nn.Parameter(0.1 * torch.randn(dim, generator=generator, dtype=DTYPE))

    def forward(self, t, y):
        return mlp(self.W1, self.b1, self.W2, self.b2, t, y)


def mlp(W1, b1, W2, b2, t, y):
    return torch.tanh(torch.cat([y, t.unsqueeze(1)], dim=1) @ W1.T + b1) @ W2.T + b2


def points(batch=4, dim=3, seed=1):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def full_jacobians(f, t, y):
    """``df/dy`` per sample, (B, D, D), from torch.func.jacrev of one sample at a time."""
    return torch.func.vmap(torch.func.jacrev(lambda ys, ts: f(ts[None], ys[None])[0]))(y, t)


# Divergence ------------------------------------------------------------------------------------------------


def test_exact_divergence_is_the_trace_and_frobenius_the_norm_of_the_full_jacobian():
    f, y = TimeField(), points()
    t = torch.linspace(0.1, 0.9, 4, dtype=DTYPE)
    fy, div, frobenius = divergence(f, t, y)
    jacobians = full_jacobians(f, t, y)
    torch.testing.assert_close(fy, f(t, y), rtol=0, atol=1e-15)
    torch.testing.assert_close(div, jacobians.diagonal(dim1=1, dim2=2).sum(dim=1), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(frobenius, jacobians.pow(2).sum(dim=(1, 2)), rtol=1e-13, atol=1e-14)
    # Under saved-tensor hooks (odeint's checkpointed steps) torch.func refuses reverse mode and the columns of
    # the Jacobian come from forward mode instead, with the same values.
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
        _, div_forward, frobenius_forward = divergence(f, t, y)
    torch.testing.assert_close(div_forward, div, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(frobenius_forward, frobenius, rtol=1e-14, atol=1e-15)
    # One number for t is shared by the batch.
    torch.testing.assert_close(divergence(f, 0.5, y)[1], divergence(f, torch.full((4,), 0.5, dtype=DTYPE), y)[1])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_estimates_are_unbiased_with_the_variance_of_the_theory(kind):
    """Both estimates are quadratic forms e^T M e, of M = J for the trace and of M = J J^T for the squared
    Frobenius norm (|e^T J|^2 = e^T J J^T e), whose variance is 2 ||S||_F^2 for Gaussian probes and
    2 (||S||_F^2 - sum_i S_ii^2) for Rademacher ones, S the symmetric part of M."""
    f, probes = TimeField(), 20000
    y, t = points(batch=1), torch.tensor([0.3], dtype=DTYPE)
    jacobian = full_jacobians(f, t, y)[0].detach()

    def mean_and_variance(matrix):
        symmetric = (matrix + matrix.T) / 2
        variance = 2 * symmetric.pow(2).sum()
        if kind == "rademacher":
            variance = variance - 2 * symmetric.diagonal().pow(2).sum()
        return matrix.trace(), variance

    # Copies of one sample under independent probes are independent draws of the estimators, in one product.
    copies = y.repeat(probes, 1)
    probe = hutchinson_probe(copies, kind=kind, generator=torch.Generator().manual_seed(2))
    if kind == "rademacher":
        assert set(probe.unique().tolist()) == {-1.0, 1.0}
    with torch.no_grad():
        _, div, frobenius = divergence(f, t.repeat(probes), copies, probe)
    for estimates, matrix in ((div, jacobian), (frobenius, jacobian @ jacobian.T)):
        mean, variance = mean_and_variance(matrix)
        assert abs(estimates.mean() - mean) < Z_LIMIT * math.sqrt(variance / probes)
        # The sample variance of 20,000 draws is within a few percent of the true one (here within 12%).
        assert abs(estimates.var() / variance - 1) < 0.12, (estimates.var(), variance)


def test_hutchinson_probe_keeps_shape_dtype_device_and_its_generator_reproduces_it():
    like = torch.zeros(5, 3, dtype=torch.float32)
    for kind in ("rademacher", "gaussian"):
        first = hutchinson_probe(like, kind=kind, generator=torch.Generator().manual_seed(7))
        again = hutchinson_probe(like, kind=kind, generator=torch.Generator().manual_seed(7))
        assert first.shape == like.shape and first.dtype == like.dtype and not first.requires_grad
        assert torch.equal(first, again)


@pytest.mark.parametrize("with_probe", [False, True], ids=["exact", "hutchinson"])
def test_divergence_gradcheck_in_the_state_and_a_parameter(with_probe):
    field = TimeField(dim=2, hidden=4)
    W1 = field.W1.detach().clone().requires_grad_()
    y = points(batch=3, dim=2).requires_grad_()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=DTYPE)
    probe = hutchinson_probe(y, generator=torch.Generator().manual_seed(3)) if with_probe else None

    def div_and_frobenius(y, W1):
        f = lambda t, y: mlp(W1, field.b1, field.W2, field.b2, t, y)  # noqa: E731
        _, div, frobenius = divergence(f, t, y, probe)
        return div, frobenius

    assert torch.autograd.gradcheck(div_and_frobenius, (y, W1))


def test_kinetic_energy_and_standard_normal_log_prob_by_hand():
    fy = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=DTYPE)
    torch.testing.assert_close(kinetic_energy(fy), torch.tensor([25.0, 1.0], dtype=DTYPE))
    z = points(batch=5, dim=3)
    normal = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    torch.testing.assert_close(standard_normal_log_prob(z), normal.log_prob(z))


# The flow --------------------------------------------------------------------------------------------------

A = torch.tensor([[-0.4, 0.9], [-0.3, 0.2]], dtype=DTYPE)


def gauss_legendre(function, a, b, nodes=40):
    """The integral of ``function(t)`` (values of shape (B,)) from a to b by Gauss-Legendre quadrature."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    times = (b - a) / 2 * x + (a + b) / 2
    return sum(wi * (b - a) / 2 * function(ti) for wi, ti in zip(w.tolist(), times.tolist()))


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.5, -0.7)])
def test_linear_field_likelihood_and_regularization_match_closed_forms(t0, t1):
    x = points(batch=5, dim=2)
    kinetic, frobenius = 0.7, 0.3
    log_prob, regularization, result = cnf_log_likelihood(
        lambda t, y: y @ A.T, x, t0=t0, t1=t1, kinetic=kinetic, frobenius=frobenius, rtol=1e-10, atol=1e-10
    )
    # y(t) = expm(A (t - t0)) z, so z = expm(-A (t1 - t0)) x, and div = trace(A) at every point.
    z = x @ torch.linalg.matrix_exp(-A * (t1 - t0)).T
    expected = standard_normal_log_prob(z) - (t1 - t0) * A.trace()
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-8)
    speed = gauss_legendre(lambda t: kinetic_energy(z @ (A @ torch.linalg.matrix_exp(A * (t - t0))).T), t0, t1)
    expected_penalty = kinetic * abs(speed) + frobenius * abs(t1 - t0) * A.pow(2).sum()
    torch.testing.assert_close(regularization, expected_penalty, rtol=0, atol=1e-8)
    assert bool((regularization > 0).all()) and bool(result.converged.all())


def test_nonlinear_flow_likelihood_matches_the_discrete_change_of_variables():
    """log p(x) = log N(z) - log |det dx/dz| with the flow map's Jacobian by reverse mode through odeint: its rows
    for the whole batch (samples are independent) in one backward pass each."""
    f = TimeField(dim=2, hidden=6, seed=4)
    z = points(batch=3, dim=2, seed=5).requires_grad_()
    ys, _ = odeint(f, z, [0.0, 1.0], rtol=1e-9, atol=1e-9)
    x = ys[-1]
    rows = [torch.autograd.grad(x[:, i].sum(), z, retain_graph=True)[0] for i in range(2)]
    jacobians = torch.stack(rows, dim=1)
    expected = standard_normal_log_prob(z) - torch.linalg.slogdet(jacobians).logabsdet
    with torch.no_grad():
        log_prob, _, _ = cnf_log_likelihood(f, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_prob, expected.detach(), rtol=0, atol=1e-7)


def test_sampling_inverts_the_likelihood():
    f, z = TimeField(dim=2, seed=6), points(batch=4, dim=2, seed=7)
    options = dict(rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        x, sample_log_prob, _ = cnf_sample(f, z, **options)
        log_prob, _, _ = cnf_log_likelihood(f, x, **options)
        # The same flow run from t1 = 1 back to t0 = 0 takes x back to z.
        back, _, _ = cnf_sample(f, x, t0=1.0, t1=0.0, **options)
    assert not x.requires_grad and not sample_log_prob.requires_grad
    torch.testing.assert_close(log_prob, sample_log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_probe", [False, True], ids=["exact", "hutchinson"])
def test_every_gradient_mode_gives_the_same_parameter_gradient(with_probe):
    """Of a loss that uses both directions of the flow: the likelihood with its penalty, and samples with
    their log-density (the adjoint's params default to the module's parameters in both)."""
    f, x = TimeField(dim=2, hidden=6, seed=8), points(batch=3, dim=2, seed=9)
    probe = hutchinson_probe(x, generator=torch.Generator().manual_seed(10)) if with_probe else None
    gradients = {}
    for gradient in ("backprop", "checkpoint", "adjoint"):
        options = dict(probe=probe, gradient=gradient, rtol=1e-6, atol=1e-6)
        log_prob, regularization, _ = cnf_log_likelihood(f, x, kinetic=0.5, frobenius=0.5, **options)
        samples, sample_log_prob, _ = cnf_sample(f, x, **options)
        loss = (log_prob - regularization).sum() + (samples.pow(2).sum(dim=1) + sample_log_prob).sum()
        gradients[gradient] = torch.autograd.grad(loss, list(f.parameters()))
    # Checkpointing recomputes the same operations; the adjoint differentiates the exact flow, within the
    # tolerance of the discrete one (a relative 2e-4 here).
    for reference, other in zip(gradients["backprop"], gradients["checkpoint"]):
        torch.testing.assert_close(other, reference, rtol=1e-12, atol=1e-13)
    for reference, other in zip(gradients["backprop"], gradients["adjoint"]):
        torch.testing.assert_close(other, reference, rtol=2e-3, atol=1e-5)


def test_log_likelihood_gradcheck_with_a_fixed_step_method():
    field = TimeField(dim=2, hidden=4, seed=11)
    W2 = field.W2.detach().clone().requires_grad_()
    x = points(batch=2, dim=2, seed=12).requires_grad_()

    def likelihood_and_penalty(x, W2):
        f = lambda t, y: mlp(field.W1, field.b1, W2, field.b2, t, y)  # noqa: E731
        log_prob, regularization, _ = cnf_log_likelihood(f, x, kinetic=1.0, frobenius=1.0, method="rk4", num_steps=3)
        return log_prob, regularization

    assert torch.autograd.gradcheck(likelihood_and_penalty, (x, W2))


def test_dynamics_pack_field_divergence_and_penalty():
    f, y = TimeField(), points()
    t = torch.full((4,), 0.2, dtype=DTYPE)
    state = torch.cat([y, torch.randn(4, 2, dtype=DTYPE)], dim=1)
    fy, div, frobenius = divergence(f, t, y)
    value = cnf_dynamics(f, kinetic=2.0, frobenius=3.0)(t, state)
    penalty = 2 * fy.pow(2).sum(dim=1) + 3 * frobenius
    torch.testing.assert_close(value, torch.cat([fy, -div[:, None], penalty[:, None]], dim=1))


def test_custom_base_log_prob():
    scale = 2.0

    def wide_normal(z):
        return standard_normal_log_prob(z / scale) - z.shape[1] * math.log(scale)

    x = points(batch=3, dim=2)
    log_prob, _, _ = cnf_log_likelihood(lambda t, y: torch.zeros_like(y), x, base_log_prob=wide_normal, rtol=1e-6)
    torch.testing.assert_close(log_prob, wide_normal(x))


# Flow matching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_flow_matching_path_target_and_endpoints_by_hand(sigma_min):
    x0, x1 = points(batch=3, dim=2, seed=13), points(batch=3, dim=2, seed=14)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)
    xt, ut = flow_matching_path(x0, x1, t, sigma_min=sigma_min)
    torch.testing.assert_close(xt[1], (1 - (1 - sigma_min) * 0.25) * x0[1] + 0.25 * x1[1])
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], x1[2] + sigma_min * x0[2])
    torch.testing.assert_close(ut, x1 - (1 - sigma_min) * x0)
    # A field equal to the target has zero loss; one that is off by c everywhere, loss |c|^2.
    assert flow_matching_loss(lambda t, x: ut, x0, x1, t, sigma_min=sigma_min) == 0
    offset = torch.tensor([0.3, -0.4], dtype=DTYPE)
    loss = flow_matching_loss(lambda t, x: ut + offset, x0, x1, t, sigma_min=sigma_min)
    torch.testing.assert_close(loss, torch.tensor(0.25, dtype=DTYPE))


def test_flow_matching_loss_gradcheck():
    field = TimeField(dim=2, hidden=4, seed=15)
    x0, t = points(batch=3, dim=2, seed=16), torch.tensor([0.1, 0.5, 0.8], dtype=DTYPE)
    x1 = points(batch=3, dim=2, seed=17).requires_grad_()
    W1 = field.W1.detach().clone().requires_grad_()

    def loss(x1, W1):
        return flow_matching_loss(lambda t, x: mlp(W1, field.b1, field.W2, field.b2, t, x), x0, x1, t, sigma_min=0.05)

    assert torch.autograd.gradcheck(loss, (x1, W1))


# Refusals --------------------------------------------------------------------------------------------------

Y = points(batch=4, dim=3)
T = torch.full((4,), 0.5, dtype=DTYPE)


def identity(t, y):
    return y


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: divergence(identity, T, Y, torch.ones(4, 2, dtype=DTYPE)), ValueError,
         "probe must have the shape of y"),
        (lambda: divergence(identity, T, Y, torch.ones(4, 3)), ValueError, "probe must have y's dtype"),
        (lambda: divergence(identity, T, Y[0]), ValueError, "y must have shape \\(B, D\\)"),
        (lambda: divergence(identity, T[:2], Y), ValueError, "t must be one number or have shape \\(B,\\) = \\(4,\\)"),
        (lambda: divergence(lambda t, y: y[:, :2], T, Y), ValueError, "f\\(t, y\\) must return a tensor of y's shape"),
        (lambda: hutchinson_probe(Y, kind="uniform"), ValueError, "unknown kind 'uniform'"),
        (lambda: hutchinson_probe([1.0]), TypeError, "like must be a torch.Tensor"),
        (lambda: hutchinson_probe(torch.ones(2, 2, dtype=torch.int64)), TypeError, "like must have a floating-point"),
        (lambda: cnf_dynamics(identity, kinetic=-1.0), ValueError, "kinetic must be a non-negative finite number"),
        (lambda: cnf_dynamics(identity, frobenius=math.nan), ValueError, "frobenius must be a non-negative"),
        (lambda: cnf_log_likelihood(identity, Y, frobenius=-0.1), ValueError, "frobenius must be a non-negative"),
        (lambda: cnf_log_likelihood(identity, Y, t0=1.0, t1=1.0), ValueError, "t0 and t1 must differ"),
        (lambda: cnf_sample(identity, Y, t1=math.inf), ValueError, "t1 must be a finite number"),
        (lambda: cnf_log_likelihood(identity, Y[None]), ValueError, "x must have shape \\(B, D\\).*flatten"),
        (lambda: cnf_sample(identity, Y[0]), ValueError, "z must have shape \\(B, D\\).*z\\[None\\]"),
        (lambda: cnf_log_likelihood(identity, Y, probe=torch.ones(4, 2, dtype=DTYPE)), ValueError,
         "probe must have the shape of x"),
        (lambda: cnf_sample(identity, Y, probe=torch.ones(4, 3)), ValueError, "probe must have z's dtype"),
        (lambda: cnf_dynamics(identity, torch.ones(4, 2, dtype=DTYPE))(T, torch.ones(4, 5, dtype=DTYPE)), ValueError,
         "probe must have the shape of y = state\\[:, :-2\\]"),
        (lambda: cnf_log_likelihood(identity, Y * math.nan), ValueError, "x contains NaN or Inf"),
        (lambda: cnf_dynamics(identity)(T, Y[:, :2]), ValueError, "state must have shape \\(B, D \\+ 2\\)"),
        (lambda: cnf_log_likelihood(identity, Y.long()), TypeError, "x must have a floating-point dtype"),
        (lambda: cnf_log_likelihood(identity, Y, method="rk5"), ValueError, "unknown method 'rk5'"),
        (lambda: cnf_log_likelihood(identity, Y, base_log_prob=lambda z: z, method="euler", num_steps=1),
         ValueError, "base_log_prob\\(z\\) must return a tensor of shape \\(B,\\)"),
        (lambda: cnf_log_likelihood(identity, Y, gradient="adjoint"), ValueError, "pass params="),
        (lambda: standard_normal_log_prob(Y[0]), ValueError, "z must have shape \\(B, D\\)"),
        (lambda: kinetic_energy(Y[0]), ValueError, "fy must have shape \\(B, ...\\)"),
        (lambda: flow_matching_path(Y, Y, T[:, None]), ValueError, "t must have shape \\(B,\\) = \\(4,\\)"),
        (lambda: flow_matching_path(Y, Y[:2], T), ValueError, "x0 and x1 must have the same shape"),
        (lambda: flow_matching_path(Y[0], Y[0], T), ValueError, "x0 must have shape \\(B, D\\)"),
        (lambda: flow_matching_path(Y, Y, T, sigma_min=1.0), ValueError, "sigma_min must lie in \\[0, 1\\)"),
        (lambda: flow_matching_loss(lambda t, x: x[:, :1], Y, Y, T), ValueError, "v\\(t, x\\) must return a tensor"),
        (lambda: flow_matching_loss(identity, Y, Y, T.float()), ValueError, "t must have x0's dtype and device"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_the_augmented_field_reads_nothing_back_to_the_host():
    """The field odeint evaluates at every stage, exact and Hutchinson, also under the saved-tensor hooks of a
    checkpointed step, runs with CUDA's synchronization debug mode set to raise."""
    f = TimeField(dim=2).cuda()
    y, t = points(batch=8, dim=2).cuda(), torch.rand(8, dtype=DTYPE, device="cuda")
    state = torch.cat([y, torch.zeros(8, 2, dtype=DTYPE, device="cuda")], dim=1)
    for probe in (None, hutchinson_probe(y)):
        field = cnf_dynamics(f, probe, kinetic=1.0, frobenius=1.0)
        field(t, state)  # first-use allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            field(t, state)
            with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
                field(t, state)
        finally:
            torch.cuda.set_sync_debug_mode(0)
