"""The batched Runge-Kutta loop on the device: one step function for every tableau, the PI step-size controller,
the dense output, and per-sample clocks frozen with ``jnp.where``. The twin of ``implicit_layers.torch.ode._loop``:
the same constants, the same decisions in the same order, so both take the same steps."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ..._tableaus import ButcherTableau
from .._batch import flat, per_sample
from .._validation import check_returns_like
from .result import ODEResult

Field = Callable[[jax.Array, jax.Array, Any], jax.Array]
"""``f(t, y, theta)``: the vector field, ``t`` of shape (B,), ``y`` of shape (B, ...), ``theta`` a pytree."""

# The PI controller's constants, shared with the torch twin: the step grows at most tenfold, shrinks at most
# fivefold, and aims at nine tenths of the step that would meet the tolerance exactly.
SAFETY = 0.9
FACTOR_MIN = 0.2
FACTOR_MAX = 10.0
PCOEFF = 0.2
ICOEFF = 0.5
# Error ratios are floored here before being raised to negative powers: an exact step (ratio 0) grows by
# FACTOR_MAX rather than dividing by zero.
RATIO_FLOOR = 1e-10


def _combine(weights, stages):
    """``sum_i weights[i] * stages[i]``, skipping zero weights (most tableaus have some)."""
    total = None
    for weight, stage in zip(weights, stages):
        if weight:
            total = weight * stage if total is None else total + weight * stage
    return total


def rk_step(f, t, y, f0, dt, tableau: ButcherTableau):
    """One explicit Runge-Kutta step of size ``dt`` (B,) from ``(t, y)`` with ``f0 = f(t, y)``; ``f(t, y)``.

    The stages are a Python loop over the tableau, unrolled when traced, so every method shares this code.

    Returns
    -------
    y1 : jax.Array
        The solution after the step.
    f1 : jax.Array or None
        ``f(t + dt, y1)`` when the tableau is FSAL (its last stage), else ``None``.
    error : jax.Array or None
        The embedded error estimate ``y1 - y1_low``; ``None`` for a fixed-step tableau.
    y_mid : jax.Array or None
        The solution at the step's midpoint when the tableau has midpoint weights, else ``None``.
    """
    h = per_sample(dt, y)
    stages = [f0]
    for c_i, row in zip(tableau.c[1:], tableau.a[1:]):
        stages.append(f(t + c_i * dt, y + h * _combine(row, stages)))
    y1 = y + h * _combine(tableau.b, stages)
    f1 = stages[-1] if tableau.fsal else None
    error = None
    if tableau.b_low is not None:
        error = h * _combine([b - b_low for b, b_low in zip(tableau.b, tableau.b_low)], stages)
    y_mid = None if tableau.b_mid is None else y + h * _combine(tableau.b_mid, stages)
    return y1, f1, error, y_mid


def interpolate(theta, y0, y1, f0, f1, y_mid, dt):
    """The step's dense output at fractions ``theta`` (T, B) of the step, shape (T, B, ...): the quartic through
    ``y_mid`` when given, else the cubic Hermite on ``(y0, y1, f0, f1)``. ``theta == 1`` gives ``y1`` exactly."""
    s = per_sample(theta, y0)
    h = per_sample(dt, y0)
    slope0, slope1 = h * f0, h * f1
    if y_mid is None:
        value = (
            (1 + 2 * s) * (1 - s) ** 2 * y0 + s * (1 - s) ** 2 * slope0
            + s**2 * (3 - 2 * s) * y1 - s**2 * (1 - s) * slope1
        )
    else:
        # p(s) = y0 + s slope0 + s^2 c2 + s^3 c3 + s^4 c4 with p(1) = y1, p'(1) = slope1, p(1/2) = y_mid.
        rise = y1 - y0 - slope0
        bend = slope1 - slope0
        lift = 16 * (y_mid - y0 - slope0 / 2)
        c2 = -5 * rise + bend + lift
        c3 = 14 * rise - 3 * bend - 2 * lift
        c4 = -8 * rise + 2 * bend + lift
        value = y0 + s * (slope0 + s * (c2 + s * (c3 + s * c4)))
    return jnp.where(s == 1, y1, value)


def error_ratio(error, y0, y1, rtol, atol):
    """Per-sample RMS over state entries of ``error / (atol + rtol * max(|y0|, |y1|))``, without gradient;
    NaN/Inf become Inf so that the step is rejected."""
    error, y0, y1 = (jax.lax.stop_gradient(x) for x in (error, y0, y1))
    scale = atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1))
    ratio = jnp.sqrt(jnp.mean(flat(error / scale) ** 2, axis=1))
    return jnp.where(jnp.isfinite(ratio), ratio, jnp.inf)


def batch_ratio(ratio, running, step_control: str):
    """The error ratio that decides each sample's step under ``step_control``: its own (``"per_sample"``), the
    largest among running samples (``"shared"``), or their root mean square (``"shared_rms"``: the error norm of
    the batch taken as one state, which lets one sample exceed the tolerance when its batch-mates are well
    within it)."""
    if step_control == "per_sample":
        return ratio
    live = jnp.where(running, ratio, 0.0)
    if step_control == "shared":
        value = jnp.max(live)
    else:
        value = jnp.sqrt(jnp.sum(live**2) / jnp.maximum(jnp.sum(running), 1))
    return jnp.broadcast_to(value, ratio.shape)


def propose_step(dt, ratio, ratio_prev, order):
    """The PI controller: ``dt * safety * r**(-(icoeff + pcoeff)/q) * r_prev**(pcoeff/q)``, with ``r`` this
    step's error ratio, ``r_prev`` the last accepted step's, ``q`` the tableau's order, the factor clipped to
    ``[factor_min, factor_max]`` after an accepted step and to ``[factor_min, safety]`` after a rejected one (a
    rejected step always shrinks). Returns whether each sample's step is accepted, and its next step size."""
    accept = ratio <= 1
    factor = (
        SAFETY
        * jnp.maximum(ratio, RATIO_FLOOR) ** (-(ICOEFF + PCOEFF) / order)
        * jnp.maximum(ratio_prev, RATIO_FLOOR) ** (PCOEFF / order)
    )
    upper = jnp.where(accept, FACTOR_MAX, SAFETY)
    return accept, dt * jnp.minimum(jnp.maximum(factor, FACTOR_MIN), upper)


def initial_step(f, t0, y0, f0, order, rtol, atol):
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), per sample, from one trial evaluation
    of ``f(t, y)``: the step at which an Euler step's change, and the change of ``f`` over it, are about 1% of
    the tolerance scale. Carries no gradient."""
    y0, f0 = jax.lax.stop_gradient(y0), jax.lax.stop_gradient(f0)
    scale = atol + rtol * jnp.abs(y0)

    def rms(x):
        return jnp.sqrt(jnp.mean(flat(x / scale) ** 2, axis=1))

    d0, d1 = rms(y0), rms(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
    f1 = jax.lax.stop_gradient(f(t0 + h0, y0 + per_sample(h0, y0) * f0))
    d2 = rms(f1 - f0) / h0
    largest = jnp.maximum(d1, d2)
    h1 = jnp.where(
        largest <= 1e-15,
        jnp.maximum(h0 * 1e-3, 1e-6),
        (0.01 / jnp.maximum(largest, 1e-15)) ** (1.0 / (order + 1)),
    )
    return jnp.minimum(100 * h0, h1).astype(y0.dtype)


def directed(f: Field, sign) -> Field:
    """The field in ``s = sign * t``, where the grid increases: ``ds/dt = sign``, so ``dy/ds = sign * f(sign * s, y)``.
    Multiplying by ``sign = +-1`` is exact, so an increasing grid integrates ``f`` itself."""

    def field(s, y, theta):
        value = f(sign * s, y, theta)
        check_returns_like(value, y, call="f(t, y, theta)", name="y")
        return sign * value

    return field


def fixed_step_edge(k, t0, t1, dt: Optional[Any], num_steps: Optional[int]):
    """The ``k``-th time a fixed-step method steps through from ``t0`` to ``t1 > t0``, ``t1`` from the last on:
    ``num_steps`` uniform steps, or steps of ``dt`` with a shorter last one (none shorter than a billionth of
    ``dt``). Traceable: ``k``, the times and ``dt`` may all be traced."""
    k = jnp.asarray(k, t0.dtype)
    if num_steps is None:
        count = jnp.maximum(1.0, jnp.ceil((t1 - t0) / dt - 1e-9))
        edge = t0 + k * dt
    else:
        count = num_steps
        edge = t0 + (t1 - t0) * k / num_steps
    return jnp.where(k >= count, t1, edge)


def integrate(
    f: Field,
    y0: jax.Array,
    grid: jax.Array,
    theta: Any,
    tableau: ButcherTableau,
    *,
    rtol: float,
    atol: float,
    dt: Optional[Any] = None,
    num_steps: Optional[int] = None,
    first_step: Optional[float] = None,
    step_control: str = "per_sample",
    max_steps: int,
    unroll: bool = False,
    record: bool = False,
    accumulate: Optional[Callable] = None,
    accumulated: Any = None,
):
    """Integrate ``y' = f(t, y, theta)`` from ``grid[0]`` to ``grid[-1]`` on a strictly increasing ``grid`` (T,),
    giving ``ys`` (T, B, ...) by each step's dense output as steps pass the grid's times.

    Each sample keeps its own time, step size and counters; a sample that finishes, fails or runs out of
    ``max_steps`` is frozen with ``jnp.where`` and steps by zero, so ``f`` only sees times a sample reached. Unless
    ``step_control`` is ``"per_sample"``, the batch takes one step size, chosen by :func:`batch_ratio`. The loop
    is a ``lax.while_loop`` (no host synchronization); with ``unroll`` it is a ``lax.scan`` of ``max_steps``
    steps, which reverse-mode autodiff can traverse, checkpointed on two levels (Griewank's square-root scheme):
    an outer scan over chunks of about ``sqrt(max_steps)`` steps, each chunk skipped whole by ``lax.cond`` once
    no sample runs, and within a chunk a scan of steps, each a ``jax.checkpoint``. Reverse mode then keeps one
    loop state per chunk, recomputes a chunk's step states when it reaches that chunk and each step's stages when
    it reaches that step: memory of about ``2 sqrt(max_steps)`` loop states instead of every stage of all
    ``max_steps`` steps, and idle steps cost one skipped chunk each ``sqrt(max_steps)`` steps. Step sizes, times
    and error ratios carry no gradient. Unreached outputs are NaN (and the caller warns).

    With ``record``, also returns the per-step buffers (``max_steps`` rows) that ``checkpoint.py`` replays:
    the state and derivative a step started from, its time, size, end time, and which samples moved and which
    outputs they passed, plus the number of loop steps run.

    With ``accumulate``, each step also updates ``accumulated = accumulate(accumulated, t, y, dt, accepted)``
    (the step's start, per-sample step size, zero for frozen samples, and acceptance), called right after the
    step's stages, before ``f`` is evaluated at the new state; the final value is returned last. The adjoint
    adds its parameter gradient there.
    """
    batch = y0.shape[0]
    dtype = y0.dtype
    grid = jax.lax.stop_gradient(grid.astype(dtype))
    t_start, t_end = grid[0], grid[-1]
    num_outputs = grid.shape[0]
    adaptive = tableau.b_low is not None
    stages_per_step = len(tableau.c) - 1 + (0 if tableau.fsal else 1)

    def field(t, y):
        return f(t, y, theta)

    t = jnp.broadcast_to(t_start, (batch,))
    f_start = field(t, y0)
    check_returns_like(f_start, y0, call="f(t, y, theta)", name="y")
    nfe = jnp.ones(batch, jnp.int32)
    if adaptive:
        if first_step is None:
            dt_now = initial_step(field, t, y0, f_start, tableau.order, rtol, atol)
            nfe = nfe + 1
        else:
            dt_now = jnp.full((batch,), first_step, dtype)
        if step_control != "per_sample":
            dt_now = jnp.broadcast_to(jnp.min(dt_now), (batch,))
        dt_now = jnp.minimum(dt_now, t_end - t)
    else:
        dt_now = jnp.broadcast_to(
            fixed_step_edge(1, t_start, t_end, dt, num_steps) - fixed_step_edge(0, t_start, t_end, dt, num_steps),
            (batch,),
        ).astype(dtype)
    dt_now = jax.lax.stop_gradient(dt_now)

    zeros = jnp.zeros(batch, jnp.int32)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        t=t,
        y=y0,
        f_now=f_start,
        dt_now=dt_now,
        ratio_prev=jnp.ones(batch, dtype),
        nfe=nfe,
        num_accepted=zeros,
        num_rejected=zeros,
        failed=jnp.zeros(batch, bool),
        running=jnp.ones(batch, bool),
        next_output=jnp.ones(batch, jnp.int32),
        ys=jnp.concatenate([y0[None], jnp.full((num_outputs - 1,) + y0.shape, jnp.nan, dtype)]),
    )
    if accumulate is not None:
        state["accumulated"] = accumulated
    if record:
        state["tape"] = dict(
            t=jnp.zeros((max_steps, batch), dtype),
            y=jnp.zeros((max_steps,) + y0.shape, dtype),
            f_now=jnp.zeros((max_steps,) + y0.shape, dtype),
            dt_step=jnp.zeros((max_steps, batch), dtype),
            t_new=jnp.zeros((max_steps, batch), dtype),
            move=jnp.zeros((max_steps, batch), bool),
            next_output=jnp.zeros((max_steps, batch), jnp.int32),
            passed=jnp.zeros((max_steps, batch), jnp.int32),
        )

    def step(state):
        t, y, f_now, dt_now, running = (state[k] for k in ("t", "y", "f_now", "dt_now", "running"))
        failed = state["failed"]
        # Frozen samples take a step of zero, so f only ever sees states and times a sample has reached (a
        # field undefined past t1 cannot put NaN into the gradient through the branch jnp.where discards).
        dt_step = jnp.where(running, dt_now, 0.0)
        y1, f1, error, y_mid = rk_step(field, t, y, f_now, dt_step, tableau)
        if adaptive:
            ratio = batch_ratio(error_ratio(error, y, y1, rtol, atol), running, step_control)
            accept, dt_next = propose_step(dt_now, ratio, state["ratio_prev"], tableau.order)
            t_new = jnp.where(dt_now >= t_end - t, t_end, t + dt_now)
        else:
            # A fixed step cannot be rejected; only a NaN/Inf state stops the sample.
            accept = jnp.all(jnp.isfinite(flat(jax.lax.stop_gradient(y1))), axis=1)
            failed = failed | (running & ~accept)
            t_new = jnp.broadcast_to(fixed_step_edge(state["step"] + 1, t_start, t_end, dt, num_steps), (batch,))
        move = running & accept
        if accumulate is not None:
            accumulated_after = accumulate(state["accumulated"], t, y, dt_step, move)
        if f1 is None:
            f1 = field(t_new, y1)
        # One comparison per output time: the default method is a loop of its own, inside every step.
        passed = jnp.searchsorted(grid, t_new, side="right", method="compare_all").astype(jnp.int32)
        new = dict(
            step=state["step"] + 1,
            nfe=state["nfe"] + running * stages_per_step,
            num_accepted=state["num_accepted"] + move,
            num_rejected=state["num_rejected"] + (running & ~accept),
            ys=emit_outputs(grid, state["ys"], t, t_new, dt_step, move, state["next_output"], passed,
                            y, y1, f_now, f1, y_mid),
            t=jnp.where(move, t_new, t),
            y=jnp.where(per_sample(move, y), y1, y),
            f_now=jnp.where(per_sample(move, y), f1, f_now),
            next_output=jnp.where(move, passed, state["next_output"]),
        )
        finished = new["t"] >= t_end
        if adaptive:
            new["ratio_prev"] = jnp.where(move, ratio, state["ratio_prev"])
            dt_proposed = jnp.where(running, dt_next, dt_now)
            failed = failed | (running & ~finished & (new["t"] + dt_proposed <= new["t"]))
            still = running & ~finished & ~failed
            new["dt_now"] = jnp.where(still, jnp.minimum(dt_proposed, t_end - new["t"]), dt_now)
        else:
            new["ratio_prev"] = state["ratio_prev"]
            still = running & ~finished & ~failed
            next_dt = (fixed_step_edge(state["step"] + 2, t_start, t_end, dt, num_steps)
                       - fixed_step_edge(state["step"] + 1, t_start, t_end, dt, num_steps))
            new["dt_now"] = jnp.where(still, next_dt, dt_now)
        new["failed"] = failed
        new["running"] = still
        if accumulate is not None:
            new["accumulated"] = accumulated_after
        if record:
            new["tape"] = {
                key: jax.lax.dynamic_update_index_in_dim(state["tape"][key], value, state["step"], 0)
                for key, value in dict(t=t, y=y, f_now=f_now, dt_step=dt_step, t_new=t_new, move=move,
                                       next_output=state["next_output"], passed=passed).items()
            }
        return new

    if unroll:
        chunk = math.isqrt(max_steps - 1) + 1  # ceil(sqrt(max_steps)); the last chunk's surplus steps are skipped

        def scan_step(state, _):
            go = jnp.any(state["running"]) & (state["step"] < max_steps)
            return jax.lax.cond(go, jax.checkpoint(step), lambda s: s, state), None

        def run_chunk(state):
            return jax.lax.scan(scan_step, state, None, length=chunk)[0]

        def chunk_step(state, _):
            return jax.lax.cond(jnp.any(state["running"]), jax.checkpoint(run_chunk), lambda s: s, state), None

        state, _ = jax.lax.scan(chunk_step, state, None, length=-(-max_steps // chunk))
    else:
        state = jax.lax.while_loop(lambda s: (s["step"] < max_steps) & jnp.any(s["running"]), step, state)

    # The record is bookkeeping: no derivative flows through it (nor could one, through its flags).
    result = jax.lax.stop_gradient(ODEResult(
        nfe=state["nfe"],
        num_accepted=state["num_accepted"],
        num_rejected=state["num_rejected"],
        final_dt=state["dt_now"],
        t_reached=state["t"],
        converged=state["t"] >= t_end,
        failed=state["failed"],
    ))
    if record:
        return state["ys"], result, state["tape"], state["step"]
    if accumulate is not None:
        return state["ys"], result, state["accumulated"]
    return state["ys"], result


def flags_as_numbers(result: ODEResult) -> ODEResult:
    """The record with its flags as int8, for the output of a ``jax.custom_vjp`` rule: a bool output of a custom
    rule gets an instantiated zero tangent, which reductions of it (``jnp.all(result.converged)``) then fail to
    differentiate. :func:`numbers_as_flags` turns them back by a comparison, whose tangent is a symbolic zero."""
    return result._replace(converged=result.converged.astype(jnp.int8), failed=result.failed.astype(jnp.int8))


def numbers_as_flags(result: ODEResult) -> ODEResult:
    """Undo :func:`flags_as_numbers` outside the custom rule."""
    return result._replace(converged=result.converged != 0, failed=result.failed != 0)


def emission(grid, t_old, t_new, dt_step, move, next_output, passed):
    """Which outputs a step writes, ``emit`` (T, B) (those it passed that the sample had not reached), and at
    what fraction ``theta`` (T, B) of the step they lie (1 for the step's end, so that ``t1`` is exact)."""
    index = jnp.arange(grid.shape[0])[:, None]
    emit = move[None] & (index >= next_output[None]) & (index < passed[None])
    theta = jnp.clip((grid[:, None] - t_old[None]) / jnp.where(emit, dt_step[None], 1.0), 0.0, 1.0)
    theta = jnp.where(grid[:, None] >= t_new[None], 1.0, theta)
    return emit, theta


def emit_outputs(grid, ys, t_old, t_new, dt_step, move, next_output, passed, y, y1, f_now, f1, y_mid):
    """``ys`` with the outputs this step passed written from its dense output; skipped (``lax.cond``) on the
    steps that pass none, which are most of them."""
    emit, theta = emission(grid, t_old, t_new, dt_step, move, next_output, passed)

    def write(ys):
        values = interpolate(theta, y, y1, f_now, f1, y_mid, dt_step)
        return jnp.where(per_sample(emit, y), values, ys)

    return jax.lax.cond(jnp.any(emit), write, lambda ys: ys, ys)
