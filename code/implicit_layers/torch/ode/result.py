"""The record ``odeint`` returns beside its solution."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ODEResult(NamedTuple):
    """What the batched ODE solver did, per sample.

    Attributes
    ----------
    nfe : torch.Tensor
        Evaluations of ``f`` made for each sample while it was integrating, shape (B,), int64: the initial
        derivative, the initial step selection's trial, and every stage of every attempted step.
    num_accepted : torch.Tensor
        Steps each sample accepted, shape (B,), int64.
    num_rejected : torch.Tensor
        Steps each sample rejected, shape (B,), int64 (fixed-step methods reject none).
    final_dt : torch.Tensor
        The last step size each sample used, signed in the direction of ``t``, shape (B,).
    t_reached : torch.Tensor
        The time each sample got to, shape (B,): ``t[-1]`` for a sample that finished.
    converged : torch.Tensor
        Whether each sample reached ``t[-1]``, shape (B,), bool.
    failed : torch.Tensor
        Whether a sample stopped because its state became NaN/Inf or its step size underflowed, shape (B,), bool.
    """

    nfe: torch.Tensor
    num_accepted: torch.Tensor
    num_rejected: torch.Tensor
    final_dt: torch.Tensor
    t_reached: torch.Tensor
    converged: torch.Tensor
    failed: torch.Tensor

    @property
    def status(self) -> str:
        """``"converged"`` if every sample reached ``t[-1]``, ``"failed"`` if some sample stopped on NaN/Inf or a
        step size underflow, else ``"max_steps"``."""
        if bool(self.converged.all()):
            return "converged"
        return "failed" if bool(self.failed.any()) else "max_steps"
