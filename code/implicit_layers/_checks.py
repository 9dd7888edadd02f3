"""Framework-free argument checks whose messages name the offending argument.

Each check returns the value as a plain Python number, so NumPy scalars (``np.int64(10)``, ``np.float32(1e-5)``)
are accepted and nothing downstream sees a NumPy type.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Mapping


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_tolerance(name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a positive finite number."""
    if not _real(value) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_iteration_limit(name: str, value: Any) -> int:
    """Return ``value`` as an int; raise unless it is a positive integer."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_unit_interval(name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it lies in (0, 1]."""
    if not _real(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` as a bool; raise unless it is a Python or NumPy boolean."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_solver_options(name: str, options: Any, solver: Callable) -> dict:
    """Return ``options`` as a dict; raise unless it is a mapping of options that ``solver`` takes.

    The settings that ``fixed_point`` passes itself (tolerance, iteration limit, strictness) are refused here
    rather than silently overridden, with a message saying which argument of ``fixed_point`` sets them.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(options).__name__}")
    owned = {"tol": "tol", "max_iter": "max_iter", "strict": "strict", "warn": "warn", "unroll": "backward"}
    if name.startswith("backward"):
        owned.update(tol="backward_tol", max_iter="backward_max_iter")
    parameters = inspect.signature(solver).parameters
    accepted = [key for key, p in parameters.items() if p.kind is p.KEYWORD_ONLY and key not in owned]
    for key in options:
        if key in owned:
            raise ValueError(f"{name} may not set {key!r}: pass it as fixed_point's argument {owned[key]!r}")
        if key not in accepted:
            raise ValueError(
                f"{name} has an option {key!r} that the {solver.__name__!r} solver does not take; "
                f"it takes {', '.join(map(repr, accepted)) or 'no options'}"
            )
    return {key: _OPTION_CHECKS[key](f"{name}: {key}", value) for key, value in options.items()}


_OPTION_CHECKS = {
    "m": check_iteration_limit,
    "restart": check_iteration_limit,
    "ridge": check_tolerance,
    "damping": check_unit_interval,
}
"""How the value of each solver option is checked, so that a bad value is refused when ``fixed_point`` is
called rather than when a backward pass first runs the solver."""


def check_fixed_point_options(
    solvers: Mapping[str, Callable],
    backward_modes: Iterable[str],
    backward_solvers: Mapping[str, Callable],
    *,
    solver: Any,
    backward: Any,
    backward_solver: Any,
    tol: Any,
    max_iter: Any,
    backward_tol: Any,
    backward_max_iter: Any,
    strict: Any,
    warn: Any,
    solver_options: Any,
    backward_solver_options: Any,
    phantom_steps: Any,
    phantom_damping: Any,
) -> tuple[dict, dict]:
    """Check every argument of ``fixed_point`` (either framework) when it is called, not when a backward pass
    first needs it, and return the keyword arguments of the forward solver and the backward settings.

    ``solvers`` are the forward solvers; ``backward_solvers``, the solvers of the derivative's linear systems,
    include them and solvers that assume an affine map, which serve there only.

    Returns
    -------
    forward : dict
        Keyword arguments of ``solvers[solver]``.
    backward : dict
        ``solver`` (name), ``options``, ``tol`` (None for the dtype's default), ``max_iter``, ``strict`` and
        ``warn`` of the solves inside the derivative, and the ``phantom_steps`` and ``phantom_damping`` of
        the phantom gradient, checked whichever mode is chosen so that a bad value never waits for a switch.
    """
    backward_solver = solver if backward_solver is None else backward_solver
    if solver in backward_solvers and solver not in solvers:
        raise ValueError(
            f"solver {solver!r} solves linear systems only, and the forward fixed point is nonlinear: pass it as "
            f"backward_solver={solver!r} and choose a solver among {', '.join(map(repr, solvers))}"
        )
    check_choice("solver", solver, solvers)
    check_choice("backward", backward, backward_modes)
    check_choice("backward_solver", backward_solver, backward_solvers)
    strict, warn = check_flag("strict", strict), check_flag("warn", warn)
    forward = {**_check_solver_options("solver_options", solver_options, solvers[solver])}
    forward.update(tol=check_tolerance("tol", tol), strict=strict, warn=warn)
    if max_iter is not None:
        forward["max_iter"] = check_iteration_limit("max_iter", max_iter)
    derivative = dict(
        solver=backward_solver,
        options=_check_solver_options(
            "backward_solver_options", backward_solver_options, backward_solvers[backward_solver]
        ),
        tol=None if backward_tol is None else check_tolerance("backward_tol", backward_tol),
        max_iter=check_iteration_limit("backward_max_iter", backward_max_iter),
        strict=strict,
        warn=warn,
        phantom_steps=check_iteration_limit("phantom_steps", phantom_steps),
        phantom_damping=check_unit_interval("phantom_damping", phantom_damping),
    )
    return forward, derivative


STATE_SHAPE_HINT = (
    "add the batch dimension: z0[None] (z0.unsqueeze(0) in torch) for a single sample, or z0[:, None] for a "
    "batch of scalar states"
)


def check_state_shape(name: str, shape: tuple) -> None:
    """Raise unless ``shape`` is (B, ...) with at least one non-empty state dimension; B may be 0."""
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (B, ...): a leading batch dimension and at least one state dimension, "
            f"got shape {tuple(shape)}; {STATE_SHAPE_HINT}"
        )
    if math.prod(shape[1:]) == 0:
        raise ValueError(f"{name} has samples with no elements (shape {tuple(shape)})")


ODE_STEP_CONTROLS = ("per_sample", "shared", "shared_rms")
ODE_GRADIENTS = ("backprop", "checkpoint", "adjoint")


def check_time_grid(name: str, values: Any) -> float:
    """Raise unless ``values`` (a plain sequence or NumPy array of floats) is a 1-D strictly increasing or
    strictly decreasing finite grid of at least two times; return the direction of integration, +1.0 or -1.0."""
    import numpy as np

    grid = np.asarray(values, dtype=float)
    if grid.ndim != 1:
        raise ValueError(f"{name} must be a 1-D grid of times, got shape {grid.shape}")
    if grid.size < 2:
        raise ValueError(f"{name} needs at least two times (the initial time and one output time), got {grid.tolist()}")
    if not np.isfinite(grid).all():
        raise ValueError(f"{name} contains NaN or Inf: {grid.tolist()}")
    steps = np.diff(grid)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing, got {grid.tolist()}")
    return 1.0 if steps[0] > 0 else -1.0


def check_time_grid_shape(name: str, shape: tuple) -> None:
    """The part of :func:`check_time_grid` that needs only the shape (what is known of a grid under ``jit``):
    raise unless it is 1-D with at least two times."""
    if len(shape) != 1:
        raise ValueError(f"{name} must be a 1-D grid of times, got shape {tuple(shape)}")
    if shape[0] < 2:
        raise ValueError(f"{name} needs at least two times (the initial time and one output time), got {shape[0]}")


def check_odeint_options(
    methods: Mapping[str, Any],
    *,
    method: Any,
    rtol: Any,
    atol: Any,
    dt: Any,
    num_steps: Any,
    first_step: Any,
    step_control: Any,
    max_steps: Any,
    gradient: Any,
    adjoint_rtol: Any,
    adjoint_atol: Any,
    strict: Any,
    warn: Any,
) -> dict:
    """Check every keyword of ``odeint`` (either framework) and return them as plain Python values, with
    ``adjoint_rtol``/``adjoint_atol`` defaulting to ``rtol``/``atol``.

    ``methods`` maps names to tableaus (``_tableaus.ODE_METHODS``). A fixed-step method needs exactly one of ``dt``
    and ``num_steps``; an adaptive one takes neither (``first_step`` sets its initial step).
    """
    check_choice("method", method, methods)
    check_choice("step_control", step_control, ODE_STEP_CONTROLS)
    check_choice("gradient", gradient, ODE_GRADIENTS)
    options = dict(
        method=method,
        rtol=check_tolerance("rtol", rtol),
        atol=check_tolerance("atol", atol),
        step_control=step_control,
        max_steps=check_iteration_limit("max_steps", max_steps),
        gradient=gradient,
        strict=check_flag("strict", strict),
        warn=check_flag("warn", warn),
        dt=None if dt is None else check_tolerance("dt", dt),
        num_steps=None if num_steps is None else check_iteration_limit("num_steps", num_steps),
        first_step=None if first_step is None else check_tolerance("first_step", first_step),
    )
    options["adjoint_rtol"] = options["rtol"] if adjoint_rtol is None else check_tolerance("adjoint_rtol", adjoint_rtol)
    options["adjoint_atol"] = options["atol"] if adjoint_atol is None else check_tolerance("adjoint_atol", adjoint_atol)
    adaptive = [name for name, tableau in methods.items() if tableau.b_low is not None]
    fixed = [name for name in methods if name not in adaptive]
    if method in adaptive:
        if dt is not None or num_steps is not None:
            raise ValueError(
                f"dt={dt!r}, num_steps={num_steps!r} fix the step, but method={method!r} chooses its steps from "
                f"rtol/atol: drop dt and num_steps (first_step=... sets its initial step), or use a fixed-step "
                f"method ({', '.join(map(repr, fixed))})"
            )
    else:
        if (dt is None) == (num_steps is None):
            raise ValueError(
                f"method={method!r} has no error estimate, so rtol/atol cannot choose its steps: pass exactly one "
                f"of dt=... (a step size) and num_steps=... (got dt={dt!r}, num_steps={num_steps!r}), or use an "
                f"adaptive method ({', '.join(map(repr, adaptive))})"
            )
        if first_step is not None:
            raise ValueError(
                f"first_step={first_step!r} sets the initial step of an adaptive method, but method={method!r} "
                "takes fixed steps: set them with dt=... or num_steps=..."
            )
    return options


QP_STATUSES = ("solved", "max_iter", "primal_infeasible", "dual_infeasible", "failed")
"""The status words of a QP sample, indexed by ``QPResult.status_code`` in both frameworks."""


def check_qp_shapes(shapes: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """Check the shapes of ``qp``'s arguments Q, p, G, h, A, b (``None`` for an absent pair) and return
    (batch, n, m, e). Each argument may carry a leading batch dimension or be shared by the batch; the batch is 1
    when none does."""
    Q, p = shapes["Q"], shapes["p"]
    if len(Q) not in (2, 3) or Q[-1] != Q[-2]:
        raise ValueError(f"Q must have shape (n, n) or (B, n, n), got {tuple(Q)}")
    n = Q[-1]
    if n == 0:
        raise ValueError("Q has shape (0, 0): a QP needs at least one variable")
    batches = {"Q": Q[0]} if len(Q) == 3 else {}

    def check_vector(name: str, shape: tuple, size: int, meaning: str) -> None:
        if len(shape) not in (1, 2) or shape[-1] != size:
            raise ValueError(f"{name} must have shape ({meaning},) or (B, {meaning}) with {meaning} = {size}, got {tuple(shape)}")
        if len(shape) == 2:
            batches[name] = shape[0]

    check_vector("p", p, n, "n")
    sizes = {}
    for matrix, vector, rows in (("G", "h", "m"), ("A", "b", "e")):
        M, v = shapes[matrix], shapes[vector]
        if (M is None) != (v is None):
            given, missing = (matrix, vector) if v is None else (vector, matrix)
            raise ValueError(f"{given} is given without {missing}: pass both or neither")
        if M is None:
            sizes[rows] = 0
            continue
        if len(M) not in (2, 3) or M[-1] != n:
            raise ValueError(f"{matrix} must have shape ({rows}, n) or (B, {rows}, n) with n = {n}, got {tuple(M)}")
        if len(M) == 3:
            batches[matrix] = M[0]
        sizes[rows] = M[-2]
        check_vector(vector, v, M[-2], rows)
    distinct = sorted(set(batches.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{name} has {size}" for name, size in batches.items())
        raise ValueError(f"the arguments disagree on the batch size (the leading dimension): {listing}")
    return (distinct[0] if distinct else 1), n, sizes["m"], sizes["e"]


def check_qp_options(*, tol: Any, max_iter: Any, strict: Any, warn: Any) -> dict:
    """Check ``qp``'s keywords and return them as plain Python values."""
    return dict(
        tol=check_tolerance("tol", tol),
        max_iter=check_iteration_limit("max_iter", max_iter),
        strict=check_flag("strict", strict),
        warn=check_flag("warn", warn),
    )


def check_vectors_shape(name: str, shape: tuple, minimum_size: int) -> None:
    """Raise unless ``shape`` has a last axis of at least ``minimum_size`` entries: the shape of a batch of
    vectors laid along the last axis, with any leading shape (a softmax's convention)."""
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (the vectors lie along its last axis), got a scalar")
    if shape[-1] < minimum_size:
        raise ValueError(
            f"{name} must have at least {minimum_size} entr{'y' if minimum_size == 1 else 'ies'} along its last "
            f"axis, got shape {tuple(shape)}"
        )


def check_subset_size(name: str, value: Any, size: int) -> int:
    """Return ``value`` as an int; raise unless it is an integer from 1 to ``size - 1``: the number of entries
    chosen among ``size``, where choosing none or all would leave nothing to choose."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= size - 1:
        raise ValueError(
            f"{name} must be an integer from 1 to {size - 1} (one less than the {size} entries), got {value!r}"
        )
    return int(value)


def check_conv_cell_sizes(*, channels: Any, inner_channels: Any, groups: Any) -> tuple[int, int, int]:
    """Return the sizes of a convolutional DEQ cell as ints; raise unless all are positive integers and
    ``groups`` divides both channel counts (the cell normalizes ``channels`` and ``inner_channels`` channels in
    ``groups`` groups each)."""
    groups = check_iteration_limit("groups", groups)
    sizes = []
    for name, value in (("channels", channels), ("inner_channels", inner_channels)):
        value = check_iteration_limit(name, value)
        if value % groups:
            raise ValueError(
                f"{name} must be divisible by groups: group normalization splits the {value} channels into "
                f"{groups} groups of equal size"
            )
        sizes.append(value)
    return sizes[0], sizes[1], groups


HUTCHINSON_PROBE_KINDS = ("rademacher", "gaussian")
"""The distributions of Hutchinson's probe ``e``: both have ``E[e e^T] = I``, which makes ``e^T A e`` unbiased for
``trace(A)``; Rademacher signs give the smaller variance (no diagonal term)."""


def check_probe_kind(kind: Any) -> str:
    """Raise unless ``kind`` names a probe distribution in ``HUTCHINSON_PROBE_KINDS``; return it."""
    check_choice("kind", kind, HUTCHINSON_PROBE_KINDS)
    return kind


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float; raise unless it is a non-negative finite number (a regularizer's weight,
    where zero switches the term off)."""
    if not _real(value) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def check_time_span(t0: Any, t1: Any) -> tuple[float, float]:
    """Return the ends of a flow's time interval as floats; raise unless both are finite numbers and differ.
    Either order is allowed: the flow carries base samples from ``t0`` to data at ``t1``."""
    for name, value in (("t0", t0), ("t1", t1)):
        if not _real(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ: the flow from t0={t0!r} to t1={t1!r} is the identity")
    return float(t0), float(t1)


def check_flat_state_shape(name: str, shape: tuple) -> None:
    """Raise unless ``shape`` is (B, D) with D >= 1: the flat states of a continuous normalizing flow, one row
    per sample (B may be 0)."""
    if len(shape) != 2:
        if len(shape) > 2:
            hint = f"; flatten each sample first: {name}.reshape(len({name}), -1)"
        else:
            hint = f"; for a single sample add the batch dimension: {name}[None]"
        raise ValueError(f"{name} must have shape (B, D), one flat state per row, got shape {tuple(shape)}{hint}")
    if shape[1] == 0:
        raise ValueError(f"{name} has samples with no elements (shape {tuple(shape)})")


def check_probe_shape(shape: tuple, state_shape: tuple, *, state: str = "y") -> None:
    """Raise unless the probe's ``shape`` equals that of the states ``state`` it probes (one probe per sample)."""
    if tuple(shape) != tuple(state_shape):
        raise ValueError(
            f"probe must have the shape of {state}, one probe vector per sample: {state} has shape "
            f"{tuple(state_shape)}, probe has shape {tuple(shape)}"
        )


def check_sigma_min(value: Any) -> float:
    """Return ``value`` as a float; raise unless it lies in [0, 1): the noise scale that the flow-matching path
    keeps at t = 1 (at 1 the path would not move)."""
    if not _real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"sigma_min must lie in [0, 1), got {value!r}")
    return float(value)


def check_flow_matching_shapes(x0: tuple, x1: tuple, t: tuple) -> None:
    """Raise unless base samples ``x0`` and data ``x1`` share one shape (B, D) and the times ``t`` have shape
    (B,): one time per pair."""
    check_flat_state_shape("x0", x0)
    check_flat_state_shape("x1", x1)
    if tuple(x0) != tuple(x1):
        raise ValueError(
            f"x0 and x1 must have the same shape (B, D), one base sample per data point: x0 has shape "
            f"{tuple(x0)}, x1 has shape {tuple(x1)}"
        )
    if tuple(t) != (x0[0],):
        raise ValueError(
            f"t must have shape (B,) = ({x0[0]},), one time per pair of x0 and x1, got shape {tuple(t)}"
        )
