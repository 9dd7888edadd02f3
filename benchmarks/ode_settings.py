"""What every case of the ODE benchmark shares: the settings, and the records of a case, a run and its outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ode_problem import Problem


@dataclass(frozen=True)
class Settings:
    """The issue's benchmark: dopri5 at rtol = atol = 1e-5 in float32; our three gradient modes."""

    rtol: float = 1e-5
    atol: float = 1e-5
    our_gradients: tuple[str, ...] = ("backprop", "checkpoint", "adjoint")
    adjoint_tol: Optional[float] = None  # our adjoint's adjoint_rtol = adjoint_atol; None: the forward tolerances


@dataclass(frozen=True)
class Outcome:
    """What one run returned, as NumPy arrays."""

    y1: np.ndarray  # (B, 2), the state at t1
    nfe: Optional[int]  # batched evaluations of the vector field, forward and backward
    grads: Optional[dict[str, np.ndarray]] = None  # dL/dparams for a gradient case


@dataclass(frozen=True)
class Run:
    """``call()`` is timed and returns only once the work is done (JAX results are blocked on); ``unpack`` turns
    its output into an :class:`Outcome`, outside the timing."""

    call: Callable[[], Any]
    unpack: Callable[[Any], Outcome]


@dataclass(frozen=True)
class Case:
    """One library's solver in one gradient mode (``None``: the forward solve alone). ``prepare(problem, settings)``
    builds a :class:`Run`; ``unavailable`` says why a peer that failed to import has no runs."""

    framework: str
    library: str
    method: str
    gradient: Optional[str]
    prepare: Optional[Callable[[Problem, Settings], Run]] = None
    unavailable: Optional[str] = None
