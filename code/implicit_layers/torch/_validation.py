"""Argument checks whose messages name the offending argument."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_state_shape


def check_batched_state(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite floating-point tensor of shape (B, ...) with at least one state
    dimension."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_state_shape(name, tuple(value.shape))
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_map_output(fz: Any, z0: torch.Tensor) -> None:
    """Raise unless ``f(z0)`` is a finite tensor of the same shape, dtype and device as ``z0``."""
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"f(z0) must return a torch.Tensor, got {type(fz).__name__}")
    for attribute in ("shape", "dtype", "device"):
        if getattr(fz, attribute) != getattr(z0, attribute):
            raise ValueError(
                f"f must map z0 to a tensor of the same {attribute}: z0 has {attribute} "
                f"{_show(getattr(z0, attribute))}, f(z0) has {_show(getattr(fz, attribute))}"
            )
    if not bool(torch.isfinite(fz).all()):
        raise ValueError("f(z0) contains NaN or Inf: check the inputs and parameters that f uses")


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, torch.Size) else str(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solvers' small linear algebra and residual norms for states of ``dtype``: float32 for
    the 16-bit formats (whose 8 or 11 significant bits cannot carry a least-squares solve), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
