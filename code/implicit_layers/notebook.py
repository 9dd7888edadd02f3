"""Helpers for running the book's chapters anywhere: in the build, locally, and in Colab."""

from __future__ import annotations

from typing import Any


def glue(name: str, value: Any, display: bool = True) -> None:
    """Record ``value`` under ``name`` for the chapter's text, and show it if ``display``.

    In the book build this is MyST-NB's ``glue``, which lets the prose quote numbers computed by the
    notebook (``{glue:text}`name```). Where MyST-NB is not installed, as in Colab, it only shows the value.

    Parameters
    ----------
    name : str
        Key the text refers to.
    value : Any
        Number, string or figure to record.
    display : bool
        Also show the value as the cell's output.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)
