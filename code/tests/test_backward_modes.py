"""The phantom and Jacobian-free backward modes of fixed_point, in both frameworks.

On the affine map f(z) = A z + B x (per sample, A symmetric with eigenvalues in [-0.5, 0.8]) every gradient has a
closed form. For the loss L = sum(g * z*), the exact gradient is dL/dx = B^T (I - A^T)^{-1} g. Phantom mode
backpropagates through k damped steps z <- (1 - lam) z + lam f(z) taken from z*, so it gives
B^T P_k g with P_k = lam * sum_{i<k} M^i and M = (1 - lam) I + lam A^T: the Neumann series of
(I - A^T)^{-1} = lam (I - M)^{-1}, truncated after k terms. Its error B^T M^k (I - A^T)^{-1} g falls like
rho(M)^k. Jacobian-free mode keeps the first term only, P = I: phantom with k = 1 and lam = 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from torch import nn

import implicit_layers.jax as ilj
from implicit_layers.errors import ConvergenceWarning
from implicit_layers.torch import FixedPointLayer, fixed_point

from conftest import tanh_problem

jax.config.update("jax_enable_x64", True)

FRAMEWORKS = ("torch", "jax")
EIGENVALUES = np.linspace(-0.5, 0.8, 6)


def affine_problem(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((EIGENVALUES.size, EIGENVALUES.size)))
    A = Q @ np.diag(EIGENVALUES) @ Q.T
    B = rng.standard_normal(A.shape)
    x = rng.standard_normal((batch, A.shape[0]))
    g = rng.standard_normal(x.shape)  # the incoming gradient dL/dz of L = sum(g * z)
    return A, B, x, g


A, B, X, G = affine_problem()


@functools.lru_cache(maxsize=None)
def solve_affine(framework, backward, phantom_steps=5, phantom_damping=0.5):
    """Return the output z of fixed_point on f(z) = A z + B x (rows: z A^T + x B^T) and dL/dx for
    L = sum(G * z), as NumPy arrays; cached, because each new JAX configuration costs a compilation."""
    # Forward iteration compiles faster in JAX than Newton; A's spectral radius 0.8 lets it converge.
    options = dict(
        solver="forward_iteration", tol=1e-12, max_iter=500, backward=backward, backward_tol=1e-14,
        phantom_steps=phantom_steps, phantom_damping=phantom_damping,
    )
    if framework == "torch":
        A_t, B_t, G_t = (torch.from_numpy(array) for array in (A, B, G))
        x = torch.tensor(X, requires_grad=True)
        z, _ = fixed_point(lambda z: z @ A_t.T + x @ B_t.T, torch.zeros_like(x), **options)
        (gradient,) = torch.autograd.grad((G_t * z).sum(), x)
        return z.detach().numpy(), gradient.numpy()

    def loss(x):
        z, _ = ilj.fixed_point(lambda z, x: z @ A.T + x @ B.T, jnp.zeros_like(x), x, **options)
        return jnp.sum(G * z), z

    gradient, z = jax.grad(loss, has_aux=True)(jnp.asarray(X))
    return np.asarray(z), np.asarray(gradient)


def series_gradient(steps, damping):
    """B^T P_k g per sample (rows: G P_k^T B), P_k = lam * sum_{i<k} ((1 - lam) I + lam A^T)^i."""
    M = (1 - damping) * np.eye(A.shape[0]) + damping * A.T
    P = damping * sum(np.linalg.matrix_power(M, i) for i in range(steps))
    return G @ P.T @ B


EXACT_GRADIENT = G @ np.linalg.inv(np.eye(A.shape[0]) - A.T).T @ B
FIXED_POINT = X @ B.T @ np.linalg.inv(np.eye(A.shape[0]) - A).T

# Each JAX configuration compiles its own program, so JAX runs the cases that the other tests reuse.
SERIES_CASES = [("torch", 1, 0.5), ("torch", 8, 0.3), ("torch", 3, 1.0)] + [
    (framework, steps, 0.5) for framework in FRAMEWORKS for steps in (20, 40)
]


@pytest.mark.parametrize("framework, steps, damping", SERIES_CASES)
def test_phantom_gradient_is_the_truncated_damped_series(framework, steps, damping):
    z, gradient = solve_affine(framework, "phantom", steps, damping)
    np.testing.assert_allclose(gradient, series_gradient(steps, damping), rtol=0, atol=1e-12)
    np.testing.assert_allclose(z, FIXED_POINT, rtol=0, atol=1e-11)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_jacobian_free_keeps_the_first_term_and_equals_one_undamped_phantom_step(framework):
    z, gradient = solve_affine(framework, "jacobian_free")
    np.testing.assert_allclose(gradient, G @ B, rtol=0, atol=1e-13)
    np.testing.assert_allclose(z, FIXED_POINT, rtol=0, atol=1e-11)
    z_phantom, phantom = solve_affine(framework, "phantom", 1, 1.0)
    np.testing.assert_array_equal(gradient, phantom)
    np.testing.assert_array_equal(z, z_phantom)
    # The first term alone is far from the exact gradient here: the identity is no approximation of
    # (I - A^T)^{-1} when A's eigenvalues reach 0.8.
    assert np.linalg.norm(gradient - EXACT_GRADIENT) > 0.3 * np.linalg.norm(EXACT_GRADIENT)


def test_implicit_mode_gives_the_exact_gradient_of_the_affine_problem():
    """The reference the approximations are measured against."""
    np.testing.assert_allclose(solve_affine("torch", "implicit")[1], EXACT_GRADIENT, rtol=0, atol=1e-11)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_phantom_error_falls_like_the_damped_spectral_radius(framework):
    damping = 0.5
    rho = np.abs(1 - damping + damping * EIGENVALUES).max()  # 0.9, from the eigenvalue 0.8
    errors = [np.linalg.norm(solve_affine(framework, "phantom", k, damping)[1] - EXACT_GRADIENT) for k in (20, 40)]
    assert errors[0] > errors[1]
    # The next eigenvalue of M is 0.77, whose share of the error is (0.77 / 0.9)^20 < 5% after 20 steps: the
    # rate measured between 20 and 40 steps is rho to within a percent.
    np.testing.assert_allclose((errors[1] / errors[0]) ** (1 / 20), rho, rtol=1e-2)


def tanh_cell(z, theta):
    W, x = theta
    return jnp.tanh(z @ W.T + x)


def tanh_gradients(W, x, upstream, **options):
    """(dL/dW, dL/dx) for L = sum(upstream * z), z the output of torch's fixed_point on z = tanh(W z + x)."""
    W, x = (torch.from_numpy(array).requires_grad_() for array in (W, x))
    options = {"solver": "newton", "tol": 1e-12, **options}
    z, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), **options)
    return [gradient.numpy() for gradient in torch.autograd.grad((torch.from_numpy(upstream) * z).sum(), (W, x))]


def cosine(a, b):
    a, b = np.concatenate([part.ravel() for part in a]), np.concatenate([part.ravel() for part in b])
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.fixture(scope="module")
def tanh_case():
    W, x = (array.numpy() for array in tanh_problem(batch=4, n=8, scale=0.9))
    return W, x, np.random.default_rng(1).standard_normal(x.shape)


def test_phantom_approaches_the_exact_gradient_on_a_tanh_cell(tanh_case):
    """In PyTorch; the next test shows that JAX computes the same gradients."""
    exact = tanh_gradients(*tanh_case, backward="implicit", backward_tol=1e-13)
    similarity = {
        steps: cosine(tanh_gradients(*tanh_case, backward="phantom", phantom_steps=steps), exact)
        for steps in (2, 10, 40)
    }
    jacobian_free = cosine(tanh_gradients(*tanh_case, backward="jacobian_free"), exact)
    # ||J|| <= 0.9 and lam = 0.5 bound the norm of the damped steps' Jacobian by 0.95, so after 40 steps the
    # adjoint vector is off by at most 0.95^40 = 13% of its norm; the measured error is far below that bound.
    assert jacobian_free < similarity[2] < similarity[10] < similarity[40]
    assert similarity[40] > 1 - 1e-10


@pytest.mark.parametrize("mode", ["phantom", "jacobian_free"])
def test_torch_and_jax_give_the_same_gradients_under_jit_and_vmap(mode, tanh_case):
    W, x, upstream = tanh_case
    # The same solver in both frameworks, so that the two z* agree to round-off and not merely to tol.
    options = dict(
        solver="forward_iteration", tol=1e-12, max_iter=500, backward=mode, phantom_steps=7, phantom_damping=0.6
    )

    def loss(theta):
        z, _ = ilj.fixed_point(tanh_cell, jnp.zeros(x.shape), theta, **options)
        return jnp.sum(upstream * z)

    # One compilation covers jit, vmap (each input of the stack gets its own solve and steps) and grad.
    gradients = jax.jit(jax.vmap(jax.grad(loss), in_axes=((None, 0),)))((W, np.stack([x, 2 * x])))
    for i, scale in enumerate((1, 2)):
        expected = tanh_gradients(W, scale * x, upstream, **options)
        for jax_gradient, torch_gradient in zip(gradients, expected):
            np.testing.assert_allclose(np.asarray(jax_gradient[i]), torch_gradient, rtol=0, atol=1e-12)


# Finite differences see z* move with the parameters, which both modes ignore by design. Started at z* with a
# loose tolerance, the solver stays at z0 under the small perturbations, so that the numerical derivative is
# that of the recorded steps alone, which the modes' derivatives must then match exactly.
GRADCHECK_OPTIONS = dict(solver="forward_iteration", phantom_steps=3, phantom_damping=0.7)


def gradcheck_problem():
    W, x = tanh_problem(batch=2, n=4, scale=0.7)
    z_star, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), tol=1e-13)
    return W, x, z_star


@pytest.mark.parametrize("mode", ["phantom", "jacobian_free"])
def test_gradcheck_of_what_the_modes_compute(mode):
    """First and second derivatives: the second is plain autograd through the recorded steps."""
    W, x, z_star = gradcheck_problem()

    def output(W, x):
        f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
        z, result = fixed_point(f, z_star, tol=1e-4, backward=mode, **GRADCHECK_OPTIONS)
        assert int(result.iterations.max()) == 0
        return z

    inputs = (W.requires_grad_(), x.requires_grad_())
    assert torch.autograd.gradcheck(output, inputs)
    assert torch.autograd.gradgradcheck(output, inputs)


def test_check_grads_of_the_jax_phantom_steps():
    """Reverse mode under jit; jacobian_free is phantom's special case k = 1, lam = 1 (shown above). Were the
    solver to leave z0 under the perturbations, the numerical derivative would include z*'s motion and fail."""
    W, x, z_star = gradcheck_problem()
    theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
    start = jnp.asarray(z_star.numpy())
    # check_grads perturbs by 1e-4, hence the looser tolerance than in PyTorch.
    @jax.jit
    def solution(theta):
        return ilj.fixed_point(tanh_cell, start, theta, tol=1e-2, backward="phantom", **GRADCHECK_OPTIONS)[0]

    check_grads(solution, (theta,), order=1, modes=("rev",))


@pytest.mark.parametrize("mode", ["implicit", "phantom", "jacobian_free"])
def test_a_starting_point_already_at_the_fixed_point_gets_no_gradient(mode):
    """Before, a solver that took no step handed z0 itself back, and a z0 that required gradients got them
    through the recorded applications of f."""
    W, x = tanh_problem(batch=2, n=3)
    x.requires_grad_()
    z_star, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), tol=1e-12)
    z0 = z_star.detach().requires_grad_()
    z, result = fixed_point(lambda z: torch.tanh(z @ W.T + x), z0, tol=1e-6, backward=mode)
    assert int(result.iterations.max()) == 0
    z.sum().backward()
    assert z0.grad is None and x.grad is not None


# JAX's two modes share the line that zeroes failed samples; one of them covers it.
@pytest.mark.parametrize("framework, mode", [("torch", "phantom"), ("torch", "jacobian_free"), ("jax", "phantom")])
def test_failed_samples_pass_on_zero_gradient(framework, mode):
    W, x = (array.numpy() for array in tanh_problem(batch=3, n=4))
    broken = np.array([True, False, False])[:, None]
    # Sample 0 asks for z = z + 1 + x: no fixed point, a singular Newton system, yet a nonzero derivative in x.
    if framework == "torch":
        W_t, x_t, broken_t = torch.from_numpy(W), torch.tensor(x, requires_grad=True), torch.from_numpy(broken)
        with pytest.warns(ConvergenceWarning, match="singular"):
            z, result = fixed_point(
                lambda z: torch.where(broken_t, z + 1.0 + x_t, torch.tanh(z @ W_t.T + x_t)), torch.zeros_like(x_t),
                tol=1e-12, backward=mode,
            )
        (gradient,) = torch.autograd.grad(z.sum(), x_t)
        gradient = gradient.numpy()
    else:

        def total(x):
            f = lambda z, x: jnp.where(broken, z + 1.0 + x, jnp.tanh(z @ W.T + x))  # noqa: E731
            z, result = ilj.fixed_point(f, jnp.zeros_like(x), x, tol=1e-12, backward=mode)
            return z.sum(), result

        with pytest.warns(ConvergenceWarning, match="singular"):
            gradient, result = jax.grad(total, has_aux=True)(jnp.asarray(x))
        gradient = np.asarray(gradient)
    assert np.asarray(result.failed).tolist() == [True, False, False]
    assert (gradient[0] == 0).all()
    assert np.isfinite(gradient).all() and (gradient[1:] != 0).all()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_options_name_the_argument(framework):
    W, x = tanh_problem(batch=2, n=3)
    if framework == "torch":
        def solve(**options):
            return fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), **options)
    else:
        def solve(**options):
            theta = (jnp.asarray(W.numpy()), jnp.asarray(x.numpy()))
            return ilj.fixed_point(tanh_cell, jnp.zeros(x.shape), theta, **options)
    # Checked in every mode, so a bad value does not wait for a switch to phantom mode to surface.
    for steps in (0, 2.5, True, None):
        with pytest.raises(ValueError, match="phantom_steps must be a positive integer"):
            solve(phantom_steps=steps)
    for damping in (0.0, 1.5, -0.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"phantom_damping must lie in \(0, 1\]"):
            solve(backward="phantom", phantom_damping=damping)
    with pytest.raises(ValueError, match="unknown backward 'neumann'; choose one of .*'phantom', 'jacobian_free'"):
        solve(backward="neumann")
    if framework == "torch":
        with pytest.raises(ValueError, match="phantom_steps must be a positive integer"):
            FixedPointLayer(TanhCell(3), backward="phantom", phantom_steps=0)


class TanhCell(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.linear = nn.Linear(n, n, bias=False, dtype=torch.float64)

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


def test_layer_trains_with_phantom_gradients():
    torch.manual_seed(0)
    layer = FixedPointLayer(TanhCell(6), backward="phantom", phantom_steps=8, phantom_damping=0.8, tol=1e-10)
    assert "phantom_steps=8" in repr(layer) and "phantom_damping=0.8" in repr(layer)
    x = torch.randn(16, 6, dtype=torch.float64)
    target = 0.5 * torch.tanh(x.flip(1))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        assert layer.f.linear.weight.grad is not None and bool(layer.f.linear.weight.grad.abs().sum() > 0)
        optimizer.step()
        losses.append(loss.item())
    assert layer.last_result.status == "converged"
    assert losses[-1] < 0.5 * losses[0]
