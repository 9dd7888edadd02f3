"""PyTorch cases of the ODE benchmark: our ``odeint`` and those of torchdiffeq and torchode, on the same float32
tensors. Every case counts its batched evaluations of the vector field by wrapping it."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from implicit_layers import torch as ours

from ode_problem import PARAMETER_NAMES, Problem
from ode_settings import Case, Outcome, Run, Settings


class CountedMLP(nn.Module):
    """The benchmark's vector field, counting its calls; ``t`` is ignored (the field is autonomous)."""

    def __init__(self, problem: Problem):
        super().__init__()
        for name in PARAMETER_NAMES:
            self.register_parameter(name, nn.Parameter(torch.tensor(problem.params[name], dtype=torch.float32)))
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.tanh(torch.addmm(self.b1, y, self.W1.T))
        h = torch.tanh(torch.addmm(self.b2, h, self.W2.T))
        return torch.addmm(self.b3, h, self.W3.T)

    def grads(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).grad.numpy().copy() for name in PARAMETER_NAMES}


def cases(settings: Settings) -> list[Case]:
    result = [Case("torch", "ours", f"dopri5, {control} steps", mode, partial(_prepare_ours, control, mode))
              for control in ("per_sample", "shared", "shared_rms") for mode in (None, *settings.our_gradients)]
    for library, modes in (("torchdiffeq", ("backprop", "adjoint")), ("torchode", ("backprop",))):
        try:
            __import__(library)
        except Exception as error:  # a broken install fails in many ways; each is reported, not raised
            reason = f"import failed: {type(error).__name__}: {error}"
            result += [Case("torch", library, "dopri5", mode, unavailable=reason) for mode in (None, *modes)]
            continue
        prepare = _prepare_torchdiffeq if library == "torchdiffeq" else _prepare_torchode
        result += [Case("torch", library, "dopri5", mode, partial(prepare, mode)) for mode in (None, *modes)]
    return result


def _inputs(problem: Problem) -> tuple[CountedMLP, torch.Tensor, torch.Tensor]:
    return (CountedMLP(problem), torch.tensor(problem.y0, dtype=torch.float32),
            torch.tensor(problem.c, dtype=torch.float32))


def _run(field: CountedMLP, c: torch.Tensor, solve, gradient: bool) -> Run:
    """``solve()`` returns y(t1); with ``gradient`` the run also backpropagates ``sum(y(t1) * c)``."""

    def call():
        field.calls = 0
        field.zero_grad(set_to_none=True)
        if not gradient:
            with torch.no_grad():
                return solve(), field.calls
        y1 = solve()
        (y1 * c).sum().backward()
        return y1.detach(), field.calls

    def unpack(output) -> Outcome:
        y1, calls = output
        return Outcome(y1.numpy().astype(np.float64), calls, field.grads() if gradient else None)

    return Run(call, unpack)


def _prepare_ours(control: str, mode, problem: Problem, settings: Settings) -> Run:
    field, y0, c = _inputs(problem)
    t = torch.tensor([0.0, problem.t1])
    options = dict(method="dopri5", rtol=settings.rtol, atol=settings.atol, step_control=control, warn=False)
    if mode is not None:
        options["gradient"] = mode  # the adjoint differentiates the module's parameters, f.parameters()
    if mode == "adjoint" and settings.adjoint_tol is not None:
        options.update(adjoint_rtol=settings.adjoint_tol, adjoint_atol=settings.adjoint_tol)
    return _run(field, c, lambda: ours.odeint(field, y0, t, **options)[0][-1], gradient=mode is not None)


def _prepare_torchdiffeq(mode, problem: Problem, settings: Settings) -> Run:
    import torchdiffeq

    field, y0, c = _inputs(problem)
    t = torch.tensor([0.0, problem.t1])
    solver = torchdiffeq.odeint_adjoint if mode == "adjoint" else torchdiffeq.odeint
    options = dict(method="dopri5", rtol=settings.rtol, atol=settings.atol)
    return _run(field, c, lambda: solver(field, y0, t, **options)[-1], gradient=mode is not None)


def _prepare_torchode(mode, problem: Problem, settings: Settings) -> Run:
    import torchode

    field, y0, c = _inputs(problem)
    term = torchode.ODETerm(field)
    controller = torchode.IntegralController(atol=settings.atol, rtol=settings.rtol, term=term)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller)
    t_eval = torch.tensor([0.0, problem.t1]).expand(problem.batch, 2)
    return _run(field, c, lambda: solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval)).ys[:, -1],
                gradient=mode is not None)
