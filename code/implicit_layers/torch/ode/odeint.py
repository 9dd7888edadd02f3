"""``odeint``: batched explicit Runge-Kutta integration with three ways to differentiate the solution."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from ..._checks import check_odeint_options, check_time_grid
from ..._tableaus import ODE_METHODS
from ...errors import report_ode_convergence
from .._validation import check_batched_state
from ._loop import integrate
from .adjoint import adjoint_integrate
from .backprop import backprop_integrate
from .checkpoint import checkpointed_step
from .result import ODEResult


def odeint(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: Any,
    *,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    dt: Optional[float] = None,
    num_steps: Optional[int] = None,
    first_step: Optional[float] = None,
    step_control: str = "per_sample",
    max_steps: int = 10_000,
    gradient: str = "backprop",
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    params: Optional[Iterable[torch.Tensor]] = None,
    strict: bool = False,
    warn: bool = True,
) -> tuple[torch.Tensor, ODEResult]:
    """Solve ``y' = f(t, y)`` from ``y(t[0]) = y0`` for a batch of samples, returning ``y`` at every time of ``t``.

    Parameters
    ----------
    f : callable
        ``f(t, y)`` with ``t`` of shape (B,) (each sample keeps its own clock) and ``y`` of shape (B, ...),
        returning a tensor of ``y``'s shape and dtype. It closes over its parameters, and each sample's output
        must depend on that sample alone.
    y0 : torch.Tensor
        Initial states, shape (B, ...), floating point, finite.
    t : torch.Tensor or list of float
        Output times shared by the batch, 1-D, strictly increasing or strictly decreasing, at least two;
        ``t[0]`` is the initial time. No gradient flows to ``t``.
    method : str
        A name in ``ODE_METHODS``: fixed-step ``"euler"``, ``"midpoint"``, ``"rk4"`` or adaptive ``"bosh3"``,
        ``"dopri5"``, ``"tsit5"``.
    rtol, atol : float
        Tolerances of adaptive methods: a step is accepted when the RMS over a sample's entries of
        ``error / (atol + rtol * max(|y0|, |y1|))`` is at most one.
    dt, num_steps : float or int, optional
        Exactly one of them for a fixed-step method: the step size, or the number of uniform steps from ``t[0]``
        to ``t[-1]``. Adaptive methods take neither.
    first_step : float, optional
        The initial step of an adaptive method; by default Hairer-Norsett-Wanner's estimate, per sample.
    step_control : str
        ``"per_sample"``: each sample its own step size and acceptance; ``"shared"``: one step size for the batch,
        set by the largest error ratio among running samples; ``"shared_rms"``: one step size for the batch, set by
        the root mean square of the running samples' error ratios, which is the error norm of the batch taken as
        one state (torchdiffeq's rule, and diffrax's for a batched state). Under both shared controls one sample
        whose state becomes NaN/Inf shrinks the step of all, and with a step size underflow they all fail; under
        ``"shared_rms"`` a sample's error may exceed the tolerance when its batch-mates are well within it.
        Per-sample steps make each sample's solution independent of its batch-mates, which is why they are the
        default; the batch still steps, and evaluates every sample, until its slowest sample is done, so they save
        arithmetic rather than time. On the ODE benchmark's neural ODE the shared controls reach a given
        worst-sample error in less time (its tolerance sweep measures all three).
    max_steps : int
        Steps (accepted and rejected) each sample may attempt.
    gradient : str
        ``"backprop"``: autograd through every operation of the solver; ``"checkpoint"``: the same gradient,
        each step recomputed in the backward pass instead of stored; ``"adjoint"``: the continuous adjoint,
        the augmented system solved backwards from ``t[-1]``, restarted at each output time, in memory
        independent of the number of steps. Step sizes carry no gradient in any mode.
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the adjoint's backward solve; default ``rtol`` and ``atol``.
    params : iterable of torch.Tensor, optional
        The tensors ``gradient="adjoint"`` differentiates besides ``y0``; default ``f.parameters()`` when ``f``
        is an ``nn.Module``. A tensor that ``f`` uses and that requires grad but is not among them is refused
        (it would get no gradient).
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` if some sample does not reach ``t[-1]``.
    warn : bool
        Warn (:class:`~implicit_layers.errors.ConvergenceWarning`) if some sample does not reach ``t[-1]``.

    Returns
    -------
    ys : torch.Tensor
        Shape (len(t), B, ...), ``ys[0] == y0``; times that a sample did not reach are NaN.
    result : ODEResult
        Per-sample step counts, evaluations, time reached and flags.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, named with its value: see ``check_odeint_options`` and ``check_time_grid``.
    ConvergenceError
        With ``strict=True``, if some sample ran out of ``max_steps`` or failed.
    """
    options = check_odeint_options(
        ODE_METHODS,
        method=method,
        rtol=rtol,
        atol=atol,
        dt=dt,
        num_steps=num_steps,
        first_step=first_step,
        step_control=step_control,
        max_steps=max_steps,
        gradient=gradient,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        strict=strict,
        warn=warn,
    )
    check_batched_state("y0", y0)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=y0.dtype)
    times = t.detach().to(device=y0.device, dtype=y0.dtype)
    direction = check_time_grid("t", times.cpu().tolist())
    if gradient == "adjoint":
        params = _adjoint_params(f, params)
    elif params is not None:
        raise ValueError(
            f"params= lists the tensors that gradient='adjoint' differentiates; gradient={gradient!r} "
            "differentiates whatever f uses: drop params or pass gradient='adjoint'"
        )

    # A decreasing grid is integrated forwards in s = -t, where the field is -f(-s, y).
    field = f if direction > 0 else (lambda s, y: -f(-s, y))
    settings = dict(
        tableau=ODE_METHODS[method],
        rtol=options["rtol"],
        atol=options["atol"],
        dt=options["dt"],
        num_steps=options["num_steps"],
        first_step=options["first_step"],
        step_control=step_control,
        max_steps=options["max_steps"],
    )
    grid = direction * times
    if gradient == "adjoint":
        ys, result = adjoint_integrate(
            field,
            y0,
            grid,
            params,
            direction=direction,
            adjoint_rtol=options["adjoint_rtol"],
            adjoint_atol=options["adjoint_atol"],
            strict=strict,
            warn=warn,
            **settings,
        )
    elif gradient == "checkpoint":
        ys, result = integrate(field, y0, grid, step=checkpointed_step, **settings)
    else:
        ys, result = backprop_integrate(field, y0, grid, **settings)
    result = result._replace(t_reached=direction * result.t_reached, final_dt=direction * result.final_dt)
    if warn or strict:
        report_ode_convergence(
            method,
            *(value.cpu().numpy() for value in (result.converged, result.failed, result.t_reached, result.final_dt)),
            t_start=float(times[0]),
            max_steps=options["max_steps"],
            strict=strict,
            stacklevel=2,
        )
    return ys, result


def _adjoint_params(f, params) -> tuple:
    """The tensors the adjoint differentiates: ``params`` as given, else an ``nn.Module``'s parameters."""
    if params is None:
        if not isinstance(f, torch.nn.Module):
            raise ValueError(
                "gradient='adjoint' needs to know which tensors f depends on: pass params=[...] (the tensors to "
                "differentiate, such as a module's parameters()), or make f an nn.Module"
            )
        params = f.parameters()
    params = tuple(params)
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor) or not param.is_floating_point():
            raise TypeError(f"params[{index}] must be a floating-point torch.Tensor, got {param!r}")
    return tuple(param for param in params if param.requires_grad)
