"""Make a notebook written by sphinx-tojupyter read like the page it comes from.

sphinx-tojupyter renders MyST directives to notebook markdown, with artefacts that Colab shows
as they are: titles of admonitions, exercises and solutions come out as headings at the level of
the enclosing section (so "Learning goals" becomes a top-level heading), an exercise heading
puts its title before its number (``##  (Contraction)Exercise 1.1``), solutions are visible,
and cross-references point at anchors (``#prop-contraction``) and other notebooks
(``bibliography.ipynb#id9``) that a notebook opened on its own does not have. ``clean_notebook``
rewrites those cells; it works on the notebook object and knows nothing about Sphinx.
"""

from __future__ import annotations

import posixpath
import re
from typing import Callable

import nbformat

HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*$")
# sphinx-exercise's number is appended after its title: "(Contraction)Exercise 1.1".
EXERCISE = re.compile(r"^(?:\((?P<title>.*)\))?\s*(?P<name>Exercise\s+[\d.]+)$")
SOLUTION = re.compile(r"^Solution to\s*\[\s*(?P<exercise>.*?)\s*\]\([^)]*\)$")
# One level of brackets inside the text covers citations, "[[VSP+17](bibliography.ipynb#id9)]".
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target>[^)\s]*)\)")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
ANCHOR_LINE = re.compile(r"^<a id='[^']*'></a>\s*$", flags=re.MULTILINE)


def site_target(docname: str, target: str, page_url: Callable[[str], str]) -> str:
    """The website URL that a notebook link ``target`` on page ``docname`` stands for.

    ``#anchor`` is an anchor of the page itself and ``other.ipynb#anchor`` one of another page,
    named relative to this page's folder as on the website.
    """
    path, _, anchor = target.partition("#")
    if path:
        folder = posixpath.dirname(docname)
        path = posixpath.normpath(posixpath.join(folder, path))
        docname = path.removesuffix(".ipynb")
    return page_url(docname) + (f"#{anchor}" if anchor else "")


def point_links_at_site(text: str, docname: str, page_url: Callable[[str], str]) -> str:
    def rewrite(match: re.Match) -> str:
        target = match["target"]
        if match["bang"] or not target or URL_SCHEME.match(target):
            return match[0]
        return f"[{match['text']}]({site_target(docname, target, page_url)})"

    return LINK.sub(rewrite, text)


def split_heading(source: str) -> tuple[int, str, str] | None:
    """``(level, heading text, rest of the cell)`` when the cell starts with a heading."""
    first, _, rest = source.partition("\n")
    match = HEADING.match(first)
    if match is None:
        return None
    return len(match["hashes"]), match["text"], rest.strip("\n")


def clean_notebook(
    nb: nbformat.NotebookNode,
    docname: str,
    page_url: Callable[[str], str],
    admonition_titles: set[str],
    preamble: str,
) -> None:
    """Rewrite the markdown cells of ``nb``, the generated notebook of ``docname``, in place.

    - Anchors (``<a id=...>``) go, and every relative link points at the same target on the
      website, where the anchor exists (``page_url`` maps a docname to its page's URL).
    - Titles of admonitions (``admonition_titles``) become bold lines instead of headings.
    - ``Exercise 1.1 (Title)`` becomes a heading one level below its section, and
      ``Solution to Exercise 1.1 (Title)`` one level below that, in a cell of its own that
      Colab (``metadata.colab.collapsed_sections``) and JupyterLab open folded, as the website
      hides solutions.
    - ``preamble`` is inserted as a cell after the title.
    """
    cells = []
    collapsed = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            cells.append(cell)
            continue
        source = ANCHOR_LINE.sub("", cell.source).strip("\n")
        source = point_links_at_site(source, docname, page_url)
        heading = split_heading(source)
        if heading is not None:
            level, text, rest = heading
            exercise = EXERCISE.match(text)
            solution = SOLUTION.match(text)
            if text in admonition_titles:
                source = f"**{text}**\n\n{rest}".rstrip("\n")
            elif exercise:
                title = f" ({exercise['title']})" if exercise["title"] else ""
                source = f"{'#' * (level + 1)} {exercise['name']}{title}\n\n{rest}".rstrip("\n")
            elif solution:
                folded = nbformat.v4.new_markdown_cell(f"{'#' * (level + 2)} Solution to {solution['exercise']}")
                # Colab names sections by this metadata id; JupyterLab reads its own key.
                folded.metadata["id"] = folded.id
                folded.metadata["jp-MarkdownHeadingCollapsed"] = True
                cells.append(folded)
                collapsed.append(folded.id)
                source = rest
        if source.strip():
            cell.source = source
            cells.append(cell)
    title_index = next(
        (i for i, cell in enumerate(cells) if cell.cell_type == "markdown" and cell.source.startswith("# ")),
        -1,
    )
    cells.insert(title_index + 1, nbformat.v4.new_markdown_cell(preamble))
    nb.cells = cells
    nb.metadata["colab"] = {"collapsed_sections": collapsed, "toc_visible": True}
