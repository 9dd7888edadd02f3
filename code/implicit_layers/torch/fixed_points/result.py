"""The record every torch solver returns beside its solution."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SolverResult:
    """What a batched solver did, per sample.

    Attributes
    ----------
    iterations : torch.Tensor
        Steps taken by each sample, shape (B,), int64. A sample stops as soon as it meets the tolerance.
    residuals : torch.Tensor
        Residual trace, shape (T + 1, B), float32 for 16-bit states: row 0 at the initial guess, row k after k
        steps of the loop. Every row comes from evaluating ``f`` on the whole batch as it stood, stopped samples
        included, so the last row is each sample's true final residual.
    converged : torch.Tensor
        Whether each sample's final residual is below the tolerance, shape (B,), bool.
    failed : torch.Tensor
        Whether a sample stopped because a step produced NaN or Inf or a linear solve was singular, shape (B,).
    nfe : int
        Number of batched evaluations of the map.
    """

    iterations: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    failed: torch.Tensor
    nfe: int

    @property
    def residual(self) -> torch.Tensor:
        """Final residual of each sample, shape (B,)."""
        return self.residuals[-1]

    @property
    def num_steps(self) -> int:
        """Number of loop steps run for the batch (the most steps any sample took)."""
        return self.residuals.shape[0] - 1

    @property
    def status(self) -> str:
        """``"converged"`` if every sample met the tolerance, ``"diverged"`` if some step failed, else
        ``"max_iter"``."""
        if bool(self.converged.all()):
            return "converged"
        return "diverged" if bool(self.failed.any()) else "max_iter"
