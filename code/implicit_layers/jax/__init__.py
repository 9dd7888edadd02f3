"""JAX implicit layers, mirroring ``implicit_layers.torch`` name for name. One subpackage per family
(``fixed_points``: batched fixed-point solvers and their implicit derivatives; ``ode``: batched Runge-Kutta
integration and its three gradients; ``cnf``: continuous normalizing flows on that integrator, with exact and
Hutchinson divergences, RNODE regularizers and flow matching; ``optimization``: layers that solve an optimization
problem, differentiated through its optimality conditions), with every public name also importable from here."""

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
    SolverResult,
    anderson,
    batched_jacobian,
    broyden,
    conv_deq_cell,
    conv_deq_cell_init,
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
from .utils import cache_compilations, compiled_memory_bytes

__all__ = [
    "BACKWARD_SOLVERS",
    "ODE_METHODS",
    "QP_STATUSES",
    "SOLVERS",
    "ConvergenceError",
    "ConvergenceWarning",
    "ODEResult",
    "QPResult",
    "SolverResult",
    "UnsupportedDerivativeError",
    "anderson",
    "batched_jacobian",
    "broyden",
    "cache_compilations",
    "cnf_dynamics",
    "cnf_log_likelihood",
    "cnf_sample",
    "compiled_memory_bytes",
    "conv_deq_cell",
    "conv_deq_cell_init",
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
    "project_simplex",
    "qp",
    "soft_topk",
    "sparsemax",
    "standard_normal_log_prob",
]
