"""Tie the book's Colab notebooks, Colab buttons and Colab setup cells to the repository.

Colab can only open ``.ipynb`` files, and the book's sources are MyST markdown. The notebook
build (sphinx-tojupyter) writes ``<docname>.ipynb`` for every page; this extension then

- keeps the notebooks of pages that are notebooks (their source declares a kernel) and deletes
  the others (the preface, the API reference), which would not run in Colab;
- cleans each kept notebook (``notebook_cleanup``) so it reads like its web page, with links to
  the website;
- copies it over the page's ".ipynb" download on the website, which would otherwise offer the
  MyST source as a notebook;
- and makes each page's Colab button open that notebook on the branch CI publishes it to.

Page sources may contain two tokens, used by the Colab setup cell to install the package:
``@REPOSITORY_URL@`` (from ``repository: url`` in ``_config.yml``) and ``@REPOSITORY_COMMIT@``
(``git rev-parse HEAD`` of the checkout being built), so that the text of a notebook and the code
it installs come from the same commit. They are replaced in the resolved documents, not in the
sources: the commit changes with every commit, and the execution cache, which is keyed on the
code of the cells, must not. The HTML pages, their downloadable sources, the executed notebooks
and the Colab notebooks all show the substituted values.

The build fails when the source folder is not a git checkout: a notebook pinned to a guessed
commit would install code that does not match its text, which is what the pin is for. A build
with uncommitted changes pins HEAD and says so in each notebook.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nbformat
from docutils import nodes
from notebook_cleanup import clean_notebook
from sphinx.application import Sphinx
from sphinx.errors import ConfigError
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)

URL_PLACEHOLDER = "@REPOSITORY_URL@"
COMMIT_PLACEHOLDER = "@REPOSITORY_COMMIT@"


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


def website_url(app: Sphinx) -> str:
    """Where the site is published, ending in ``/``: ``html.baseurl`` when set, otherwise the
    repository's GitHub Pages address, ``https://<owner>.github.io/<repo>/``."""
    if app.config.html_baseurl:
        return app.config.html_baseurl.rstrip("/") + "/"
    owner, repo = github_owner_repo(repository_url(app))
    host = f"{owner.lower()}.github.io"
    return f"https://{host}/" if repo.lower() == host else f"https://{host}/{repo}/"


@cache
def checkout_commit(srcdir: str) -> tuple[str, bool]:
    """``(commit, dirty)``: HEAD of the git checkout holding ``srcdir``, and whether tracked files
    differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", srcdir, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise ConfigError(
            f"colab_notebooks pins the Colab install to the commit being built, but {srcdir} is not "
            f"a git checkout with a commit ({detail.strip()}); build the book from a clone"
        ) from error
    if dirty:
        LOGGER.info(
            "colab_notebooks: the working tree has uncommitted changes; notebooks install %s without them",
            commit,
        )
    return commit, dirty


def substitute(app: Sphinx, text: str) -> str:
    if URL_PLACEHOLDER in text:
        text = text.replace(URL_PLACEHOLDER, repository_url(app))
    if COMMIT_PLACEHOLDER in text:
        text = text.replace(COMMIT_PLACEHOLDER, checkout_commit(app.srcdir)[0])
    return text


def substitute_in_doctree(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    for text in list(doctree.findall(nodes.Text)):
        new = substitute(app, text)
        if new != text:
            text.parent.replace(text, nodes.Text(new))
    # Sphinx highlights a code block from its raw source, and skips highlighting when it differs
    # from the block's text.
    for block in doctree.findall(nodes.literal_block):
        block.rawsource = substitute(app, block.rawsource)


def substitute_in_files(app: Sphinx, folder: Path, suffixes: set[str]) -> None:
    if not folder.is_dir():
        return
    for path in folder.rglob("*"):
        if path.suffix in suffixes:
            text = path.read_text(encoding="utf-8")
            new = substitute(app, text)
            if new != text:
                path.write_text(new, encoding="utf-8")


def substitute_in_executed_notebooks(app: Sphinx) -> None:
    # MyST-NB writes them from the unsubstituted sources whenever a builder reads a page.
    substitute_in_files(app, Path(app.outdir).parent / "jupyter_execute", {".ipynb"})


def substitute_in_copied_sources(app: Sphinx, exception: Exception | None) -> None:
    # The HTML builder copies the raw sources for the download button after reading them.
    if exception is not None or app.builder.format != "html":
        return
    substitute_in_files(app, Path(app.outdir, "_sources"), {".md", ".txt", ".ipynb"})
    substitute_in_executed_notebooks(app)


def is_notebook_page(app: Sphinx, docname: str) -> bool:
    """Whether the page's source declares a kernel (a MyST notebook), so its code can run."""
    return "kernelspec" in app.env.metadata.get(docname, {})


def admonition_titles(app: Sphinx, docname: str) -> set[str]:
    doctree = app.env.get_doctree(docname)
    return {
        node[0].astext()
        for node in doctree.findall(nodes.admonition)
        if node.children and isinstance(node[0], nodes.title)
    }


def preamble(app: Sphinx, title: str, page_url: str) -> str:
    commit, dirty = checkout_commit(app.srcdir)
    repository = repository_url(app)
    changes = " with uncommitted changes" if dirty else ""
    return (
        f"*This notebook is the page [{title}]({page_url}) of the book {app.config.html_title}, "
        f"generated from commit [`{commit[:12]}`]({repository}/tree/{commit}){changes}; in Colab its "
        "first cell installs the book's package from that commit. Numbers quoted in the text were "
        "computed when the book was built, so a new run can differ slightly. Solutions to the "
        "exercises are folded under their headings.*"
    )


def finish_notebooks(app: Sphinx) -> None:
    """Publish only runnable notebooks, clean them, and offer them as the pages' downloads."""
    outdir = Path(app.outdir)
    html_sources = outdir.parent / "html" / "_sources"
    site = website_url(app)
    substitute_in_executed_notebooks(app)

    def page_url(docname: str) -> str:
        return f"{site}{docname}.html"

    for docname in sorted(app.env.found_docs):
        path = outdir / f"{docname}.ipynb"
        if not path.is_file():
            continue
        if not is_notebook_page(app, docname):
            path.unlink()
            continue
        nb = nbformat.read(path, as_version=4)
        title = nb.metadata.get("title", docname)
        clean_notebook(
            nb,
            docname,
            page_url,
            admonition_titles(app, docname),
            preamble(app, title, page_url(docname)),
        )
        nbformat.validate(nb)
        nbformat.write(nb, path)
        download = html_sources / f"{docname}.ipynb"
        if download.is_file():
            shutil.copyfile(path, download)


def run_before_tojupyter_exits(app: Sphinx) -> None:
    # sphinx-tojupyter's finish() ends the process with sys.exit, so build-finished never fires
    # for it: post-process the written notebooks just before it.
    if app.builder.name != "jupyter":
        return
    tojupyter_finish = app.builder.finish

    def finish() -> None:
        finish_notebooks(app)
        tojupyter_finish()

    app.builder.finish = finish


def colab_notebook_url(colab_url: str, repo_url: str, branch: str, docname: str) -> str:
    """The Colab link that opens the generated notebook of ``docname`` on ``branch``."""
    owner, repo = github_owner_repo(repo_url)
    return f"{colab_url.rstrip('/')}/github/{owner}/{repo}/blob/{branch}/{docname}.ipynb"


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
    app.connect("doctree-resolved", substitute_in_doctree)
    app.connect("build-finished", substitute_in_copied_sources)
    app.connect("builder-inited", run_before_tojupyter_exits)
    # sphinx-book-theme adds its launch buttons at priority 501; rewrite them afterwards.
    app.connect("html-page-context", retarget_colab_button, priority=600)
    return {"version": "1.1", "parallel_read_safe": True, "parallel_write_safe": True}
