"""The JAX argument checks shared by every family (``implicit_layers.jax._validation``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_layers.jax as ilj

jax.config.update("jax_enable_x64", True)


def test_states_closed_over_by_a_jitted_function_are_accepted():
    """An array a jitted function closes over is concrete, but a check computed on it is traced: the value check
    must be skipped there, not turned into a bool (which raised TracerBoolConversionError)."""
    y0 = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    t = jnp.array([0.0, 0.5])

    def loss(scale):
        ys, _ = ilj.odeint(lambda t, y, k: -k * y, y0, t, scale)
        z, _ = ilj.fixed_point(lambda z, k: jnp.tanh(0.5 * z + k), y0, scale)
        return jnp.sum(ys[-1]) + jnp.sum(z)

    value, grad = jax.jit(jax.value_and_grad(loss))(2.0)
    expected = np.sum(np.asarray(y0)) * np.exp(-1.0)
    assert np.isfinite(float(value)) and np.isfinite(float(grad))
    assert abs(float(jnp.sum(ilj.odeint(lambda t, y, k: -k * y, y0, t, 2.0)[0][-1])) - expected) < 1e-6


def test_non_finite_states_are_refused_outside_jit():
    bad = jnp.array([[0.0, jnp.nan]])
    with pytest.raises(ValueError, match="y0 contains NaN or Inf"):
        ilj.odeint(lambda t, y, k: -k * y, bad, jnp.array([0.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="z0 contains NaN or Inf"):
        ilj.fixed_point(lambda z, k: jnp.tanh(z + k), bad, 1.0)
