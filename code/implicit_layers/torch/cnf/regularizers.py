"""Regularizers of a flow's dynamics that make it cheap to solve (RNODE, Finlay et al. 2020). The other one,
the Jacobian's squared Frobenius norm, is the third output of :func:`~implicit_layers.torch.divergence`."""

from __future__ import annotations

import torch


def kinetic_energy(fy: torch.Tensor) -> torch.Tensor:
    """The squared speed ``|f(t, y)|^2`` of each sample, shape (B,).

    Integrated along the trajectories, it is the transport cost that optimal transport minimizes: penalizing it
    favours straight paths at constant speed, which an adaptive solver crosses in few steps.

    Parameters
    ----------
    fy : torch.Tensor
        The field's values, shape (B, ...).

    Returns
    -------
    torch.Tensor
        The sum of squares of each sample's entries, shape (B,), differentiable.
    """
    if not isinstance(fy, torch.Tensor):
        raise TypeError(f"fy must be a torch.Tensor, got {type(fy).__name__}")
    if fy.ndim < 2:
        raise ValueError(f"fy must have shape (B, ...) with at least one dimension per sample, got {tuple(fy.shape)}")
    return fy.flatten(1).pow(2).sum(dim=1)
