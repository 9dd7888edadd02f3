"""``odeint``: batched explicit Runge-Kutta integration on the device, with three ways to differentiate the
solution. The twin of :func:`implicit_layers.torch.odeint`."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..._checks import check_odeint_options, check_time_grid, check_time_grid_shape
from ..._tableaus import ODE_METHODS
from ...errors import report_ode_convergence
from .._validation import check_batched_state, is_concrete
from .adjoint import adjoint_integrate
from .backprop import backprop_integrate
from .checkpoint import checkpointed_integrate
from .result import ODEResult


def odeint(
    f: Callable[[jax.Array, jax.Array, Any], jax.Array],
    y0: jax.Array,
    t: Any,
    theta: Any,
    *,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    dt: Optional[float] = None,
    num_steps: Optional[int] = None,
    first_step: Optional[float] = None,
    step_control: str = "per_sample",
    max_steps: int = 10_000,
    gradient: str = "backprop",
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    strict: bool = False,
    warn: bool = True,
) -> tuple[jax.Array, ODEResult]:
    """Solve ``y' = f(t, y, theta)`` from ``y(t[0]) = y0`` for a batch of samples, returning ``y`` at every time
    of ``t``.

    JAX functions are pure, so what the torch version finds in ``f``'s closure is passed here as ``theta``. The
    solve composes with ``jit``, ``vmap`` and ``grad``; its loop runs on the device without host
    synchronization.

    Parameters
    ----------
    f : callable
        ``f(t, y, theta)`` with ``t`` of shape (B,) (each sample keeps its own clock) and ``y`` of shape (B, ...),
        returning an array of ``y``'s shape and dtype. Each sample's output must depend on that sample alone.
    y0 : jax.Array
        Initial states, shape (B, ...), floating point, finite.
    t : array_like
        Output times shared by the batch, 1-D, strictly increasing or strictly decreasing, at least two;
        ``t[0]`` is the initial time. No gradient flows to ``t`` (its derivative is zero).
    theta : pytree
        What ``f`` depends on besides ``t`` and ``y`` (parameters, inputs); differentiable in every mode. With
        ``gradient="checkpoint"`` or ``"adjoint"`` its leaves must be floating-point arrays.
    method : str
        A name in ``ODE_METHODS``: fixed-step ``"euler"``, ``"midpoint"``, ``"rk4"`` or adaptive ``"bosh3"``,
        ``"dopri5"``, ``"tsit5"``.
    rtol, atol : float
        Tolerances of adaptive methods: a step is accepted when the RMS over a sample's entries of
        ``error / (atol + rtol * max(|y0|, |y1|))`` is at most one.
    dt, num_steps : float or int, optional
        Exactly one of them for a fixed-step method: the step size, or the number of uniform steps from ``t[0]``
        to ``t[-1]``. Adaptive methods take neither.
    first_step : float, optional
        The initial step of an adaptive method; by default Hairer-Norsett-Wanner's estimate, per sample.
    step_control : str
        ``"per_sample"``: each sample its own step size and acceptance; ``"shared"``: one step size for the batch,
        set by the largest error ratio among running samples; ``"shared_rms"``: one step size for the batch, set by
        the root mean square of the running samples' error ratios, which is the error norm of the batch taken as
        one state (torchdiffeq's rule, and diffrax's for a batched state). Under both shared controls one sample
        whose state becomes NaN/Inf shrinks the step of all, and with a step size underflow they all fail; under
        ``"shared_rms"`` a sample's error may exceed the tolerance when its batch-mates are well within it.
        Per-sample steps make each sample's solution independent of its batch-mates, which is why they are the
        default; the batch still steps, and evaluates every sample, until its slowest sample is done, so they save
        arithmetic rather than time. On the ODE benchmark's neural ODE the shared controls reach a given
        worst-sample error in less time (its tolerance sweep measures all three).
    max_steps : int
        Steps (accepted and rejected) each sample may attempt. A solve differentiated with
        ``gradient="checkpoint"`` allocates that many rows of two states, so keep an adaptive method's near
        need there; one differentiated with ``"backprop"`` scans that many steps in chunks of about
        ``sqrt(max_steps)``, skipping idle chunks, and keeps about ``2 sqrt(max_steps)`` loop states. A
        fixed-step method whose number of steps is known (``num_steps``, or ``dt`` with concrete times) runs only
        those.
    gradient : str
        ``"backprop"``: autodiff through every operation of the solver (a ``lax.scan`` of ``max_steps``, run
        only when the solve is differentiated, its chunks and steps recomputed in the backward pass from the
        states it keeps; otherwise a loop that stops with the last sample);
        ``"checkpoint"``: the same gradient, each step recomputed in the backward pass from its stored start,
        in a buffer of ``max_steps`` rows allocated up front (so unless ``max_steps`` is near need,
        ``"backprop"``, which keeps about ``2 sqrt(max_steps)`` states, takes less memory and time);
        ``"adjoint"``: the continuous adjoint, the augmented system solved backwards from ``t[-1]``, restarted at
        each output time, in memory independent of the number of steps. Step sizes carry no gradient in any
        mode.
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the adjoint's backward solve; default ``rtol`` and ``atol``.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` if some sample does not reach ``t[-1]``. Under
        ``jit`` the error is raised from the device callback and reaches the caller wrapped in a
        ``jax.errors.JaxRuntimeError`` quoting its message.
    warn : bool
        Warn (:class:`~implicit_layers.errors.ConvergenceWarning`) if some sample does not reach ``t[-1]``; under
        ``jit`` the check is a device callback made only when some sample fell short.

    Returns
    -------
    ys : jax.Array
        Shape (len(t), B, ...), ``ys[0] == y0``; times that a sample did not reach are NaN.
    result : ODEResult
        Per-sample step counts, evaluations, time reached and flags.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, named with its value: see ``check_odeint_options`` and ``check_time_grid``. Checks of
        values (NaN/Inf in ``y0`` or ``t``, a non-monotone ``t``) need concrete values and are skipped under
        ``jit``; checks of shapes and dtypes always run.
    ConvergenceError
        With ``strict=True``, if some sample ran out of ``max_steps`` or failed.
    """
    options = check_odeint_options(
        ODE_METHODS,
        method=method,
        rtol=rtol,
        atol=atol,
        dt=dt,
        num_steps=num_steps,
        first_step=first_step,
        step_control=step_control,
        max_steps=max_steps,
        gradient=gradient,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        strict=strict,
        warn=warn,
    )
    check_batched_state("y0", y0)
    if not hasattr(t, "shape"):
        t = np.asarray(t, dtype=float)
    check_time_grid_shape("t", tuple(t.shape))
    if is_concrete(t):
        sign = check_time_grid("t", np.asarray(t, dtype=float))
    else:
        sign = jnp.sign(t[1] - t[0])
    loop_length = _loop_length(options, ODE_METHODS[method], t)
    t = jax.lax.stop_gradient(jnp.asarray(t, dtype=y0.dtype))
    sign = jax.lax.stop_gradient(jnp.asarray(sign, dtype=y0.dtype))
    if gradient in ("checkpoint", "adjoint"):
        _check_floating_leaves(theta, gradient)
        f, theta = _closed_over_into_theta(f, jnp.broadcast_to(t[0], y0.shape[:1]), y0, theta)

    tableau = ODE_METHODS[method]
    settings = dict(
        rtol=options["rtol"],
        atol=options["atol"],
        dt=options["dt"],
        num_steps=options["num_steps"],
        first_step=options["first_step"],
        step_control=step_control,
        max_steps=loop_length,
    )
    grid = sign * t
    report = partial(_report, max_steps=options["max_steps"], strict=strict) if warn or strict else None
    if gradient == "backprop":
        ys, result = backprop_integrate(f, y0, grid, theta, sign, tableau, **settings)
    elif gradient == "checkpoint":
        ys, result = checkpointed_integrate(f, y0, grid, theta, sign, tableau, **settings)
    else:
        ys, result = adjoint_integrate(
            f, y0, grid, theta, sign, tableau, adjoint_rtol=options["adjoint_rtol"],
            adjoint_atol=options["adjoint_atol"],
            report=partial(report, f"{method}, adjoint") if report else lambda *_: None, **settings,
        )
    result = result._replace(t_reached=sign * result.t_reached, final_dt=sign * result.final_dt)
    if report:
        report(method, result, t[0])
    return ys, result


def _loop_length(options: dict, tableau, t: jax.Array) -> int:
    """The steps the solve's loop is given: ``max_steps``, or fewer for a fixed-step method whose number of steps
    is known before it runs (``num_steps``, or ``dt`` with concrete times). A differentiated solve scans, and a
    checkpointed one stores, that many steps: rk4 with four steps must not scan ``max_steps = 10_000``."""
    if tableau.b_low is not None:
        return options["max_steps"]
    if options["num_steps"] is not None:
        return min(options["max_steps"], options["num_steps"])
    if is_concrete(t):
        span = abs(float(t[-1]) - float(t[0]))
        # As fixed_step_edge counts them: no step shorter than a billionth of dt.
        return min(options["max_steps"], max(1, math.ceil(span / options["dt"] - 1e-9)))
    return options["max_steps"]


def _check_floating_leaves(theta: Any, gradient: str) -> None:
    """Raise unless every leaf of ``theta`` is a floating-point array: the custom derivative rules of
    ``"checkpoint"`` and ``"adjoint"`` return a cotangent for each."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"theta{jax.tree_util.keystr(path)} must be a floating-point array for gradient={gradient!r}, got "
                f"{leaf!r}; pass other values to f through a closure"
            )


def _closed_over_into_theta(f: Callable, t0: jax.Array, y0: jax.Array, theta: Any):
    """``f`` and ``theta`` with the traced arrays ``f`` closes over moved into ``theta``.

    The custom derivative rules of ``"checkpoint"`` and ``"adjoint"`` differentiate their explicit arguments only;
    a traced array in ``f``'s closure (a probe or a parameter of an enclosing ``jit`` or ``grad``) would leak
    out of them as an escaped tracer. As explicit arguments such arrays get their derivatives, as they do with
    ``"backprop"`` (which converts its closure the same way). ``jax.closure_convert`` moves the floating-point
    ones; integer arrays carry no derivative and stay in the closure.
    """
    converted, closed_over = jax.closure_convert(f, t0, y0, theta)
    if not closed_over:
        return f, theta

    def field(t, y, theta_and_closed_over):
        own_theta, values = theta_and_closed_over
        return converted(t, y, own_theta, *values)

    return field, (theta, tuple(closed_over))


def _report(name: str, result: ODEResult, t_start: Any, *, max_steps: int, strict: bool) -> None:
    """Warn (or raise, with ``strict``) if some sample fell short of ``t[-1]``: at once when the values are
    concrete, else from the device by ``jax.debug.callback``, made only when some sample fell short."""

    def emit(converged, failed, t_reached, final_dt, t_start):
        report_ode_convergence(
            name, converged, failed, t_reached, final_dt, t_start=float(t_start), max_steps=max_steps,
            strict=strict, stacklevel=4,
        )

    values = (result.converged, result.failed, result.t_reached, result.final_dt, t_start)
    if all(is_concrete(value) for value in values):
        emit(*values)
    else:
        jax.lax.cond(
            jnp.all(result.converged), lambda *_: None, lambda *a: jax.debug.callback(emit, *a), *values
        )
