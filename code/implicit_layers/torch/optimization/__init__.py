"""Optimization layers in PyTorch: layers whose output is the solution of an optimization problem, differentiated
implicitly through its optimality conditions. Here so far: the exact Euclidean projections onto the simplex and
the capped simplex (``project_simplex``, ``sparsemax``, ``soft_topk``); the batched QP solver joins them."""

from .projections import project_simplex, soft_topk, sparsemax

__all__ = ["project_simplex", "soft_topk", "sparsemax"]
