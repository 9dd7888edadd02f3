"""Euclidean projections onto the simplex and the capped simplex, solved exactly by sorting, with their
closed-form derivatives: ``project_simplex``, ``sparsemax`` and ``soft_topk``.

Each projection ``y`` of a vector lies on a face of its polytope: a set ``F`` of free entries strictly inside their
bounds, the others held at a bound. Near ``x`` the face does not change, so ``y`` moves with ``x`` as the orthogonal
projection of the change onto that face's directions (entries of ``F`` only, summing to zero). Its Jacobian is

    dy/dx = diag(1_F) - 1_F 1_F^T / |F|,

symmetric and independent of ``x`` on each face. The backward pass applies it to the incoming gradient instead of
differentiating through the sort.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch

from ..._checks import check_subset_size, check_tolerance, check_vectors_shape
from .._validation import all_finite, compute_dtype


def project_simplex(x: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Euclidean projection of each vector along the last axis onto the simplex
    ``{y : y >= 0, sum(y) = radius}``.

    Solved exactly by sorting (Held, Wolfe and Crowder 1974; Duchi et al. 2008): with ``u`` the entries sorted in
    decreasing order, the support is the longest prefix of ``u`` whose smallest entry stays above the threshold
    ``tau = (u_1 + ... + u_rho - radius) / rho`` it implies, and ``y = max(x - tau, 0)``. The cost is
    O(n log n) per vector. Condat (2016) reaches O(n) expected time with a sequential scan; one sort per batch of
    vectors vectorizes better on a batch, which is how layers call it.

    Parameters
    ----------
    x : torch.Tensor
        Floating-point tensor of shape (..., n), n >= 1; each vector along the last axis is projected.
    radius : float
        The sum of each projection, a positive number. It is a constant of the layer and gets no gradient.

    Returns
    -------
    torch.Tensor
        The projections, shape and dtype of ``x``.

    Notes
    -----
    The gradient is implicit: with ``S = {i : y_i > 0}`` the support (never empty, since ``radius > 0``), the
    Jacobian is ``diag(1_S) - 1_S 1_S^T / |S|``, applied to the incoming gradient by one masked mean. It is exact
    wherever ``y`` is differentiable, which is everywhere except where an entry sits on the support's edge
    (``x_i`` equal to the threshold ``tau``, so ``y_i = 0`` with ``x_i`` neither above nor below it). There the
    entry is taken as outside the support: the result is the Jacobian on the side where that entry stays zero,
    one of the one-sided derivatives. Ties among the entries are no obstacle: equal entries inside the support
    move together. The backward pass is written in differentiable operations of the incoming gradient, so a
    second derivative is exact too: zero with respect to ``x``, on which the first derivative is piecewise
    constant.

    16-bit inputs are projected in float32 and the result rounded back.

    References
    ----------
    Held, Wolfe and Crowder, "Validation of subgradient optimization", Mathematical Programming, 1974. Duchi,
    Shalev-Shwartz, Singer and Chandra, "Efficient projections onto the l1-ball for learning in high dimensions",
    ICML 2008. Condat, "Fast projection onto the simplex and the l1 ball", Mathematical Programming, 2016.

    Examples
    --------
    >>> project_simplex(torch.tensor([0.5, 1.5, -1.0]))
    tensor([0., 1., 0.])
    >>> project_simplex(torch.tensor([0.2, 0.3, 0.1]), radius=2.0)
    tensor([0.6667, 0.7667, 0.5667])
    """
    _check_vectors("x", x, minimum_size=1)
    radius = check_tolerance("radius", radius)
    return _Projection.apply(x, partial(_simplex_solution, radius=radius), math.inf)


def sparsemax(logits: torch.Tensor) -> torch.Tensor:
    """Sparsemax (Martins and Astudillo 2016): the Euclidean projection of the logits onto the probability simplex,
    along the last axis.

    Like softmax it maps logits to probabilities and is unchanged when a constant is added to every logit;
    unlike softmax it gives exact zeros to the logits more than a threshold below the largest. It is
    ``project_simplex(logits, radius=1.0)``, whose notes describe its gradient.

    Parameters
    ----------
    logits : torch.Tensor
        Floating-point tensor of shape (..., n), n >= 1.

    Returns
    -------
    torch.Tensor
        Probabilities, shape and dtype of ``logits``: non-negative, summing to one along the last axis.

    References
    ----------
    Martins and Astudillo, "From softmax to sparsemax: a sparse model of attention and multi-label
    classification", ICML 2016.

    Examples
    --------
    >>> sparsemax(torch.tensor([1.0, 0.8, -1.0]))
    tensor([0.6000, 0.4000, 0.0000])
    """
    _check_vectors("logits", logits, minimum_size=1)
    return _Projection.apply(logits, partial(_simplex_solution, radius=1.0), math.inf)


def soft_topk(scores: torch.Tensor, k: int, *, temperature: float = 1.0) -> torch.Tensor:
    """A relaxed top-k mask: for each vector along the last axis, the Euclidean projection of
    ``scores / temperature`` onto the capped simplex ``{y : 0 <= y <= 1, sum(y) = k}``.

    The solution is ``y = clip(s - t, 0, 1)`` with ``s = scores / temperature`` and the threshold ``t`` where
    ``phi(t) = sum(clip(s - t, 0, 1))`` equals ``k``. ``phi`` is piecewise linear and non-increasing, with
    breakpoints at each ``s_i`` (an entry becomes free) and ``s_i - 1`` (an entry reaches its cap), so one sort of
    the 2n breakpoints and running sums give ``phi`` at every breakpoint; ``t`` then solves the linear equation of the
    segment on which ``phi`` crosses ``k``. This is exact up to rounding in a fixed number of vectorized
    operations, where a bisection on ``t`` would need a pass over the data per bit of the dtype.

    As ``temperature`` falls to zero the gaps between scaled scores grow past one and ``y`` becomes the hard top-k
    mask: once the gap between a vector's k-th and (k+1)-th largest scores is at least ``temperature``, ``y`` is
    that vector's mask. As ``temperature`` grows, ``y`` tends to the uniform ``k / n``.

    Parameters
    ----------
    scores : torch.Tensor
        Floating-point tensor of shape (..., n), n >= 2.
    k : int
        How many entries the mask selects, from 1 to n - 1.
    temperature : float
        A positive number dividing the scores. It is a constant of the layer and gets no gradient.

    Returns
    -------
    torch.Tensor
        The relaxed mask, shape and dtype of ``scores``: entries in [0, 1], summing to ``k`` along the last axis.

    Notes
    -----
    The gradient is implicit: with ``F = {i : 0 < y_i < 1}`` the free entries, the Jacobian with respect to the
    scores is ``(diag(1_F) - 1_F 1_F^T / |F|) / temperature``, zero when ``F`` has fewer than two entries (none:
    the hard mask; one: the sum pins it). ``y`` fails to be differentiable only where some ``s_i - t`` is exactly
    0 or 1; that entry is then counted as held at its bound, which gives one of the one-sided derivatives.
    Second derivatives are exact (zero), as for :func:`project_simplex`.

    Examples
    --------
    >>> soft_topk(torch.tensor([3.0, 1.0, 0.8, -2.0]), k=2)
    tensor([1.0000, 0.6000, 0.4000, 0.0000])
    >>> soft_topk(torch.tensor([3.0, 1.0, 0.8, -2.0]), k=2, temperature=0.01)
    tensor([1., 1., 0., 0.])
    """
    _check_vectors("scores", scores, minimum_size=2)
    k = check_subset_size("k", k, scores.shape[-1])
    temperature = check_tolerance("temperature", temperature)
    return _Projection.apply(scores / temperature, partial(_capped_simplex_solution, k=k), 1.0)


def _check_vectors(name: str, value: Any, *, minimum_size: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    check_vectors_shape(name, tuple(value.shape), minimum_size)
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")


def _simplex_solution(x: torch.Tensor, *, radius: float) -> torch.Tensor:
    work = x.to(compute_dtype(x.dtype))
    # The projection is unchanged by a shift of all entries; measuring them from the largest keeps the threshold's
    # rounding on the scale of the radius, so that a logit that dwarfs the radius still gets its mass.
    work = work - work.amax(-1, keepdim=True)
    descending = torch.sort(work, dim=-1, descending=True).values
    excess = descending.cumsum(-1) - radius  # rho * tau for a support of the rho largest entries
    ranks = torch.arange(1, x.shape[-1] + 1, dtype=work.dtype, device=work.device)
    # The condition holds on a prefix, and for rho = 1 (where it reads radius > 0), so the support has one entry
    # at least.
    support_size = (ranks * descending > excess).sum(-1, keepdim=True)
    threshold = excess.gather(-1, support_size - 1) / support_size
    return (work - threshold).clamp(min=0).to(x.dtype)


def _capped_simplex_solution(s: torch.Tensor, *, k: int) -> torch.Tensor:
    work = s.to(compute_dtype(s.dtype))
    work = work - work.amax(-1, keepdim=True)  # unchanged projection, running sums on the scale of the spread
    n = s.shape[-1]
    # Walking t down from +inf, entry i becomes free at t = s_i and reaches its cap at t = s_i - 1. Below the
    # j-th breakpoint the capped and free entries are those whose breakpoints came first, so running sums give
    # phi(t) = capped + sum(s_free) - |free| t on each segment. A stable sort makes ties resolve the same way
    # on every call (and in the JAX twin).
    breakpoints = torch.cat([work, work - 1], dim=-1)
    order = torch.argsort(breakpoints, dim=-1, descending=True, stable=True)
    breakpoints = breakpoints.gather(-1, order)
    frees = order < n
    values = torch.cat([work, work], dim=-1).gather(-1, order)
    kinds_and_values = torch.stack([~frees, frees, torch.where(frees, values, -values)]).to(work.dtype)
    capped, freed, free_sum = kinds_and_values.cumsum(-1)
    free_count = freed - capped
    phi = capped + free_sum - free_count * breakpoints
    # phi rises from 0 at the first breakpoint to n at the last, so k is crossed on the segment that ends at the
    # first breakpoint where phi >= k. (Counting the breakpoints where phi < k would not do: rounding can dip phi
    # below k after a flat stretch at k.) A segment without free entries is such a flat stretch: k capped
    # entries, the hard mask, which every t on it gives, so t is taken at its upper end.
    segment = (phi >= k).to(torch.uint8).argmax(-1, keepdim=True) - 1
    capped, free_sum, free_count, upper_end = (
        quantity.gather(-1, segment) for quantity in (capped, free_sum, free_count, breakpoints)
    )
    # (The clamp only keeps the discarded branch of a flat stretch from dividing by zero.)
    threshold = torch.where(free_count > 0, (capped + free_sum - k) / free_count.clamp(min=1), upper_end)
    return (work - threshold).clamp(min=0, max=1).to(s.dtype)


def _free_entries(y: torch.Tensor, upper: float) -> torch.Tensor:
    """The entries strictly inside their bounds (0, ``upper``)."""
    return (y > 0) & (y < upper)


def _tangent_projection(v: torch.Tensor, y: torch.Tensor, upper: float) -> torch.Tensor:
    """``(diag(1_F) - 1_F 1_F^T / |F|) v`` per vector, with ``F`` the free entries of ``y``: ``v`` on them less its
    mean over them, zero elsewhere, the orthogonal projection onto the directions of the face. Differentiable in
    ``v``; in ``y`` only through comparisons, whose derivative is zero."""
    mask = _free_entries(y, upper).to(v.dtype)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask * (v - (mask * v).sum(-1, keepdim=True) / count)


class _Projection(torch.autograd.Function):
    """``solution(x)`` with the derivative of a projection onto a face: ``_tangent_projection`` of the incoming
    gradient (backward) or tangent (forward mode), on the entries of the solution strictly inside (0, ``upper``).
    """

    @staticmethod
    def forward(x: torch.Tensor, solution: Callable[[torch.Tensor], torch.Tensor], upper: float) -> torch.Tensor:
        return solution(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.upper = inputs[2]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (y,) = ctx.saved_tensors
        return _tangent_projection(grad_y, y, ctx.upper), None, None

    @staticmethod
    def jvp(ctx, x_dot: torch.Tensor, solution_dot: None, upper_dot: None) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return _tangent_projection(x_dot, y, ctx.upper)
