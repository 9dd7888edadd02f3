"""``qp``: a batch of convex quadratic programs solved by an interior-point method and differentiated through their
KKT conditions (OptNet). The JAX twin of the torch module."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..._checks import check_qp_options, check_qp_shapes
from ...errors import UnsupportedDerivativeError, report_qp_status
from .._validation import is_concrete, known_to_be_finite
from ._kkt import factor_kkt, kkt_residual, regularization, solve_kkt_refined
from .pdipm import DUAL_INFEASIBLE, PRIMAL_INFEASIBLE, largest, pdipm, per_sample
from .result import QPResult

DEFAULT_TOL = {jnp.dtype(jnp.float64): 1e-9, jnp.dtype(jnp.float32): 1e-5}
BACKWARD_REFINEMENTS = 3  # iterative-refinement rounds that take the regularization out of the backward solve


def qp(
    Q: jax.Array,
    p: jax.Array,
    G: Optional[jax.Array] = None,
    h: Optional[jax.Array] = None,
    A: Optional[jax.Array] = None,
    b: Optional[jax.Array] = None,
    *,
    tol: Optional[float] = None,
    max_iter: int = 100,
    strict: bool = False,
    warn: bool = True,
) -> tuple[jax.Array, QPResult]:
    """The JAX twin of :func:`implicit_layers.torch.qp`: solve ``min 1/2 x'Qx + p'x subject to Gx <= h, Ax = b``
    for each sample of a batch, differentiably.

    Parameters
    ----------
    Q : jax.Array
        Symmetric positive semidefinite, shape (n, n) or (B, n, n).
    p : jax.Array
        Shape (n,) or (B, n).
    G, h : jax.Array, optional
        Inequalities ``G x <= h``: shapes (m, n) or (B, m, n), and (m,) or (B, m). Both or neither.
    A, b : jax.Array, optional
        Equalities ``A x = b``: shapes (e, n) or (B, e, n), and (e,) or (B, e). Both or neither.
    tol : float, optional
        Stopping tolerance on the residuals and the duality gap, each relative to the size of its terms (plus
        one); also the tolerance of the infeasibility certificates. Defaults to 1e-9 in float64, 1e-5 in float32.
    max_iter : int
        Interior-point iterations before a sample is reported as ``"max_iter"``.
    strict : bool
        Raise :class:`~implicit_layers.errors.ConvergenceError` instead of warning when a sample is not solved.
        Under ``jit`` the error is raised from a device callback and reaches the caller wrapped in a
        ``jax.errors.JaxRuntimeError`` quoting its message.
    warn : bool
        Warn (:class:`~implicit_layers.errors.ConvergenceWarning`) naming the samples not solved and why; under
        ``jit`` the warning comes from a device callback made only when some sample is not solved.

    Returns
    -------
    x : jax.Array
        The solutions, shape (B, n) (B = 1 when no argument has a batch dimension). NaN for a sample found
        infeasible or unbounded, which has no solution.
    result : QPResult
        Multipliers, slacks, iterations, residuals and gap reached, and each sample's status. Its fields carry
        no gradient.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, named: a shape (always), a dtype (always), NaN/Inf or a Q that is not symmetric
        positive semidefinite (only when the values are concrete: these checks are skipped for the traced
        values that ``jit``, ``vmap`` and ``grad`` pass in).
    ConvergenceError
        With ``strict=True``, if some sample is not solved.
    UnsupportedDerivativeError
        When the gradient is differentiated again with respect to anything the QP's arguments depend on.

    Notes
    -----
    Every argument may be shared by the batch or given per sample. Each sample runs Mehrotra's predictor-corrector
    on the homogeneous self-dual embedding (see ``pdipm``) until it is solved or certified infeasible; finished
    samples are frozen while the others go on, in a ``lax.while_loop`` that decides on the device when to stop.

    Gradients reach every argument through the implicit function theorem applied to the KKT conditions at the
    solution (Amos and Kolter, 2017), a ``custom_vjp`` rule: one factorization of the Newton matrix there, one
    solve per backward pass. A shared argument is broadcast to the batch before the rule, so its gradient is the
    sum over the samples. The backward pass reads the active set off the solution (a constraint whose multiplier
    exceeds its slack holds with equality) and is exact for it. Where a constraint is weakly active (its
    multiplier and its slack both zero) the solution is not differentiable; the gradient returned there is that
    of the active set the solution shows, one of the one-sided derivatives. A constraint whose multiplier is below
    about the square root of the tolerance reached cannot be told apart from a weakly active one. Samples found
    infeasible get NaN gradients.

    The rule is first order, as in torch: differentiating the gradient again (``grad`` of ``grad``,
    ``jax.hessian``) with respect to anything that reaches Q, p, G, h, A or b raises
    :class:`~implicit_layers.errors.UnsupportedDerivativeError` when it is traced, because the rule holds the
    solution fixed and would miss how it moves. Differentiating it with respect to what only the incoming
    gradient depends on is exact (the rule is linear in it) and allowed. Forward mode (``jvp``) is refused by
    JAX itself, with a ``TypeError``, as for every ``custom_vjp``.

    ``jit`` (with the keywords static), ``grad`` and ``vmap`` compose with it. A ``vmap`` over single problems
    gives each its batch of one (so ``x`` has shape (V, 1, n)); passing the batch as the leading dimension does the
    same work as one loop.
    """
    arrays = {name: None if value is None else _as_array(name, value)
              for name, value in dict(Q=Q, p=p, G=G, h=h, A=A, b=b).items()}
    batch, n, m, e = check_qp_shapes({name: None if v is None else tuple(v.shape) for name, v in arrays.items()})
    dtype = _check_dtype(arrays)
    options = check_qp_options(tol=DEFAULT_TOL[dtype] if tol is None else tol, max_iter=max_iter, strict=strict, warn=warn)
    for name, value in arrays.items():
        if value is not None and not known_to_be_finite(value):
            raise ValueError(f"{name} contains NaN or Inf")
    if is_concrete(arrays["Q"]):
        _check_positive_semidefinite(np.asarray(arrays["Q"]))

    def batched(value: Optional[jax.Array], rows: int, vector: bool) -> jax.Array:
        if value is None:
            return jnp.zeros((batch, rows) if vector else (batch, rows, n), dtype=dtype)
        return jnp.broadcast_to(value, (batch, *value.shape[-(1 if vector else 2):]))

    Q, p, G, h, A, b = (batched(arrays[name], size, vector) for name, size, vector in
                        (("Q", n, False), ("p", n, True), ("G", m, False), ("h", m, True), ("A", e, False),
                         ("b", e, True)))
    # The solve itself carries no derivative: the custom_vjp rule below supplies it.
    x, result, infeasible = _solve(*(jax.lax.stop_gradient(v) for v in (Q, p, G, h, A, b)), tol=options["tol"],
                                   max_iter=options["max_iter"])
    if options["warn"] or options["strict"]:
        _report(result, max_iter=options["max_iter"], strict=options["strict"])
    x = _kkt_gradient(Q, p, G, h, A, b, x, result.lam, result.nu, result.slack, infeasible)
    return x, result


@jax.jit
def _solve(Q, p, G, h, A, b, *, tol: float, max_iter: int) -> tuple[jax.Array, QPResult, jax.Array]:
    """The solution, the record and the infeasible (or unbounded) samples of a batch of broadcast QPs, without
    derivatives. Compiled as one program, cached by shapes and dtype (``tol`` and ``max_iter`` are traced), so
    that calls outside ``jit`` do not trace and compile the loop again."""
    Q_symmetric = 0.5 * (Q + jnp.swapaxes(Q, -1, -2))
    output = pdipm(Q_symmetric, p, G, h, A, b, tol=tol, max_iter=max_iter)
    x, slack, lam, nu, tau, _ = output.iterate
    x, slack, lam, nu = (v / tau[:, None] for v in (x, slack, lam, nu))
    residual = kkt_residual(Q_symmetric, p, G, h, A, b, x, lam, nu, slack)
    gap = jnp.abs((x * jnp.matmul(Q_symmetric, x[..., None])[..., 0]).sum(1) + (p * x).sum(1) + (h * lam).sum(1)
                  + (b * nu).sum(1))
    certificate = output.iterate.lam, output.iterate.nu
    scale = jnp.maximum(largest(certificate[0]), largest(certificate[1]))[:, None]
    primal_infeasible = (output.status == PRIMAL_INFEASIBLE)[:, None]
    infeasible = primal_infeasible | (output.status == DUAL_INFEASIBLE)[:, None]
    x, slack = jnp.where(infeasible, jnp.nan, x), jnp.where(infeasible, jnp.nan, slack)
    lam = jnp.where(primal_infeasible, certificate[0] / scale, jnp.where(infeasible, jnp.nan, lam))
    nu = jnp.where(primal_infeasible, certificate[1] / scale, jnp.where(infeasible, jnp.nan, nu))
    primal_residual, dual_residual, gap = (jnp.where(infeasible[:, 0], jnp.nan, v) for v in
                                           (residual.primal, residual.dual, gap))
    result = QPResult(lam, nu, slack, output.iterations, primal_residual, dual_residual, gap, output.status,
                      output.num_factorizations)
    return x, result, infeasible[:, 0]


@jax.custom_jvp
def _refuse_second_derivative(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The identity, whose derivative raises: the backward rule passes its inputs through it, so that a second
    derivative, which would have to differentiate the rule, is refused when it is traced."""
    return arrays


@_refuse_second_derivative.defjvp
def _refuse_second_derivative_jvp(primals, tangents):
    raise UnsupportedDerivativeError(
        "qp's gradient comes from the KKT conditions with the solution held fixed, so differentiating it "
        "again would miss how the solution moves: a wrong second derivative. qp is differentiable once."
    )


@jax.custom_vjp
def _kkt_gradient(Q, p, G, h, A, b, x, lam, nu, slack, infeasible):
    """Passes the solution through and differentiates the KKT conditions at it in the backward pass.

    With the complementarity rows divided by lam, the linearized KKT conditions read J [dx; dlam; dnu] = -[dQ x +
    dp + dG' lam + dA' nu; dG x - dh; dA x - db] with the symmetric J = [[Q, G', A'], [G, -W, 0], [A, 0, 0]],
    W = slack / lam, the interior-point Newton matrix at the solution. So one solve J u = [g; 0; 0] for the
    incoming gradient g gives every input's gradient as an outer product (OptNet's, with d_x = -u_x).
    """
    return x


def _kkt_gradient_forward(Q, p, G, h, A, b, x, lam, nu, slack, infeasible):
    return x, (Q, p, G, h, A, b, x, lam, nu, slack, infeasible)


def _kkt_gradient_backward(saved, g):
    Q, _, G, _, A, _ = _refuse_second_derivative(*saved[:6])
    gradients = _kkt_gradients(Q, G, A, *saved[6:], g)
    # The solution, multipliers, slacks and flags passed in get no cotangent: they are outputs of the solve.
    return (*gradients, None, None, None, None, None)


@jax.jit
def _kkt_gradients(Q, G, A, x, lam, nu, slack, infeasible, g) -> tuple[jax.Array, ...]:
    """The gradients with respect to Q, p, G, h, A, b for the incoming gradient ``g`` of the solution ``x``.
    Compiled as one program, cached by shapes, so that a gradient taken outside ``jit`` is not dispatched (and
    compiled) operation by operation."""
    Q = 0.5 * (Q + jnp.swapaxes(Q, -1, -2))
    # The active set, read off the solution: a constraint whose multiplier exceeds its slack holds with
    # equality (W = 0), the others drop out (their rows zeroed, their multipliers' part of u zero). This is
    # the exact KKT derivative for that active set, where W = slack / lam at a finite tolerance would leave an
    # error of the order of the complementarity reached.
    active = lam > slack
    G = jnp.where(active[..., None], G, 0.0)
    lam = jnp.where(active, lam, 0.0)
    W = jnp.where(active, 0.0, 1.0).astype(g.dtype)
    delta, smallest_W = regularization(g.dtype)
    factor = factor_kkt(Q, G, jnp.swapaxes(G, -1, -2), A, 1 / (W + smallest_W), delta)
    zeros = [jnp.zeros(v.shape + (1,), g.dtype) for v in (lam, nu)]
    u_x, u_lam, u_nu = (v[..., 0] for v in
                        solve_kkt_refined(factor, Q, W, g[..., None], *zeros, refinements=BACKWARD_REFINEMENTS))

    def outer(u: jax.Array, v: jax.Array) -> jax.Array:
        return u[:, :, None] * v[:, None, :]

    gradients = (
        -0.5 * (outer(u_x, x) + outer(x, u_x)),
        -u_x,
        -outer(lam, u_x) - outer(u_lam, x),
        u_lam,
        -outer(nu, u_x) - outer(u_nu, x),
        u_nu,
    )
    return tuple(jnp.where(per_sample(infeasible, v), jnp.nan, v) for v in gradients)


_kkt_gradient.defvjp(_kkt_gradient_forward, _kkt_gradient_backward)


def _as_array(name: str, value: Any) -> jax.Array:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be a JAX array, got {type(value).__name__}")
    return jnp.asarray(value)


def _check_dtype(arrays: dict) -> Any:
    dtype = arrays["Q"].dtype
    if dtype not in DEFAULT_TOL:
        raise TypeError(f"Q must be float32 or float64 (the interior-point method needs their precision), got {dtype}")
    for name, value in arrays.items():
        if value is not None and value.dtype != dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but Q has {dtype}: give every argument the same dtype")
    return dtype


def _check_positive_semidefinite(Q: np.ndarray) -> None:
    """Raise unless every sample of Q is symmetric and positive semidefinite, to a tolerance relative to its
    size (a Cholesky factorization of Q + sqrt(eps) * scale * I must exist). The same test as torch's, in NumPy
    on the concrete values."""
    eps = np.finfo(Q.dtype).eps
    batched = Q if Q.ndim == 3 else Q[None]
    scale = np.maximum(np.abs(batched).reshape(batched.shape[0], -1).max(1), 1.0).astype(Q.dtype)
    asymmetry = np.abs(batched - np.swapaxes(batched, -1, -2)).reshape(batched.shape[0], -1).max(1)
    bad = np.flatnonzero(asymmetry > 100 * eps * scale)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"Q must be symmetric: sample {i} has max |Q - Q'| = {float(asymmetry[i]):.3g}")
    shifted = batched + (eps**0.5 * scale)[:, None, None] * np.eye(Q.shape[-1], dtype=Q.dtype)
    try:
        np.linalg.cholesky(shifted)
        return
    except np.linalg.LinAlgError:  # NumPy does not say which sample failed: look for the first one
        pass
    for i, sample in enumerate(shifted):
        try:
            np.linalg.cholesky(sample)
        except np.linalg.LinAlgError:
            smallest = float(np.linalg.eigvalsh(batched[i]).min())
            raise ValueError(f"Q must be positive semidefinite: sample {i} has an eigenvalue {smallest:.3g}") from None


def _report(result: QPResult, *, max_iter: int, strict: bool) -> None:
    """Warn (or raise, with ``strict``) naming the samples not solved: at once when the values are concrete,
    else from the device by ``jax.debug.callback``, made only when some sample is not solved."""

    def emit(status_code, primal_residual, dual_residual, gap):
        report_qp_status(status_code, primal_residual, dual_residual, gap, max_iter=max_iter, strict=strict,
                         stacklevel=4)

    values = (result.status_code, result.primal_residual, result.dual_residual, result.gap)
    if all(is_concrete(value) for value in values):
        emit(*values)
    else:
        jax.lax.cond(jnp.all(result.converged), lambda *_: None, lambda *a: jax.debug.callback(emit, *a), *values)
