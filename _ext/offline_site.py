"""Make the built site self-contained and clean in a browser.

- MathJax is served from the site (``_static/mathjax``), copied from the ``django-static-mathjax``
  package, so math renders with no network; Sphinx's default loads it from a CDN.
- Chapters are executed with ``BOOK_STATIC_OUTPUT=1`` (see :func:`implicit_layers.config.static_output`):
  a static page cannot run a widget, so chapters show their static fallbacks and no page needs the
  widget manager (``nb_ipywidgets_js`` in ``_config.yml`` is empty). A page that still shows a
  widget is reported as a warning, which fails ``make book``.
- Each inline script is included once. Sphinx 7 writes an inline script registered after the
  builder starts (sphinx-thebe's ``const THEBE_JS_URL``, sphinx-togglebutton's selector) twice, and
  the second ``const`` declaration is a console error on every page.
- Each page has one viewport meta tag instead of three (Sphinx's layout, docutils' writer and
  pydata-sphinx-theme each add one).
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from implicit_layers.config import STATIC_ENV_VAR
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)

MATHJAX_DISTRIBUTION = "django-static-mathjax"
# The package's copy of MathJax 3: es5/ is the browser build, the licence sits beside it.
MATHJAX_ROOT = "mathjax/static/mathjax"
# Where the site serves it, relative to _static.
MATHJAX_STATIC_DIR = "mathjax"
# The bundle Sphinx loads from a CDN by default (TeX and MathML input, HTML output).
MATHJAX_ENTRY_POINT = "tex-mml-chtml.js"
TEMPLATES = Path(__file__).parent / "templates"
VIEWPORT_META = '<meta name="viewport" content="width=device-width, initial-scale=1" />'
WIDGET_VIEW_MIME_TYPE = "application/vnd.jupyter.widget-view+json"


def mathjax_source() -> Path:
    """The folder of the installed MathJax distribution that holds ``es5/`` and ``LICENSE``."""
    try:
        distribution = metadata.distribution(MATHJAX_DISTRIBUTION)
    except metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"{MATHJAX_DISTRIBUTION} is not installed: it provides the MathJax that the site serves "
            "(pip install -r requirements.txt)"
        ) from error
    root = Path(distribution.locate_file(MATHJAX_ROOT))
    if not (root / "es5" / MATHJAX_ENTRY_POINT).is_file():
        raise RuntimeError(f"{MATHJAX_DISTRIBUTION} has no es5/{MATHJAX_ENTRY_POINT} under {root}")
    return root


def configure_site(app: Sphinx, config: Config) -> None:
    mathjax_source()  # fail at the start of the build, not after every page is written
    config.mathjax_path = f"{MATHJAX_STATIC_DIR}/{MATHJAX_ENTRY_POINT}"
    config.templates_path.append(str(TEMPLATES))


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_source()
    target = Path(app.outdir) / "_static" / MATHJAX_STATIC_DIR
    # MathJax loads its fonts and extensions from beside the entry point, so es5/ goes whole.
    shutil.copytree(source / "es5", target, dirs_exist_ok=True)
    shutil.copy2(source / "LICENSE", target / "LICENSE")


def include_inline_scripts_once(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    # Sphinx stores an inline script under the file name None in one list and "" in the other, so
    # its own duplicate check misses it.
    unique, seen = [], set()
    for script in context.get("script_files", []):
        key = (os.fspath(script.filename or ""), script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique
    # docutils' viewport tag; the one in Sphinx's layout stays (templates/layout.html drops the theme's).
    context["metatags"] = context.get("metatags", "").replace(VIEWPORT_META, "")


def refuse_widgets(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    if WIDGET_VIEW_MIME_TYPE in context.get("body", ""):
        LOGGER.warning(
            "%s shows an ipywidget, which the static site cannot run: show its static fallback when "
            "implicit_layers.config.static_output() is true",
            pagename,
            location=pagename,
            type="offline_site",
            subtype="widget",
        )


def setup(app: Sphinx) -> dict[str, Any]:
    # Kernels started by the build inherit this process's environment.
    os.environ[STATIC_ENV_VAR] = "1"
    app.connect("config-inited", configure_site)
    # After every other handler has added its scripts to the page.
    app.connect("html-page-context", include_inline_scripts_once, priority=900)
    app.connect("html-page-context", refuse_widgets)
    app.connect("build-finished", copy_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
