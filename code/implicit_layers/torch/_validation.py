"""Argument checks whose messages name the offending argument."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_flat_state_shape, check_probe_shape, check_state_shape


def all_finite(value: torch.Tensor) -> bool:
    """Whether every entry of a real tensor is finite. Its smallest and largest entries are NaN if any entry is,
    and infinite if any is, so one reading pass tells, where ``isfinite(value).all()`` writes and reads several
    (ten times slower, measured on a (128, 50, 50) float64 tensor)."""
    return not value.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())


def check_batched_state(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite floating-point tensor of shape (B, ...) with at least one state
    dimension."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_state_shape(name, tuple(value.shape))
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")


def check_returns_like(value: Any, reference: torch.Tensor, *, call: str, name: str) -> None:
    """Raise unless ``value``, what ``call`` returned for the argument ``name`` (whose value is ``reference``),
    is a tensor of ``reference``'s shape, dtype and device: the check every solver makes of its user's map."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{call} must return a torch.Tensor, got {type(value).__name__}")
    for attribute in ("shape", "dtype", "device"):
        if getattr(value, attribute) != getattr(reference, attribute):
            raise ValueError(
                f"{call} must return a tensor of {name}'s {attribute}: {name} has {attribute} "
                f"{_show(getattr(reference, attribute))}, {call} returned {_show(getattr(value, attribute))}"
            )


def check_map_output(fz: Any, z0: torch.Tensor) -> None:
    """Raise unless ``f(z0)`` is a finite tensor of the same shape, dtype and device as ``z0``."""
    check_returns_like(fz, z0, call="f(z)", name="z")
    if not all_finite(fz):
        raise ValueError("f(z0) contains NaN or Inf: check the inputs and parameters that f uses")


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, torch.Size) else str(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solvers' small linear algebra and residual norms for states of ``dtype``: float32 for
    the 16-bit formats (whose 8 or 11 significant bits cannot carry a least-squares solve), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_floating_tensor(name: str, value: Any) -> None:
    """Raise unless ``value`` is a floating-point tensor. Reads no value, so it costs no host synchronization."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")


def check_flat_states(name: str, value: Any) -> None:
    """Raise unless ``value`` is a floating-point tensor of shape (B, D) with D >= 1: the flat states of a
    continuous normalizing flow. Reads no value, so it may run inside an ODE solver's field."""
    check_floating_tensor(name, value)
    check_flat_state_shape(name, tuple(value.shape))


def check_probe(probe: Any, states: torch.Tensor, *, name: str) -> None:
    """Raise unless ``probe`` is a tensor of the shape, dtype and device of ``states`` (called ``name``): one
    Hutchinson probe vector per sample."""
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a torch.Tensor or None, got {type(probe).__name__}")
    check_probe_shape(tuple(probe.shape), tuple(states.shape), state=name)
    for attribute in ("dtype", "device"):
        if getattr(probe, attribute) != getattr(states, attribute):
            raise ValueError(
                f"probe must have {name}'s {attribute}: {name} has {attribute} {getattr(states, attribute)}, "
                f"probe has {getattr(probe, attribute)}"
            )
