"""Randomized estimates of a batched map's Jacobian from vector products, in JAX: its squared Frobenius norm and
its spectral norm. The twin of ``implicit_layers.torch.fixed_points.jacobian_estimates``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._checks import check_iteration_limit
from .._validation import check_batched_state, check_map_output
from ._loop import Map, flat, per_sample


def jacobian_frobenius_estimate(f: Map, z: jax.Array, key: jax.Array, *, probes: int = 1) -> jax.Array:
    """Estimate each sample's squared Frobenius norm ``||df/dz||_F^2`` at ``z`` without forming the Jacobian.

    The JAX twin of :func:`implicit_layers.torch.jacobian_frobenius_estimate`: Hutchinson's estimator, the
    average of ``||v^T J||^2`` over ``probes`` Gaussian probes ``v``, unbiased with variance
    ``2 ||J J^T||_F^2 / probes``. ``f`` is linearized once and the vector-Jacobian products of all probes run as
    one ``vmap``. Composes with ``jit``, ``vmap`` and ``grad``: differentiating the estimate with respect to what
    ``f`` closes over gives the gradient of the Jacobian penalty of Bai et al. (2021).

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape and dtype, acting on each sample
        independently.
    z : jax.Array
        Where the Jacobian is taken, shape (B, ...), floating point; typically the fixed point.
    key : jax.Array
        PRNG key of the probes.
    probes : int
        Number of Gaussian probes per sample.

    Returns
    -------
    jax.Array
        Shape (B,), dtype of ``z``: each sample's estimate (non-negative).
    """
    check_batched_state("z", z)
    probes = check_iteration_limit("probes", probes)
    fz, vjp = jax.vjp(f, z)
    check_map_output(fz, z)
    vectors = jax.random.normal(key, (probes,) + z.shape, dtype=z.dtype)
    (products,) = jax.vmap(vjp)(vectors)
    return jnp.mean(jnp.sum(products.reshape(probes, z.shape[0], -1) ** 2, axis=2), axis=0)


def jacobian_spectral_norm(f: Map, z: jax.Array, key: jax.Array, *, iterations: int = 20) -> jax.Array:
    """Estimate each sample's spectral norm ``||df/dz||_2`` (largest singular value) at ``z`` by power iteration.

    The JAX twin of :func:`implicit_layers.torch.jacobian_spectral_norm`: power iteration on ``J^T J`` from a
    random start, each step one Jacobian-vector and one vector-Jacobian product of the once-linearized ``f``,
    returning ``||J^T J v|| / ||J v||``, a lower bound on the largest singular value ``s1`` that approaches it as
    ``(s2 / s1)^(4k)`` after ``k`` steps. The steps run in a ``lax.fori_loop``; composes with ``jit`` and
    ``vmap``.

    Parameters
    ----------
    f : callable
        Maps a batch of states of shape (B, ...) to a batch of the same shape and dtype, acting on each sample
        independently.
    z : jax.Array
        Where the Jacobian is taken, shape (B, ...), floating point.
    key : jax.Array
        PRNG key of the random start.
    iterations : int
        Power-iteration steps.

    Returns
    -------
    jax.Array
        Shape (B,), dtype of ``z``, under ``stop_gradient``: a diagnostic, not a quantity to train through.
    """
    check_batched_state("z", z)
    iterations = check_iteration_limit("iterations", iterations)
    fz, jvp = jax.linearize(f, jax.lax.stop_gradient(z))
    check_map_output(fz, z)
    vjp = jax.linear_transpose(jvp, z)
    tiny = jnp.finfo(z.dtype).tiny

    def step(_, carry):
        vector, _ = carry
        image = jvp(vector)
        (normal,) = vjp(image)
        estimate = _norm(normal) / jnp.maximum(_norm(image), tiny)
        return _unit(normal), estimate

    start = _unit(jax.random.normal(key, z.shape, dtype=z.dtype))
    _, estimate = jax.lax.fori_loop(0, iterations, step, (start, jnp.zeros(z.shape[0], z.dtype)))
    return jax.lax.stop_gradient(estimate)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(flat(x), axis=1)


def _unit(x: jax.Array) -> jax.Array:
    """Scale each sample to unit norm; a zero sample (``J^T J v = 0``: the estimate is already zero) stays zero."""
    return x / per_sample(jnp.maximum(_norm(x), jnp.finfo(x.dtype).tiny), x)
