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
        ``warn`` of the solves inside the derivative.
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
