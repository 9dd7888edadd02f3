"""The monotone parametrization of both frameworks: its guarantee (the symmetric part of I - W is at least m I),
the unique fixed point it gives z = relu(W z + U x + b), which the damped iteration reaches from every start, and a
weight without the guarantee whose layer has several fixed points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import implicit_layers.jax as ilj
from implicit_layers.torch import anderson, forward_iteration, monotone_step_size, monotone_weight, newton

jax.config.update("jax_enable_x64", True)


def random_parameters(n, scale, generator):
    A = scale * torch.randn(n, n, generator=generator, dtype=torch.float64)
    B = scale * torch.randn(n, n, generator=generator, dtype=torch.float64)
    return A, B


def symmetric_part(M):
    return (M + M.T) / 2


def test_the_symmetric_part_of_i_minus_w_is_m_plus_a_t_a():
    generator = torch.Generator().manual_seed(0)
    for draw in range(200):
        n = 1 + draw % 12
        scale = 10.0 ** (draw % 5 - 2)  # from 0.01 to 100
        m = 0.05 + 0.9 * torch.rand((), generator=generator, dtype=torch.float64).item()
        A, B = random_parameters(n, scale, generator)
        W = monotone_weight(A, B, m)
        smallest = torch.linalg.eigvalsh(symmetric_part(torch.eye(n, dtype=torch.float64) - W))[0]
        # Exactly m + sigma_min(A)^2, up to the round-off of entries of size scale^2.
        expected = m + torch.linalg.svdvals(A)[-1] ** 2
        assert smallest >= m - 1e-13 * (1 + scale**2)
        torch.testing.assert_close(smallest, expected, rtol=0, atol=1e-13 * (1 + scale**2))
    # With A = 0 the margin is exactly m: the bound is tight.
    W = monotone_weight(torch.zeros(4, 4, dtype=torch.float64), B[:4, :4], 0.3)
    torch.testing.assert_close(torch.linalg.eigvalsh(symmetric_part(torch.eye(4, dtype=torch.float64) - W)),
                               torch.full((4,), 0.3, dtype=torch.float64), rtol=0, atol=1e-14)


def monotone_layer(n=8, inputs=6, batch=4, m=0.5, seed=0):
    """A monotone layer z = relu(W z + U x + b) whose W is far from a contraction (spectral norm above 2)."""
    generator = torch.Generator().manual_seed(seed)
    A, B = random_parameters(n, 0.3, generator)
    W = monotone_weight(A, B, m)
    U = torch.randn(n, inputs, generator=generator, dtype=torch.float64)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, inputs, generator=generator, dtype=torch.float64)
    injection = x @ U.T + b
    return W, injection, m


def test_the_monotone_layer_has_one_fixed_point_that_every_start_and_solver_finds():
    W, injection, m = monotone_layer()
    assert torch.linalg.matrix_norm(W, ord=2) > 2  # plain iteration of relu(W z + ...) has no guarantee here
    alpha = monotone_step_size(W, m)
    starts, batch = 6, injection.shape[0]
    generator = torch.Generator().manual_seed(1)
    # Every sample from six starts spread over [-10, 10]^n, solved as one batch.
    z0 = 10 * (2 * torch.rand(starts * batch, W.shape[0], generator=generator, dtype=torch.float64) - 1)
    repeated = injection.repeat(starts, 1)

    def damped(z):
        return torch.relu((1 - alpha) * z + alpha * (z @ W.T + repeated))

    z, result = forward_iteration(damped, z0, tol=1e-12, max_iter=3000, strict=True)
    solutions = z.reshape(starts, batch, -1)
    torch.testing.assert_close(solutions, solutions[:1].expand_as(solutions), rtol=0, atol=1e-10)
    # It solves the layer's own equation, not only the damped one.
    solution = solutions[0]
    torch.testing.assert_close(torch.relu(solution @ W.T + injection), solution, rtol=0, atol=1e-10)
    assert (solution == 0).any() and (solution > 0).any()  # both pieces of relu are in play

    def layer(z):
        return torch.relu(z @ W.T + injection)

    # Newton and Anderson on the undamped layer carry no guarantee here, but they converge, to the same point.
    for solver in (newton, anderson):
        found, _ = solver(layer, torch.zeros_like(solution), tol=1e-12, max_iter=100, strict=True)
        torch.testing.assert_close(found, solution, rtol=0, atol=1e-10)


def test_the_damped_iteration_contracts_at_the_returned_step_size():
    W, _, m = monotone_layer()
    identity = torch.eye(W.shape[0], dtype=torch.float64)
    alpha = monotone_step_size(W, m)
    lipschitz = torch.linalg.matrix_norm(identity - W, ord=2)
    # The linear part of the step (relu only shrinks differences) and the bound of monotone_step_size's
    # docstring: below one for steps in (0, 2 alpha), smallest at alpha itself.
    for fraction in (0.5, 1.0, 1.5):
        step = fraction * alpha
        factor = torch.linalg.matrix_norm(identity - step * (identity - W), ord=2)
        bound = (1 - 2 * step * m + step**2 * lipschitz**2).sqrt()
        assert factor <= bound + 1e-14
        assert factor < 1
    torch.testing.assert_close(1 - 2 * alpha * m + alpha**2 * lipschitz**2, 1 - m**2 / lipschitz**2, rtol=0,
                               atol=1e-14)


def test_an_unconstrained_weight_gives_two_fixed_points():
    # Mutual inhibition: each unit silences the other, so whichever starts ahead wins.
    W = torch.tensor([[0.0, -2.0], [-2.0, 0.0]], dtype=torch.float64)
    b = torch.ones(2, dtype=torch.float64)
    # I - W has a symmetric part with eigenvalues 3 and -1: not monotone, and no (A, B, m) gives this W.
    assert torch.linalg.eigvalsh(symmetric_part(torch.eye(2, dtype=torch.float64) - W))[0] < 0
    z0 = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    z, _ = forward_iteration(lambda z: torch.relu(z @ W.T + b), z0, tol=1e-12, strict=True)
    torch.testing.assert_close(z, torch.eye(2, dtype=torch.float64), rtol=0, atol=0)
    # A third, unstable one sits between them; Newton lands on it from the symmetric start.
    third, _ = newton(lambda z: torch.relu(z @ W.T + b), torch.full((1, 2), 0.4, dtype=torch.float64), tol=1e-12,
                      strict=True)
    torch.testing.assert_close(third, torch.full((1, 2), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_torch_gradients_gradcheck():
    generator = torch.Generator().manual_seed(2)
    A, B = (p.requires_grad_() for p in random_parameters(4, 0.5, generator))
    m = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(monotone_weight, (A, B, m))
    assert torch.autograd.gradcheck(lambda A, B, m: monotone_step_size(monotone_weight(A, B, m), m), (A, B, m))


def test_bad_arguments_are_named():
    square = torch.zeros(3, 3, dtype=torch.float64)
    frameworks = (
        (monotone_weight, monotone_step_size, lambda a: a),
        (ilj.monotone_weight, ilj.monotone_step_size, lambda a: jnp.asarray(a.numpy())),
    )
    for weight, step_size, convert in frameworks:
        A = convert(square)
        with pytest.raises(ValueError, match="^A must be a non-empty square matrix"):
            weight(convert(torch.zeros(3, 2, dtype=torch.float64)), A, 0.5)
        with pytest.raises(ValueError, match="^B must be a non-empty square matrix"):
            weight(A, convert(torch.zeros(2, 3, 3, dtype=torch.float64)), 0.5)
        with pytest.raises(ValueError, match="A and B must have the same shape"):
            weight(A, convert(torch.zeros(2, 2, dtype=torch.float64)), 0.5)
        with pytest.raises(TypeError, match="^A must have a floating-point dtype"):
            weight(convert(torch.zeros(3, 3, dtype=torch.int64)), A, 0.5)
        with pytest.raises(ValueError, match="^B contains NaN"):
            weight(A, convert(torch.full((3, 3), float("nan"), dtype=torch.float64)), 0.5)
        with pytest.raises(ValueError, match="^W must be a non-empty square matrix"):
            step_size(convert(torch.zeros(3, dtype=torch.float64)), 0.5)
        for m in (0.0, 1.0, -0.5, float("nan")):
            with pytest.raises(ValueError, match="^m must lie strictly between 0 and 1"):
                weight(A, A, m)
            with pytest.raises(ValueError, match="^m must lie strictly between 0 and 1"):
                step_size(A, m)
        with pytest.raises(TypeError, match="^m must be a number"):
            weight(A, A, True)
        with pytest.raises(ValueError, match="^m must be a number or a 0-dimensional"):
            weight(A, A, convert(torch.full((2,), 0.5, dtype=torch.float64)))
    with pytest.raises(TypeError, match="^A must be a torch.Tensor"):
        monotone_weight(np.zeros((3, 3)), square, 0.5)
    with pytest.raises(ValueError, match="^m must lie strictly"):
        monotone_weight(square, square, torch.tensor(1.5, dtype=torch.float64))


def test_jax_twin_gives_the_same_numbers_and_composes_with_jit_and_grad():
    W_torch, injection, m = monotone_layer()
    generator = torch.Generator().manual_seed(0)
    A_torch, B_torch = random_parameters(8, 0.3, generator)  # the draw monotone_layer made
    A, B = jnp.asarray(A_torch.numpy()), jnp.asarray(B_torch.numpy())

    @jax.jit
    def weight_and_step(A, B, m):
        W = ilj.monotone_weight(A, B, m)
        return W, ilj.monotone_step_size(W, m)

    W, alpha = weight_and_step(A, B, m)  # m traced: its value is checked only outside jit
    np.testing.assert_allclose(np.asarray(W), W_torch.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(float(alpha), float(monotone_step_size(W_torch, m)), rtol=1e-14)
    check_grads(lambda A, B, m: weight_and_step(A, B, m)[1], (A[:3, :3], B[:3, :3], 0.3), order=1,
                modes=("rev",))
    # The JAX damped iteration reaches the fixed point the torch one finds.
    alpha_torch = monotone_step_size(W_torch, m)
    expected, _ = forward_iteration(
        lambda z: torch.relu((1 - alpha_torch) * z + alpha_torch * (z @ W_torch.T + injection)),
        torch.zeros_like(injection), tol=1e-12, max_iter=3000, strict=True,
    )
    injection = jnp.asarray(injection.numpy())
    z = jax.lax.fori_loop(0, 3000, lambda _, z: jax.nn.relu((1 - alpha) * z + alpha * (z @ W.T + injection)),
                          jnp.zeros_like(injection))
    np.testing.assert_allclose(np.asarray(z), expected.numpy(), rtol=0, atol=1e-10)
