"""The monotone parametrization of a fixed-point layer's weight (monDEQ, Winston and Kolter 2020) and its step
size, in JAX. The twin of ``implicit_layers.torch.fixed_points.monotone``."""

from __future__ import annotations

import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp

from .._validation import is_concrete, known_to_be_finite

Scalar = Union[float, jax.Array]


def monotone_weight(A: jax.Array, B: jax.Array, m: Scalar) -> jax.Array:
    """The weight ``W = (1 - m) I - A^T A + B - B^T`` of a monotone equilibrium layer.

    The JAX twin of :func:`implicit_layers.torch.monotone_weight`: the symmetric part of ``I - W`` is
    ``m I + A^T A >= m I``, so ``z = relu(W z + U x + b)`` has exactly one fixed point for every input.
    Composes with ``jit``, ``vmap`` and ``grad`` (with respect to ``A``, ``B`` and ``m``); the value of ``m``
    is checked only when it is known, not when it is traced.

    Parameters
    ----------
    A, B : jax.Array
        Square matrices of the same shape (n, n), floating point: the free parameters.
    m : float or jax.Array
        Monotonicity margin, in (0, 1).

    Returns
    -------
    jax.Array
        ``W``, shape (n, n).
    """
    _check_square("A", A)
    _check_square("B", B)
    if A.shape != B.shape:
        raise ValueError(f"A and B must have the same shape, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    _check_margin(m)
    return (1 - m) * jnp.eye(A.shape[0], dtype=A.dtype) - A.T @ A + B - B.T


def monotone_step_size(W: jax.Array, m: Scalar) -> jax.Array:
    """The JAX twin of :func:`implicit_layers.torch.monotone_step_size`: ``alpha = m / ||I - W||_2^2``.

    With it the damped iteration ``z <- relu((1 - alpha) z + alpha (W z + U x + b))`` contracts by at least
    ``sqrt(1 - m^2 / ||I - W||_2^2)`` per step (the torch docstring gives the bound). Composes with ``jit``,
    ``vmap`` and ``grad``.

    Parameters
    ----------
    W : jax.Array
        The layer's weight, shape (n, n), floating point.
    m : float or jax.Array
        The margin ``W`` was built with, in (0, 1).

    Returns
    -------
    jax.Array
        ``alpha``, a scalar of ``W``'s dtype.
    """
    _check_square("W", W)
    _check_margin(m)
    return m / jnp.linalg.norm(jnp.eye(W.shape[0], dtype=W.dtype) - W, 2) ** 2


def _check_square(name: str, value: Any) -> None:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix (n, n), got shape {tuple(value.shape)}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if not known_to_be_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_margin(m: Any) -> None:
    """As the torch twin's check: ``m`` a real number or a 0-dimensional floating-point array strictly between
    0 and 1, its value checked only when it is known."""
    if hasattr(m, "shape") and hasattr(m, "dtype"):
        if m.ndim != 0 or not jnp.issubdtype(m.dtype, jnp.floating):
            raise ValueError(
                f"m must be a number or a 0-dimensional floating-point array, got a {m.dtype} array of shape "
                f"{tuple(m.shape)}"
            )
        if not is_concrete(m):
            return
        value = float(m)
    elif isinstance(m, numbers.Real) and not isinstance(m, bool):
        value = float(m)
    else:
        raise TypeError(f"m must be a number in (0, 1), got {type(m).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"m must lie strictly between 0 and 1, got {value!r}")
