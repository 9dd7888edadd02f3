"""Warnings and errors shared by the torch and JAX solvers."""


class ConvergenceWarning(UserWarning):
    """A solver stopped before every sample met its tolerance; the message gives the residual reached."""


class ConvergenceError(RuntimeError):
    """A solver called with ``strict=True`` stopped before every sample met its tolerance."""
