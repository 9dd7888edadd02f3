"""Book-wide switches read from the environment."""

import os

QUICK_ENV_VAR = "BOOK_QUICK"
STATIC_ENV_VAR = "BOOK_STATIC_OUTPUT"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def quick_mode() -> bool:
    """Return True when the book runs in quick mode.

    Quick mode keeps every code path of a chapter but shrinks its sizes (epochs, data, problem dimensions) so
    the whole book executes in minutes; the tests set it. It is on when the environment variable ``BOOK_QUICK``
    is ``1``, ``true`` or ``yes`` (any case).

    Returns
    -------
    bool
        Whether quick mode is on.
    """
    return _env_flag(QUICK_ENV_VAR)


def static_output() -> bool:
    """Return True while the book build executes a chapter for a static web page.

    The build sets the environment variable ``BOOK_STATIC_OUTPUT=1``; a static page can show neither a live
    progress bar nor a widget, so cells leave them out there.
    """
    return _env_flag(STATIC_ENV_VAR)

