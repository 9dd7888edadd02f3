"""The book around the package: chapters execute, the builds work, every Colab button opens a
notebook the build produced, and CI runs what it claims to run.

Chapters are found from ``_toc.yml`` (every page whose MyST source declares a kernel), so a new
chapter is tested as soon as it is listed there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from conftest import REPO, book_config, write_tiny_cifar10

PLACEHOLDER = "@REPOSITORY_URL@"
COMMIT_PLACEHOLDER = "@REPOSITORY_COMMIT@"
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/[^\"'<>\s]+")
CELL_TIMEOUT_S = 900


def toc_docnames(node=None) -> list[str]:
    """Every page of ``_toc.yml`` in order, as docnames (paths without suffix)."""
    if node is None:
        node = yaml.safe_load((REPO / "_toc.yml").read_text())
    names = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                names.append(str(Path(node[key]).with_suffix("")))
        for value in node.values():
            if isinstance(value, (dict, list)):
                names += toc_docnames(value)
    elif isinstance(node, list):
        for item in node:
            names += toc_docnames(item)
    return names


def is_notebook_page(docname: str) -> bool:
    path = REPO / f"{docname}.md"
    return path.exists() and "kernelspec" in jupytext.read(path).metadata


CHAPTERS = [name for name in toc_docnames() if is_notebook_page(name)]
"""Every page that is a notebook: the chapters and the appendices that execute code (the benchmarks)."""
NUMBERED_CHAPTERS = [
    name
    for part in yaml.safe_load((REPO / "_toc.yml").read_text())["parts"]
    if part.get("numbered")
    for name in toc_docnames(part["chapters"])
    if name in CHAPTERS
]
"""The notebook pages of the numbered parts: the chapters proper, with their exercises, in reading order."""


def repository_url() -> str:
    return book_config()["repository"]["url"].rstrip("/")


def first_code_cell(nb):
    return next(cell for cell in nb.cells if cell.cell_type == "code")


def test_toc_lists_chapters():
    assert CHAPTERS, "no page of _toc.yml is a MyST notebook"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_starts_with_hidden_colab_setup_cell(docname):
    cell = first_code_cell(jupytext.read(REPO / f"{docname}.md"))
    assert "hide-cell" in cell.metadata.get("tags", []), "the setup cell must be tagged hide-cell"
    assert "google.colab" in cell.source
    pinned = f"git+{PLACEHOLDER}@{COMMIT_PLACEHOLDER}#subdirectory=code"
    assert pinned in cell.source, f"install the package from {pinned}, the commit that built the notebook"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_executes_in_quick_mode(docname, monkeypatch, tmp_path):
    path = REPO / f"{docname}.md"
    # The kernel inherits this process's environment: small sizes, offline data.
    monkeypatch.setenv("BOOK_QUICK", "1")
    monkeypatch.delenv("BOOK_MNIST", raising=False)
    # Chapter 3's opt-in CIFAR-10 training runs too, for one epoch of one batch of random images in the
    # binary format (26 per training file: 130 images, a batch of 128).
    write_tiny_cifar10(tmp_path, train_per_file=26, test_count=8)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    monkeypatch.setenv("CIFAR10_EPOCHS", "1")
    nb = jupytext.read(path)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    # The site build (execution off in these tests) cannot see a number the text quotes but no cell glues.
    glued = {
        output.get("metadata", {}).get("scrapbook", {}).get("name")
        for cell in nb.cells
        for output in cell.get("outputs", [])
    }
    quoted = set(re.findall(r"\{glue:(?:text|any|figure|math)?\}`([^`:]+)", path.read_text()))
    assert quoted <= glued, f"the text quotes values no cell glues: {sorted(quoted - glued)}"


def test_preface_example_runs():
    text = (REPO / "book" / "intro.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "the preface shows the package in a ```python block"
    for code in blocks:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
        )
        assert result.returncode == 0, result.stderr[-3000:]


def test_notebooks_only_for_pages_that_run(built):
    """Chapters get a valid notebook; pages without a kernel (preface, API) get none, since their
    code would run in Colab without the setup cell that installs the package."""
    for docname in toc_docnames():
        path = built / "jupyter" / f"{docname}.ipynb"
        if docname in CHAPTERS:
            nbformat.validate(nbformat.read(path, as_version=4))
        else:
            assert not path.exists(), f"{docname} is not a notebook page but has a notebook"


@pytest.mark.parametrize("docname", CHAPTERS)
def test_generated_notebook_starts_with_colab_setup(built, docname):
    nb = nbformat.read(built / "jupyter" / f"{docname}.ipynb", as_version=4)
    source = first_code_cell(nb).source
    assert "google.colab" in source
    assert re.search(rf"pip install .*git\+{re.escape(repository_url())}@[0-9a-f]{{40}}#", source), source
    assert PLACEHOLDER not in source and COMMIT_PLACEHOLDER not in source


def test_colab_buttons_open_generated_notebooks(built):
    html = built / "html"
    owner_repo = repository_url().removeprefix("https://github.com/")
    prefix = f"https://colab.research.google.com/github/{owner_repo}/blob/notebooks/"
    pages_with_button = set()
    for page in html.rglob("*.html"):
        for link in set(COLAB_LINK.findall(page.read_text(encoding="utf-8"))):
            assert link.startswith(prefix), f"{page.relative_to(html)}: {link}"
            target = link.removeprefix(prefix)
            assert (built / "jupyter" / target).is_file(), f"{link} names no generated notebook"
            pages_with_button.add(page.relative_to(html).with_suffix("").as_posix())
    assert pages_with_button >= set(CHAPTERS), f"no Colab button on {set(CHAPTERS) - pages_with_button}"


def test_site_and_notebooks_name_the_repository_not_the_placeholders(built):
    for folder in ("html", "jupyter", "jupyter_execute"):
        for page in (built / folder).rglob("*"):
            if page.suffix in {".html", ".md", ".ipynb", ".txt"}:
                text = page.read_text(encoding="utf-8")
                assert PLACEHOLDER not in text and COMMIT_PLACEHOLDER not in text, page


def load_workflow(name: str) -> dict:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in steps(job))


def uses(job: dict) -> list[str]:
    return [step.get("uses", "") for step in steps(job)]


def job_running(workflow: dict, command: str) -> dict:
    matches = [job for job in workflow["jobs"].values() if command in runs(job)]
    assert matches, f"no job runs {command!r}"
    return matches[0]


def job_using(workflow: dict, action: str) -> dict:
    matches = [job for job in workflow["jobs"].values() if any(u.startswith(action) for u in uses(job))]
    assert matches, f"no job uses {action}"
    return matches[0]


def write_permissions(job: dict) -> set[str]:
    return {scope for scope, level in job["permissions"].items() if level == "write"}


@pytest.mark.parametrize("name", ["pr.yml", "main.yml"])
def test_workflow_permissions_are_set_per_job(name):
    workflow = load_workflow(name)
    assert workflow["permissions"] == {"contents": "read"}
    for job_name, job in workflow["jobs"].items():
        assert "permissions" in job, f"{name}: job {job_name} sets no permissions"


def test_pull_requests_run_make_test():
    workflow = load_workflow("pr.yml")
    assert "pull_request" in workflow["on"]
    job = job_running(workflow, ".ci/run")
    assert write_permissions(job) == set()


def test_main_builds_deploys_and_publishes_notebooks():
    workflow = load_workflow("main.yml")
    assert "main" in workflow["on"]["push"]["branches"]

    book = job_running(workflow, "make book")
    assert write_permissions(book) == set()
    assert any(u.startswith("actions/upload-pages-artifact") for u in uses(book))
    cache = [s for s in steps(book) if s.get("uses", "").startswith("actions/cache")]
    assert cache, "the execution cache is not restored"
    restore = cache[0]["with"]
    assert restore["path"] == "_build/.jupyter_cache"
    assert re.search(r"hashFiles\([^)]*'code/\*\*'[^)]*'book/\*\*'[^)]*\)", restore["key"]), restore["key"]

    deploy = job_using(workflow, "actions/deploy-pages")
    assert write_permissions(deploy) == {"pages", "id-token"}

    notebooks = job_running(workflow, "git push")
    assert "notebooks" in runs(notebooks)
    assert write_permissions(notebooks) == {"contents"}


def test_ci_entry_point_runs_make_test():
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK)
    lines = [line.strip() for line in script.read_text().splitlines()]
    assert "set -euo pipefail" in lines
    assert "make test" in lines
