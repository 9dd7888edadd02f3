"""The convolutional cell of a deep equilibrium model in JAX: a residual block with group normalization and
input injection, as a pure function of its parameters. The twin of ``implicit_layers.torch.fixed_points.conv_cell``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..._checks import check_conv_cell_sizes

GROUP_NORM_EPS = 1e-5
"""The constant added to each group's variance, torch.nn.GroupNorm's default, so the twins agree."""


def conv_deq_cell_init(key: jax.Array, channels: int, inner_channels: int, groups: int = 4) -> dict[str, jax.Array]:
    """The JAX twin of :class:`implicit_layers.torch.ConvDEQCell`'s construction: fresh parameters of the cell.

    The convolution weights are drawn as torch draws them (uniform in +-1/sqrt(fan_in), fan_in = 9 times the
    input channels), the normalizations start as the identity (scale 1, offset 0).

    Parameters
    ----------
    key : jax.Array
        A PRNG key.
    channels : int
        Channels C of the state and of the injected input.
    inner_channels : int
        Channels of the hidden activation.
    groups : int
        Groups of every group normalization; must divide ``channels`` and ``inner_channels``. It is checked
        here and must be passed again, unchanged, to :func:`conv_deq_cell`.

    Returns
    -------
    dict of jax.Array
        In torch's layouts: ``"conv1"`` (inner_channels, channels, 3, 3), ``"conv2"`` (channels, inner_channels,
        3, 3), and for k = 1, 2, 3 ``"norm{k}_scale"`` and ``"norm{k}_offset"`` (inner_channels entries for
        k = 1, channels for k = 2, 3). The dtype is JAX's default float dtype.
    """
    channels, inner_channels, groups = check_conv_cell_sizes(
        channels=channels, inner_channels=inner_channels, groups=groups
    )
    key1, key2 = jax.random.split(key)

    def conv_weight(key, out_channels, in_channels):
        bound = 1.0 / (9 * in_channels) ** 0.5
        return jax.random.uniform(key, (out_channels, in_channels, 3, 3), minval=-bound, maxval=bound)

    params = {"conv1": conv_weight(key1, inner_channels, channels), "conv2": conv_weight(key2, channels, inner_channels)}
    for k, size in ((1, inner_channels), (2, channels), (3, channels)):
        params[f"norm{k}_scale"] = jnp.ones(size, params["conv1"].dtype)
        params[f"norm{k}_offset"] = jnp.zeros(size, params["conv1"].dtype)
    return params


def conv_deq_cell(z: jax.Array, x: jax.Array, params: dict[str, Any], groups: int = 4) -> jax.Array:
    """The JAX twin of :class:`implicit_layers.torch.ConvDEQCell`: the residual cell ``f(z, x)`` of a
    convolutional deep equilibrium model.

    For a state ``z`` and an injected input ``x`` of the same shape (B, C, H, W)::

        y = GN1(relu(conv1(z)))
        f(z, x) = GN3(relu(z + GN2(x + conv2(y))))

    with 3x3 convolutions without bias (padding 1) and group normalizations with per-channel scale and offset.
    Given the same weights it computes what the torch cell computes. Pure, so it composes with ``jit``,
    ``vmap`` and ``grad``; use it with ``fixed_point(lambda z, p: conv_deq_cell(z, x, p), z0, params)``.

    Parameters
    ----------
    z, x : jax.Array
        State and injected input, both of shape (B, C, H, W) (NCHW, as in torch).
    params : dict of jax.Array
        The cell's parameters, as :func:`conv_deq_cell_init` returns them.
    groups : int
        Groups of every group normalization, as given to :func:`conv_deq_cell_init`.

    Returns
    -------
    jax.Array
        ``f(z, x)``, shaped like ``z``.
    """
    inner_channels, channels = params["conv1"].shape[:2]
    check_conv_cell_sizes(channels=channels, inner_channels=inner_channels, groups=groups)
    if params["conv2"].shape != (channels, inner_channels, 3, 3):
        raise ValueError(
            f"params['conv2'] must have shape {(channels, inner_channels, 3, 3)} to match params['conv1'] of shape "
            f"{tuple(params['conv1'].shape)}, got {tuple(params['conv2'].shape)}"
        )
    if z.ndim != 4 or z.shape[1] != channels:
        raise ValueError(f"z must have shape (B, {channels}, H, W) to match params['conv1'], got {tuple(z.shape)}")
    if x.shape != z.shape:
        raise ValueError(f"x must have z's shape {tuple(z.shape)}, got {tuple(x.shape)}")
    y = _group_norm(jax.nn.relu(_conv3x3(z, params["conv1"])), params["norm1_scale"], params["norm1_offset"], groups)
    injected = _group_norm(x + _conv3x3(y, params["conv2"]), params["norm2_scale"], params["norm2_offset"], groups)
    return _group_norm(jax.nn.relu(z + injected), params["norm3_scale"], params["norm3_offset"], groups)


def _conv3x3(inputs: jax.Array, weight: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
        inputs, weight, window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def _group_norm(inputs: jax.Array, scale: jax.Array, offset: jax.Array, groups: int) -> jax.Array:
    """torch.nn.GroupNorm: each sample's channels split into ``groups`` groups, each group normalized to zero
    mean and unit (biased) variance over its channels and pixels, then scaled and shifted per channel."""
    batch, channels, height, width = inputs.shape
    grouped = inputs.reshape(batch, groups, channels // groups, height, width)
    mean = grouped.mean(axis=(2, 3, 4), keepdims=True)
    variance = jnp.square(grouped - mean).mean(axis=(2, 3, 4), keepdims=True)
    normalized = ((grouped - mean) * lax.rsqrt(variance + GROUP_NORM_EPS)).reshape(inputs.shape)
    return normalized * scale[:, None, None] + offset[:, None, None]
