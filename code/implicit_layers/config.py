"""Book-wide switches read from the environment."""

import os

QUICK_ENV_VAR = "BOOK_QUICK"


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
    return os.environ.get(QUICK_ENV_VAR, "").strip().lower() in {"1", "true", "yes"}
