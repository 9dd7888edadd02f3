"""Optimization layers in PyTorch: layers whose output is the solution of an optimization problem, differentiated
implicitly through its optimality conditions. ``qp`` solves a batch of convex
quadratic programs by an interior-point method and differentiates them through their KKT conditions;
``project_simplex``, ``sparsemax`` and ``soft_topk`` are the exact Euclidean projections onto the simplex and the
capped simplex."""

from ..._checks import QP_STATUSES
from .projections import project_simplex, soft_topk, sparsemax
from .qp import qp
from .result import QPResult

__all__ = ["QPResult", "QP_STATUSES", "project_simplex", "qp", "soft_topk", "sparsemax"]
