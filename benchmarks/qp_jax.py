"""JAX cases of the QP benchmark: our ``qp`` and qpax's ``solve_qp_primal``, both jitted, on the same float64
arrays (the driver enables ``jax_enable_x64``). Every run is one forward and one backward pass of ``sum(c * x)``
to Q, p, G and h; its program is compiled ahead of the timing, and the compile time reported apart."""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qp_problem import ARGUMENTS, Case, Outcome, Problem, Run

QPAX_CHUNK = 64
"""qpax solves one QP; it is batched with vmap. One vmap over a batch of 128 deadlocked XLA's CPU thread pool on
this 2-core machine; chunks of 64 mapped one after the other (``lax.map``) ran, so every batch goes in such chunks."""


def cases() -> list[Case]:
    result = []
    try:
        from implicit_layers.jax.optimization.qp import qp  # noqa: F401  (only whether it imports matters here)
    except Exception as error:  # an older checkout of our package has no qp; the peers still run
        result.append(Case("jax", "ours", "qp", unavailable=f"import failed: {type(error).__name__}: {error}"))
    else:
        result.append(Case("jax", "ours", "qp, default tol 1e-9", _prepare_ours))
    try:
        import qpax  # noqa: F401
    except Exception as error:  # a broken install fails in many ways; each is reported, not raised
        return result + [Case("jax", "qpax", "solve_qp_primal",
                              unavailable=f"import failed: {type(error).__name__}: {error}")]
    return result + [
        Case("jax", "qpax", "solve_qp_primal, defaults (explicit backend, target_kappa 1e-3, solver_tol 1e-5)",
             partial(_prepare_qpax, {})),
        Case("jax", "qpax", "solve_qp_primal, implicit backend, defaults", partial(_prepare_qpax, {"backend": "i"})),
        Case("jax", "qpax", "solve_qp_primal, implicit backend, target_kappa 1e-8, solver_tol 1e-10",
             partial(_prepare_qpax, {"backend": "i", "target_kappa": 1e-8, "solver_tol": 1e-10})),
    ]


def _run(problem: Problem, solve) -> Run:
    """``solve(Q, p, G, h) -> (x, all_solved)`` for the batch; the run is the jitted gradient of ``sum(c * x)``
    with respect to all four, compiled here (and timed) before the first call."""
    inputs = tuple(jnp.asarray(getattr(problem, name)) for name in ARGUMENTS)
    c = jnp.asarray(problem.c)

    def loss(Q, p, G, h):
        x, all_solved = solve(Q, p, G, h)
        return jnp.sum(c * x), (x, all_solved)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)).lower(*inputs).compile()
    compile_s = time.perf_counter() - start

    def unpack(output) -> Outcome:
        grads, (x, all_solved) = output
        if not bool(all_solved):
            raise RuntimeError("some samples were not solved")
        return Outcome(np.asarray(x), {name: np.asarray(g) for name, g in zip(ARGUMENTS, grads)})

    return Run(lambda: jax.block_until_ready(compiled(*inputs)), unpack, compile_s)


def _prepare_ours(problem: Problem) -> Run:
    from implicit_layers.jax.optimization.qp import qp

    def solve(Q, p, G, h):
        x, result = qp(Q, p, G, h)
        return x, jnp.all(result.converged)

    return _run(problem, solve)


def _prepare_qpax(options: dict, problem: Problem) -> Run:
    import qpax

    if problem.batch % QPAX_CHUNK and problem.batch > QPAX_CHUNK:
        raise ValueError(f"the batch ({problem.batch}) must be a multiple of {QPAX_CHUNK} or smaller")
    chunk = min(problem.batch, QPAX_CHUNK)
    no_equalities = jnp.zeros((0, problem.n)), jnp.zeros(0)

    def one(Q, p, G, h):
        return qpax.solve_qp_primal(Q, p, *no_equalities, G, h, **options)

    def solve(Q, p, G, h):
        chunks = [v.reshape(-1, chunk, *v.shape[1:]) for v in (Q, p, G, h)]
        x = jax.lax.map(lambda args: jax.vmap(one)(*args), chunks).reshape(problem.batch, problem.n)
        # qpax returns no status: a sample it failed on shows up as NaN
        return x, jnp.all(jnp.isfinite(x))

    return _run(problem, solve)
