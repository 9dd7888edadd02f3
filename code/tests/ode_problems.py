"""The ODE test problems, and the refused options, that the torch and JAX tests share, defined once without
either framework.

A field here takes a batch ``y`` (B, d) of any array type that supports column indexing and arithmetic (NumPy,
torch, JAX) and returns its derivative as a list of d columns; each framework's tests stack them. The references
are NumPy arrays computed once per process."""

import functools

import numpy as np
from scipy.integrate import solve_ivp
from scipy.linalg import expm

# A damped rotation: y' = A y, with y(t) = expm(A t) y0.
ROTATION = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def linear(y):
    return [sum(float(ROTATION[row, col]) * y[:, col] for col in range(2)) for row in range(2)]


def lotka_volterra(y):
    return [1.5 * y[:, 0] - y[:, 0] * y[:, 1], -3.0 * y[:, 1] + y[:, 0] * y[:, 1]]


def van_der_pol(y):
    return [y[:, 1], (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]]


def lorenz(y):
    return [10 * (y[:, 1] - y[:, 0]), y[:, 0] * (28 - y[:, 2]) - y[:, 1], y[:, 0] * y[:, 1] - 8 / 3 * y[:, 2]]


# name: (field, initial states of a batch of two, end time); each is solved from t = 0.
PROBLEMS = {
    "linear": (linear, [[1.0, 0.0], [0.5, 0.3]], 5.0),
    "lotka_volterra": (lotka_volterra, [[1.0, 1.0], [2.0, 0.5]], 5.0),
    "van_der_pol": (van_der_pol, [[2.0, 0.0], [0.5, 0.5]], 5.0),
    "lorenz": (lorenz, [[1.0, 1.0, 1.0], [-2.0, 3.0, 20.0]], 1.0),
}


def linear_exact(y0, times):
    """The damped rotation's solution from ``y0`` (B, 2) at ``times``, shape (T, B, 2)."""
    return np.stack([np.asarray(y0) @ expm(ROTATION * float(s)).T for s in times])


@functools.lru_cache
def scipy_reference(problem):
    """The problem's output times (six, from 0 to its end) and DOP853's solution at rtol = atol = 1e-12, one
    sample at a time, shape (T, B, d)."""
    field, y0, t_end = PROBLEMS[problem]
    times = np.linspace(0.0, t_end, 6)

    def derivative(t, y):
        return np.array([column[0] for column in field(y[None])])

    solutions = [
        solve_ivp(derivative, (times[0], times[-1]), np.array(sample), method="DOP853", rtol=1e-12, atol=1e-12,
                  t_eval=times).y.T
        for sample in y0
    ]
    return times, np.stack(solutions, axis=1)


# Two samples of y' = -k_b * rotate(y) with k = RATES: sample 0 barely moves, sample 1 oscillates fast.
RATES = np.array([0.05, 20.0])
EASY_HARD_Y0 = np.array([[1.0, 0.0], [0.0, 1.0]])


def easy_and_hard(y, rates):
    return [rates * y[:, 1], -rates * y[:, 0]]


def easy_and_hard_exact(y0, times):
    """The solution from ``y0`` (2, 2) at ``times``, shape (T, 2, 2)."""
    angle = RATES[None, :] * np.asarray(times)[:, None]
    c, s = np.cos(angle), np.sin(angle)
    y0 = np.asarray(y0)
    return np.stack([c * y0[:, 0] + s * y0[:, 1], -s * y0[:, 0] + c * y0[:, 1]], axis=2)


# Options that either framework's odeint refuses, naming the argument: (options, error, message pattern).
OPTION_REFUSALS = [
    (dict(method="rk45"), ValueError, "unknown method 'rk45'"),
    (dict(step_control="global"), ValueError, "unknown step_control 'global'"),
    (dict(gradient="unrolled"), ValueError, "unknown gradient 'unrolled'"),
    (dict(rtol=0.0), ValueError, "rtol must be a positive"),
    (dict(atol=-1.0), ValueError, "atol must be a positive"),
    (dict(max_steps=0), ValueError, "max_steps must be a positive integer"),
    (dict(method="rk4", dt=-0.1), ValueError, "dt must be a positive"),
    (dict(method="rk4"), ValueError, "method='rk4' has no error estimate.*dt=.*num_steps=.*adaptive method"),
    (dict(method="rk4", dt=0.1, num_steps=10), ValueError, "exactly one of dt=... .* and num_steps"),
    (dict(method="rk4", dt=0.1, first_step=0.1), ValueError, "first_step=0.1 sets the initial step"),
    (dict(method="dopri5", dt=0.1), ValueError, "dt=0.1, num_steps=None fix the step, but method='dopri5'"),
]
