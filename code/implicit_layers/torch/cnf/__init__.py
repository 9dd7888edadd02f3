"""Continuous normalizing flows in PyTorch: the divergence of a vector field (exact, or Hutchinson's estimate),
the regularizers of RNODE, the augmented dynamics solved by ``odeint`` for log-likelihoods and samples, and the
conditional flow-matching loss that trains the same field without a solver."""

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
