"""Conditional flow matching (Lipman et al. 2023): a simulation-free regression loss that trains the vector field
of a continuous normalizing flow without solving an ODE; with ``sigma_min = 0`` it is rectified flow (Liu et al.
2023)."""

from __future__ import annotations

from typing import Callable

import torch

from ..._checks import check_flow_matching_shapes, check_sigma_min
from .._validation import check_floating_tensor


def flow_matching_path(
    x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, *, sigma_min: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal-transport conditional path from base samples ``x0`` to data ``x1`` and its velocity.

    ``xt = (1 - (1 - sigma_min) t) x0 + t x1`` moves each base sample along a straight line at constant speed
    ``ut = x1 - (1 - sigma_min) x0``; at ``t = 1`` it reaches ``x1 + sigma_min x0``, the data blurred by a
    Gaussian of scale ``sigma_min`` when ``x0`` is standard normal.

    Parameters
    ----------
    x0 : torch.Tensor
        Base samples, shape (B, D).
    x1 : torch.Tensor
        Data (or, for a reflow, the samples a previous flow carried ``x0`` to), shape (B, D).
    t : torch.Tensor
        Times in [0, 1], shape (B,), one per pair, drawn by the caller (uniformly, for the standard loss).
    sigma_min : float
        The path's spread at ``t = 1``, in [0, 1).

    Returns
    -------
    xt : torch.Tensor
        Points on the paths at times ``t``, shape (B, D).
    ut : torch.Tensor
        The paths' velocities, the regression target of the vector field, shape (B, D).
    """
    sigma_min = _check_pairs(x0, x1, t, sigma_min)
    shrink = 1.0 - sigma_min
    s = t.unsqueeze(1)
    return (1 - shrink * s) * x0 + s * x1, x1 - shrink * x0


def flow_matching_loss(
    v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    *,
    sigma_min: float = 0.0,
) -> torch.Tensor:
    """The conditional flow-matching loss ``mean over the batch of |v(t, xt) - ut|^2``.

    Its gradient with respect to ``v``'s parameters equals, in expectation, that of the regression on the
    marginal velocity field that carries the base distribution to the data, so minimizing it trains ``v`` as
    the field of a continuous normalizing flow (integrate it from 0 to 1 with
    :func:`~implicit_layers.torch.cnf_sample`) at the cost of one evaluation of ``v`` per step, with no ODE solve.

    Parameters
    ----------
    v : callable
        The vector field ``v(t, x)``, ``t`` of shape (B,), ``x`` of shape (B, D), returning (B, D).
    x0, x1, t, sigma_min
        As in :func:`flow_matching_path`.

    Returns
    -------
    torch.Tensor
        A scalar: the batch mean of the squared error summed over the D coordinates, differentiable with respect
        to whatever ``v`` uses.
    """
    xt, ut = flow_matching_path(x0, x1, t, sigma_min=sigma_min)
    prediction = v(t, xt)
    if not isinstance(prediction, torch.Tensor) or prediction.shape != ut.shape:
        shape = tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction).__name__
        raise ValueError(f"v(t, x) must return a tensor of x's shape {tuple(ut.shape)}, got {shape}")
    return (prediction - ut).pow(2).sum(dim=1).mean()


def _check_pairs(x0, x1, t, sigma_min) -> float:
    for name, value in (("x0", x0), ("x1", x1), ("t", t)):
        check_floating_tensor(name, value)
    check_flow_matching_shapes(tuple(x0.shape), tuple(x1.shape), tuple(t.shape))
    for name, value in (("x1", x1), ("t", t)):
        # torch would promote a mixed-precision path silently, and the field would then see another dtype.
        if value.dtype != x0.dtype or value.device != x0.device:
            raise ValueError(
                f"{name} must have x0's dtype and device: x0 has {x0.dtype} on {x0.device}, {name} has "
                f"{value.dtype} on {value.device}"
            )
    return check_sigma_min(sigma_min)
