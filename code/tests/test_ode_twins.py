"""The torch and JAX ODE solvers on the same problem: the same states, the same per-sample step counts, the same
gradients in every mode, and the same refusals. Float64 throughout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt

jax.config.update("jax_enable_x64", True)

ADAPTIVE = ("bosh3", "dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4")
GRADIENTS = ("backprop", "checkpoint", "adjoint")


def problem(batch=5, seed=0):
    """A damped nonlinear oscillator per sample, with a sample-dependent stiffness so that samples need different
    step sizes: y = (position, velocity), y' = (v, -k_b sin(p) - 0.3 v)."""
    rng = np.random.default_rng(seed)
    y0 = rng.standard_normal((batch, 2))
    stiffness = np.geomspace(0.5, 40.0, batch)
    return y0, stiffness


def torch_field(stiffness):
    def f(t, y):
        return torch.stack([y[:, 1], -stiffness * torch.sin(y[:, 0]) - 0.3 * y[:, 1]], dim=1)
    return f


def jax_field(t, y, stiffness):
    return jnp.stack([y[:, 1], -stiffness * jnp.sin(y[:, 0]) - 0.3 * y[:, 1]], axis=1)


def solve_both(method, **options):
    y0, stiffness = problem()
    t = np.linspace(0.0, 2.0, 7)
    ys_t, result_t = ilt.odeint(torch_field(torch.tensor(stiffness)), torch.tensor(y0), torch.tensor(t),
                                method=method, **options)
    ys_j, result_j = ilj.odeint(jax_field, jnp.asarray(y0), jnp.asarray(t), jnp.asarray(stiffness),
                                method=method, **options)
    return (ys_t.numpy(), result_t), (np.asarray(ys_j), result_j)


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("step_control", ("per_sample", "shared", "shared_rms"))
def test_adaptive_solutions_and_step_counts_agree(method, step_control):
    (ys_t, result_t), (ys_j, result_j) = solve_both(method, rtol=1e-6, atol=1e-8, step_control=step_control)
    assert ys_t.shape == ys_j.shape == (7, 5, 2)
    np.testing.assert_allclose(ys_t, ys_j, rtol=0, atol=1e-10)
    for field in ("num_accepted", "num_rejected", "nfe"):
        np.testing.assert_array_equal(np.asarray(getattr(result_t, field)), np.asarray(getattr(result_j, field)),
                                      err_msg=field)
    # step sizes are products of many controller factors: rounding differences between the twins add up
    np.testing.assert_allclose(np.asarray(result_t.final_dt), np.asarray(result_j.final_dt), rtol=1e-6)
    assert result_t.status == result_j.status == "converged"


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_solutions_agree(method):
    (ys_t, result_t), (ys_j, result_j) = solve_both(method, num_steps=64)
    np.testing.assert_allclose(ys_t, ys_j, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(result_t.nfe), np.asarray(result_j.nfe))


def test_per_sample_control_gives_samples_their_own_steps():
    (_, result_t), (_, result_j) = solve_both("dopri5", rtol=1e-6, atol=1e-8)
    accepted = np.asarray(result_t.num_accepted)
    assert accepted[0] < accepted[-1], "the stiffest sample should need the most steps"
    (_, shared_t), _ = solve_both("dopri5", rtol=1e-6, atol=1e-8, step_control="shared")
    assert np.all(np.asarray(shared_t.num_accepted) == np.asarray(shared_t.num_accepted)[0])


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradients_agree(gradient):
    y0, stiffness = problem()
    t = np.linspace(0.0, 1.0, 4)
    weights = np.random.default_rng(1).standard_normal((4, 5, 2))
    options = dict(method="dopri5", rtol=1e-9, atol=1e-11, gradient=gradient)
    if gradient == "adjoint":
        options.update(adjoint_rtol=1e-11, adjoint_atol=1e-13)

    k_t = torch.tensor(stiffness, requires_grad=True)
    y0_t = torch.tensor(y0, requires_grad=True)
    ys_t, _ = ilt.odeint(torch_field(k_t), y0_t, torch.tensor(t),
                         **(options | ({"params": [k_t]} if gradient == "adjoint" else {})))
    torch_grads = torch.autograd.grad((ys_t * torch.tensor(weights)).sum(), (k_t, y0_t))

    def loss(k, y0_):
        ys, _ = ilj.odeint(jax_field, y0_, jnp.asarray(t), k, **options)
        return jnp.sum(ys * weights)

    jax_grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(stiffness), jnp.asarray(y0))
    for g_t, g_j in zip(torch_grads, jax_grads):
        np.testing.assert_allclose(g_t.numpy(), np.asarray(g_j), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(t=[0.0, 1.0, 0.5]), "t"),
        (dict(t=[0.0]), "t"),
        (dict(method="dopri8"), "method"),
        (dict(rtol=0.0), "rtol"),
        (dict(atol=-1.0), "atol"),
        (dict(step_control="global"), "step_control"),
        (dict(gradient="implicit"), "gradient"),
        (dict(method="rk4"), "dt"),  # a fixed-step method needs dt or num_steps
        (dict(method="dopri5", dt=0.1), "dt"),  # an adaptive one takes none
    ],
)
def test_both_refuse_the_same_input_naming_the_argument(change, message):
    y0, stiffness = problem()
    arguments = dict(t=[0.0, 1.0], method="dopri5")
    arguments.update(change)
    t = arguments.pop("t")
    errors = []
    for run in (
        lambda: ilt.odeint(torch_field(torch.tensor(stiffness)), torch.tensor(y0), torch.tensor(t), **arguments),
        lambda: ilj.odeint(jax_field, jnp.asarray(y0), jnp.asarray(t), jnp.asarray(stiffness), **arguments),
    ):
        with pytest.raises((TypeError, ValueError), match=message) as caught:
            run()
        errors.append(type(caught.value))
    assert errors[0] is errors[1]
