"""The batched primal-dual interior-point method behind ``qp``: Mehrotra's predictor-corrector on the homogeneous
self-dual embedding of the QP, so that one loop either solves a sample or finds a certificate that it is primal or
dual infeasible. The JAX twin of the torch module, step for step, with its loop a ``lax.while_loop``.

The embedding (as in Clarabel: Goulart and Chen, 2024) adds two scalars, tau and kappa, to the iterate
(x, s, lam, nu) and drives to zero

    r_x   = Qx + G'lam + A'nu + p tau
    r_lam = Gx + s - h tau
    r_nu  = Ax - b tau
    r_tau = kappa + p'x + h'lam + b'nu + x'Qx / tau

with s, lam, tau, kappa > 0 and s * lam, tau * kappa following the central path down to zero. If tau stays away
from zero, (x, s, lam, nu) / tau solves the QP; if it goes to zero, (lam, nu) or x becomes a certificate of
infeasibility. Each iteration factors one Newton matrix (``_kkt.factor_kkt``) and solves with it twice: once for
two right-hand sides together (the direction's part along tau and the affine predictor), once for the corrector.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._batch import per_sample
from ._kkt import bmtv, bmv, factor_kkt, largest, regularization, solve_kkt

SOLVED, MAX_ITER, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE, FAILED = range(5)
STEP_TO_BOUNDARY = 0.99  # the fraction of the longest step that keeps s, lam, tau, kappa positive
CHUNK = 32  # the most samples one loop iterates together; a larger batch is solved in chunks, one after another


class Iterate(NamedTuple):
    x: jax.Array  # (B, n)
    s: jax.Array  # (B, m)
    lam: jax.Array  # (B, m)
    nu: jax.Array  # (B, e)
    tau: jax.Array  # (B,)
    kappa: jax.Array  # (B,)


class PDIPMOutput(NamedTuple):
    iterate: Iterate  # the final iterate, not yet divided by tau
    status: jax.Array  # (B,) int, one of the codes above
    iterations: jax.Array  # (B,) int
    num_factorizations: jax.Array  # () int: one per step of the loop that took the most, plus the start


class Residuals(NamedTuple):
    x: jax.Array  # r_x (B, n)
    lam: jax.Array  # r_lam (B, m)
    nu: jax.Array  # r_nu (B, e)
    tau: jax.Array  # r_tau (B,)
    Qx: jax.Array  # Q x (B, n)
    xQx: jax.Array  # x'Qx (B,)


def _dot(u: jax.Array, v: jax.Array) -> jax.Array:
    return (u * v).sum(axis=-1)


def _shift_into_cone(v: jax.Array) -> jax.Array:
    """Move each sample's vector into the positive orthant, with its smallest entry at least 1 if it was not
    already comfortably positive (Clarabel's start)."""
    if not v.shape[1]:
        return v
    smallest = v.min(axis=1, keepdims=True)
    return jnp.where(smallest < jnp.finfo(v.dtype).eps ** 0.5, v + 1 - smallest, v)


def _row_scale(M: jax.Array) -> jax.Array:
    """One over the Euclidean norm of each row of M (B, r, n), shape (B, r); one for a zero row."""
    norms = jnp.linalg.norm(M, axis=2)
    return jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 1)


def _longest_step(iterate: Iterate, step: Iterate) -> jax.Array:
    """The largest alpha in (0, 1] per sample that keeps s, lam, tau and kappa positive along ``step``."""
    values = jnp.concatenate([iterate.s, iterate.lam, iterate.tau[:, None], iterate.kappa[:, None]], axis=1)
    directions = jnp.concatenate([step.s, step.lam, step.tau[:, None], step.kappa[:, None]], axis=1)
    ratios = jnp.where(directions < 0, -values / directions, 1.0)
    return jnp.minimum(ratios.min(axis=1), 1.0)


def _solve_columns(factor, iterate, residuals, p, h, b, r_s_lam, *, eta):
    """Solve the Newton matrix for the residuals' right-hand side (scaled by ``eta``, with the complementarity
    target ``r_s_lam``), preceded, when ``p`` is given, by the constant right-hand side [-p; h; b]."""
    eta = eta[:, None]
    columns = [(-eta * residuals.x, -eta * residuals.lam + r_s_lam / iterate.lam, -eta * residuals.nu)]
    if p is not None:
        columns.insert(0, (-p, h, b))
    blocks = solve_kkt(factor, *(jnp.stack(block, axis=-1) for block in zip(*columns)))
    return [tuple(block[..., k] for block in blocks) for k in range(len(columns))]


def _complete(along_tau, direction, iterate, residuals, p, h, b, r_s_lam, r_tau_kappa, *, eta) -> Iterate:
    """The full step from a solve of the Newton matrix: dtau from the linearized r_tau row, then ds and dkappa
    from the linearized complementarity products."""
    x, s, lam, nu, tau, kappa = iterate
    # The gradient of x'Qx / tau in x, and minus its derivative in tau, enter the linearized r_tau row.
    slope = p + 2 * residuals.Qx / tau[:, None]
    numerator = (-eta * residuals.tau + r_tau_kappa / tau
                 - _dot(slope, direction[0]) - _dot(h, direction[1]) - _dot(b, direction[2]))
    denominator = (_dot(slope, along_tau[0]) + _dot(h, along_tau[1]) + _dot(b, along_tau[2])
                   - kappa / tau - residuals.xQx / tau**2)
    dtau = numerator / denominator
    dx, dlam, dnu = (v + dtau[:, None] * u for v, u in zip(direction, along_tau))
    ds = -(r_s_lam + s * dlam) / lam
    dkappa = -(r_tau_kappa + kappa * dtau) / tau
    return Iterate(dx, ds, dlam, dnu, dtau, dkappa)


def initial_iterate(Q, p, G, G_transposed, h, A, b, delta: float) -> Iterate:
    """Clarabel's start: solve the KKT system with W = I, then shift s and lam into the positive orthant."""
    factor = factor_kkt(Q, G, G_transposed, A, jnp.ones_like(h), delta)
    x, lam, nu = (v[..., 0] for v in solve_kkt(factor, -p[..., None], h[..., None], b[..., None]))
    ones = jnp.ones_like(p[:, 0])
    return Iterate(x, _shift_into_cone(-lam), _shift_into_cone(lam), nu, ones, ones)


def _residuals(Q, p, G, h, A, b, iterate: Iterate, tol: float, p_size, h_size, b_size):
    """The embedding's residuals at ``iterate``, and which samples it shows solved, primal infeasible or dual
    infeasible (the stopping tests: on the candidate solution divided by tau, and on the certificates not)."""
    x, s, lam, nu, tau, kappa = iterate
    Qx, Gx, Ax = bmv(Q, x), bmv(G, x), bmv(A, x)
    Gt_lam, At_nu = bmtv(G, lam), bmtv(A, nu)
    xQx = _dot(x, Qx)
    r_x = Qx + Gt_lam + At_nu + p * tau[:, None]
    r_lam = Gx + s - h * tau[:, None]
    r_nu = Ax - b * tau[:, None]
    r_tau = kappa + _dot(p, x) + _dot(h, lam) + _dot(b, nu) + xQx / tau

    primal_residual = jnp.maximum(largest(r_lam), largest(r_nu)) / tau
    dual_residual = largest(r_x) / tau
    primal_objective = (0.5 * xQx / tau + _dot(p, x)) / tau
    dual_objective = (-0.5 * xQx / tau - _dot(h, lam) - _dot(b, nu)) / tau
    gap = jnp.abs(primal_objective - dual_objective)
    solved = (
        (primal_residual <= tol * (1 + jnp.maximum(jnp.maximum(largest(Gx), largest(Ax)) / tau,
                                                   jnp.maximum(jnp.maximum(largest(s) / tau, h_size), b_size))))
        & (dual_residual <= tol * (1 + jnp.maximum(jnp.maximum(largest(Qx), largest(Gt_lam + At_nu)) / tau, p_size)))
        & (gap <= tol * (1 + jnp.minimum(jnp.abs(primal_objective), jnp.abs(dual_objective))))
    )
    h_lam_b_nu = _dot(h, lam) + _dot(b, nu)
    primal_infeasible = (h_lam_b_nu < -tol * jnp.maximum(largest(lam), largest(nu))) & (
        largest(Gt_lam + At_nu) <= -tol * h_lam_b_nu
    )
    p_x = _dot(p, x)
    dual_infeasible = (p_x < -tol * largest(x)) & (
        jnp.maximum(largest(Qx), jnp.maximum(largest(Gx + s), largest(Ax))) <= -tol * p_x
    )
    return Residuals(r_x, r_lam, r_nu, r_tau, Qx, xQx), solved, primal_infeasible, dual_infeasible


class _LoopState(NamedTuple):
    iterate: Iterate
    status: jax.Array
    running: jax.Array
    iterations: jax.Array
    steps: jax.Array  # () int: loop steps taken for the batch, each one factorization
    stopped: jax.Array  # () bool: no sample was left running, or max_iter steps were taken


def pdipm(Q, p, G, h, A, b, *, tol: float, max_iter: int) -> PDIPMOutput:
    """Run the interior-point method on a batch of broadcast QPs (Q (B, n, n), p (B, n), G (B, m, n), h (B, m),
    A (B, e, n), b (B, e)), in chunks of at most ``CHUNK`` samples solved one after another (``lax.map``), each
    by ``_pdipm_chunk``; the chunks are as equal as can be, the last sample repeated to fill the last one.

    Each sample's iterations are its own, so chunking changes no result; the record's factorization count is
    that of the chunk that took the most steps, the count of one loop over the whole batch. It saves time two
    ways: a chunk's loop stops when its own samples have, where one loop over the batch steps every sample until
    the slowest has finished, and a chunk's matrices stay in the CPU's caches between the operations of a step
    (at a batch of 128 with n = m = 50, 0.8 of the time of one loop; at 512, 0.6).
    """
    batch = p.shape[0]
    if batch <= CHUNK:
        return _pdipm_chunk(Q, p, G, h, A, b, tol=tol, max_iter=max_iter)
    chunks = -(-batch // CHUNK)
    size = -(-batch // chunks)
    padding = chunks * size - batch

    def split(v: jax.Array) -> jax.Array:
        v = jnp.concatenate([v, jnp.broadcast_to(v[-1:], (padding, *v.shape[1:]))]) if padding else v
        return v.reshape(chunks, size, *v.shape[1:])

    output = jax.lax.map(lambda arrays: _pdipm_chunk(*arrays, tol=tol, max_iter=max_iter),
                         [split(v) for v in (Q, p, G, h, A, b)])
    iterate, status, iterations = jax.tree.map(
        lambda v: v.reshape(chunks * size, *v.shape[2:])[:batch], (output.iterate, output.status, output.iterations)
    )
    return PDIPMOutput(iterate, status, iterations, output.num_factorizations.max())


def _pdipm_chunk(Q, p, G, h, A, b, *, tol: float, max_iter: int) -> PDIPMOutput:
    """``pdipm`` on a batch in one loop. Samples stop one by one: a finished sample's iterate is frozen, and the
    loop ends when every sample has stopped, decided on the device (no host synchronization).

    Each pass of the loop checks the iterate and then, under a ``lax.cond``, steps, as each pass of torch's loop
    does: the check is written once in the program, which keeps its compilation short.

    The method runs on the problem with every inequality row scaled to unit Euclidean norm (its right-hand side
    with it), and the iterate it returns is mapped back to the problem as given. Without that, a row much shorter
    than its right-hand side (a constraint far from the origin, written with small coefficients) could stall the
    iterations, for example at |g| = 0.06, h = 1 in two variables. Equality rows are left as given: scaled to
    unit norm, the learned equalities of the Sudoku layer (chapter 6) no longer converged in float32, the fixed
    regularization of the Schur complement then weighing more against its entries."""
    G_scale = _row_scale(G)
    G, h = G * G_scale[..., None], h * G_scale
    G_transposed = jnp.swapaxes(G, -1, -2)  # made once, outside the loop (see factor_kkt)
    batch, m = p.shape[0], h.shape[1]
    delta, smallest_W = regularization(p.dtype)
    integer = jax.dtypes.canonicalize_dtype(int)
    p_size, h_size, b_size = largest(p), largest(h), largest(b)

    def step(state: _LoopState, residuals: Residuals) -> _LoopState:
        iterate, status, running = state.iterate, state.status, state.running
        x, s, lam, nu, tau, kappa = iterate
        factor = factor_kkt(Q, G, G_transposed, A, lam / (s + smallest_W * lam), delta)
        ones = jnp.ones_like(tau)
        # One solve for two right-hand sides: [-p; h; b] gives each direction's part along tau, the residuals
        # give the affine (predictor) direction.
        along_tau, affine = _solve_columns(factor, iterate, residuals, p, h, b, s * lam, eta=ones)
        predictor = _complete(along_tau, affine, iterate, residuals, p, h, b, s * lam, tau * kappa, eta=ones)
        alpha = _longest_step(iterate, predictor)
        mu = (_dot(s, lam) + tau * kappa) / (m + 1)
        sigma_mu = (1 - alpha) ** 3 * mu
        eta = 1 - (1 - alpha) ** 3
        # Mehrotra's corrector: aim at the central path, mu shrunk by sigma, and cancel the predictor's
        # second-order term in the complementarity products.
        r_s_lam = s * lam + predictor.s * predictor.lam - sigma_mu[:, None]
        r_tau_kappa = tau * kappa + predictor.tau * predictor.kappa - sigma_mu
        (corrector,) = _solve_columns(factor, iterate, residuals, None, None, None, r_s_lam, eta=eta)
        direction = _complete(along_tau, corrector, iterate, residuals, p, h, b, r_s_lam, r_tau_kappa, eta=eta)
        alpha = STEP_TO_BOUNDARY * _longest_step(iterate, direction)
        stepped = Iterate(*(v + per_sample(alpha, v) * dv for v, dv in zip(iterate, direction)))
        finite = ~factor.singular & jnp.stack(
            [jnp.isfinite(v).reshape(batch, -1).all(axis=1) for v in stepped[:4]]
            + [jnp.isfinite(stepped.tau * stepped.kappa)]
        ).all(axis=0)
        status = jnp.where(running & ~finite, FAILED, status)
        running = running & finite
        iterate = Iterate(*(jnp.where(per_sample(running, new), new, old) for new, old in zip(stepped, iterate)))
        return _LoopState(iterate, status, running, state.iterations + running, state.steps + 1, state.stopped)

    def check_then_step(state: _LoopState) -> _LoopState:
        residuals, solved, primal_infeasible, dual_infeasible = _residuals(
            Q, p, G, h, A, b, state.iterate, tol, p_size, h_size, b_size
        )
        status, running = state.status, state.running
        for code, flag in ((DUAL_INFEASIBLE, dual_infeasible), (PRIMAL_INFEASIBLE, primal_infeasible), (SOLVED, solved)):
            status = jnp.where(running & flag, code, status)
        state = state._replace(status=status, running=running & ~(solved | primal_infeasible | dual_infeasible))
        return jax.lax.cond(
            state.running.any() & (state.steps < max_iter),
            step, lambda state, _: state._replace(stopped=jnp.ones((), bool)), state, residuals,
        )

    batch_of = partial(jnp.full, (batch,))
    state = jax.lax.while_loop(
        lambda state: ~state.stopped, check_then_step,
        _LoopState(initial_iterate(Q, p, G, G_transposed, h, A, b, delta), batch_of(MAX_ITER, dtype=integer),
                   batch_of(True), batch_of(0, dtype=integer), jnp.zeros((), integer), jnp.zeros((), bool)),
    )
    iterate = state.iterate._replace(s=state.iterate.s / G_scale, lam=state.iterate.lam * G_scale)
    return PDIPMOutput(iterate, state.status, state.iterations, state.steps + 1)
