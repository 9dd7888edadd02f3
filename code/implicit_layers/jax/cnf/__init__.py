"""Continuous normalizing flows in JAX: the divergence of a field (exact, or Hutchinson's estimator), the RNODE
regularizers, the augmented dynamics that ``odeint`` integrates for log-likelihoods and samples, and conditional
flow matching, which trains the same fields without a solver."""

from .divergence import divergence, hutchinson_probe
from .flow import cnf_dynamics, cnf_log_likelihood, cnf_sample, standard_normal_log_prob
from .flow_matching import flow_matching_loss, flow_matching_path
from .regularizers import kinetic_energy

__all__ = [
    "cnf_dynamics",
    "cnf_log_likelihood",
    "cnf_sample",
    "divergence",
    "flow_matching_loss",
    "flow_matching_path",
    "hutchinson_probe",
    "kinetic_energy",
    "standard_normal_log_prob",
]
