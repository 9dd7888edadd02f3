"""Helpers shared by every family for batches laid out as (B, ...)."""

from __future__ import annotations

import torch


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``values`` of shape (B,) (or (T, B)) to broadcast against ``like`` of shape (B, ...)."""
    return values.reshape(*values.shape, *([1] * (like.ndim - 1)))
