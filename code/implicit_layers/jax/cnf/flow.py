"""Continuous normalizing flows in JAX: the dynamics of a state augmented with its change of log-density and a
regularizer, and the log-likelihood and sampling solves that integrate them with ``odeint``. The JAX twin of
``implicit_layers.torch.cnf.flow``."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ..._checks import check_flat_state_shape, check_nonnegative, check_time_span
from .._validation import check_flat_state, check_probe
from ..ode import ODEResult, odeint
from .divergence import Field, divergence
from .regularizers import kinetic_energy

LogProb = Callable[[jax.Array], jax.Array]


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """The log-density of the standard normal distribution ``N(0, I)`` at each sample.

    The JAX twin of :func:`implicit_layers.torch.standard_normal_log_prob`: the default base distribution of a
    flow.

    Parameters
    ----------
    z : jax.Array
        Points, shape (B, D), floating point.

    Returns
    -------
    jax.Array
        Shape (B,): ``-|z|^2 / 2 - D log(2 pi) / 2``.
    """
    check_flat_state("z", z)
    return -0.5 * jnp.sum(z**2, axis=1) - 0.5 * z.shape[1] * math.log(2.0 * math.pi)


def cnf_dynamics(
    f: Field, probe: Optional[jax.Array] = None, *, kinetic: float = 0.0, frobenius: float = 0.0
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """The field of a flow's state augmented with its log-density change and regularizer, for ``odeint``.

    The JAX twin of :func:`implicit_layers.torch.cnf_dynamics`. Along ``y' = f(t, y)`` the log-density obeys the
    instantaneous change of variables ``d log p(y(t)) / dt = -trace(df/dy)``; the returned ``g(t, state,
    theta)`` integrates ``state = [y, logdet, reg]`` of shape (B, D + 2) with

    ``g = [f(t, y, theta), -div, kinetic * |f(t, y, theta)|^2 + frobenius * ||df/dy||_F^2]``,

    the divergence and the Frobenius term exact or estimated with ``probe`` (see :func:`divergence`). Packing
    the three into one array lets ``odeint`` solve them together, with one step size per sample chosen for all
    of them. ``g`` closes over the probe, which ``odeint`` accepts in every gradient mode, also when ``jit``
    traces the probe.

    Parameters
    ----------
    f : callable
        The flow's field ``f(t, y, theta)``, ``y`` of shape (B, D).
    probe : jax.Array, optional
        Hutchinson's probe, shape (B, D) (see :func:`hutchinson_probe`), kept for the whole solve; None for the
        exact divergence.
    kinetic, frobenius : float
        Non-negative weights of the kinetic-energy and Jacobian-Frobenius regularizers (RNODE, Finlay et al.
        2020); zero switches a term off.

    Returns
    -------
    callable
        ``g(t, state, theta)`` with ``state`` of shape (B, D + 2), returning an array of that shape.
    """
    field = _augmented_field(
        f, check_nonnegative("kinetic", kinetic), check_nonnegative("frobenius", frobenius)
    )
    if probe is not None:
        if not hasattr(probe, "shape") or not hasattr(probe, "dtype"):
            raise TypeError(f"probe must be a JAX array or None, got {type(probe).__name__}")
        check_flat_state_shape("probe", tuple(probe.shape))
    return lambda t, state, theta: field(t, state, (theta, probe))


def cnf_log_likelihood(
    f: Field,
    x: jax.Array,
    theta: Any,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    probe: Optional[jax.Array] = None,
    kinetic: float = 0.0,
    frobenius: float = 0.0,
    base_log_prob: Optional[LogProb] = None,
    **odeint_options: Any,
) -> tuple[jax.Array, jax.Array, ODEResult]:
    """The log-density a continuous normalizing flow gives each data point, and the regularizer of its dynamics.

    The JAX twin of :func:`implicit_layers.torch.cnf_log_likelihood`. The flow carries base samples ``z`` at
    ``t0`` to data at ``t1`` along ``y' = f(t, y, theta)``. From ``(x, 0, 0)`` at ``t1`` the augmented system of
    :func:`cnf_dynamics` is solved back to ``t0`` with ``odeint``, reaching ``z(t0)`` and
    ``int_{t0}^{t1} div dt``, so that ``log p(x) = base_log_prob(z(t0)) - int_{t0}^{t1} div dt``. Composes with
    ``jit`` (the options static), ``vmap`` and ``grad`` in every gradient mode of ``odeint``; the probe travels
    in ``odeint``'s ``theta`` beside the parameters and receives no gradient.

    Parameters
    ----------
    f : callable
        The flow's field ``f(t, y, theta)``, ``t`` of shape (B,), ``y`` of shape (B, D).
    x : jax.Array
        Data, shape (B, D), floating point, finite.
    theta : pytree
        The parameters of ``f``; floating-point leaves with ``gradient="checkpoint"`` or ``"adjoint"``.
    t0, t1 : float
        The times of the base distribution and of the data; distinct, in either order.
    probe : jax.Array, optional
        Hutchinson's probe, shape and dtype of ``x``, kept for the whole solve; None for the exact divergence.
    kinetic, frobenius : float
        Non-negative weights of the regularizers integrated along the trajectory (see :func:`cnf_dynamics`).
    base_log_prob : callable, optional
        ``base_log_prob(z)``, shape (B,): the base distribution's log-density; default
        :func:`standard_normal_log_prob`.
    **odeint_options
        Keyword arguments of :func:`~implicit_layers.jax.odeint` (``method``, ``rtol``, ``atol``, ``gradient``,
        ``num_steps``, ``max_steps``, ...). Its error control sees the whole augmented state.

    Returns
    -------
    log_prob : jax.Array
        Shape (B,): the model's log-density at each ``x``.
    regularization : jax.Array
        Shape (B,): ``int (kinetic * |f|^2 + frobenius * ||df/dy||_F^2) |dt|`` along each trajectory,
        non-negative; zeros when both weights are zero.
    result : ODEResult
        ``odeint``'s record of the solve.
    """
    t0, t1 = check_time_span(t0, t1)
    field = _augmented_field(
        f, check_nonnegative("kinetic", kinetic), check_nonnegative("frobenius", frobenius)
    )
    check_flat_state("x", x)
    if probe is not None:
        check_probe(probe, x, state="x")
    _check_base_log_prob(base_log_prob, x)
    state, result = _solve(field, x, [t1, t0], theta, probe, odeint_options)
    z, integrated_divergence, integrated_rate = _split(state)
    # The solve ran from t1 to t0, so the logdet entry holds int_{t1}^{t0} -div dt = int_{t0}^{t1} div dt and
    # the regularizer entry int_{t1}^{t0} rate dt, whose sign is that of t0 - t1.
    regularization = integrated_rate if t0 > t1 else -integrated_rate
    return _base_log_prob(base_log_prob, z) - integrated_divergence, regularization, result


def cnf_sample(
    f: Field,
    z: jax.Array,
    theta: Any,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    probe: Optional[jax.Array] = None,
    base_log_prob: Optional[LogProb] = None,
    **odeint_options: Any,
) -> tuple[jax.Array, jax.Array, ODEResult]:
    """Carry base samples through the flow to data space, with the model's log-density at each result.

    The JAX twin of :func:`implicit_layers.torch.cnf_sample`. The augmented system of :func:`cnf_dynamics`
    (regularizers off) is solved from ``(z, 0, 0)`` at ``t0`` to ``t1``, giving ``x = y(t1)`` and
    ``log p(x) = base_log_prob(z) - int_{t0}^{t1} div dt``; :func:`cnf_log_likelihood` of that ``x`` retraces the
    same path backwards. Composes with ``jit``, ``vmap`` and ``grad`` as :func:`cnf_log_likelihood` does.

    Parameters
    ----------
    f : callable
        The flow's field ``f(t, y, theta)``, ``t`` of shape (B,), ``y`` of shape (B, D).
    z : jax.Array
        Base samples, shape (B, D), floating point, finite.
    theta : pytree
        The parameters of ``f``.
    t0, t1 : float
        The times of the base distribution and of the data; distinct, in either order.
    probe : jax.Array, optional
        Hutchinson's probe, shape and dtype of ``z``; None for the exact divergence.
    base_log_prob : callable, optional
        ``base_log_prob(z)``, shape (B,); default :func:`standard_normal_log_prob`.
    **odeint_options
        Keyword arguments of :func:`~implicit_layers.jax.odeint`.

    Returns
    -------
    x : jax.Array
        Shape (B, D): the samples.
    log_prob : jax.Array
        Shape (B,): the model's log-density at each ``x``.
    result : ODEResult
        ``odeint``'s record of the solve.
    """
    t0, t1 = check_time_span(t0, t1)
    check_flat_state("z", z)
    if probe is not None:
        check_probe(probe, z, state="z")
    _check_base_log_prob(base_log_prob, z)
    state, result = _solve(_augmented_field(f, 0.0, 0.0), z, [t0, t1], theta, probe, odeint_options)
    x, negative_divergence_integral, _ = _split(state)
    return x, _base_log_prob(base_log_prob, z) + negative_divergence_integral, result


def _augmented_field(f: Field, kinetic: float, frobenius: float) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """``cnf_dynamics``'s field with the probe read from ``theta = (parameters, probe)``, so that the solves of
    ``cnf_log_likelihood`` and ``cnf_sample`` take it as an explicit input."""

    def field(t, state, theta_and_probe):
        theta, probe = theta_and_probe
        if state.ndim != 2 or state.shape[1] < 3:
            raise ValueError(
                f"the augmented state must have shape (B, D + 2) = [y, logdet, reg] with D >= 1, got shape "
                f"{tuple(state.shape)}"
            )
        if probe is not None:
            probe = jax.lax.stop_gradient(probe)
        fy, div, frobenius_term = divergence(f, t, state[:, :-2], theta, probe)
        # A weight of zero leaves its term out, so that an infinite speed does not turn into 0 * inf = NaN.
        rate = jnp.zeros_like(div)
        if kinetic:
            rate = rate + kinetic * kinetic_energy(fy)
        if frobenius:
            rate = rate + frobenius * frobenius_term
        return jnp.concatenate([fy, -div[:, None], rate[:, None]], axis=1)

    return field


def _solve(field, y, times, theta, probe, odeint_options) -> tuple[jax.Array, ODEResult]:
    """Integrate ``field`` from ``(y, 0, 0)`` over ``times`` (two of them) and return the final augmented state."""
    start = jnp.concatenate([y, jnp.zeros((y.shape[0], 2), y.dtype)], axis=1)
    states, result = odeint(field, start, times, (theta, probe), **odeint_options)
    return states[-1], result


def _split(state: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return state[:, :-2], state[:, -2], state[:, -1]


def _check_base_log_prob(base_log_prob: Optional[LogProb], z: jax.Array) -> None:
    """Raise unless ``base_log_prob`` gives one value per sample of ``z``: its shape is traced, not computed, so
    a wrong one is refused before the solve rather than after it."""
    if base_log_prob is None:
        return
    if not callable(base_log_prob):
        raise TypeError(f"base_log_prob must be a callable or None, got {type(base_log_prob).__name__}")
    shape = getattr(jax.eval_shape(base_log_prob, z), "shape", None)
    if shape != (z.shape[0],):
        raise ValueError(
            f"base_log_prob(z) must return shape (B,) = ({z.shape[0]},), one log-density per sample, got "
            f"{'no array' if shape is None else shape}"
        )


def _base_log_prob(base_log_prob: Optional[LogProb], z: jax.Array) -> jax.Array:
    return standard_normal_log_prob(z) if base_log_prob is None else base_log_prob(z)
