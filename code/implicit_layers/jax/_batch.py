"""Helpers shared by every family for batches laid out as (B, ...)."""

from __future__ import annotations

import math

import jax


def per_sample(values: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape per-sample ``values`` of shape (B,) (or (T, B)) to broadcast against ``like`` of shape (B, ...)."""
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def flat(x: jax.Array) -> jax.Array:
    """View a batch (B, ...) as (B, d); unlike ``reshape(B, -1)`` this also works for an empty batch."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))
