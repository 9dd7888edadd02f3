"""JAX implicit layers: batched fixed-point solvers and their implicit derivatives, mirroring
``implicit_layers.torch`` name for name."""

from ..errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from .anderson import anderson
from .broyden import broyden
from .fixed_point import BACKWARD_SOLVERS, SOLVERS, fixed_point
from .forward_iteration import forward_iteration
from .gmres import gmres
from .newton import batched_jacobian, newton
from .result import SolverResult
from .utils import cache_compilations, compiled_memory_bytes

__all__ = [
    "BACKWARD_SOLVERS",
    "SOLVERS",
    "ConvergenceError",
    "ConvergenceWarning",
    "SolverResult",
    "UnsupportedDerivativeError",
    "anderson",
    "batched_jacobian",
    "broyden",
    "cache_compilations",
    "compiled_memory_bytes",
    "fixed_point",
    "forward_iteration",
    "gmres",
    "newton",
]
