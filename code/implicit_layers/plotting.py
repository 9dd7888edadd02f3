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
}
"""Colors keyed by method name (solvers, gradient methods, data splits)."""


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
