"""Tie the book's Colab buttons and Colab setup cells to the configured repository.

Colab can only open ``.ipynb`` files, and the book's sources are MyST markdown. The notebook
build (sphinx-tojupyter) writes ``<docname>.ipynb`` for every page and CI publishes them on a
separate branch; this extension makes each page's Colab button open that notebook instead of the
markdown source that sphinx-book-theme would link to.

Page sources may also contain the token ``@REPOSITORY_URL@`` (the Colab setup cell installs the
package from the repository). It is replaced while the source is read, so the HTML pages, the
executed notebooks and the generated Colab notebooks all name the repository from ``_config.yml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sphinx.application import Sphinx
from sphinx.errors import ConfigError

PLACEHOLDER = "@REPOSITORY_URL@"


def repository_url(app: Sphinx) -> str:
    """The repository URL from ``repository: url`` in ``_config.yml``, without a trailing slash."""
    url = app.config.html_theme_options.get("repository_url", "")
    if not url:
        raise ConfigError("colab_notebooks needs `repository: url` in _config.yml")
    return url.rstrip("/").removesuffix(".git")


def github_owner_repo(url: str) -> tuple[str, str]:
    """Split ``https://github.com/<owner>/<repo>`` into ``(owner, repo)``."""
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.netloc != "github.com" or len(parts) != 2:
        raise ConfigError(f"Colab opens notebooks from GitHub only; repository url is {url!r}")
    return parts[0], parts[1]


def colab_notebook_url(colab_url: str, repo_url: str, branch: str, docname: str) -> str:
    """The Colab link that opens the generated notebook of ``docname`` on ``branch``."""
    owner, repo = github_owner_repo(repo_url)
    return f"{colab_url.rstrip('/')}/github/{owner}/{repo}/blob/{branch}/{docname}.ipynb"


def substitute_repository_url(app: Sphinx, docname: str, source: list[str]) -> None:
    source[0] = source[0].replace(PLACEHOLDER, repository_url(app))


def substitute_in_copied_sources(app: Sphinx, exception: Exception | None) -> None:
    # The HTML builder copies the raw source files for the "download .md" button after
    # source-read has run, so those copies still hold the placeholder.
    sources = Path(app.outdir, "_sources")
    if exception is not None or app.builder.format != "html" or not sources.is_dir():
        return
    url = repository_url(app)
    for path in sources.rglob("*"):
        if path.suffix in {".md", ".txt"}:
            text = path.read_text(encoding="utf-8")
            if PLACEHOLDER in text:
                path.write_text(text.replace(PLACEHOLDER, url), encoding="utf-8")


def retarget_colab_button(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    launch = app.config.html_theme_options.get("launch_buttons", {})
    colab_url = launch.get("colab_url")
    if not colab_url:
        return
    target = colab_notebook_url(
        colab_url, repository_url(app), app.config.colab_notebooks_branch, pagename
    )
    for group in context.get("header_buttons", []):
        if group.get("label") != "launch-buttons":
            continue
        for button in group.get("buttons", []):
            if button.get("url", "").startswith(colab_url.rstrip("/") + "/"):
                button["url"] = target


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("colab_notebooks_branch", "notebooks", "html", types=[str])
    app.connect("source-read", substitute_repository_url)
    app.connect("build-finished", substitute_in_copied_sources)
    # sphinx-book-theme adds its launch buttons at priority 501; rewrite them afterwards.
    app.connect("html-page-context", retarget_colab_button, priority=600)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
