"""Helpers for running the book's chapters anywhere: in the build, locally, and in Colab."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import static_output


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


def progress(iterable: Iterable | None = None, **tqdm_options: Any):
    """A tqdm progress bar that suits where the chapter runs.

    In Jupyter and Colab it is ``tqdm.auto``'s bar (a widget when ipywidgets is present); in a terminal, a
    text bar; in the book build (:func:`implicit_layers.config.static_output`) it is disabled, because a static page would keep
    only an empty widget or a smear of carriage returns.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over, as for ``tqdm``.
    **tqdm_options
        Passed on to ``tqdm`` (``total``, ``desc``, ``unit``, ...).

    Returns
    -------
    tqdm.std.tqdm
        The bar; use it as an iterator or call ``update`` and ``set_postfix`` on it.
    """
    from tqdm.auto import tqdm

    if static_output():
        tqdm_options["disable"] = True
    return tqdm(iterable, **tqdm_options)
