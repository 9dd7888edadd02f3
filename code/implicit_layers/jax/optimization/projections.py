"""Euclidean projections onto the simplex and the capped simplex in JAX, solved exactly by sorting, with their
closed-form derivatives as ``custom_jvp`` rules: ``project_simplex``, ``sparsemax`` and ``soft_topk``.

Each projection ``y`` of a vector lies on a face of its polytope: a set ``F`` of free entries strictly inside their
bounds, the others held at a bound. Near ``x`` the face does not change, so ``y`` moves with ``x`` as the orthogonal
projection of the change onto that face's directions (entries of ``F`` only, summing to zero). Its Jacobian is

    dy/dx = diag(1_F) - 1_F 1_F^T / |F|,

symmetric and independent of ``x`` on each face. The ``custom_jvp`` rule applies it to the tangent, and JAX
transposes the rule for reverse mode, instead of differentiating through the sort.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..._checks import check_subset_size, check_tolerance, check_vectors_shape
from .._validation import compute_dtype, known_to_be_finite


def project_simplex(x: jax.Array, radius: float = 1.0) -> jax.Array:
    """Euclidean projection of each vector along the last axis onto the simplex
    ``{y : y >= 0, sum(y) = radius}``.

    The JAX twin of :func:`implicit_layers.torch.project_simplex`, with the same exact sort-based solution
    (Held, Wolfe and Crowder 1974; Duchi et al. 2008; Condat 2016 for the O(n) variants) and the same implicit
    derivative, as a ``custom_jvp`` rule: ``jvp``, ``grad``, ``jit`` and ``vmap`` all apply, and derivatives of
    every order are exact.

    Parameters
    ----------
    x : jax.Array
        Floating-point array of shape (..., n), n >= 1; each vector along the last axis is projected.
    radius : float
        The sum of each projection, a positive Python number (static under ``jit``). It gets no derivative.

    Returns
    -------
    jax.Array
        The projections, shape and dtype of ``x``.

    Notes
    -----
    The derivative: with ``S = {i : y_i > 0}`` the support (never empty, since ``radius > 0``), the Jacobian is
    ``diag(1_S) - 1_S 1_S^T / |S|``. It is exact wherever ``y`` is differentiable, which is everywhere except
    where an entry sits on the support's edge (``x_i`` equal to the threshold, so ``y_i = 0`` with ``x_i`` neither
    above nor below it). There the entry is taken as outside the support: the result is the Jacobian on the
    side where that entry stays zero, one of the one-sided derivatives. Equal entries inside the support move
    together. The second derivative with respect to ``x`` is zero, on which the first is piecewise constant.

    The check for NaN and Inf runs only on concrete inputs (not under ``jit``). 16-bit inputs are projected in
    float32 and the result rounded back.

    References
    ----------
    Held, Wolfe and Crowder, "Validation of subgradient optimization", Mathematical Programming, 1974. Duchi,
    Shalev-Shwartz, Singer and Chandra, "Efficient projections onto the l1-ball for learning in high dimensions",
    ICML 2008. Condat, "Fast projection onto the simplex and the l1 ball", Mathematical Programming, 2016.
    """
    x = _check_vectors("x", x, minimum_size=1)
    radius = check_tolerance("radius", radius)
    return _projection(partial(_simplex_solution, radius=radius), math.inf, x)


def sparsemax(logits: jax.Array) -> jax.Array:
    """Sparsemax (Martins and Astudillo 2016): the Euclidean projection of the logits onto the probability simplex,
    along the last axis.

    The JAX twin of :func:`implicit_layers.torch.sparsemax`: ``project_simplex(logits, radius=1.0)``, whose notes
    describe its derivative.

    Parameters
    ----------
    logits : jax.Array
        Floating-point array of shape (..., n), n >= 1.

    Returns
    -------
    jax.Array
        Probabilities, shape and dtype of ``logits``: non-negative, summing to one along the last axis.

    References
    ----------
    Martins and Astudillo, "From softmax to sparsemax: a sparse model of attention and multi-label
    classification", ICML 2016.
    """
    logits = _check_vectors("logits", logits, minimum_size=1)
    return _projection(partial(_simplex_solution, radius=1.0), math.inf, logits)


def soft_topk(scores: jax.Array, k: int, *, temperature: float = 1.0) -> jax.Array:
    """A relaxed top-k mask: for each vector along the last axis, the Euclidean projection of
    ``scores / temperature`` onto the capped simplex ``{y : 0 <= y <= 1, sum(y) = k}``.

    The JAX twin of :func:`implicit_layers.torch.soft_topk`, with the same exact solution ``clip(s - t, 0, 1)``
    (the threshold ``t`` from one sort of the 2n breakpoints) and the same implicit derivative, as a
    ``custom_jvp`` rule. ``k`` and ``temperature`` are Python numbers, static under ``jit``.

    Parameters
    ----------
    scores : jax.Array
        Floating-point array of shape (..., n), n >= 2.
    k : int
        How many entries the mask selects, from 1 to n - 1.
    temperature : float
        A positive number dividing the scores. It gets no derivative.

    Returns
    -------
    jax.Array
        The relaxed mask, shape and dtype of ``scores``: entries in [0, 1], summing to ``k`` along the last axis.

    Notes
    -----
    With ``F = {i : 0 < y_i < 1}`` the free entries, the Jacobian with respect to the scores is
    ``(diag(1_F) - 1_F 1_F^T / |F|) / temperature``, zero when ``F`` has fewer than two entries (none: the hard
    mask; one: the sum pins it). Where some ``s_i - t`` is exactly 0 or 1, that entry is counted as held at its
    bound, which gives one of the one-sided derivatives. As ``temperature`` falls to zero, ``y`` becomes the hard
    top-k mask.
    """
    scores = _check_vectors("scores", scores, minimum_size=2)
    k = check_subset_size("k", k, scores.shape[-1])
    temperature = check_tolerance("temperature", temperature)
    return _projection(partial(_capped_simplex_solution, k=k), 1.0, scores / temperature)


def _check_vectors(name: str, value: Any, *, minimum_size: int) -> jax.Array:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(value).__name__}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    check_vectors_shape(name, tuple(value.shape), minimum_size)
    if not known_to_be_finite(value):
        raise ValueError(f"{name} contains NaN or Inf")
    return jnp.asarray(value)


# The solutions and the derivative are jitted so that a call outside jit compiles a program per shape and dtype
# (whatever the radius or k, which are traced) rather than one per operation, seconds for a new shape; under an
# outer jit they are inlined. The solution is compiled apart from the derivative so that the programs that JAX's
# transformations make of the derivative do not each contain the sort again.
@jax.jit
def _simplex_solution(x: jax.Array, *, radius: float) -> jax.Array:
    work = x.astype(compute_dtype(x.dtype))
    # The projection is unchanged by a shift of all entries; measuring them from the largest keeps the threshold's
    # rounding on the scale of the radius, so that a logit that dwarfs the radius still gets its mass.
    work = work - jnp.max(work, axis=-1, keepdims=True)
    descending = -jnp.sort(-work, axis=-1)
    excess = jnp.cumsum(descending, axis=-1) - radius  # rho * tau for a support of the rho largest entries
    ranks = jnp.arange(1, x.shape[-1] + 1, dtype=work.dtype)
    # The condition holds on a prefix, and for rho = 1 (where it reads radius > 0), so the support has one entry
    # at least.
    support_size = jnp.sum(ranks * descending > excess, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(excess, support_size - 1, axis=-1) / support_size
    return jnp.maximum(work - threshold, 0).astype(x.dtype)


@jax.jit
def _capped_simplex_solution(s: jax.Array, *, k: int) -> jax.Array:
    work = s.astype(compute_dtype(s.dtype))
    work = work - jnp.max(work, axis=-1, keepdims=True)  # unchanged projection, running sums on the spread's scale
    n = s.shape[-1]
    # Walking t down from +inf, entry i becomes free at t = s_i and reaches its cap at t = s_i - 1. Below the
    # j-th breakpoint the capped and free entries are those whose breakpoints came first, so running sums give
    # phi(t) = capped + sum(s_free) - |free| t on each segment. A stable sort makes ties resolve the same way
    # on every call (and in the torch twin).
    # (lax.sort carries the values and kinds along with the keys, where argsort and two gathers compile slower.)
    negated, values, frees = jax.lax.sort(
        (
            -jnp.concatenate([work, work - 1], axis=-1),
            jnp.concatenate([work, work], axis=-1),
            jnp.broadcast_to(jnp.arange(2 * n) < n, work.shape[:-1] + (2 * n,)),
        ),
        dimension=work.ndim - 1,
        is_stable=True,
        num_keys=1,
    )
    breakpoints = -negated
    capped, freed, free_sum = jnp.cumsum(
        jnp.stack([~frees, frees, jnp.where(frees, values, -values)]).astype(work.dtype), axis=-1
    )
    free_count = freed - capped
    phi = capped + free_sum - free_count * breakpoints
    # phi rises from 0 at the first breakpoint to n at the last, so k is crossed on the segment that ends at the
    # first breakpoint where phi >= k. (Counting the breakpoints where phi < k would not do: rounding can dip phi
    # below k after a flat stretch at k.) A segment without free entries is such a flat stretch: k capped
    # entries, the hard mask, which every t on it gives, so t is taken at its upper end.
    segment = jnp.argmax(phi >= k, axis=-1, keepdims=True) - 1
    capped, free_sum, free_count, upper_end = (
        jnp.take_along_axis(quantity, segment, axis=-1) for quantity in (capped, free_sum, free_count, breakpoints)
    )
    # (The floor only keeps the discarded branch of a flat stretch from dividing by zero.)
    threshold = jnp.where(free_count > 0, (capped + free_sum - k) / jnp.maximum(free_count, 1), upper_end)
    return jnp.clip(work - threshold, 0, 1).astype(s.dtype)


def _free_entries(y: jax.Array, upper: float) -> jax.Array:
    """The entries strictly inside their bounds (0, ``upper``)."""
    return (y > 0) & (y < upper)


@jax.jit
def _tangent_projection(v: jax.Array, y: jax.Array, upper: float) -> jax.Array:
    """``(diag(1_F) - 1_F 1_F^T / |F|) v`` per vector, with ``F`` the free entries of ``y``: ``v`` on them less its
    mean over them, zero elsewhere, the orthogonal projection onto the directions of the face. Linear in ``v``, so
    JAX transposes it for reverse mode."""
    mask = _free_entries(y, upper).astype(v.dtype)
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    return mask * (v - jnp.sum(mask * v, axis=-1, keepdims=True) / count)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _projection(solution: Callable[[jax.Array], jax.Array], upper: float, x: jax.Array) -> jax.Array:
    """``solution(x)`` with the derivative of a projection onto a face: ``_tangent_projection`` of the tangent,
    on the entries of the solution strictly inside (0, ``upper``)."""
    return solution(x)


@_projection.defjvp
def _projection_jvp(solution, upper, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # The solution goes through the rule again, so that a second differentiation sees its derivative (and the
    # free set, a comparison, none) rather than the sort's.
    y = _projection(solution, upper, x)
    return y, _tangent_projection(x_dot, y, upper)
