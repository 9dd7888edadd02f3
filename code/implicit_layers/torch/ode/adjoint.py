"""gradient="adjoint": the continuous adjoint method, whose memory does not grow with the number of steps."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...errors import report_ode_convergence
from ._loop import integrate


def adjoint_integrate(field, y0, grid, params, *, direction, adjoint_rtol, adjoint_atol, strict, warn, **settings):
    """Integrate as ``integrate`` does, without recording the steps; the backward pass solves the adjoint system.

    For a loss ``L`` of the outputs, ``a(t) = dL/dy(t)`` and ``g = dL/dparams`` solve, from ``t[-1]`` back to
    ``t[0]``, ``y' = f``, ``a' = -a^T df/dy``, ``g' = -a^T df/dparams``, with ``a`` jumping by ``dL/dys[j]`` at
    each output time. Each interval between output times is solved afresh from the stored ``ys[j]`` (as
    torchdiffeq does), so the backward trajectory of ``y`` does not drift from the forward one. The gradient is
    that of the exact solution, within the adjoint tolerances of the discrete solver's.

    ``(y, a)`` is the integrated state, per sample, and its error alone steers the steps. ``g`` has no batch
    axis, so it is not part of that state: each accepted step adds its quadrature of ``a^T df/dparams`` at the
    step's stages, weighted by ``b`` and each sample's own step size, in one vector-Jacobian product through
    the stages' evaluations of ``f`` (torchdiffeq's "seminorm" choice of excluding ``g`` from error control).

    ``field`` and ``grid`` are in the increasing time ``odeint`` integrates in; ``direction`` (+1 or -1) turns
    times back into the caller's for the backward solve's warnings.
    """
    if torch.is_grad_enabled():
        check_params_cover_field(field, y0, grid[0], params)
    record = []
    ys = _Adjoint.apply(
        dict(field=field, settings=settings, rtol=adjoint_rtol, atol=adjoint_atol, strict=strict, warn=warn,
             direction=direction, record=record),
        grid,
        y0,
        *params,
    )
    return ys, record[0]


def check_params_cover_field(field, y0, t0, params) -> None:
    """Raise if ``f`` reaches a tensor that requires grad other than through ``params``.

    The adjoint returns gradients for ``y0`` and ``params`` only, so such a tensor would silently get none. One
    evaluation of ``f`` at ``(t0, y0)`` under autograd is traced back from its output: the walk stops at
    ``params`` (leaves, or intermediate tensors, whose own history autograd then follows) and fails at any
    other leaf that requires grad.
    """
    y = y0.detach().requires_grad_(True)
    # Only the graph's structure is read, and the probe is freed on return, so its saved tensors are hidden from
    # any outer hooks (autograd_graph_bytes would count them as held). They are still saved, not dropped: a
    # field may differentiate inside itself (a CNF's Hutchinson divergence does) and needs them at once.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
        value = field(t0.expand(y0.shape[0]), y)
    covered_leaves = {id(param) for param in params if param.is_leaf} | {id(y)}
    covered_nodes = {param.grad_fn for param in params if not param.is_leaf}
    pending, seen, missed = [value.grad_fn], set(), []
    while pending:
        node = pending.pop()
        if node is None or node in seen or node in covered_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in covered_leaves:
            missed.append(variable)
        pending.extend(next_node for next_node, _ in node.next_functions)
    if missed:
        shapes = ", ".join(str(tuple(tensor.shape)) for tensor in missed)
        raise ValueError(
            f"f uses {len(missed)} tensor(s) that require grad but are not in params (shapes {shapes}); "
            "gradient='adjoint' would give them no gradient: add them to params=[...], or use "
            "gradient='backprop' or 'checkpoint'"
        )


class _AugmentedField:
    """The adjoint system in reversed time ``u = -t`` on ``z = (y, a)`` stacked along dimension 1:
    ``dz/du = (-f, a^T df/dy)``. It keeps each stage's evaluation of ``f`` with its graph until the loop
    reports the step's acceptance, then adds the step's share of ``g``."""

    def __init__(self, field, params, tableau):
        self.field, self.params, self.tableau = field, params, tableau
        self.stages = []
        self.gradients = [torch.zeros_like(param) for param in params]

    def __call__(self, u, z):
        y, a = z.unbind(dim=1)
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            value = self.field(-u, y)
            (a_dot,) = torch.autograd.grad(value, y, a, retain_graph=bool(self.params), allow_unused=True)
        if self.params:
            self.stages.append((value, a))
        return torch.stack([-value.detach(), torch.zeros_like(a) if a_dot is None else a_dot], dim=1)

    def accumulate(self, u, z, dt, accepted):
        """Add ``sum_i b_i h a_i^T df/dparams(stage i)`` over the accepted samples; the first stage, carried
        from the last step rather than evaluated, is evaluated again here for its graph."""
        if not self.params:
            return
        # The step's own stages 1..s-1 are the latest evaluations; earlier ones (the loop's start, the initial
        # step's trial, a fixed-step method's evaluation at the new state) carry no quadrature weight.
        count = len(self.tableau.c) - 1
        stages = self.stages[len(self.stages) - count :]
        self.stages = []
        self(u, z)
        stages = [self.stages.pop()] + stages
        weight = torch.where(accepted, dt, torch.zeros_like(dt))
        values, cotangents = [], []
        for b, (value, a) in zip(self.tableau.b, stages):
            if b:
                values.append(value)
                cotangents.append(b * weight.view(-1, *[1] * (a.ndim - 1)) * a)
        grads = torch.autograd.grad(values, self.params, cotangents, allow_unused=True)
        for total, grad in zip(self.gradients, grads):
            if grad is not None:
                total += grad


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context, grid, y0, *params):
        ys, result = integrate(context["field"], y0, grid, **context["settings"])
        context["record"].append(result)
        ctx.context = context
        ctx.save_for_backward(grid, ys, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        grid, ys, *params = ctx.saved_tensors
        context = ctx.context
        settings = dict(context["settings"])
        if settings["num_steps"] is not None:
            # The same uniform step as the forward solve, on each interval between output times.
            settings["dt"] = float(grid[-1] - grid[0]) / settings["num_steps"]
            settings["num_steps"] = None
        settings.update(rtol=context["rtol"], atol=context["atol"], first_step=None)
        augmented = _AugmentedField(context["field"], params, settings["tableau"])
        a = grad_ys[-1]
        for index in range(len(grid) - 1, 0, -1):
            zs, result = integrate(
                augmented, torch.stack([ys[index], a], dim=1), torch.stack([-grid[index], -grid[index - 1]]),
                on_step=augmented.accumulate, **settings,
            )
            if context["warn"] or context["strict"]:
                report_ode_convergence(
                    f"{settings['tableau'].name}, adjoint",
                    result.converged.cpu().numpy(),
                    result.failed.cpu().numpy(),
                    *(-context["direction"] * v.cpu().numpy() for v in (result.t_reached, result.final_dt)),
                    t_start=context["direction"] * float(grid[index]),
                    max_steps=settings["max_steps"],
                    strict=context["strict"],
                    stacklevel=2,
                )
            a = zs[-1][:, 1] + grad_ys[index - 1]
        return (None, None, a, *augmented.gradients)
