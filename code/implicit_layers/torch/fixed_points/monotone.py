"""The monotone parametrization of a fixed-point layer's weight (monDEQ, Winston and Kolter 2020), under which
``z = relu(W z + U x + b)`` has exactly one fixed point, and the step size that makes its damped iteration a
contraction."""

from __future__ import annotations

import numbers
from typing import Any, Union

import torch

from .._validation import all_finite

Scalar = Union[float, torch.Tensor]


def monotone_weight(A: torch.Tensor, B: torch.Tensor, m: Scalar) -> torch.Tensor:
    """The weight ``W = (1 - m) I - A^T A + B - B^T`` of a monotone equilibrium layer.

    The symmetric part of ``I - W`` is ``m I + A^T A``, at least ``m I``, whatever ``A`` and ``B`` are (the skew
    part ``B - B^T`` drops out of it). So the operator ``z -> (I - W) z`` is strongly monotone, and by the theory
    of monotone operator splitting the layer ``z = relu(W z + U x + b)`` has exactly one fixed point for every
    input, found by :func:`monotone_step_size`'s damped iteration; training ``A`` and ``B`` freely never leaves
    that class.

    Parameters
    ----------
    A, B : torch.Tensor
        Square matrices of the same shape (n, n), floating point, finite: the free parameters.
    m : float or torch.Tensor
        Monotonicity margin, in (0, 1); a 0-dimensional tensor when it should get a gradient.

    Returns
    -------
    torch.Tensor
        ``W``, shape (n, n), differentiable with respect to ``A``, ``B`` and ``m``.
    """
    _check_square("A", A)
    _check_square("B", B)
    if A.shape != B.shape:
        raise ValueError(f"A and B must have the same shape, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    _check_margin(m)
    identity = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return (1 - m) * identity - A.T @ A + B - B.T


def monotone_step_size(W: torch.Tensor, m: Scalar) -> torch.Tensor:
    """The step size ``alpha = m / ||I - W||_2^2`` that makes the damped iteration of a monotone layer contract.

    The iteration ``z <- relu((1 - alpha) z + alpha (W z + U x + b))`` is forward-backward splitting: a step
    ``z - alpha ((I - W) z - U x - b)`` followed by ``relu``, which is non-expansive. When the symmetric part of
    ``I - W`` is at least ``m I`` (as :func:`monotone_weight` guarantees) and ``L = ||I - W||_2``, the step
    shrinks differences by a factor of at most ``sqrt(1 - 2 alpha m + alpha^2 L^2)``, below one for every
    ``alpha`` in ``(0, 2 m / L^2)``. The returned value minimizes that bound: the iteration then contracts by at
    least ``sqrt(1 - m^2 / L^2)`` per step, whatever ``A`` and ``B`` are.

    Parameters
    ----------
    W : torch.Tensor
        The layer's weight, shape (n, n), floating point, finite.
    m : float or torch.Tensor
        The margin ``W`` was built with, in (0, 1).

    Returns
    -------
    torch.Tensor
        ``alpha``, a 0-dimensional tensor of ``W``'s dtype, differentiable with respect to ``W`` and ``m``.
    """
    _check_square("W", W)
    _check_margin(m)
    identity = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return m / torch.linalg.matrix_norm(identity - W, ord=2) ** 2


def _check_square(name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix (n, n), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_margin(m: Any) -> None:
    """Raise unless ``m`` is a real number or a 0-dimensional floating-point tensor strictly between 0 and 1.
    At ``m = 0`` the layer may have many fixed points; ``m >= 1`` would keep one but make the symmetric part
    of ``W``, ``(1 - m) I - A^T A``, negative semi-definite, a needlessly narrow class of layers."""
    if isinstance(m, torch.Tensor):
        if m.ndim != 0 or not m.is_floating_point():
            raise ValueError(
                f"m must be a number or a 0-dimensional floating-point tensor, got a {m.dtype} tensor of shape "
                f"{tuple(m.shape)}"
            )
        value = float(m.detach())
    elif isinstance(m, numbers.Real) and not isinstance(m, bool):
        value = float(m)
    else:
        raise TypeError(f"m must be a number in (0, 1), got {type(m).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"m must lie strictly between 0 and 1, got {value!r}")
