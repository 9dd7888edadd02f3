"""PyTorch implicit layers. One subpackage per family (``fixed_points``: batched fixed-point solvers and their
implicit gradients; ``ode``: batched ODE integration; ``cnf``: continuous normalizing flows on that integrator,
with exact and Hutchinson divergences, RNODE regularizers and flow matching; ``optimization``: layers that solve an
optimization problem, differentiated through its optimality conditions), with every public name also importable
from here."""

from ..errors import ConvergenceError, ConvergenceWarning, UnsupportedDerivativeError
from .cnf import (
    cnf_dynamics,
    cnf_log_likelihood,
    cnf_sample,
    divergence,
    flow_matching_loss,
    flow_matching_path,
    hutchinson_probe,
    kinetic_energy,
    standard_normal_log_prob,
)
from .fixed_points import (
    BACKWARD_SOLVERS,
    SOLVERS,
    ConvDEQCell,
    FixedPointLayer,
    SolverResult,
    anderson,
    batched_jacobian,
    broyden,
    fixed_point,
    forward_iteration,
    gmres,
    jacobian_frobenius_estimate,
    jacobian_spectral_norm,
    monotone_step_size,
    monotone_weight,
    newton,
)
from .ode import ODE_METHODS, ODEResult, odeint
from .optimization import QP_STATUSES, QPResult, project_simplex, qp, soft_topk, sparsemax
from .utils import autograd_graph_bytes, default_device, peak_memory_bytes, seed_everything

__all__ = [
    "BACKWARD_SOLVERS",
    "ODE_METHODS",
    "QP_STATUSES",
    "SOLVERS",
    "ConvDEQCell",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointLayer",
    "ODEResult",
    "QPResult",
    "SolverResult",
    "UnsupportedDerivativeError",
    "anderson",
    "autograd_graph_bytes",
    "batched_jacobian",
    "broyden",
    "cnf_dynamics",
    "cnf_log_likelihood",
    "cnf_sample",
    "default_device",
    "divergence",
    "fixed_point",
    "flow_matching_loss",
    "flow_matching_path",
    "forward_iteration",
    "gmres",
    "hutchinson_probe",
    "jacobian_frobenius_estimate",
    "jacobian_spectral_norm",
    "kinetic_energy",
    "monotone_step_size",
    "monotone_weight",
    "newton",
    "odeint",
    "peak_memory_bytes",
    "project_simplex",
    "qp",
    "seed_everything",
    "soft_topk",
    "sparsemax",
    "standard_normal_log_prob",
]
