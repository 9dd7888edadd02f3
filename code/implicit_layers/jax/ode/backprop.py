"""gradient="backprop": autodiff through every operation of the solver."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._validation import check_returns_like
from ._loop import directed, flags_as_numbers, integrate, numbers_as_flags


def backprop_integrate(f, y0, grid, theta, sign, tableau, **settings):
    """Integrate as ``integrate`` does; derivatives come from autodiff of the same steps as a ``lax.scan``.

    Reverse mode cannot traverse a ``lax.while_loop``, so a differentiated solve is a ``lax.scan`` of
    ``max_steps`` steps in chunks of about ``sqrt(max_steps)``, idle chunks skipped by ``lax.cond``, chunks and
    steps recomputed in the backward pass (``jax.checkpoint``) so that it keeps about ``2 sqrt(max_steps)`` loop
    states rather than every stage of every step (see ``integrate``). A solve that is not differentiated need not pay for the idle steps: the solve is a ``jax.custom_jvp`` whose primal is
    the ``lax.while_loop``, which stops with the last running sample, and whose rule is the forward-mode
    derivative of the scan (which reverse mode transposes). Both run the same step function, so both give the
    same outputs.

    Values that ``f`` closes over are differentiable as with plain autodiff: ``jax.closure_convert`` makes them
    explicit arguments of the custom rule. ``grid`` is ``sign * t``, increasing.
    """
    # JAX arrays in theta (traced or not) are arguments of the custom rule; other leaves (strings, Python numbers
    # that f may use in Python control flow) stay what they are, closed over as with plain autodiff.
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    array_positions = [index for index, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

    def with_arrays(arrays):
        merged = list(leaves)
        for index, array in zip(array_positions, arrays):
            merged[index] = array
        return jax.tree_util.tree_unflatten(treedef, merged)

    def checked(t, y, arrays):
        value = f(t, y, with_arrays(arrays))
        check_returns_like(value, y, call="f(t, y, theta)", name="y")
        return value

    arrays = [leaves[index] for index in array_positions]
    field, closed_over = jax.closure_convert(checked, jnp.broadcast_to(grid[0], y0.shape[:1]), y0, arrays)

    def solve_with(unroll):
        def run(y0, grid, arrays, sign, closed_over):
            def user_field(t, y, arrays):
                return field(t, y, arrays, *closed_over)

            ys, result = integrate(directed(user_field, sign), y0, grid, arrays, tableau, unroll=unroll, **settings)
            return ys, flags_as_numbers(result)
        return run

    solve = jax.custom_jvp(solve_with(unroll=False))
    solve.defjvp(lambda primals, tangents: jax.jvp(solve_with(unroll=True), primals, tangents))
    ys, result = solve(y0, grid, arrays, sign, closed_over)
    return ys, numbers_as_flags(result)
