"""Forward (Picard) iteration ``z <- f(z)``, in JAX."""

from __future__ import annotations

import jax

from ._loop import Map, solve_batched
from .result import SolverResult


def forward_iteration(
    f: Map,
    z0: jax.Array,
    *,
    tol: float = 1e-5,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
    unroll: bool = False,
) -> tuple[jax.Array, SolverResult]:
    """Find a fixed point ``z = f(z)`` of a batched map by iterating it.

    The JAX twin of :func:`implicit_layers.torch.forward_iteration`; composes with ``jit`` and ``vmap``.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape and dtype, acting on each sample
        independently.
    z0 : jax.Array
        Initial guess, shape (B, ...), floating point.
    tol : float
        Absolute tolerance on each sample's residual ``||f(z) - z||_2``.
    max_iter : int
        Most steps per sample.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` instead of warning when a sample does not converge.
        Under ``jax.jit`` the values are known only after the solve, so the check runs in a host callback:
        the error then reaches the caller as a ``jax.errors.JaxRuntimeError`` whose message contains the
        ``ConvergenceError`` and its text (JAX also logs the callback's traceback to stderr), and a ``z0``
        with NaN or Inf, which the argument checks cannot see under ``jit``, is reported as failed samples
        (status ``"diverged"``) rather than as an error.
    warn : bool
        Check convergence after the solve and warn about samples that missed. Under ``jit`` the check is a host
        callback, taken only when a sample missed, whose mere presence cost 10% to 30% of a solve's time in
        ``benchmarks/fixed_point.py`` on a 2-core CPU; ``False`` leaves it out (the result record still says
        which samples converged).
        ``strict=True`` checks regardless.
    unroll : bool
        Run a fixed ``max_iter``-step ``lax.scan`` that reverse-mode autodiff can differentiate through
        (unrolled differentiation), instead of an early-stopping ``lax.while_loop``.

    Returns
    -------
    z : jax.Array
        The last iterate, shape of ``z0``.
    result : SolverResult
        Iterations, residual trace and convergence flags per sample.

    Warns
    -----
    ConvergenceWarning
        When some sample does not reach ``tol``; the message gives the largest residual reached.
    """
    return solve_batched(
        "forward_iteration",
        f,
        z0,
        _picard_update,
        evaluations_per_update=0,
        tol=tol,
        max_iter=max_iter,
        strict=strict,
        warn=warn,
        unroll=unroll,
    )


def _picard_update(f: Map, z: jax.Array, fz: jax.Array, state: None) -> tuple[jax.Array, None]:
    return fz, None
