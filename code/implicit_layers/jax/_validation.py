"""Argument checks whose messages name the offending argument; value checks run only outside ``jit``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_batched_state(name: str, value: Any) -> None:
    """Raise unless ``value`` is a floating-point array with a leading batch dimension (and, when its values
    are known, finite)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(value).__name__}")
    if value.ndim < 1:
        raise ValueError(f"{name} must have a leading batch dimension, got an array of shape {tuple(value.shape)}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if is_concrete(value) and not bool(jnp.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_map_output(fz: Any, z0: jax.Array) -> None:
    """Raise unless ``f(z0)`` has the shape and dtype of ``z0`` (and, when known, finite values)."""
    for attribute in ("shape", "dtype"):
        if getattr(fz, attribute, None) != getattr(z0, attribute):
            raise ValueError(
                f"f must map z0 to an array of the same {attribute}: z0 has {attribute} "
                f"{getattr(z0, attribute)}, f(z0) has {getattr(fz, attribute, type(fz).__name__)}"
            )
    if is_concrete(fz) and not bool(jnp.isfinite(fz).all()):
        raise ValueError("f(z0) contains NaN or Inf: check the inputs and parameters that f uses")
