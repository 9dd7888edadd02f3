"""The convolutional cell of a deep equilibrium model: a residual block with group normalization and input
injection, whose fixed point in ``z`` is the layer's output."""

from __future__ import annotations

import torch
from torch import nn

from ..._checks import check_conv_cell_sizes


class ConvDEQCell(nn.Module):
    """The residual cell ``f(z, x)`` of a convolutional deep equilibrium model (Bai et al. 2020).

    For a state ``z`` and an injected input ``x`` of the same shape (B, C, H, W), it computes::

        y = GN1(relu(conv1(z)))
        f(z, x) = GN3(relu(z + GN2(x + conv2(y))))

    where ``conv1`` (C -> ``inner_channels``) and ``conv2`` (``inner_channels`` -> C) are 3x3 convolutions
    without bias and with padding 1, and ``GN1``, ``GN2``, ``GN3`` are group normalizations with a learned
    per-channel scale and offset. The final normalization keeps ``f`` bounded whatever ``z`` is, which is what
    lets a solver search for its fixed point from ``z = 0``. Use it with :class:`FixedPointLayer` or with
    ``fixed_point(lambda z: cell(z, x), z0)``.

    Parameters
    ----------
    channels : int
        Channels C of the state and of the injected input.
    inner_channels : int
        Channels of the hidden activation ``y``.
    groups : int
        Groups of every group normalization; must divide ``channels`` and ``inner_channels``.

    Examples
    --------
    >>> import torch
    >>> cell = ConvDEQCell(16, 32)
    >>> z = torch.zeros(2, 16, 8, 8)
    >>> cell(z, torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
    """

    def __init__(self, channels: int, inner_channels: int, groups: int = 4) -> None:
        super().__init__()
        channels, inner_channels, groups = check_conv_cell_sizes(
            channels=channels, inner_channels=inner_channels, groups=groups
        )
        self.channels, self.inner_channels, self.groups = channels, inner_channels, groups
        self.conv1 = nn.Conv2d(channels, inner_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner_channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner_channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the cell to a state ``z`` (B, C, H, W) with the injected input ``x`` of the same shape."""
        # Shape checks only: a solver calls the cell once per iteration, and a finiteness check would make
        # every call wait for the device.
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"z must have shape (B, {self.channels}, H, W), got {tuple(z.shape)}")
        if x.shape != z.shape:
            raise ValueError(f"x must have z's shape {tuple(z.shape)}, got {tuple(x.shape)}")
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner_channels={self.inner_channels}, groups={self.groups}"
