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
