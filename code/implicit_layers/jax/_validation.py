"""Argument checks whose messages name the offending argument; value checks run only outside ``jit``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._checks import check_flat_state_shape, check_probe_shape, check_state_shape


def is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def known_to_be_finite(value: Any) -> bool:
    """False only when ``value``'s entries are known and one is NaN or Inf. A concrete array closed over by a
    function under ``jit`` is known, but the check on it is traced (its result a tracer), so it is skipped."""
    if not is_concrete(value):
        return True
    finite = jnp.isfinite(value).all()
    return not is_concrete(finite) or bool(finite)


def check_batched_state(name: str, value: Any) -> None:
    """Raise unless ``value`` is a floating-point array of shape (B, ...) with at least one state dimension
    (and, when its values are known, finite)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(value).__name__}")
    check_state_shape(name, tuple(value.shape))
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if not known_to_be_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")


def check_returns_like(value: Any, reference: jax.Array, *, call: str, name: str) -> None:
    """Raise unless ``value``, what ``call`` returned for the argument ``name`` (whose value is ``reference``),
    is an array of ``reference``'s shape and dtype: the check every solver makes of its user's map (known when
    traced, so it costs nothing at run time)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{call} must return a JAX array, got {type(value).__name__}")
    for attribute in ("shape", "dtype"):
        if getattr(value, attribute) != getattr(reference, attribute):
            raise ValueError(
                f"{call} must return an array of {name}'s {attribute}: {name} has {attribute} "
                f"{getattr(reference, attribute)}, {call} returned {getattr(value, attribute)}"
            )


def check_map_output(fz: Any, z0: jax.Array) -> None:
    """Raise unless ``f(z0)`` has the shape and dtype of ``z0`` (and, when known, finite values)."""
    check_returns_like(fz, z0, call="f(z)", name="z")
    if not known_to_be_finite(fz):
        raise ValueError("f(z0) contains NaN or Inf: check the inputs and parameters that f uses")


def compute_dtype(dtype: Any) -> Any:
    """The dtype of the solvers' small linear algebra and residual norms for states of ``dtype``: float32 for
    the 16-bit formats (whose 8 or 11 significant bits cannot carry a least-squares solve), else ``dtype``."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def check_flat_state(name: str, value: Any) -> None:
    """Raise unless ``value`` is a floating-point array of shape (B, D), the flat states of a continuous
    normalizing flow (and, when its values are known, finite)."""
    if hasattr(value, "shape"):
        check_flat_state_shape(name, tuple(value.shape))
    check_batched_state(name, value)


def check_probe(probe: Any, y: jax.Array, *, state: str = "y") -> None:
    """Raise unless ``probe`` is an array of the shape and dtype of the states ``y`` it probes (named ``state``)."""
    if not hasattr(probe, "shape") or not hasattr(probe, "dtype"):
        raise TypeError(f"probe must be a JAX array or None, got {type(probe).__name__}")
    check_probe_shape(tuple(probe.shape), tuple(y.shape), state=state)
    if probe.dtype != y.dtype:
        raise ValueError(f"probe must have the dtype of {state}: {state} has dtype {y.dtype}, probe has {probe.dtype}")
