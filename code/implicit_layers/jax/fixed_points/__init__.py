"""Fixed points in JAX: the batched solvers (one module each), their shared loop and result record, and
``fixed_point``, which makes a solution differentiable by the implicit function theorem. The twin of
``implicit_layers.torch.fixed_points``."""

from .anderson import anderson
from .broyden import broyden
from .conv_cell import conv_deq_cell, conv_deq_cell_init
from .fixed_point import BACKWARD_SOLVERS, SOLVERS, fixed_point
from .forward_iteration import forward_iteration
from .gmres import gmres
from .jacobian_estimates import jacobian_frobenius_estimate, jacobian_spectral_norm
from .monotone import monotone_step_size, monotone_weight
from .newton import batched_jacobian, newton
from .result import SolverResult

__all__ = [
    "BACKWARD_SOLVERS",
    "SOLVERS",
    "SolverResult",
    "anderson",
    "batched_jacobian",
    "broyden",
    "conv_deq_cell",
    "conv_deq_cell_init",
    "fixed_point",
    "forward_iteration",
    "gmres",
    "jacobian_frobenius_estimate",
    "jacobian_spectral_norm",
    "monotone_step_size",
    "monotone_weight",
    "newton",
]
