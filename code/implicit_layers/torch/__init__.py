"""PyTorch implicit layers: batched fixed-point solvers and their implicit gradients."""

from ..errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from .anderson import anderson
from .broyden import broyden
from .fixed_point import BACKWARD_SOLVERS, SOLVERS, FixedPointLayer, fixed_point
from .forward_iteration import forward_iteration
from .gmres import gmres
from .newton import batched_jacobian, newton
from .result import SolverResult
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
