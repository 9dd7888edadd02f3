"""Continuous normalizing flows: the dynamics of a state augmented with its change of log-density (the
instantaneous change of variables) and the regularizers' integrals, solved by the package's ``odeint``."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..._checks import check_flat_state_shape, check_nonnegative, check_probe_shape, check_time_span
from .._validation import check_batched_state, check_flat_states, check_floating_tensor, check_probe
from ..ode import ODEResult, odeint
from .divergence import Field, field_divergence
from .regularizers import kinetic_energy

LogProb = Callable[[torch.Tensor], torch.Tensor]
"""``log_prob(z)``: a log-density evaluated at each row of ``z`` (B, D), returning shape (B,)."""


def cnf_dynamics(
    f: Field, probe: Optional[torch.Tensor] = None, *, kinetic: float = 0.0, frobenius: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The field ``g(t, state)`` of a flow's state augmented with its log-density and regularizers.

    Along a trajectory ``y' = f(t, y)`` the log-density of the transported distribution changes as
    ``d log p(y(t)) / dt = -trace(df/dy)`` (Chen et al. 2018). Packing ``[y, log-density change, penalty]``
    into one tensor of shape (B, D + 2) lets ``odeint`` integrate all three together, in either direction and
    with any of its gradient modes.

    Parameters
    ----------
    f : callable
        The flow's vector field ``f(t, y)``, ``t`` of shape (B,), ``y`` of shape (B, D), each sample's output
        depending on that sample alone.
    probe : torch.Tensor, optional
        Hutchinson's probe of shape (B, D), drawn once per solve (see
        :func:`~implicit_layers.torch.hutchinson_probe`); ``None`` for the exact divergence.
    kinetic, frobenius : float
        Non-negative weights of the penalty's rate ``kinetic * |f|^2 + frobenius * ||df/dy||_F^2`` (the
        Frobenius term estimated with the probe when one is given).

    Returns
    -------
    callable
        ``g(t, state)``: for ``state`` of shape (B, D + 2) holding ``[y, logp, reg]``, returns
        ``[f(t, y), -div, kinetic * |f(t, y)|^2 + frobenius * frobenius_term]``, shape (B, D + 2). It reads no
        value back to the host.
    """
    kinetic = check_nonnegative("kinetic", kinetic)
    frobenius = check_nonnegative("frobenius", frobenius)
    if probe is not None:
        check_floating_tensor("probe", probe)
        check_flat_state_shape("probe", tuple(probe.shape))

    def augmented_field(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if state.ndim != 2 or state.shape[1] < 3:
            raise ValueError(
                f"state must have shape (B, D + 2), rows [y, logp, reg] with D >= 1, got {tuple(state.shape)}"
            )
        y = state[:, :-2]
        if probe is not None:
            check_probe_shape(tuple(probe.shape), tuple(y.shape), state="y = state[:, :-2]")
        fy, div, frobenius_term = field_divergence(f, t, y, probe)
        penalty = torch.zeros_like(div)
        if kinetic:
            penalty = penalty + kinetic * kinetic_energy(fy)
        if frobenius:
            penalty = penalty + frobenius * frobenius_term
        return torch.cat([fy, -div.unsqueeze(1), penalty.unsqueeze(1)], dim=1)

    return augmented_field


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """The log-density of the standard normal ``N(0, I)`` at each row of ``z``.

    Parameters
    ----------
    z : torch.Tensor
        Points of shape (B, D).

    Returns
    -------
    torch.Tensor
        ``-|z|^2 / 2 - D log(2 pi) / 2`` per row, shape (B,).
    """
    check_flat_states("z", z)
    return -0.5 * z.pow(2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def cnf_log_likelihood(
    f: Field,
    x: torch.Tensor,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    probe: Optional[torch.Tensor] = None,
    kinetic: float = 0.0,
    frobenius: float = 0.0,
    base_log_prob: Optional[LogProb] = None,
    **odeint_options: Any,
) -> tuple[torch.Tensor, torch.Tensor, ODEResult]:
    """The log-likelihood of data ``x`` under a continuous normalizing flow, with its regularizers' integrals.

    The flow ``y' = f(t, y)`` carries base samples ``z = y(t0)`` to data ``x = y(t1)``. Solving the augmented
    dynamics of :func:`cnf_dynamics` from ``(x, 0, 0)`` at ``t1`` back to ``t0`` gives ``z`` and the
    instantaneous change of variables (FFJORD, Grathwohl et al. 2019)::

        log p(x) = base_log_prob(z) - integral from t0 to t1 of trace(df/dy)(t, y(t)) dt.

    Parameters
    ----------
    f : callable
        The vector field ``f(t, y)``, ``t`` of shape (B,), ``y`` of shape (B, D); typically an ``nn.Module``.
    x : torch.Tensor
        Data of shape (B, D), floating point, finite.
    t0, t1 : float
        The times of the base distribution and of the data; they differ, in either order.
    probe : torch.Tensor, optional
        Hutchinson's probe of ``x``'s shape, drawn once per call; ``None`` for the exact divergence.
    kinetic, frobenius : float
        Non-negative weights of the kinetic energy and of the Jacobian's squared Frobenius norm in
        ``regularization``.
    base_log_prob : callable, optional
        The base distribution's log-density, mapping (B, D) to (B,); by default
        :func:`standard_normal_log_prob`.
    **odeint_options
        Passed to :func:`~implicit_layers.torch.odeint`: ``method``, ``rtol``, ``atol``, ``dt``, ``num_steps``,
        ``max_steps``, ``gradient``, ``params``, ... With ``gradient="adjoint"``, ``params`` defaults to
        ``f.parameters()`` when ``f`` is an ``nn.Module`` (the augmented field is a plain function, so it must
        be told).

    Returns
    -------
    log_prob : torch.Tensor
        ``log p(x)`` per sample, shape (B,); an unbiased estimate when a probe is given.
    regularization : torch.Tensor
        ``integral of (kinetic |f|^2 + frobenius ||df/dy||_F^2) |dt|`` along each trajectory, shape (B,),
        non-negative (zero when both weights are).
    result : ODEResult
        What ``odeint`` did, per sample (its ``nfe`` counts evaluations of the augmented field).
    """
    _check_flow_input("x", x, probe)
    t0, t1 = check_time_span(t0, t1)
    dynamics = cnf_dynamics(f, probe, kinetic=kinetic, frobenius=frobenius)
    start = torch.cat([x, x.new_zeros(x.shape[0], 2)], dim=1)
    ys, result = odeint(dynamics, start, [t1, t0], **_with_adjoint_params(f, odeint_options))
    end = ys[-1]
    z, log_density_change, penalty = end[:, :-2], end[:, -2], end[:, -1]
    # The solve ran from t1 to t0: its log-density change is the integral of div from t0 to t1, and its
    # penalty the integral of the rate from t1 to t0, which the sign of t1 - t0 turns into one over |dt|
    # (0 - penalty rather than -penalty, so that a zero penalty reads 0 and not -0).
    log_prob = _base_log_prob(base_log_prob, z) - log_density_change
    regularization = 0.0 - penalty if t1 > t0 else penalty
    return log_prob, regularization, result


def cnf_sample(
    f: Field,
    z: torch.Tensor,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    probe: Optional[torch.Tensor] = None,
    base_log_prob: Optional[LogProb] = None,
    **odeint_options: Any,
) -> tuple[torch.Tensor, torch.Tensor, ODEResult]:
    """Carry base samples ``z`` through a continuous normalizing flow to samples ``x``, with their log-density.

    The inverse of :func:`cnf_log_likelihood`: the augmented dynamics are solved from ``(z, 0, 0)`` at ``t0``
    forward to ``t1``, giving ``x = y(t1)`` and ``log p(x) = base_log_prob(z) - integral from t0 to t1 of
    trace(df/dy) dt``.

    Parameters
    ----------
    f : callable
        The vector field ``f(t, y)``, as in :func:`cnf_log_likelihood`.
    z : torch.Tensor
        Base samples of shape (B, D), floating point, finite.
    t0, t1 : float
        The times of the base distribution and of the data; they differ, in either order.
    probe : torch.Tensor, optional
        Hutchinson's probe of ``z``'s shape; ``None`` for the exact divergence.
    base_log_prob : callable, optional
        The base distribution's log-density, mapping (B, D) to (B,); by default
        :func:`standard_normal_log_prob`.
    **odeint_options
        Passed to :func:`~implicit_layers.torch.odeint`, as in :func:`cnf_log_likelihood`.

    Returns
    -------
    x : torch.Tensor
        The samples, shape (B, D).
    log_prob : torch.Tensor
        The model's log-density at ``x``, shape (B,).
    result : ODEResult
        What ``odeint`` did, per sample.
    """
    _check_flow_input("z", z, probe)
    t0, t1 = check_time_span(t0, t1)
    dynamics = cnf_dynamics(f, probe)
    start = torch.cat([z, z.new_zeros(z.shape[0], 2)], dim=1)
    ys, result = odeint(dynamics, start, [t0, t1], **_with_adjoint_params(f, odeint_options))
    end = ys[-1]
    x, log_density_change = end[:, :-2], end[:, -2]
    return x, _base_log_prob(base_log_prob, z) + log_density_change, result


def _check_flow_input(name: str, value: Any, probe: Optional[torch.Tensor]) -> None:
    """Check the flow's input and its probe once, before the solve, so that errors name them rather than the
    augmented state that ``odeint`` sees."""
    check_flat_states(name, value)
    check_batched_state(name, value)
    if probe is not None:
        check_probe(probe, value, name=name)


def _with_adjoint_params(f: Field, options: dict) -> dict:
    """``odeint``'s options, with ``params`` defaulting to ``f``'s parameters under the adjoint: ``odeint`` sees
    the augmented field, a plain function, and could not find them itself."""
    if options.get("gradient") == "adjoint" and options.get("params") is None and isinstance(f, torch.nn.Module):
        return {**options, "params": f.parameters()}
    return options


def _base_log_prob(base_log_prob: Optional[LogProb], z: torch.Tensor) -> torch.Tensor:
    if base_log_prob is None:
        return standard_normal_log_prob(z)
    value = base_log_prob(z)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (z.shape[0],):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"base_log_prob(z) must return a tensor of shape (B,) = ({z.shape[0]},), got {shape}")
    return value
