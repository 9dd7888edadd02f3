"""The divergence of a batched vector field, ``trace(df/dy)`` per sample: exact from one vector-Jacobian product
per state dimension (all of them batched into one call), or Hutchinson's unbiased estimate from a single one."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..._checks import check_probe_kind
from .._validation import check_flat_states, check_floating_tensor, check_probe

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``f(t, y)``: a vector field on flat states, ``t`` of shape (B,) and ``y`` of shape (B, D), returning (B, D)."""


def hutchinson_probe(
    like: torch.Tensor, *, kind: str = "rademacher", generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw a probe for Hutchinson's trace estimator: a random tensor of ``like``'s shape, dtype and device.

    Both kinds have ``E[e e^T] = I``, so ``e^T A e`` is an unbiased estimate of ``trace(A)`` for any square
    ``A``. With ``S`` the symmetric part of ``A``, the estimate's variance is ``2 ||S||_F^2`` for Gaussian
    probes and ``2 (||S||_F^2 - sum_i S_ii^2)`` for Rademacher ones, which never exceeds it (and is zero for a
    diagonal ``A``).

    Parameters
    ----------
    like : torch.Tensor
        The states to be probed, typically of shape (B, D): one probe vector per sample.
    kind : str
        ``"rademacher"`` (independent signs +1 and -1, each with probability 1/2) or ``"gaussian"`` (independent
        standard normal entries).
    generator : torch.Generator, optional
        Source of the randomness (on ``like``'s device), for reproducible probes; by default torch's global one.

    Returns
    -------
    torch.Tensor
        A tensor of ``like``'s shape, dtype and device that does not require grad.
    """
    check_floating_tensor("like", like)
    check_probe_kind(kind)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    signs = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * signs - 1).to(like.dtype)


def divergence(
    f: Field, t: Union[torch.Tensor, float], y: torch.Tensor, probe: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate ``f(t, y)`` with the trace and the squared Frobenius norm of its Jacobian ``df/dy``, per sample.

    Without a probe both are exact: the ``D`` vector-Jacobian products ``e_i^T df/dy`` with the standard basis
    vectors are the Jacobian's rows, computed in one call (``torch.func.vmap`` of ``torch.func.vjp``) for the
    whole batch; the trace sums their diagonal entries and the Frobenius norm squares all of them. That is ``D``
    times the work of one product, so it suits small ``D`` (the 2-D densities of a tutorial). Under saved-tensor
    hooks (``odeint``'s ``gradient="checkpoint"``), where ``torch.func`` refuses reverse mode, the Jacobian's
    columns come from ``torch.func.jvp`` instead, with the same results. With a probe ``e``
    (see :func:`hutchinson_probe`) one product ``e^T df/dy`` gives Hutchinson's estimate ``(e^T df/dy) e`` of
    the trace and ``|e^T df/dy|^2`` of the squared Frobenius norm, both unbiased because ``E[e e^T] = I``; this
    is FFJORD's estimator (Grathwohl et al. 2019) and the Jacobian regularizer of RNODE (Finlay et al. 2020).

    Parameters
    ----------
    f : callable
        ``f(t, y)`` with ``t`` of shape (B,) and ``y`` of shape (B, D), returning a tensor of ``y``'s shape;
        each sample's output must depend on that sample alone (the trace of the batch's Jacobian would
        otherwise mix samples). It closes over its parameters.
    t : torch.Tensor or float
        The time, of shape (B,), or one number (or 0-d tensor) shared by the batch.
    y : torch.Tensor
        States of shape (B, D), floating point.
    probe : torch.Tensor, optional
        Hutchinson's probe, of ``y``'s shape; ``None`` for the exact values.

    Returns
    -------
    fy : torch.Tensor
        ``f(t, y)``, shape (B, D).
    div : torch.Tensor
        ``trace(df/dy)`` per sample, shape (B,), exact or estimated.
    frobenius : torch.Tensor
        ``||df/dy||_F^2`` per sample, shape (B,), exact or estimated.

    Notes
    -----
    All three outputs are differentiable with respect to ``y`` and to the tensors ``f`` uses: when autograd
    is recording, they carry a graph, so ``div`` and ``frobenius`` can enter a training loss. No value is read
    back to the host, so the call can run inside an ODE solver's field.
    """
    check_flat_states("y", y)
    t = _batch_times(t, y)
    if probe is not None:
        check_probe(probe, y, name="y")
    return field_divergence(f, t, y, probe)


def field_divergence(
    f: Field, t: torch.Tensor, y: torch.Tensor, probe: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`divergence` on arguments already checked (``t`` of shape (B,)), as the CNF dynamics call it at
    every evaluation of the solver."""
    if probe is not None:
        return _hutchinson(f, t, y, probe)
    batch, dim = y.shape
    # The basis vector e_i for every sample at once: shape (D, B, D), mapped over its first axis.
    basis = torch.eye(dim, dtype=y.dtype, device=y.device).unsqueeze(1).expand(dim, batch, dim)
    if _reverse_mode_allowed():
        fy, pullback = torch.func.vjp(lambda state: f(t, state), y)
        _check_field_value(fy, y)
        (products,) = torch.func.vmap(pullback)(basis)  # products[i, b] = row i of sample b's Jacobian
    else:
        # Forward mode runs under saved-tensor hooks; the Jacobian's columns have the same diagonal and the
        # same sum of squares as its rows, at about 1.5 times their cost.
        def column(tangent):
            return torch.func.jvp(lambda state: f(t, state), (y,), (tangent,))

        fy, products = torch.func.vmap(column, out_dims=(None, 0))(basis)
        _check_field_value(fy, y)
    return fy, products.diagonal(dim1=0, dim2=2).sum(dim=1), products.pow(2).sum(dim=(0, 2))


def _reverse_mode_allowed() -> bool:
    """Whether ``torch.func.vjp`` may run here. It refuses to under saved-tensor hooks, which ``odeint``'s
    checkpointed steps and its adjoint's check of ``params`` install; this asks torch the question it asks."""
    try:
        with torch.autograd.graph.disable_saved_tensors_hooks("asked whether saved-tensor hooks are active"):
            return True
    except RuntimeError:
        return False


def _hutchinson(
    f: Field, t: torch.Tensor, y: torch.Tensor, probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    differentiable = torch.is_grad_enabled()
    # The product needs f's graph even when the caller wants numbers only (sampling under no_grad).
    with torch.enable_grad():
        point = y if y.requires_grad else y.detach().requires_grad_()
        fy = f(t, point)
        _check_field_value(fy, y)
        row = None
        if fy.requires_grad:  # else f ignores y and has no parameters: its Jacobian is zero
            (row,) = torch.autograd.grad(fy, point, probe, create_graph=differentiable, allow_unused=True)
    if row is None:  # None also when f uses parameters but not y
        row = torch.zeros_like(y)
    if not differentiable:
        fy = fy.detach()
    return fy, (row * probe).sum(dim=1), row.pow(2).sum(dim=1)


def _check_field_value(fy, y: torch.Tensor) -> None:
    if not isinstance(fy, torch.Tensor) or fy.shape != y.shape:
        shape = tuple(fy.shape) if isinstance(fy, torch.Tensor) else type(fy).__name__
        raise ValueError(f"f(t, y) must return a tensor of y's shape {tuple(y.shape)}, got {shape}")


def _batch_times(t, y: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of shape (B,) with ``y``'s dtype and device: one number is shared by the batch."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be a number or a torch.Tensor of shape (B,), got {type(t).__name__}")
        t = torch.tensor(float(t))
    if t.ndim == 0:
        t = t.expand(y.shape[0])
    if tuple(t.shape) != (y.shape[0],):
        raise ValueError(f"t must be one number or have shape (B,) = ({y.shape[0]},), got shape {tuple(t.shape)}")
    return t.to(dtype=y.dtype, device=y.device)
