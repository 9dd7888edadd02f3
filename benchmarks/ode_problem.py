"""The neural ODE every library integrates in ``ode.py``, and its float64 references from SciPy.

The vector field is an MLP 2-64-64-2 with tanh, ``f(y) = W3 tanh(W2 tanh(W1 y + b1) + b2) + b3``, the same for
every sample of a batch of 256 two-dimensional states, integrated from t = 0 to 1. Its weights are Gaussian with
a gain of 3 over the usual ``1/sqrt(fan_in)`` scale, which makes the dynamics worth an adaptive solver: Dormand-Prince
at rtol = atol = 1e-5 takes about 20 steps. The loss is ``L = sum(y(1) * c)`` for a fixed random ``c``.
The references are independent of every library benchmarked: SciPy's DOP853 at rtol = atol = 1e-12 for ``y(1)``,
and for ``dL/dparams`` the adjoint equations integrated backwards with DOP853 along the dense forward solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.integrate import solve_ivp

WIDTH = 64
GAIN = 3.0
REFERENCE_TOL = 1e-12
PARAMETER_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


@dataclass(frozen=True)
class Problem:
    """Weights, initial states and loss weights in float64; ``t1`` the end of the integration."""

    params: dict[str, np.ndarray]
    y0: np.ndarray
    c: np.ndarray
    t1: float = 1.0

    @property
    def batch(self) -> int:
        return self.y0.shape[0]


def make_problem(batch: int = 256, t1: float = 1.0, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    params = {}
    for index, (fan_out, fan_in) in enumerate([(WIDTH, 2), (WIDTH, WIDTH), (2, WIDTH)], start=1):
        params[f"W{index}"] = GAIN * rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)
        params[f"b{index}"] = 0.5 * rng.standard_normal(fan_out)
    return Problem(params, rng.standard_normal((batch, 2)), rng.standard_normal((batch, 2)), t1)


def vector_field(params: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
    h1 = np.tanh(y @ params["W1"].T + params["b1"])
    h2 = np.tanh(h1 @ params["W2"].T + params["b2"])
    return h2 @ params["W3"].T + params["b3"]


def vector_field_vjp(params: dict[str, np.ndarray], y: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, dict]:
    """``a^T df/dy`` per sample and ``sum_b a_b^T df/dparams``, written out by hand so that the reference
    shares no autodiff with the libraries it checks."""
    h1 = np.tanh(y @ params["W1"].T + params["b1"])
    h2 = np.tanh(h1 @ params["W2"].T + params["b2"])
    back2 = (a @ params["W3"]) * (1 - h2**2)
    back1 = (back2 @ params["W2"]) * (1 - h1**2)
    grads = {"W3": a.T @ h2, "b3": a.sum(0), "W2": back2.T @ h1, "b2": back2.sum(0),
             "W1": back1.T @ y, "b1": back1.sum(0)}
    return back1 @ params["W1"], grads


def reference(problem: Problem) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``y(t1)`` and ``dL/dparams`` in float64, to about 1e-11."""
    shape = problem.y0.shape
    forward = solve_ivp(lambda t, y: vector_field(problem.params, y.reshape(shape)).ravel(), (0.0, problem.t1),
                        problem.y0.ravel(), method="DOP853", rtol=REFERENCE_TOL, atol=REFERENCE_TOL,
                        dense_output=True)
    y1 = forward.y[:, -1].reshape(shape)
    sizes = [problem.params[name].size for name in PARAMETER_NAMES]

    def adjoint(t, state):
        # a' = -a^T df/dy and g' = -a^T df/dparams, from a(t1) = c and g(t1) = 0 back to t = 0
        a = state[: problem.y0.size].reshape(shape)
        da, grads = vector_field_vjp(problem.params, forward.sol(t).reshape(shape), a)
        return -np.concatenate([da.ravel()] + [grads[name].ravel() for name in PARAMETER_NAMES])

    start = np.concatenate([problem.c.ravel(), np.zeros(sum(sizes))])
    backward = solve_ivp(adjoint, (problem.t1, 0.0), start, method="DOP853", rtol=REFERENCE_TOL,
                         atol=REFERENCE_TOL)
    flat = backward.y[problem.y0.size:, -1]
    grads, offset = {}, 0
    for name, size in zip(PARAMETER_NAMES, sizes):
        grads[name] = flat[offset: offset + size].reshape(problem.params[name].shape)
        offset += size
    return y1, grads


def relative_error(grads: dict[str, np.ndarray], reference_grads: dict[str, np.ndarray]) -> float:
    """The largest relative Frobenius error over the parameters."""
    return max(float(np.linalg.norm(np.asarray(grads[name], dtype=np.float64) - reference_grads[name])
                     / np.linalg.norm(reference_grads[name])) for name in PARAMETER_NAMES)
