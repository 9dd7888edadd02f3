"""gradient="checkpoint": each step is recomputed under autodiff in the backward pass instead of stored."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._loop import directed, emission, flags_as_numbers, integrate, interpolate, numbers_as_flags, per_sample, rk_step


def checkpointed_integrate(f, y0, grid, theta, sign, tableau, **settings):
    """Integrate as ``integrate`` does (a ``lax.while_loop``), keeping the state and derivative each step
    started from in a buffer of ``max_steps`` rows; the backward pass replays the steps in reverse, each under
    ``jax.vjp``, with the step sizes and accept decisions the forward pass took.

    The gradient is that of the discrete solver, equal to backpropagation's to round-off, in memory of two
    states per step (``max_steps`` of them, allocated up front) rather than every stage of every step.

    ``grid`` is ``sign * t``, increasing, and ``f`` the user's field in ``t``; ``sign`` is an argument rather
    than a closure so that the backward pass sees no outer tracer.
    """

    @jax.custom_vjp
    def solve(y0, grid, theta, sign):
        ys, result = integrate(directed(f, sign), y0, grid, theta, tableau, **settings)
        return ys, flags_as_numbers(result)

    def forward(y0, grid, theta, sign):
        ys, result, tape, num_steps = integrate(directed(f, sign), y0, grid, theta, tableau, record=True,
                                                **settings)
        return (ys, flags_as_numbers(result)), (grid, theta, sign, y0, tape, num_steps)

    def backward(residuals, cotangents):
        grid, theta, sign, y0, tape, num_steps = residuals
        grad_ys = cotangents[0]
        field = directed(f, sign)

        def replay(k, carry):
            grad_y, grad_f, grad_theta = carry
            index = num_steps - 1 - k
            row = {key: jax.lax.dynamic_index_in_dim(value, index, 0, keepdims=False) for key, value in tape.items()}
            emit, fraction = emission(grid, row["t"], row["t_new"], row["dt_step"], row["move"],
                                      row["next_output"], row["passed"])

            def step(y, f_now, theta, with_outputs):
                def at(t, y):
                    return field(t, y, theta)

                y1, f1, _, y_mid = rk_step(at, row["t"], y, f_now, row["dt_step"], tableau)
                if f1 is None:
                    f1 = at(row["t_new"], y1)
                moved = per_sample(row["move"], y)
                outputs = (
                    interpolate(fraction, y, y1, f_now, f1, y_mid, row["dt_step"]) if with_outputs else None
                )
                return jnp.where(moved, y1, y), jnp.where(moved, f1, f_now), outputs

            def pull_back(with_outputs):
                def run(_):
                    _, vjp = jax.vjp(lambda y, f_now, th: step(y, f_now, th, with_outputs), row["y"], row["f_now"],
                                     theta)
                    grad_outputs = jnp.where(per_sample(emit, grad_ys[0]), grad_ys, 0.0) if with_outputs else None
                    return vjp((grad_y, grad_f, grad_outputs))
                return run

            # Most steps pass no output: their pullback leaves the dense output out.
            step_grad_y, step_grad_f, step_grad_theta = jax.lax.cond(
                jnp.any(emit), pull_back(True), pull_back(False), None
            )
            return step_grad_y, step_grad_f, jax.tree_util.tree_map(jnp.add, grad_theta, step_grad_theta)

        zero_theta = jax.tree_util.tree_map(jnp.zeros_like, theta)
        grad_y, grad_f, grad_theta = jax.lax.fori_loop(
            0, num_steps, replay, (jnp.zeros_like(y0), jnp.zeros_like(y0), zero_theta)
        )
        # The loop started from f(t0, y0, theta), and ys[0] is y0 itself.
        t0 = jnp.broadcast_to(grid[0], (y0.shape[0],))
        _, vjp = jax.vjp(lambda y, th: field(t0, y, th), y0, theta)
        start_grad_y, start_grad_theta = vjp(grad_f)
        grad_y0 = grad_y + start_grad_y + grad_ys[0]
        grad_theta = jax.tree_util.tree_map(jnp.add, grad_theta, start_grad_theta)
        return grad_y0, jnp.zeros_like(grid), grad_theta, jnp.zeros_like(sign)

    solve.defvjp(forward, backward)
    ys, result = solve(y0, grid, theta, sign)
    return ys, numbers_as_flags(result)
