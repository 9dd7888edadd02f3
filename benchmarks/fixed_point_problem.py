"""The benchmark's problems, shared settings and float64 reference, independent of every library compared.

The problem is the tanh layer ``f(z) = tanh(z W^T + x)`` of the book, solved for a batch of inputs ``x`` at once,
and the loss ``L = sum(z* * c)`` whose gradient with respect to ``W`` and ``x`` the implicit function theorem
gives. All arrays come from one seeded NumPy generator and are handed to every library as the same float32 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Settings:
    """Solver settings that every library gets, each in its own vocabulary (the case modules translate)."""

    tol: float = 1e-5
    """Absolute tolerance on each sample's residual ``||f(z) - z||_2``."""
    max_iter: int = 500
    """Iteration limit of forward iteration, Anderson and Broyden, forward and backward."""
    newton_max_iter: int = 50
    anderson_m: int = 5
    anderson_ridge: float = 1e-4
    """Our Anderson ridge, relative: the regularization is this times the history's mean squared residual."""
    peer_anderson_ridge: float = 1e-10
    """The peers' Anderson ridge, absolute (their APIs have no relative one). It is ``tol**2``: the squared
    residuals near convergence. With 1e-4, torchdeq's default, the ridge outweighs the Gram matrix long before
    the tolerance is met and the weights tend to a plain average: on the hard problem both peers then take about
    five times as many steps as ours."""
    broyden_m: int = 30
    backward_rtol: float = 1e-4
    """Tolerance of the adjoint solve relative to each sample's incoming gradient ``||c_b||``."""

    def iterations(self, method: str) -> int:
        """The iteration limit of ``method`` (forward and backward)."""
        return self.newton_max_iter if method == "newton" else self.max_iter

    def our_options(self, method: str) -> dict:
        """The keyword options of our solver for ``method``, in torch and JAX alike."""
        if method == "anderson":
            return {"m": self.anderson_m, "ridge": self.anderson_ridge}
        if method == "broyden":
            return {"m": self.broyden_m}
        return {}


@dataclass(frozen=True)
class Problem:
    """One batched fixed-point problem with its loss weights and float64 answers."""

    name: str
    W: np.ndarray  # (n, n) float32
    x: np.ndarray  # (B, n) float32
    c: np.ndarray  # (B, n) float32, weights of the loss sum(z* * c)
    z_ref: np.ndarray  # (B, n) float64 fixed point
    grad_W_ref: np.ndarray  # (n, n) float64
    grad_x_ref: np.ndarray  # (B, n) float64

    @property
    def z0(self) -> np.ndarray:
        """The initial guess every solver starts from."""
        return np.zeros_like(self.x)


INPUT_SCALE = 0.1
"""Standard deviation of the inputs ``x``. Small inputs keep ``tanh`` near its linear regime, where ``tanh' ~ 1``
and the Jacobian ``D W`` contracts only as much as ``W`` does; with unit inputs many units saturate, ``D`` shrinks
and even the "hard" problem takes plain iteration only about 25 steps."""


def make_problems(n: int, batch: int, seed: int = 0) -> list[Problem]:
    """The "easy" problem (Gaussian ``W`` with spectral norm 0.5) and the "hard" one (symmetric ``W`` with spectral
    norm 0.9: eigenvalues near +-0.9 make plain iteration contract slowly), with their references."""
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((n, n))
    symmetric = rng.standard_normal((n, n))
    symmetric = symmetric + symmetric.T
    x = (INPUT_SCALE * rng.standard_normal((batch, n))).astype(np.float32)
    c = rng.standard_normal((batch, n)).astype(np.float32)
    weights = {"easy": _with_spectral_norm(gaussian, 0.5), "hard": _with_spectral_norm(symmetric, 0.9)}
    return [_with_reference(name, W, x, c) for name, W in weights.items()]


def _with_spectral_norm(matrix: np.ndarray, norm: float) -> np.ndarray:
    return (matrix * (norm / np.linalg.norm(matrix, 2))).astype(np.float32)


def _with_reference(name: str, W: np.ndarray, x: np.ndarray, c: np.ndarray) -> Problem:
    z = reference_fixed_point(W, x)
    grad_W, grad_x = reference_gradient(W, z, c)
    return Problem(name, W, x, c, z, grad_W, grad_x)


def tanh_layer(z: np.ndarray, W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``f(z) = tanh(z W^T + x)`` in float64, the map every library solves."""
    return np.tanh(z @ W.astype(np.float64).T + x.astype(np.float64))


def residuals(z: np.ndarray, W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-sample ``||f(z) - z||_2`` in float64, shape (B,)."""
    z = np.asarray(z, dtype=np.float64)
    return np.linalg.norm(tanh_layer(z, W, x) - z, axis=1)


def reference_fixed_point(W: np.ndarray, x: np.ndarray, tol: float = 1e-12, max_iter: int = 50) -> np.ndarray:
    """Newton's method on ``f(z) - z = 0`` in float64, each sample its own dense ``n x n`` system.

    The Jacobian of ``f`` is ``D W`` with ``D = diag(1 - f(z)^2)``; Newton needs no line search here since
    ``||W|| < 1`` makes ``f`` a contraction whose fixed point is unique.
    """
    W64 = W.astype(np.float64)
    identity = np.eye(W.shape[0])
    z = np.zeros(x.shape)
    for _ in range(max_iter):
        fz = tanh_layer(z, W, x)
        if np.linalg.norm(fz - z, axis=1).max() < tol:
            return z
        jacobian = (1.0 - fz**2)[:, :, None] * W64[None]
        z = z - np.linalg.solve(jacobian - identity, (fz - z)[:, :, None])[:, :, 0]
    raise RuntimeError(f"the float64 reference did not converge in {max_iter} Newton steps")


def reference_gradient(W: np.ndarray, z: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(z* * c)`` with respect to ``W`` and ``x`` by the implicit function theorem.

    With ``J = D W`` at the fixed point, ``h = (I - J)^{-T} c`` per sample (a dense solve); the gradient with
    respect to the pre-activation ``u = z W^T + x`` is ``D h``, so ``dL/dx = D h`` and ``dL/dW = (D h)^T z``.
    """
    W64 = W.astype(np.float64)
    derivative = 1.0 - z**2  # tanh' at the fixed point, since z* = tanh(u*)
    jacobian = derivative[:, :, None] * W64[None]
    adjoint = np.eye(W.shape[0]) - jacobian.transpose(0, 2, 1)
    h = np.linalg.solve(adjoint, c.astype(np.float64)[:, :, None])[:, :, 0]
    grad_u = derivative * h
    return grad_u.T @ z, grad_u


@dataclass(frozen=True)
class Accuracy:
    """How close one library's answer is to the float64 reference."""

    residual: float  # max over samples of ||f(z) - z||_2, evaluated in float64
    z_error: float  # max over samples of ||z - z_ref||_2
    grad_error: Optional[float]  # largest relative Frobenius error of dL/dW and dL/dx, if gradients were computed


def accuracy(problem: Problem, z: np.ndarray, grads: Optional[tuple[np.ndarray, np.ndarray]]) -> Accuracy:
    """Measure an answer against the reference; ``z`` is what the library returned, ``grads`` = (dL/dW, dL/dx)."""
    z = np.asarray(z, dtype=np.float64)
    grad_error = None
    if grads is not None:
        grad_error = max(
            _relative_error(grads[0], problem.grad_W_ref),
            _relative_error(grads[1], problem.grad_x_ref),
        )
    return Accuracy(
        residual=float(residuals(z, problem.W, problem.x).max()),
        z_error=float(np.linalg.norm(z - problem.z_ref, axis=1).max()),
        grad_error=grad_error,
    )


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(value, dtype=np.float64) - reference) / np.linalg.norm(reference))


def describe(options: dict, *extra: str) -> str:
    """A case's options as one line of the results file."""
    return ", ".join([*extra, *(f"{key}={value}" for key, value in options.items())])


@dataclass(frozen=True)
class Outcome:
    """What one run returned, as NumPy arrays."""

    z: np.ndarray  # (B, n), the solution the library returned
    steps: int  # solver steps, as the library counts them (most over the samples)
    grads: Optional[tuple[np.ndarray, np.ndarray]] = None  # (dL/dW, dL/dx) for the "gradient" task


@dataclass(frozen=True)
class Run:
    """A prepared benchmark: ``call()`` is timed and must return only once the work is done (JAX results are
    blocked on); ``unpack`` turns its output into an :class:`Outcome`, outside the timing."""

    call: Callable[[], Any]
    unpack: Callable[[Any], Outcome]


TASKS = ("forward", "gradient")
"""``forward``: solve only; ``gradient``: solve, then ``dL/dW`` and ``dL/dx`` through the implicit backward pass."""


@dataclass(frozen=True)
class Case:
    """One library's solver for one method. ``prepare(problem, settings, task)`` builds a :class:`Run`;
    ``unavailable`` says why a peer that failed to import has no runs (then ``prepare`` is None)."""

    framework: str
    library: str
    method: str
    settings: str
    prepare: Optional[Callable[[Problem, Settings, str], Run]] = None
    unavailable: Optional[str] = None
