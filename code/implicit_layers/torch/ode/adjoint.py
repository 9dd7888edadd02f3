"""gradient="adjoint": the continuous adjoint method, whose memory does not grow with the number of steps."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...errors import report_ode_convergence
from ._loop import integrate


def adjoint_integrate(field, y0, grid, params, *, adjoint_rtol, adjoint_atol, strict, warn, **settings):
    """Integrate as ``integrate`` does, without recording the steps; the backward pass solves the adjoint system.

    For a loss ``L`` of the outputs, ``a(t) = dL/dy(t)`` and ``g = dL/dparams`` solve, from ``t[-1]`` back to
    ``t[0]``, ``y' = f``, ``a' = -a^T df/dy``, ``g' = -a^T df/dparams``, with ``a`` jumping by ``dL/dys[j]`` at
    each output time. Each interval between output times is solved afresh from the stored ``ys[j]`` (as
    torchdiffeq does), so the backward trajectory of ``y`` does not drift from the forward one. The gradient is
    that of the exact solution, within the adjoint tolerances of the discrete solver's.

    The parameter part ``g`` is integrated per sample (each sample keeps its own clock), from batched
    vector-Jacobian products (``torch.autograd.grad(..., is_grads_batched=True)``), and summed over the batch
    at the end; that costs memory B times the number of parameters during the backward pass.
    """
    record = []
    ys = _Adjoint.apply(
        dict(field=field, settings=settings, rtol=adjoint_rtol, atol=adjoint_atol, strict=strict, warn=warn,
             record=record),
        grid,
        y0,
        *params,
    )
    return ys, record[0]


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
            settings["dt"] = float(grid[-1] - grid[0]) / settings.pop("num_steps")
            settings["num_steps"] = None
        settings.update(rtol=context["rtol"], atol=context["atol"], first_step=None)
        field = context["field"]
        state_shape = ys.shape[1:]
        batch, size = state_shape[0], ys[0][0].numel()
        param_sizes = [param.numel() for param in params]

        def augmented(u, z):
            # Time runs backwards: u = -t, so d/du of (y, a, g) is (-f, a^T df/dy, a^T df/dparams).
            y = z[:, :size].reshape(state_shape)
            a = z[:, size : 2 * size].reshape(state_shape)
            with torch.enable_grad():
                y = y.detach().requires_grad_(True)
                value = field(-u, y)
                (a_dot,) = torch.autograd.grad(value, y, a, retain_graph=bool(params), allow_unused=True)
                a_dot = torch.zeros_like(y) if a_dot is None else a_dot
                pieces = [-value.detach().flatten(1), a_dot.flatten(1)]
                if params:
                    # Cotangent b of the batch is sample b's adjoint alone, so each row is one sample's gradient.
                    one_hot = torch.eye(batch, dtype=a.dtype, device=a.device).view(batch, batch, *[1] * (a.ndim - 1))
                    grads = torch.autograd.grad(
                        value, params, one_hot * a.unsqueeze(0), is_grads_batched=True, allow_unused=True
                    )
                    pieces += [
                        torch.zeros(batch, n, dtype=a.dtype, device=a.device) if g is None else g.reshape(batch, -1)
                        for g, n in zip(grads, param_sizes)
                    ]
            return torch.cat(pieces, dim=1)

        a = grad_ys[-1]
        totals = [torch.zeros_like(param) for param in params]
        for index in range(len(grid) - 1, 0, -1):
            z0 = torch.cat(
                [ys[index].flatten(1), a.flatten(1), ys.new_zeros(batch, sum(param_sizes))], dim=1
            )
            zs, result = integrate(augmented, z0, torch.stack([-grid[index], -grid[index - 1]]), **settings)
            if context["warn"] or context["strict"]:
                report_ode_convergence(
                    f"{settings['tableau'].name}, adjoint",
                    *(v.cpu().numpy() for v in (result.converged, result.failed, -result.t_reached, -result.final_dt)),
                    t_start=float(grid[index]),
                    max_steps=settings["max_steps"],
                    strict=context["strict"],
                    stacklevel=2,
                )
            z1 = zs[-1]
            a = z1[:, size : 2 * size].reshape(state_shape) + grad_ys[index - 1]
            offset = 2 * size
            for total, n in zip(totals, param_sizes):
                total += z1[:, offset : offset + n].sum(dim=0).view_as(total)
                offset += n
        return (None, None, a, *totals)
