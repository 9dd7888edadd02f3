"""The record ``qp`` returns beside its solution (a pytree, so it passes through ``jit``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ..._checks import QP_STATUSES


class QPResult(NamedTuple):
    """What the batched QP solver found, per sample; the JAX twin of the torch record.

    Attributes
    ----------
    lam : jax.Array
        Multipliers of the inequalities ``G x <= h``, shape (B, m), nonnegative. For a primal infeasible sample,
        the certificate instead: ``lam >= 0`` and ``nu`` with ``G' lam + A' nu = 0`` and ``h' lam + b' nu < 0``,
        scaled to unit infinity norm.
    nu : jax.Array
        Multipliers of the equalities ``A x = b``, shape (B, e).
    slack : jax.Array
        ``h - G x`` at the solution, shape (B, m).
    iterations : jax.Array
        Interior-point iterations of each sample, shape (B,), integer.
    primal_residual : jax.Array
        The infinity norm of the primal residual reached by each sample, the larger of those of ``G x + slack - h``
        and ``A x - b``, shape (B,). NaN for an infeasible sample.
    dual_residual : jax.Array
        The infinity norm of ``Q x + p + G' lam + A' nu`` reached by each sample, shape (B,). NaN for an
        infeasible sample.
    gap : jax.Array
        The duality gap reached by each sample, the absolute difference of the primal and dual objectives, shape
        (B,). NaN for an infeasible sample.
    status_code : jax.Array
        Index of each sample's status in ``QP_STATUSES``, shape (B,), integer.
    nfe : jax.Array
        Factorizations of the Newton matrix made for the batch (one per iteration, plus the start), a scalar
        integer array (an ``int`` in torch; here it is computed on the device).

    Notes
    -----
    None of the fields carries a gradient. Like the torch record, computed without autograd, each is a constant
    to ``grad``; only the solution ``x`` is differentiable.
    """

    lam: jax.Array
    nu: jax.Array
    slack: jax.Array
    iterations: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    gap: jax.Array
    status_code: jax.Array
    nfe: jax.Array

    @property
    def status(self) -> tuple[str, ...]:
        """The status of each sample, one of ``"solved"``, ``"max_iter"``, ``"primal_infeasible"``,
        ``"dual_infeasible"`` (the QP is unbounded below) or ``"failed"`` (a step gave NaN/Inf or a singular system). Needs concrete
        values (read it outside ``jit``)."""
        return tuple(QP_STATUSES[code] for code in np.asarray(self.status_code).tolist())

    @property
    def converged(self) -> jax.Array:
        """Whether each sample was solved to the tolerance, shape (B,), bool."""
        return self.status_code == QP_STATUSES.index("solved")
