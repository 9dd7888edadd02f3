"""Plot style shared by every chapter, so one method has one color throughout the book."""

import matplotlib as mpl

METHOD_COLORS = {
    "forward_iteration": "#1f77b4",
    "newton": "#d62728",
    "anderson": "#2ca02c",
    "broyden": "#9467bd",
    "implicit": "#d62728",
    "unrolled": "#1f77b4",
    "unrolled_newton": "#ff7f0e",
    "train": "#1f77b4",
    "test": "#ff7f0e",
    # ODE solvers (Chapter 4 onwards); "scipy" is SciPy's solve_ivp
    "euler": "#8c564b",
    "midpoint": "#e377c2",
    "rk4": "#7f7f7f",
    "bosh3": "#bcbd22",
    "dopri5": "#1f77b4",
    "tsit5": "#17becf",
    "scipy": "#000000",
    # gradients through an ODE solve: backprop is unrolling, the adjoint is the implicit (continuous) rule
    "backprop": "#1f77b4",
    "checkpoint": "#ff7f0e",
    "adjoint": "#d62728",
    # models compared in Chapter 4
    "resnet": "#ff7f0e",
    "ode_net": "#1f77b4",
    "augmented_ode_net": "#2ca02c",
    "kinetic_energy": "#9467bd",  # an ODE-net trained with the kinetic-energy regularizer
    # approximate gradients of a deep equilibrium model (Chapter 3), beside "implicit", the exact one
    "phantom": "#9467bd",
    "jacobian_free": "#8c564b",
    "jacobian_penalty": "#2ca02c",  # a DEQ trained with the Jacobian regularizer
}
"""Colors keyed by method name (solvers, gradient methods, data splits, models)."""


def use_book_style() -> None:
    """Set matplotlib defaults for the book: readable font sizes, light grids, tight layouts."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 110,
            "figure.constrained_layout.use": True,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 11,
            "legend.frameon": False,
        }
    )
