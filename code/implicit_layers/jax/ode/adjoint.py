"""gradient="adjoint": the continuous adjoint method, whose memory does not grow with the number of steps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._loop import directed, flags_as_numbers, flat, integrate, numbers_as_flags, per_sample


def adjoint_integrate(f, y0, grid, theta, sign, tableau, *, adjoint_rtol, adjoint_atol, report, **settings):
    """Integrate as ``integrate`` does, keeping only the outputs; the backward pass solves the adjoint system.

    For a loss ``L`` of the outputs, ``a(t) = dL/dy(t)`` and ``g = dL/dtheta`` solve, from ``t[-1]`` back to
    ``t[0]``, ``y' = f``, ``a' = -a^T df/dy``, ``g' = -a^T df/dtheta``, with ``a`` jumping by ``dL/dys[j]`` at
    each output time. Each interval between output times is solved afresh from the stored ``ys[j]`` (as
    torchdiffeq does), so the backward trajectory of ``y`` does not drift from the forward one; the intervals
    are a ``lax.scan``, so the program does not grow with the number of output times. The gradient is that of
    the exact solution, within the adjoint tolerances of the discrete solver's.

    ``(y, a)`` is the integrated state, per sample, and its error alone steers the steps. ``g`` has no batch
    axis, so it is not part of that state: each accepted step adds its quadrature of ``a^T df/dtheta`` at the
    step's stages, weighted by ``b`` and each sample's own step size, through the pullbacks of the stages'
    evaluations of ``f`` with the batch summed (torchdiffeq's "seminorm" choice of excluding ``g`` from error
    control), as the torch twin does.

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
        grad_ys = cotangents[0]
        backward_settings = dict(settings)
        if backward_settings["num_steps"] is not None:
            # The same uniform step as the forward solve, on each interval between output times.
            backward_settings["dt"] = (grid[-1] - grid[0]) / backward_settings.pop("num_steps")
            backward_settings["num_steps"] = None
        backward_settings.update(rtol=adjoint_rtol, atol=adjoint_atol, first_step=None, unroll=False)

        def interval(carry, index):
            a, grad_theta = carry
            augmented = _AugmentedField(directed(f, sign), ys.shape[1:], theta, tableau)
            z0 = jnp.concatenate([flat(ys[index]), flat(a)], axis=1)
            zs, result, grad_theta = integrate(
                augmented, z0, -grid[jnp.stack([index, index - 1])], theta, tableau,
                accumulate=augmented.accumulate, accumulated=grad_theta, **backward_settings,
            )
            a = augmented.split(zs[-1])[1] + grad_ys[index - 1]
            return (a, grad_theta), result

        zero_theta = jax.tree_util.tree_map(jnp.zeros_like, theta)
        (grad_y0, grad_theta), results = jax.lax.scan(
            interval, (grad_ys[-1], zero_theta), jnp.arange(grid.shape[0] - 1, 0, -1)
        )
        # One record for the backward solves: the first interval (going backwards) where each sample fell short.
        missed = jnp.argmax(~results.converged, axis=0)
        merged = jax.tree_util.tree_map(lambda x: jnp.take_along_axis(x, missed[None], axis=0)[0], results)
        # The backward solves run in u = -s = -sign * t.
        report(merged._replace(t_reached=-sign * merged.t_reached, final_dt=-sign * merged.final_dt), sign * grid[-1])
        return grad_y0, jnp.zeros_like(grid), grad_theta, jnp.zeros_like(sign)

    solve.defvjp(forward, backward)
    ys, result = solve(y0, grid, theta, sign)
    return ys, numbers_as_flags(result)


class _AugmentedField:
    """The adjoint system in reversed time ``u = -t`` on ``z = (y, a)``, flattened and side by side along axis 1:
    ``dz/du = (-f, a^T df/dy)``, as ``integrate`` calls a field, ``(u, z, theta)``.

    Each evaluation keeps the pullback of ``f`` (its residuals) and the stage's ``a`` until the loop, still
    tracing the same step, calls :meth:`accumulate` with the step's acceptance, which pulls the step's weighted
    adjoints back to ``theta``. XLA computes only the parts of each pullback that are used: the state part
    here, the parameter part there."""

    def __init__(self, field, state_shape, theta, tableau):
        self.field, self.state_shape, self.theta, self.tableau = field, state_shape, theta, tableau
        self.size = math.prod(state_shape[1:])
        self.stages = []

    def split(self, z):
        """``(y, a)`` of the state's shape from ``z``."""
        return z[:, : self.size].reshape(self.state_shape), z[:, self.size :].reshape(self.state_shape)

    def __call__(self, u, z, theta):
        y, a = self.split(z)
        value, pullback = jax.vjp(lambda y_, theta_: self.field(-u, y_, theta_), y, theta)
        a_dot, _ = pullback(a)
        self.stages.append((lambda cotangent: pullback(cotangent)[1], a))
        return jnp.concatenate([-flat(value), flat(a_dot)], axis=1)

    def accumulate(self, grad_theta, u, z, dt, accepted):
        """``grad_theta`` plus ``sum_i b_i h a_i^T df/dtheta(stage i)`` over the accepted samples, ``h`` each
        sample's step. The first stage, carried from the last step rather than evaluated, is evaluated again
        here for its pullback."""
        # The step's stages 1..s-1 are the latest evaluations; earlier ones (the loop's start, the initial
        # step's trial, the last step's evaluation at its new state) carry no quadrature weight.
        count = len(self.tableau.c) - 1
        stages = self.stages[len(self.stages) - count :]
        self.stages = []
        y, a = self.split(z)
        _, first_pullback = jax.vjp(lambda theta_: self.field(-u, y, theta_), self.theta)
        stages = [(lambda cotangent: first_pullback(cotangent)[0], a)] + stages
        weight = per_sample(jnp.where(accepted, dt, 0.0), a)
        for b, (pullback, stage_a) in zip(self.tableau.b, stages):
            if b:
                grad_theta = jax.tree_util.tree_map(jnp.add, grad_theta, pullback(b * weight * stage_a))
        return grad_theta
