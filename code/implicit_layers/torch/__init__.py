"""PyTorch implicit layers. One subpackage per family (``fixed_points``: batched fixed-point solvers and their
implicit gradients), with every public name also importable from here."""

from ..errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from .fixed_points import (
    BACKWARD_SOLVERS,
    SOLVERS,
    FixedPointLayer,
    SolverResult,
    anderson,
    batched_jacobian,
    broyden,
    fixed_point,
    forward_iteration,
    gmres,
    newton,
)
from .utils import autograd_graph_bytes, default_device, peak_memory_bytes, seed_everything

__all__ = [
    "BACKWARD_SOLVERS",
    "SOLVERS",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointLayer",
    "SolverResult",
    "UnsupportedDerivativeError",
    "anderson",
    "autograd_graph_bytes",
    "batched_jacobian",
    "broyden",
    "default_device",
    "fixed_point",
    "forward_iteration",
    "gmres",
    "newton",
    "peak_memory_bytes",
    "seed_everything",
]
