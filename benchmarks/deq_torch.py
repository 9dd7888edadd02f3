"""PyTorch cases: the training step with our ``fixed_point`` and with torchdeq's DEQ, on the same float32
parameters and batch."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from implicit_layers import torch as ours

from deq_problem import PARAMETERS, Case, DEQClassifierParts, Outcome, Problem, Run, Settings


def cases(settings: Settings) -> list[Case]:
    """Ours, then torchdeq (or a note of why it could not be imported)."""
    options = f"m={settings.anderson_m}, ridge={settings.anderson_ridge:g} (relative), forward and backward"
    result = [Case("torch", "ours", "anderson", options, _prepare_ours)]
    try:
        import torchdeq  # noqa: F401  (only whether it imports matters here)
    except Exception as error:  # a broken install fails in many ways; every one of them is reported
        return result + [Case("torch", "torchdeq", "anderson", "", unavailable=f"import failed: {error}")]
    backward_tol = "backward tol = backward_rtol * min_b ||dL/dz*_b||"
    defaults = (
        f"get_deq(ift=True), stop_mode=abs; forward m={settings.anderson_m}, lam={settings.anderson_ridge:g}; "
        "backward at its defaults m=6, lam=1e-4 (its DEQ passes the backward solver only max_iter, tol and stop_mode)"
    )
    scaled = (
        f"get_deq(ift=True), stop_mode=abs, m={settings.anderson_m}; lam = tol^2 forward ({settings.tol**2:g}) and "
        f"({backward_tol})^2 backward, through a solver registered with torchdeq.solver.register_solver"
    )
    return result + [
        Case("torch", "torchdeq", "anderson", defaults, partial(_prepare_torchdeq, scaled_ridge=False)),
        Case("torch", "torchdeq, lam = tol^2", "anderson", scaled, partial(_prepare_torchdeq, scaled_ridge=True)),
    ]


def _setup(problem: Problem, settings: Settings):
    """A fresh float32 model with the problem's parameters, the batch as tensors, and the loss of a state."""
    parts = DEQClassifierParts(settings).load(problem.params)
    images, labels = torch.from_numpy(problem.images), torch.from_numpy(problem.labels)
    z0 = torch.from_numpy(problem.z0)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(parts.logits(z), labels)

    return parts, images, z0, loss_of


def _gradients(parts: DEQClassifierParts, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = dict(parts.named_parameters())
    return dict(zip(PARAMETERS, torch.autograd.grad(loss, [named[name] for name in PARAMETERS.values()])))


def _unpack(out) -> Outcome:
    z, grads, forward_steps, backward_steps = out
    return Outcome(z.numpy(), {k: g.numpy() for k, g in grads.items()}, forward_steps, backward_steps)


def _prepare_ours(problem: Problem, settings: Settings) -> Run:
    """``fixed_point(solver="anderson", backward="implicit")``: the adjoint solve by Anderson with the same
    options, to ``backward_rtol`` relative to each sample's ``||dL/dz*||``."""
    parts, images, z0, loss_of = _setup(problem, settings)
    options = {"m": settings.anderson_m, "ridge": settings.anderson_ridge}
    backward_steps = []

    def step():
        x = parts.stem(images)
        z, result = ours.fixed_point(
            lambda z: parts.cell(z, x),
            z0,
            solver="anderson",
            backward="implicit",
            tol=settings.tol,
            max_iter=settings.max_iter,
            backward_tol=settings.backward_rtol,
            backward_max_iter=settings.backward_max_iter,
            solver_options=options,
            backward_solver_options=options,
            backward_callback=lambda record: backward_steps.append(int(record.num_steps)),
            # Like the peers, no convergence check after the solve: the table's residual column is the check.
            warn=False,
        )
        grads = _gradients(parts, loss_of(z))
        return z.detach(), grads, int(result.num_steps), backward_steps[-1]

    return Run(step, _unpack)


def _prepare_torchdeq(problem: Problem, settings: Settings, scaled_ridge: bool) -> Run:
    """torchdeq's DEQ with its Anderson solver forward and backward and the exact IFT backward (``ift=True``).

    It stops once the largest per-sample ``||f(z) - z||_2`` is below ``tol`` (``stop_mode="abs"``), our per-sample
    test. Its backward tolerance is absolute, so ours (relative to each ``||dL/dz*_b||``) becomes
    ``backward_rtol * min_b ||dL/dz*_b||`` at the reference: no sample gets a looser test than ours.

    Its ridge ``lam`` is absolute: near the tolerance the squared residuals in its Gram matrix fall below it, and
    Anderson slows to an averaged plain iteration. With ``scaled_ridge`` it is the squared tolerance instead, for
    the backward solve too (the DEQ cannot pass the backward solver a ``lam``, so a solver with that default is
    registered under a name of its own).
    """
    from torchdeq import get_deq
    from torchdeq.solver import register_solver
    from torchdeq.solver.anderson import anderson_solver

    parts, images, z0, loss_of = _setup(problem, settings)
    backward_tol = settings.backward_rtol * float(problem.incoming_grad_norms.min())
    forward_lam = settings.tol**2 if scaled_ridge else settings.anderson_ridge
    backward_solver = "anderson"
    if scaled_ridge:
        backward_solver = "anderson_with_lam_backward_tol_squared"
        register_solver(backward_solver, partial(anderson_solver, m=settings.anderson_m, lam=backward_tol**2))
    deq = get_deq(
        core="indexing",
        ift=True,
        f_solver="anderson",
        b_solver=backward_solver,
        f_max_iter=settings.max_iter,
        b_max_iter=settings.backward_max_iter,
        f_tol=settings.tol,
        b_tol=backward_tol,
        f_stop_mode="abs",
        b_stop_mode="abs",
    )  # a new module is in training mode, which is where torchdeq attaches the IFT backward
    solver_kwargs = {"m": settings.anderson_m, "lam": forward_lam}
    backward_steps = []

    def step():
        x = parts.stem(images)
        states, info = deq(
            lambda z: parts.cell(z, x),
            z0,
            solver_kwargs=solver_kwargs,
            backward_writer=lambda record: backward_steps.append(int(record["nstep"].max())),
        )
        z = states[-1]
        grads = _gradients(parts, loss_of(z))
        # torchdeq records, per sample, the step of its lowest residual: the solution it returns.
        return z.detach(), grads, int(info["nstep"].max()), backward_steps[-1]

    return Run(step, _unpack)
