"""The Colab notebooks read like the website: headings in order, exercises titled as on the site,
solutions folded, links that lead to the published pages, no leftover MyST markup, the install
pinned to a commit of this repository, and the same notebook behind the site's ".ipynb" download.

Everything here reads the notebooks and pages of the ``built`` fixture (one build, execution off).
"""

from __future__ import annotations

import html
import re
import subprocess
import tomllib
from urllib.parse import urlparse

import nbformat
import pytest

from conftest import REPO
from test_book import CHAPTERS, NUMBERED_CHAPTERS, first_code_cell, repository_url

HEADING = re.compile(r"^(#{1,6}) (\S.*)$")
LINK_TARGET = re.compile(r"\]\(([^)\s]*)\)")
CITATION_LINK = re.compile(r"\[([^\[\]]+)\]\(([^)\s]+/bibliography\.html#[^)\s]+)\)")
PINNED_INSTALL = re.compile(r"git\+(?P<url>\S+?)@(?P<commit>[0-9a-f]{40})#subdirectory=code")


def notebook(built, docname):
    return nbformat.read(built / "jupyter" / f"{docname}.ipynb", as_version=4)


def markdown_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "markdown"]


def headings(nb):
    """``(level, text, cell)`` of every cell that starts with a heading."""
    found = []
    for cell in markdown_cells(nb):
        match = HEADING.match(cell.source.split("\n", 1)[0])
        if match:
            found.append((len(match[1]), match[2].strip(), cell))
    return found


def directive_arguments(docname, directive):
    source = (REPO / f"{docname}.md").read_text(encoding="utf-8")
    return [arg.strip() for arg in re.findall(rf"^`{{3,}}\{{{directive}\}}(.*)$", source, flags=re.MULTILINE)]


def website():
    owner, repo = urlparse(repository_url()).path.strip("/").split("/")
    return f"https://{owner.lower()}.github.io/{repo}/"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_headings_form_an_outline(built, docname):
    levels = [level for level, _, _ in headings(notebook(built, docname))]
    assert levels[0] == 1 and levels.count(1) == 1, f"one top-level heading, the title: {levels}"
    for previous, level in zip(levels, levels[1:]):
        assert level <= previous + 1, f"a heading skips a level: {levels}"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_admonition_titles_are_not_headings(built, docname):
    titles = {text for _, text, _ in headings(notebook(built, docname))}
    for title in directive_arguments(docname, "admonition"):
        assert title not in titles


@pytest.mark.parametrize("docname", NUMBERED_CHAPTERS)
def test_exercises_and_solutions_read_as_on_the_website(built, docname):
    nb = notebook(built, docname)
    found = headings(nb)
    exercises = [(level, text) for level, text, _ in found if re.match(r"Exercise \d", text)]
    solutions = [(level, text) for level, text, _ in found if text.startswith("Solution")]
    titles = directive_arguments(docname, "exercise")
    chapter = NUMBERED_CHAPTERS.index(docname) + 1  # the site numbers chapters in reading order, whatever the name
    expected = [f"Exercise {chapter}.{i} ({title})" for i, title in enumerate(titles, 1)]
    # Sphinx typesets quotes: "circle's" in the source is "circle’s" on the page.
    assert [text.replace("’", "'") for _, text in exercises] == expected
    section = next(level for level, text, _ in found if text == "Exercises")
    assert {level for level, _ in exercises} == {section + 1}
    assert len(solutions) == len(directive_arguments(docname, "solution"))
    for level, text in solutions:
        assert level == section + 2
        assert re.fullmatch(r"Solution to Exercise \d+\.\d+ \(.+\)", text), text


@pytest.mark.parametrize("docname", NUMBERED_CHAPTERS)
def test_solutions_are_folded(built, docname):
    nb = notebook(built, docname)
    folded = nb.metadata["colab"]["collapsed_sections"]
    found = headings(nb)
    solutions = [cell for _, text, cell in found if text.startswith("Solution")]
    assert solutions and len(folded) == len(solutions)
    for cell in solutions:
        # Colab folds every cell below a heading cell, not the heading cell's own text.
        assert "\n" not in cell.source.strip(), "the solution heading must be alone in its cell"
        assert cell.metadata["id"] in folded
        assert cell.metadata["jp-MarkdownHeadingCollapsed"] is True
        following = nb.cells[nb.cells.index(cell) + 1]
        assert following.source.strip() and not following.source.startswith("#"), "an empty solution"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_links_lead_to_anchors_on_the_website(built, docname):
    site = website()
    checked = 0
    for cell in markdown_cells(notebook(built, docname)):
        for target in LINK_TARGET.findall(cell.source):
            assert re.match(r"https?://", target), f"relative link {target!r} is dead in Colab"
            if not target.startswith(site):
                continue
            path, _, anchor = target.removeprefix(site).partition("#")
            page = built / "html" / path
            assert page.is_file(), f"{target}: no page {path} on the site"
            if anchor:
                assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), f"{target}: no anchor"
            checked += 1
    assert checked, "no link to the website"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_citations_link_to_their_entries(built, docname):
    bibliography = (built / "html" / "book" / "bibliography.html").read_text(encoding="utf-8")
    citations = [
        link for cell in markdown_cells(notebook(built, docname)) for link in CITATION_LINK.findall(cell.source)
    ]
    assert citations
    for label, target in citations:
        anchor = target.rsplit("#", 1)[1]
        entry = re.search(rf'id="{anchor}"[^>]*>\s*<span class="label">(.*?)</span></span>', bibliography, re.S)
        assert entry, f"no bibliography entry {anchor}"
        shown = html.unescape(re.sub(r"<[^>]+>", "", entry[1])).strip("[]")
        assert shown == label, f"{label} links to the entry of {shown}"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_no_markup_leftovers(built, docname):
    for cell in markdown_cells(notebook(built, docname)):
        source = cell.source
        assert not re.search(r"\{[a-z]+(:[a-z]+)*\}`", source), f"a raw role: {source[:300]}"
        assert "```{" not in source and ":::" not in source, f"a raw directive: {source[:300]}"
        assert "<a id=" not in source and "[Unresolved glue" not in source, source[:300]


@pytest.mark.parametrize("docname", CHAPTERS)
def test_notebook_pins_the_install_to_a_commit_of_this_repository(built, docname):
    nb = notebook(built, docname)
    install = PINNED_INSTALL.search(first_code_cell(nb).source)
    assert install, first_code_cell(nb).source
    assert install["url"] == repository_url()
    commit = install["commit"]
    ancestry = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"])
    assert ancestry.returncode == 0, f"{commit} is not a commit of this checkout"
    # The same pin on the page, in the executed notebook and in the text that names the commit.
    page = (built / "html" / f"{docname}.html").read_text(encoding="utf-8")
    assert f"@{commit}#subdirectory=code" in html.unescape(re.sub(r"<[^>]+>", "", page)), "the page differs"
    executed = (built / "jupyter_execute" / f"{docname}.ipynb").read_text(encoding="utf-8")
    assert f"@{commit}#subdirectory=code" in executed, "the executed notebook differs"
    assert any(commit[:12] in cell.source for cell in markdown_cells(nb)), "the text names another commit"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_colab_install_leaves_torch_and_jax_alone(docname):
    source = (REPO / f"{docname}.md").read_text(encoding="utf-8")
    extras = re.search(r'"implicit-layers\[([a-z,]+)\] @ git\+', source)
    assert extras, "the setup cell installs the package with the extras the chapter imports"
    declared = set(tomllib.loads((REPO / "code" / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set(extras[1].split(","))
    assert named <= declared and not named & {"torch", "jax"}


@pytest.mark.parametrize("docname", CHAPTERS)
def test_download_button_offers_the_colab_notebook(built, docname):
    page = (built / "html" / f"{docname}.html").read_text(encoding="utf-8")
    assert re.search(rf'href="[./]*_sources/{re.escape(docname)}\.ipynb"', page), "no .ipynb download"
    offered = (built / "html" / "_sources" / f"{docname}.ipynb").read_bytes()
    assert offered == (built / "jupyter" / f"{docname}.ipynb").read_bytes()


def test_pin_needs_a_git_checkout_and_reports_uncommitted_changes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "_ext"))
    from colab_notebooks import checkout_commit
    from sphinx.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a git checkout"):
        checkout_commit(str(tmp_path))

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "--quiet")
    (tmp_path / "page.md").write_text("one")
    git("add", "page.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "one")
    head = git("rev-parse", "HEAD").strip()
    checkout_commit.cache_clear()
    assert checkout_commit(str(tmp_path)) == (head, False)
    (tmp_path / "page.md").write_text("two")
    checkout_commit.cache_clear()
    assert checkout_commit(str(tmp_path)) == (head, True)
