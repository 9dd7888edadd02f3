"""The batched Runge-Kutta loop: one step function for every tableau, the PI step-size controller, the dense
output, and per-sample clocks frozen with ``torch.where`` when a sample finishes."""

from __future__ import annotations

import bisect
import functools
import math
from typing import Callable, NamedTuple, Optional

import torch

from ..._tableaus import ButcherTableau
from .._batch import per_sample
from .._validation import check_returns_like
from .result import ODEResult

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``f(t, y)``: the vector field, ``t`` of shape (B,) and ``y`` of shape (B, ...)."""

# The PI controller's constants, shared with the JAX twin: the step grows at most tenfold, shrinks at most
# fivefold, and aims at nine tenths of the step that would meet the tolerance exactly.
SAFETY = 0.9
FACTOR_MIN = 0.2
FACTOR_MAX = 10.0
PCOEFF = 0.2
ICOEFF = 0.5
# Error ratios are floored here before being raised to negative powers: an exact step (ratio 0) grows by
# FACTOR_MAX rather than dividing by zero.
RATIO_FLOOR = 1e-10


class _Coefficients(NamedTuple):
    """A tableau's coefficients as tensors of one dtype and device, made once: a step then multiplies by them
    instead of by Python floats (each of which torch would first convert to a tensor)."""

    nodes: torch.Tensor
    """``c[1:]`` as a column (stages - 1, 1): every stage's time offset from one product with the step sizes."""
    rows: tuple
    """For stages 1 to the last, the pairs ``(j, a[i][j])`` of nonzero weights, each a 0-d tensor: a stage's
    input is summed term by term in this order (a matrix product would round differently, and in float32 that
    can flip a step's acceptance)."""
    outputs: torch.Tensor
    """The rows ``b``, then ``b - b_low`` and ``b_mid`` where the tableau has them, (rows, stages)."""


@functools.lru_cache(maxsize=None)
@torch.inference_mode(False)
def _coefficients(tableau: ButcherTableau, dtype: torch.dtype, device: torch.device) -> _Coefficients:
    # Made outside inference mode even when first asked for inside it: autograd may save these for backward.
    rows = [tableau.b]
    if tableau.b_low is not None:
        rows.append(tuple(b - b_low for b, b_low in zip(tableau.b, tableau.b_low)))
    if tableau.b_mid is not None:
        rows.append(tableau.b_mid)
    return _Coefficients(
        nodes=torch.tensor(tableau.c[1:], dtype=dtype, device=device).view(-1, 1),
        rows=tuple(
            tuple((j, torch.tensor(weight, dtype=dtype, device=device)) for j, weight in enumerate(row) if weight)
            for row in tableau.a[1:]
        ),
        outputs=torch.tensor(rows, dtype=dtype, device=device),
    )


def rk_step(f: Field, t: torch.Tensor, y: torch.Tensor, f0: torch.Tensor, dt: torch.Tensor, tableau: ButcherTableau):
    """One explicit Runge-Kutta step of size ``dt`` (B,) from ``(t, y)`` with ``f0 = f(t, y)``.

    Returns
    -------
    y1 : torch.Tensor
        The solution after the step.
    f1 : torch.Tensor or None
        ``f(t + dt, y1)`` when the tableau is FSAL (its last stage), else ``None``.
    error : torch.Tensor or None
        The embedded error estimate ``y1 - y1_low``; ``None`` for a fixed-step tableau.
    y_mid : torch.Tensor or None
        The solution at the step's midpoint when the tableau has midpoint weights, else ``None``.
    """
    coefficients = _coefficients(tableau, y.dtype, y.device)
    h = per_sample(dt, y)
    times = (t + coefficients.nodes * dt).unbind(0)
    stages = [f0]
    for time, row in zip(times, coefficients.rows):
        combination = None
        for j, weight in row:
            term = weight * stages[j]
            combination = term if combination is None else combination + term
        stages.append(f(time, y + h * combination))
    sums = torch.mm(coefficients.outputs, torch.stack(stages).view(len(stages), -1)).view(-1, *y.shape).unbind(0)
    y1 = y + h * sums[0]
    f1 = stages[-1] if tableau.fsal else None
    error = None if tableau.b_low is None else h * sums[1]
    y_mid = None if tableau.b_mid is None else y + h * sums[-1]
    return y1, f1, error, y_mid


Step = Callable[..., tuple]
"""``step(f, t, y, f0, dt, tableau)`` with ``rk_step``'s signature and results (``checkpoint.py`` wraps it)."""


def interpolate(theta, y0, y1, f0, f1, y_mid, dt):
    """The step's dense output at fractions ``theta`` (B,) of the step: the quartic through ``y_mid`` when given,
    else the cubic Hermite on ``(y0, y1, f0, f1)``. ``theta == 1`` returns ``y1`` exactly."""
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
    return torch.where(s == 1, y1, value)


def error_ratio(error, y0, y1, rtol, atol):
    """Per-sample RMS over state entries of ``error / (atol + rtol * max(|y0|, |y1|))``, detached; NaN/Inf
    become Inf so that the step is rejected. ``rtol`` and ``atol`` are floats or 0-d tensors of the state's dtype
    (the loop passes tensors, which torch need not convert at every step)."""
    scale = atol + rtol * torch.maximum(y0.detach().abs(), y1.detach().abs())
    ratio = (error.detach() / scale).flatten(1).pow(2).mean(dim=1).sqrt()
    return torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)


@functools.lru_cache(maxsize=256)
@torch.inference_mode(False)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d tensor, made once (outside inference mode, as autograd may save it): torch would
    otherwise convert a Python float at every use."""
    return torch.tensor(value, dtype=dtype, device=device)


def batch_ratio(ratio, running, step_control: str):
    """The error ratio that decides each sample's step under ``step_control``: its own (``"per_sample"``), the
    largest among running samples (``"shared"``), or their root mean square (``"shared_rms"``: the error norm of
    the batch taken as one state, which lets one sample exceed the tolerance when its batch-mates are well
    within it)."""
    if step_control == "per_sample":
        return ratio
    live = torch.where(running, ratio, 0.0)
    if step_control == "shared":
        value = live.amax()
    else:
        value = (live.square().sum() / running.sum().clamp(min=1)).sqrt()
    return value.expand(ratio.shape)


def propose_step(dt, ratio, ratio_prev, order):
    """The PI controller: ``dt * safety * r**(-(icoeff + pcoeff)/q) * r_prev**(pcoeff/q)``, with ``r`` this
    step's error ratio, ``r_prev`` the last accepted step's, ``q`` the tableau's order (the error estimate's
    order in ``dt``), the factor clipped to ``[factor_min, factor_max]`` after an accepted step and to
    ``[factor_min, safety]`` after a rejected one (a rejected step always shrinks).

    The integral term alone is the classical controller (torchdiffeq's); the proportional one damps the
    oscillation of step sizes that it shows on mildly stiff problems (Gustafsson 1991, diffrax's PIDController).
    """
    safety = _constant(SAFETY, dt.dtype, dt.device)
    accept = ratio <= _constant(1.0, dt.dtype, dt.device)
    factor = (
        safety
        * ratio.clamp_min(RATIO_FLOOR) ** (-(ICOEFF + PCOEFF) / order)
        * ratio_prev.clamp_min(RATIO_FLOOR) ** (PCOEFF / order)
    )
    upper = torch.where(accept, _constant(FACTOR_MAX, dt.dtype, dt.device), safety)
    return accept, dt * torch.minimum(factor.clamp_min(FACTOR_MIN), upper)


def initial_step(f, t0, y0, f0, order, rtol, atol):
    """Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4), per sample, from one trial evaluation
    of ``f``: the step at which an Euler step's change, and the change of ``f`` over it, are about 1% of the
    tolerance scale."""
    y0, f0 = y0.detach(), f0.detach()
    scale = atol + rtol * y0.abs()

    def rms(x):
        return (x / scale).flatten(1).pow(2).mean(dim=1).sqrt()

    d0, d1 = rms(y0), rms(f0)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    with torch.no_grad():
        f1 = f(t0 + h0, y0 + per_sample(h0, y0) * f0)
    d2 = rms(f1 - f0) / h0
    largest = torch.maximum(d1, d2)
    h1 = torch.where(
        largest <= 1e-15,
        torch.clamp_min(h0 * 1e-3, 1e-6),
        (0.01 / largest.clamp_min(1e-15)) ** (1.0 / (order + 1)),
    )
    return torch.minimum(100 * h0, h1)


def fixed_step_edges(t0: float, t1: float, dt: Optional[float], num_steps: Optional[int]) -> list:
    """The times a fixed-step method steps through, from ``t0`` to ``t1 > t0`` exactly: ``num_steps`` uniform
    steps, or steps of ``dt`` with a shorter last one (none shorter than a billionth of ``dt``)."""
    if num_steps is None:
        num_steps = max(1, math.ceil((t1 - t0) / dt - 1e-9))
        return [t0 + k * dt for k in range(num_steps)] + [t1]
    return [t0 + (t1 - t0) * k / num_steps for k in range(num_steps)] + [t1]


def integrate(
    f: Field,
    y0: torch.Tensor,
    grid: torch.Tensor,
    tableau: ButcherTableau,
    *,
    rtol: float,
    atol: float,
    dt: Optional[float] = None,
    num_steps: Optional[int] = None,
    first_step: Optional[float] = None,
    step_control: str = "per_sample",
    max_steps: int,
    step: Step = rk_step,
    on_step: Optional[Callable] = None,
) -> tuple[torch.Tensor, ODEResult]:
    """Integrate ``y' = f(t, y)`` from ``grid[0]`` to ``grid[-1]`` on a strictly increasing ``grid`` (T,), giving
    ``ys`` (T, B, ...) by each step's dense output as steps pass the grid's times.

    Each sample keeps its own time, step size and counters; a sample that finishes, fails or runs out of
    ``max_steps`` is frozen with ``torch.where``. Unless ``step_control`` is ``"per_sample"``, the batch takes one
    step size, chosen by :func:`batch_ratio`. The one host synchronization per step reads whether any sample
    still runs and which grid times the step passed. Step sizes, times and error ratios are detached: gradients
    flow through the states only. Unreached outputs are NaN (and the caller warns).

    ``on_step(t, y, dt, accepted)``, if given, is called after each step with the step's start, per-sample step
    size (zero for frozen samples) and acceptance, before ``f`` is evaluated again (the adjoint accumulates its
    parameter gradient there).
    """
    batch = y0.shape[0]
    device, dtype = y0.device, y0.dtype
    grid = grid.detach().to(device=device, dtype=dtype)
    t_end = grid[-1]
    grid_values = grid.tolist()
    t0_value, t1_value = grid_values[0], grid_values[-1]
    num_outputs = grid.shape[0]
    adaptive = tableau.b_low is not None
    ones = torch.ones(batch, device=device, dtype=torch.int64)

    t = grid[0].expand(batch).clone()
    f_start = f(t, y0)
    check_returns_like(f_start, y0, call="f(t, y)", name="y")
    nfe = ones.clone()
    ys = [y0] + [torch.full_like(y0, math.nan) for _ in range(num_outputs - 1)]

    if adaptive:
        if first_step is None:
            dt_now = initial_step(f, t, y0, f_start, tableau.order, rtol, atol)
            nfe = nfe + 1
        else:
            dt_now = torch.full((batch,), first_step, device=device, dtype=dtype)
        if step_control != "per_sample":
            dt_now = dt_now.amin().expand(batch).clone()
        dt_now = torch.minimum(dt_now, t_end - t)
        edges = None
    else:
        edges = torch.tensor(fixed_step_edges(t0_value, t1_value, dt, num_steps), device=device, dtype=dtype)
        dt_now = (edges[1] - edges[0]).expand(batch).clone()

    y, f_now = y0, f_start
    zero = _constant(0.0, dtype, device)
    lowest = _constant(-math.inf, dtype, device)
    rtol_value, atol_value = _constant(rtol, dtype, device), _constant(atol, dtype, device)
    ratio_prev = torch.ones(batch, device=device, dtype=dtype)
    num_accepted = torch.zeros(batch, device=device, dtype=torch.int64)
    attempted = torch.zeros_like(num_accepted)
    failed = torch.zeros(batch, device=device, dtype=torch.bool)
    running = torch.ones(batch, device=device, dtype=torch.bool)
    next_output = ones.clone()
    # The smallest output index a running sample has yet to emit, as last computed (it only grows, so an old
    # value bounds the range of outputs a step can pass from below); read with the step's host synchronization.
    first_pending = torch.ones((), device=device, dtype=dtype)
    stages_per_step = len(tableau.c) - 1 + (0 if tableau.fsal else 1)

    for step_index in range(max_steps):
        # Frozen samples take a step of zero, so f only ever sees states and times a sample has reached (a
        # field undefined past t1 cannot put NaN into the gradient through the branch torch.where discards).
        dt_step = torch.where(running, dt_now, zero)
        y1, f1, error, y_mid = step(f, t, y, f_now, dt_step, tableau)
        if adaptive:
            ratio = batch_ratio(error_ratio(error, y, y1, rtol_value, atol_value), running, step_control)
            accept, dt_next = propose_step(dt_now, ratio, ratio_prev, tableau.order)
            # Never past t_end, not even by the rounding of t + dt: a step that ends the integration ends on t_end.
            t_new = torch.where(dt_now >= t_end - t, t_end, torch.minimum(t + dt_now, t_end))
        else:
            # A fixed step cannot be rejected; only a NaN/Inf state stops the sample.
            accept = torch.isfinite(y1.detach()).flatten(1).all(dim=1)
            failed = failed | (running & ~accept)
            t_new = edges[min(step_index + 1, len(edges) - 1)].expand(batch)
            dt_next = None
        move = running & accept
        if on_step is not None:
            on_step(t, y, dt_step, move)
        if f1 is None:
            f1 = f(t_new, y1)
        attempted = attempted + running
        num_accepted = num_accepted + move

        t_old = t
        t = torch.where(move, t_new, t)
        move_state = per_sample(move, y)
        y_old, f_old = y, f_now
        y = torch.where(move_state, y1, y)
        f_now = torch.where(move_state, f1, f_now)

        live = running & (t < t_end)
        if adaptive:
            ratio_prev = torch.where(move, ratio, ratio_prev)
            underflow = live & (t + dt_next <= t)
            failed = failed | underflow
            still = live & ~underflow
            dt_now = torch.where(still, torch.minimum(dt_next, t_end - t), dt_now)
        else:
            still = live & ~failed
            if step_index + 2 < len(edges):
                dt_now = torch.where(still, edges[step_index + 2] - edges[step_index + 1], dt_now)
        # The loop's one host synchronization: whether to go on, and which outputs this step passed (those from
        # the first pending one to the last at or before the furthest time a sample moved to).
        reach = torch.where(move, t_new, lowest).amax()
        any_running, reach, first = torch.stack([still.any().to(dtype), reach, first_pending]).tolist()
        last = bisect.bisect_right(grid_values, reach)
        if last > first:
            passed = torch.searchsorted(grid, t_new.contiguous(), right=True)
            for index in range(int(first), last):
                emit = move & (next_output <= index) & (passed > index)
                if index == num_outputs - 1:
                    # Every sample that passed the last time stopped on it: its output is the step's end state.
                    ys[index] = torch.where(per_sample(emit, y), y1, ys[index])
                    continue
                theta = ((grid[index] - t_old) / torch.where(emit, dt_step, torch.ones_like(dt_step))).clamp(0, 1)
                theta = torch.where(grid[index] >= t_new, torch.ones_like(theta), theta)
                value = interpolate(theta, y_old, y1, f_old, f1, y_mid, dt_step)
                ys[index] = torch.where(per_sample(emit, y), value, ys[index])
            next_output = torch.where(move, passed, next_output)
            first_pending = torch.where(still, next_output, num_outputs).amin().to(dtype)
        running = still
        if not any_running:
            break

    # Each attempted step evaluates f the same number of times; an adaptive step not accepted was rejected.
    nfe = nfe + stages_per_step * attempted
    num_rejected = attempted - num_accepted if adaptive else torch.zeros_like(num_accepted)
    result = ODEResult(
        nfe=nfe,
        num_accepted=num_accepted,
        num_rejected=num_rejected,
        final_dt=dt_now,
        t_reached=t,
        converged=t >= t_end,
        failed=failed,
    )
    return torch.stack(ys), result
