"""gradient="adjoint": the continuous adjoint method, whose memory does not grow with the number of steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._loop import directed, flags_as_numbers, flat, integrate, numbers_as_flags


def adjoint_integrate(f, y0, grid, theta, sign, tableau, *, adjoint_rtol, adjoint_atol, report, **settings):
    """Integrate as ``integrate`` does, keeping only the outputs; the backward pass solves the adjoint system.

    For a loss ``L`` of the outputs, ``a(t) = dL/dy(t)`` and ``g = dL/dtheta`` solve, from ``t[-1]`` back to
    ``t[0]``, ``y' = f``, ``a' = -a^T df/dy``, ``g' = -a^T df/dtheta``, with ``a`` jumping by ``dL/dys[j]`` at
    each output time. Each interval between output times is solved afresh from the stored ``ys[j]`` (as
    torchdiffeq does), so the backward trajectory of ``y`` does not drift from the forward one; the intervals
    are a ``lax.scan``, so the program does not grow with the number of output times. The gradient is that of
    the exact solution, within the adjoint tolerances of the discrete solver's.

    ``g`` is integrated per sample (each sample keeps its own clock), from vector-Jacobian products batched by
    ``vmap`` over one-hot cotangents, and summed over the batch at the end; that costs memory B times the size
    of ``theta`` during the backward pass, and B vector-Jacobian products per evaluation.

    ``grid`` is ``sign * t``, increasing, and ``f`` the user's field in ``t``; ``sign`` (+1 or -1, an array that
    may be traced) is an argument rather than a closure so that the backward pass sees no outer tracer.
    ``report(result, t_start)`` is called with the backward solves' record (the intervals merged, times in
    ``t``) so that a backward solve that falls short is not silent.
    """

    @jax.custom_vjp
    def solve(y0, grid, theta, sign):
        ys, result = integrate(directed(f, sign), y0, grid, theta, tableau, **settings)
        return ys, flags_as_numbers(result)

    def forward(y0, grid, theta, sign):
        ys, result = integrate(directed(f, sign), y0, grid, theta, tableau, **settings)
        return (ys, flags_as_numbers(result)), (ys, grid, theta, sign)

    def backward(residuals, cotangents):
        ys, grid, theta, sign = residuals
        field = directed(f, sign)
        grad_ys = cotangents[0]
        state_shape = ys.shape[1:]
        batch, size = state_shape[0], flat(ys[0]).shape[1]
        theta_flat, unravel = ravel_pytree(theta)

        def augmented(u, z, theta):
            # Time runs backwards: u = -t, so d/du of (y, a, g) is (-f, a^T df/dy, a^T df/dtheta).
            y = z[:, :size].reshape(state_shape)
            a = z[:, size : 2 * size].reshape(state_shape)

            value, vjp = jax.vjp(lambda y_, th: field(-u, y_, th), y, theta)
            a_dot, _ = vjp(a)
            # Cotangent b of the batch is sample b's adjoint alone, so row b is sample b's parameter derivative
            # (theta may hold per-sample entries, so f cannot be evaluated one sample at a time).
            one_hot = jnp.eye(batch, dtype=a.dtype).reshape((batch, batch) + (1,) * (a.ndim - 1))
            g_dot = jax.vmap(lambda cotangent: ravel_pytree(vjp(cotangent)[1])[0])(one_hot * a[None])
            return jnp.concatenate([-flat(value), flat(a_dot), g_dot.astype(z.dtype)], axis=1)

        backward_settings = dict(settings)
        if backward_settings["num_steps"] is not None:
            # The same uniform step as the forward solve, on each interval between output times.
            backward_settings["dt"] = (grid[-1] - grid[0]) / backward_settings.pop("num_steps")
            backward_settings["num_steps"] = None
        backward_settings.update(rtol=adjoint_rtol, atol=adjoint_atol, first_step=None, unroll=False)

        def interval(carry, index):
            a, g = carry
            z0 = jnp.concatenate([flat(ys[index]), flat(a), jnp.zeros((batch, theta_flat.size), ys.dtype)], axis=1)
            zs, result = integrate(augmented, z0, -grid[jnp.stack([index, index - 1])], theta, tableau,
                                   **backward_settings)
            z1 = zs[-1]
            a = z1[:, size : 2 * size].reshape(state_shape) + grad_ys[index - 1]
            return (a, g + jnp.sum(z1[:, 2 * size :], axis=0)), result

        (grad_y0, grad_theta), results = jax.lax.scan(
            interval, (grad_ys[-1], jnp.zeros(theta_flat.size, ys.dtype)), jnp.arange(grid.shape[0] - 1, 0, -1)
        )
        # One record for the backward solves: the first interval (going backwards) where each sample fell short.
        missed = jnp.argmax(~results.converged, axis=0)
        merged = jax.tree_util.tree_map(lambda x: jnp.take_along_axis(x, missed[None], axis=0)[0], results)
        # The backward solves run in u = -s = -sign * t.
        report(merged._replace(t_reached=-sign * merged.t_reached, final_dt=-sign * merged.final_dt), sign * grid[-1])
        return grad_y0, jnp.zeros_like(grid), unravel(grad_theta.astype(theta_flat.dtype)), jnp.zeros_like(sign)

    solve.defvjp(forward, backward)
    ys, result = solve(y0, grid, theta, sign)
    return ys, numbers_as_flags(result)
