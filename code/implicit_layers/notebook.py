"""Helpers for running the book's chapters anywhere: in the build, locally, and in Colab."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

from .config import static_output

GLUE_MIME_PREFIX = "application/papermill.record/"
"""The prefix MyST-NB's ``glue`` puts on the MIME types of a value recorded but not shown."""


def glue(name: str, value: Any, display: bool = True) -> None:
    """Record ``value`` under ``name`` for the chapter's text, and show it if ``display``.

    In the book build this writes what MyST-NB's ``glue`` writes, which lets the prose quote numbers computed
    by the notebook (``{glue:text}`name```): the value's display data, its MIME types prefixed when it is not
    shown, and its name in the output's metadata. It writes them itself because importing MyST-NB's ``glue``
    pulls in jsonschema's format checkers, seconds of every chapter's run (the tests check that both write the
    same outputs). Where MyST-NB is not installed, as in Colab, it only shows the value.

    Parameters
    ----------
    name : str
        Key the text refers to.
    value : Any
        Number, string or figure to record. A NumPy, PyTorch or JAX scalar is recorded as the Python number it
        holds: the text the build formats is the value's repr, and ``{glue:text}`name:.3g``` cannot read
        ``np.float64(0.5)`` or ``tensor(0.5)`` as a number.
    display : bool
        Also show the value as the cell's output.
    """
    from IPython.display import display as show

    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()

    if importlib.util.find_spec("myst_nb") is None:
        if display:
            show(value)
        return
    from IPython.core.formatters import format_display_data

    mimebundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_MIME_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    show({prefix + mime_type: data for mime_type, data in mimebundle.items()}, raw=True, metadata=metadata)


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
