"""ODEs in JAX: ``odeint``, batched explicit Runge-Kutta integration with per-sample clocks on the device, dense
output and three gradient modes (backpropagation, checkpointing, the continuous adjoint), and its result record."""

from ..._tableaus import ODE_METHODS
from .odeint import odeint
from .result import ODEResult

__all__ = ["ODE_METHODS", "ODEResult", "odeint"]
