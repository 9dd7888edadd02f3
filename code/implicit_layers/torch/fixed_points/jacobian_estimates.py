"""Randomized estimates of a batched map's Jacobian from vector products: its squared Frobenius norm (the
Jacobian regularizer of deep equilibrium models) and its spectral norm (how far the map is from a contraction)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_iteration_limit
from .._validation import check_batched_state, check_map_output
from ._loop import Map, per_sample


def jacobian_frobenius_estimate(
    f: Map, z: torch.Tensor, *, probes: int = 1, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Estimate each sample's squared Frobenius norm ``||df/dz||_F^2`` at ``z`` without forming the Jacobian.

    Hutchinson's estimator: for a Gaussian probe ``v ~ N(0, I)`` the squared norm of the vector-Jacobian product
    ``||v^T J||^2 = v^T J J^T v`` has expectation ``trace(J J^T) = ||J||_F^2``, so the average over ``probes``
    independent probes is unbiased, with variance ``2 ||J J^T||_F^2 / probes``. Each probe costs one
    vector-Jacobian product for the whole batch. Bai et al. (2021) add ``gamma * estimate.mean() / z[0].numel()``
    at the fixed point to a deep equilibrium model's loss, which keeps its solver iterations from growing during
    training.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape, dtype and device, acting on each
        sample independently.
    z : torch.Tensor
        Where the Jacobian is taken, shape (B, ...), floating point, finite; typically the fixed point.
    probes : int
        Number of Gaussian probes per sample: more probes, lower variance.
    generator : torch.Generator, optional
        Source of the probes (on ``z``'s device), for reproducible estimates; by default torch's global one.

    Returns
    -------
    torch.Tensor
        Shape (B,), dtype of ``z``: each sample's estimate (non-negative). When autograd is recording, the
        estimate is differentiable with respect to everything ``f`` uses (its parameters, and ``z`` if ``z``
        requires grad), so it can serve as a training penalty; it then requires grad even when nothing else
        does, since the products are taken with respect to a copy of ``z`` that does. Under
        ``torch.no_grad()`` it is a plain number.

    Notes
    -----
    The products come from ``torch.autograd.grad`` rather than ``torch.func.vjp``, which refuses to run under
    saved-tensor hooks, so the penalty's memory can be measured with
    :func:`~implicit_layers.torch.autograd_graph_bytes`.
    """
    check_batched_state("z", z)
    probes = check_iteration_limit("probes", probes)
    differentiable = torch.is_grad_enabled()
    point = z if z.requires_grad else z.detach().requires_grad_()
    # The products need f's graph even when the caller only wants the number (under no_grad).
    with torch.enable_grad():
        fz = f(point)
    check_map_output(fz, z)
    estimate = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    if not fz.requires_grad:  # f ignores z and has no parameters: the Jacobian is zero
        return estimate
    for _ in range(probes):
        probe = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        (product,) = torch.autograd.grad(
            fz, point, probe, retain_graph=True, create_graph=differentiable, allow_unused=True
        )
        if product is not None:  # None: f uses parameters but not z
            estimate = estimate + product.flatten(1).pow(2).sum(dim=1)
    return estimate / probes


def jacobian_spectral_norm(
    f: Map, z: torch.Tensor, *, iterations: int = 20, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Estimate each sample's spectral norm ``||df/dz||_2`` (largest singular value) at ``z`` by power iteration.

    The iteration runs on ``J^T J``, one Jacobian-vector product and one vector-Jacobian product per step, from a
    random start normalized per sample. Each step returns ``||J^T J v|| / ||J v||`` for the current unit vector
    ``v``: a lower bound on the largest singular value ``s1`` that approaches it as ``(s2 / s1)^(4k)`` after
    ``k`` steps, ``s2`` the second singular value, so a Jacobian whose top two singular values are close needs
    more ``iterations``. A value below one at a fixed point says that ``f`` is a local contraction there, and it
    bounds the spectral radius that governs the linear convergence of forward iteration; chapters track it during
    training instead of the norm of a weight matrix.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape, dtype and device, acting on each
        sample independently.
    z : torch.Tensor
        Where the Jacobian is taken, shape (B, ...), floating point, finite.
    iterations : int
        Power-iteration steps.
    generator : torch.Generator, optional
        Source of the random start (on ``z``'s device), for reproducible estimates; by default torch's global one.

    Returns
    -------
    torch.Tensor
        Shape (B,), dtype of ``z``, detached: a diagnostic, not a quantity to train through.
    """
    check_batched_state("z", z)
    iterations = check_iteration_limit("iterations", iterations)
    vector = _unit(torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device))
    point = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(point)
    check_map_output(fz, z)
    if not fz.requires_grad:  # f ignores z and has no parameters: the Jacobian is zero
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    # As in jacobian_frobenius_estimate, autograd.grad rather than torch.func.vjp, which refuses saved-tensor
    # hooks; forward mode (torch.func.jvp) accepts them.
    with torch.no_grad():
        for _ in range(iterations):
            _, image = torch.func.jvp(f, (point.detach(),), (vector,))
            (normal,) = torch.autograd.grad(fz, point, image, retain_graph=True, allow_unused=True)
            if normal is None:  # f uses parameters but not z
                normal = torch.zeros_like(vector)
            estimate = _norm(normal) / _norm(image).clamp_min(torch.finfo(z.dtype).tiny)
            vector = _unit(normal)
    return estimate


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Scale each sample to unit norm; a zero sample (``J^T J v = 0``, so ``v`` spans part of the null space
    and the estimate is already zero) stays zero."""
    return x / per_sample(_norm(x).clamp_min(torch.finfo(x.dtype).tiny), x)
