"""The record ``qp`` returns beside its solution."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._checks import QP_STATUSES


class QPResult(NamedTuple):
    """What the batched QP solver found, per sample.

    Attributes
    ----------
    lam : torch.Tensor
        Multipliers of the inequalities ``G x <= h``, shape (B, m), nonnegative. For a primal infeasible sample,
        the certificate instead: ``lam >= 0`` and ``nu`` with ``G' lam + A' nu = 0`` and ``h' lam + b' nu < 0``,
        scaled to unit infinity norm.
    nu : torch.Tensor
        Multipliers of the equalities ``A x = b``, shape (B, e).
    slack : torch.Tensor
        ``h - G x`` at the solution, shape (B, m).
    iterations : torch.Tensor
        Interior-point iterations of each sample, shape (B,), int64.
    primal_residual : torch.Tensor
        The infinity norm of the primal residual reached by each sample, the larger of those of ``G x + slack - h``
        and ``A x - b``, shape (B,). NaN for an infeasible sample.
    dual_residual : torch.Tensor
        The infinity norm of ``Q x + p + G' lam + A' nu`` reached by each sample, shape (B,). NaN for an
        infeasible sample.
    gap : torch.Tensor
        The duality gap reached by each sample, the absolute difference of the primal and dual objectives, shape
        (B,). NaN for an infeasible sample.
    status_code : torch.Tensor
        Index of each sample's status in ``QP_STATUSES``, shape (B,), int64.
    nfe : int
        Factorizations of the Newton matrix made for the batch (one per iteration, plus the start).
    """

    lam: torch.Tensor
    nu: torch.Tensor
    slack: torch.Tensor
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    gap: torch.Tensor
    status_code: torch.Tensor
    nfe: int

    @property
    def status(self) -> tuple[str, ...]:
        """The status of each sample, one of ``"solved"``, ``"max_iter"``, ``"primal_infeasible"``,
        ``"dual_infeasible"`` (the QP is unbounded below) or ``"failed"`` (a step gave NaN/Inf or a singular system)."""
        return tuple(QP_STATUSES[code] for code in self.status_code.tolist())

    @property
    def converged(self) -> torch.Tensor:
        """Whether each sample was solved to the tolerance, shape (B,), bool."""
        return self.status_code == QP_STATUSES.index("solved")
