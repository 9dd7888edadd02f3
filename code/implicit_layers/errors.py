"""Warnings and errors shared by the torch and JAX solvers."""


class ConvergenceWarning(UserWarning):
    """A solver stopped before every sample met its tolerance; the message gives the residual reached."""


class ConvergenceError(RuntimeError):
    """A solver called with ``strict=True`` stopped before every sample met its tolerance."""


class UnsupportedDerivativeError(RuntimeError):
    """A derivative was requested that this route cannot compute correctly (rather than return a wrong one)."""


def report_convergence(
    name, converged, residual, failed, drifted, *, tol, max_iter, strict, stacklevel=2
) -> None:
    """Warn (or, when ``strict``, raise) if some sample of a batched solve did not converge.

    Parameters
    ----------
    name : str
        The solver, as the message names it.
    converged, residual, failed : array_like
        Per-sample flags and final residuals (NumPy-convertible, shape (B,)).
    drifted : array_like
        Per-sample flags: the sample met the tolerance during the solve but not at its final iterate, which
        happens only when the map mixes samples of the batch.
    tol, max_iter : float, int
        The limits the solver ran with, quoted in the message.
    strict : bool
        Raise :class:`ConvergenceError` instead of warning.
    stacklevel : int
        Passed to :func:`warnings.warn` so the warning points at the caller's code.
    """
    import warnings

    import numpy as np

    converged, residual, failed, drifted = (np.asarray(a) for a in (converged, residual, failed, drifted))
    missed = ~converged
    if not missed.any():
        return
    message = (
        f"{name} did not converge for {int(missed.sum())} of {missed.size} samples "
        f"(max_iter={max_iter}): largest residual reached {float(residual[missed].max()):.3g}, tol {tol:.3g}"
    )
    if failed.any():
        message += f"; {int(failed.sum())} stopped because a step gave NaN/Inf or a singular linear system"
    if drifted.any():
        message += (
            f"; {int(drifted.sum())} met the tolerance and lost it while other samples moved, so f mixes the "
            "samples of the batch (batch statistics such as batch normalization in training mode do): a batched "
            "solver needs each sample's output to depend on that sample alone"
        )
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


ODE_HINT = "raise max_steps or loosen rtol/atol; a failed sample (NaN/Inf or step size underflow) points at f or at stiffness"


def report_ode_convergence(
    method, converged, failed, t_reached, final_dt, *, t_start, max_steps, strict, stacklevel=2
) -> None:
    """Warn (or, when ``strict``, raise) if some sample of a batched ODE solve did not reach the final time.

    Parameters
    ----------
    method : str
        The integration method, as the message names it.
    converged, failed : array_like
        Per-sample flags, shape (B,): reached the final time; stopped on NaN/Inf or a step size underflow.
    t_reached, final_dt : array_like
        Per-sample time reached and last step size, shape (B,).
    t_start : float
        The initial time, from which "furthest" is measured (the grid may decrease).
    max_steps : int
        The step limit the solver ran with, quoted in the message.
    strict : bool
        Raise :class:`ConvergenceError` instead of warning.
    stacklevel : int
        Passed to :func:`warnings.warn` so the warning points at the caller's code.
    """
    import warnings

    import numpy as np

    converged, failed, t_reached, final_dt = (np.asarray(a) for a in (converged, failed, t_reached, final_dt))
    missed = ~converged
    if not missed.any():
        return
    furthest = t_reached[missed][np.argmax(np.abs(t_reached[missed] - t_start))]
    message = (
        f"odeint({method}) did not reach t1 for {int(missed.sum())} of {missed.size} samples "
        f"(max_steps={max_steps}): furthest t={float(furthest):.6g}, smallest dt {float(np.abs(final_dt[missed]).min()):.3g}"
    )
    if failed.any():
        message += f"; {int(failed.sum())} stopped on NaN/Inf or a step size underflow"
    message += f"; {ODE_HINT}"
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


def report_qp_status(status_code, primal_residual, dual_residual, gap, *, max_iter, strict, stacklevel=2) -> None:
    """Warn (or, when ``strict``, raise) naming the samples of a batched QP that were not solved: infeasible,
    unbounded, stopped at ``max_iter`` (with the residuals reached) or failed.

    Parameters
    ----------
    status_code : array_like
        Per-sample index into ``_checks.QP_STATUSES``, shape (B,).
    primal_residual, dual_residual, gap : array_like
        Per-sample values reached, shape (B,).
    max_iter : int
        The iteration limit, quoted in the message.
    strict : bool
        Raise :class:`ConvergenceError` instead of warning.
    stacklevel : int
        Passed to :func:`warnings.warn` so the warning points at the caller's code.
    """
    import warnings

    import numpy as np

    from ._checks import QP_STATUSES

    status_code = np.asarray(status_code)
    unsolved = status_code != QP_STATUSES.index("solved")
    if not unsolved.any():
        return

    def samples(mask) -> str:
        indices = np.flatnonzero(mask).tolist()
        shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
        return f"sample{'s' if len(indices) > 1 else ''} {shown}"

    parts = []
    for word, meaning in (
        ("primal_infeasible", "primal infeasible (no x satisfies the constraints)"),
        ("dual_infeasible", "dual infeasible (the objective is unbounded below on the constraints)"),
        ("failed", "failed (a step gave NaN/Inf or a singular system; check the inputs' scaling)"),
    ):
        mask = status_code == QP_STATUSES.index(word)
        if mask.any():
            parts.append(f"{int(mask.sum())} {meaning}: {samples(mask)}")
    stopped = status_code == QP_STATUSES.index("max_iter")
    if stopped.any():
        primal, dual, gap = (float(np.asarray(values)[stopped].max()) for values in (primal_residual, dual_residual, gap))
        parts.append(
            f"{int(stopped.sum())} not solved within max_iter={max_iter} iterations ({samples(stopped)}): largest "
            f"primal residual {primal:.3g}, dual residual {dual:.3g}, gap {gap:.3g}; raise max_iter or loosen tol"
        )
    message = f"qp did not solve {int(unsolved.sum())} of {unsolved.size} samples: " + "; ".join(parts)
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)
