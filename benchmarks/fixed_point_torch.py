"""PyTorch cases: our solvers and torchdeq's, on the same float32 tensors."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from implicit_layers import torch as ours

from fixed_point_problem import Case, Outcome, Problem, Run, Settings, describe

METHODS = ("forward_iteration", "anderson", "broyden", "newton")
TORCHDEQ_SOLVERS = {"forward_iteration": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
"""Our method name -> torchdeq's solver name; torchdeq has no Newton solver."""
TORCHDEQ_BACKWARD_DEFAULTS = {
    "anderson": "; backward with torchdeq's defaults m=6, lam=1e-4",
    "broyden": "; backward with torchdeq's default LBFGS_thres=max_iter",
}
"""torchdeq's DEQ passes only max_iter, tol and stop_mode to its backward solver; the rest stays at its defaults."""


def cases(settings: Settings) -> list[Case]:
    """Our four solvers, then torchdeq's three (or a note of why torchdeq could not be imported)."""
    result = [
        Case("torch", "ours", method, describe(settings.our_options(method)), partial(_prepare_ours, method))
        for method in METHODS
    ]
    try:
        import torchdeq  # noqa: F401  (only whether it imports matters here)
    except Exception as error:  # a broken install fails in many ways; every one of them is reported
        reason = f"import failed: {type(error).__name__}: {error}"
        return result + [Case("torch", "torchdeq", m, "", unavailable=reason) for m in TORCHDEQ_SOLVERS]
    for method in TORCHDEQ_SOLVERS:
        backward = TORCHDEQ_BACKWARD_DEFAULTS.get(method, "")
        text = describe(_torchdeq_options(method, settings), "stop_mode=abs") + backward
        result.append(Case("torch", "torchdeq", method, text, partial(_prepare_torchdeq, method)))
    return result


def _tensors(problem: Problem) -> tuple[torch.Tensor, ...]:
    """W, x, c and the initial guess as float32 tensors (copies: a run may set ``requires_grad``)."""
    return tuple(torch.tensor(a) for a in (problem.W, problem.x, problem.c, problem.z0))


def _tanh_layer(W: torch.Tensor, x: torch.Tensor):
    return lambda z: torch.tanh(z @ W.T + x)


def _prepare_ours(method: str, problem: Problem, settings: Settings, task: str) -> Run:
    """Our solver alone (``forward``), or ``fixed_point(..., backward="implicit")`` and ``autograd.grad``
    (``gradient``), whose adjoint solve uses the same method, options and iteration limit."""
    W, x, c, z0 = _tensors(problem)
    options = settings.our_options(method)
    # warn=False: like the peers (optimistix runs with throw=False), no convergence check after the solve;
    # the table's residual column is the check.
    limits = {"tol": settings.tol, "max_iter": settings.iterations(method), "warn": False}
    if task == "forward":
        solver, f = getattr(ours, method), _tanh_layer(W, x)

        def solve():
            with torch.no_grad():
                return solver(f, z0, **options, **limits)

        return Run(solve, lambda out: Outcome(out[0].numpy(), int(out[1].num_steps)))

    W.requires_grad_()
    x.requires_grad_()

    def solve_and_differentiate():
        z, result = ours.fixed_point(
            _tanh_layer(W, x),
            z0,
            solver=method,
            backward="implicit",
            backward_tol=settings.backward_rtol,
            backward_max_iter=limits["max_iter"],
            solver_options=options,
            backward_solver_options=options,
            **limits,
        )
        return z.detach(), result, torch.autograd.grad((z * c).sum(), (W, x))

    return Run(solve_and_differentiate, lambda out: _outcome(out[0], int(out[1].num_steps), out[2]))


def _torchdeq_options(method: str, settings: Settings) -> dict:
    if method == "anderson":
        return {"m": settings.anderson_m, "lam": settings.peer_anderson_ridge}
    if method == "broyden":
        # By default torchdeq keeps every update (LBFGS_thres = max_iter); this caps it at our memory.
        return {"LBFGS_thres": settings.broyden_m}
    return {}


def _prepare_torchdeq(method: str, problem: Problem, settings: Settings, task: str) -> Run:
    """torchdeq's solver function (``forward``), or its DEQ module with exact IFT backward (``gradient``).

    torchdeq stops once the largest per-sample ``||f(z) - z||_2`` in the batch is below ``tol``
    (``stop_mode="abs"``), which guarantees every sample what our per-sample test does. Its backward tolerance
    is absolute, so ours (relative to ``||c_b||``) becomes ``backward_rtol * min_b ||c_b||``.
    """
    from torchdeq import get_deq
    from torchdeq.solver import get_solver

    W, x, c, z0 = _tensors(problem)
    name, options, max_iter = TORCHDEQ_SOLVERS[method], _torchdeq_options(method, settings), settings.iterations(method)
    if task == "forward":
        solver, f = get_solver(name), _tanh_layer(W, x)

        def solve():
            with torch.no_grad():
                return solver(f, z0, max_iter=max_iter, tol=settings.tol, stop_mode="abs", **options)

        return Run(solve, lambda out: Outcome(out[0].numpy(), _torchdeq_steps(out[2])))

    W.requires_grad_()
    x.requires_grad_()
    deq = get_deq(
        core="indexing",
        ift=True,
        f_solver=name,
        b_solver=name,
        f_max_iter=max_iter,
        b_max_iter=max_iter,
        f_tol=settings.tol,
        b_tol=settings.backward_rtol * float(np.linalg.norm(problem.c, axis=1).min()),
        f_stop_mode="abs",
        b_stop_mode="abs",
    )  # a new module is in training mode, which is where torchdeq attaches the IFT backward

    def solve_and_differentiate():
        states, info = deq(_tanh_layer(W, x), z0, solver_kwargs=options)
        z = states[-1]
        return z.detach(), info, torch.autograd.grad((z * c).sum(), (W, x))

    return Run(solve_and_differentiate, lambda out: _outcome(out[0], _torchdeq_steps(out[1]), out[2]))


def _torchdeq_steps(info: dict) -> int:
    """torchdeq records, per sample, the step of its lowest residual: the solution it returns."""
    return int(info["nstep"].max())


def _outcome(z: torch.Tensor, steps: int, grads: tuple[torch.Tensor, torch.Tensor]) -> Outcome:
    return Outcome(z.numpy(), steps, tuple(g.numpy() for g in grads))
