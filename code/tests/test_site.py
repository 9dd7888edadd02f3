"""The built site as readers get it: every page opened in a real headless Chromium, offline.

The site from the ``built`` fixture (execution off) is served on 127.0.0.1 and every request to
another host is refused and recorded, so the browser sees what a reader without network sees. At
desktop and phone widths each page must load with no console error, no failed request and no
request elsewhere, show its math typeset by MathJax (no TeX left in the text), and fit the screen
width. The browser is Debian's ``chromium`` (``.ci/run`` installs it), driven by Playwright, which
never downloads a browser of its own here. Without chromium the browser check is skipped, except
under CI (``CI=true``), where it fails.

Pages of the site are also checked as files (one viewport tag, a favicon, no orphan page, an API
reference made of this package's docstrings), an executed page is built to check what execution
leaves on a page, and the chapters' code is checked for MyST labels, which readers see verbatim.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import jupytext
import pytest
import yaml

from conftest import REPO, book_config
from test_book import CHAPTERS, toc_docnames

DESKTOP_WIDTH = 1280
PHONE_WIDTH = 375
PAGE_TIMEOUT_MS = 60_000
# Flags for a headless Chromium that talks to nothing but the local server. Playwright adds
# --headless and a fresh profile directory of its own.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
# Folders of the site that hold assets, not pages.
ASSET_FOLDERS = {"_static", "_sources", "_images", "_downloads"}

# What a page reports once MathJax has finished: math elements left untypeset, text outside code
# that still looks like TeX, its width, and the elements that stick out of a window it overflows.
INSPECT_PAGE = r"""
async () => {
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
  }
  const untypeset = [...document.querySelectorAll(".math")]
    .filter((element) => !element.querySelector("mjx-container"))
    .map((element) => element.textContent.trim().slice(0, 80));
  const tex = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{/;
  const rawTex = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, textarea, mjx-container")) continue;
    if (tex.test(node.textContent)) rawTex.push(node.textContent.trim().slice(0, 80));
  }
  const width = window.innerWidth;
  const scrollWidth = document.documentElement.scrollWidth;
  const overflowing = scrollWidth <= width ? [] : [...document.body.querySelectorAll("*")]
    .filter((element) => element.getBoundingClientRect().right > width + 1)
    .filter((element) => {
      for (let parent = element.parentElement; parent; parent = parent.parentElement) {
        if (getComputedStyle(parent).overflowX !== "visible") return false;
      }
      return true;
    })
    .slice(-5)
    .map((element) => `<${element.tagName.toLowerCase()} class="${element.className}">`);
  return {
    mathElements: document.querySelectorAll(".math").length,
    untypeset,
    rawTex,
    scrollWidth,
    width,
    overflowing,
  };
}
"""


def site_pages(html: Path) -> list[Path]:
    """Every HTML page of the site, assets aside."""
    return sorted(
        page
        for page in html.rglob("*.html")
        if not ASSET_FOLDERS & set(page.relative_to(html).parts[:-1])
    )


def is_redirect(page: Path) -> bool:
    return re.search(r'http-equiv="refresh"', page.read_text(encoding="utf-8"), re.IGNORECASE) is not None


class PageTags(HTMLParser):
    """Collects what one page links to (anchors and a redirect), its viewport tags and icons."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.viewport_tags = 0
        self.icons: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "a" and attributes.get("href"):
            self.hrefs.append(attributes["href"])
        if tag == "form" and attributes.get("action"):
            self.hrefs.append(attributes["action"])
        if tag == "meta" and attributes.get("name") == "viewport":
            self.viewport_tags += 1
        if tag == "meta" and (attributes.get("http-equiv") or "").lower() == "refresh":
            self.hrefs += re.findall(r"url=(\S+)", attributes.get("content") or "", re.IGNORECASE)
        if tag == "link" and "icon" in (attributes.get("rel") or "").split():
            self.icons.append(attributes.get("href", ""))


def parse(page: Path) -> PageTags:
    parser = PageTags()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def local_target(page: Path, href: str) -> Path | None:
    """The file of the site that ``href`` on ``page`` points to, or None for another site."""
    url = urlparse(href)
    if url.scheme or url.netloc or not url.path:
        return None
    return (page.parent / unquote(url.path)).resolve()


# ---------------------------------------------------------------------------------------------
# The pages as files


def test_every_page_has_one_viewport_tag(built):
    html = built / "html"
    counts = {
        page.relative_to(html).as_posix(): parse(page).viewport_tags
        for page in site_pages(html)
        if not is_redirect(page)
    }
    assert counts and set(counts.values()) == {1}, counts


def test_every_page_has_a_favicon_the_site_serves(built):
    html = built / "html"
    for page in site_pages(html):
        if is_redirect(page):
            continue
        icons = parse(page).icons
        assert icons, f"{page.relative_to(html)} declares no icon, so browsers ask for /favicon.ico"
        for icon in icons:
            target = local_target(page, icon)
            assert target is not None and target.is_file(), f"{page.relative_to(html)}: icon {icon} is missing"


def test_every_page_is_linked_from_the_book(built):
    """A page no link leads to (like an index of proof labels) is one readers never find."""
    html = built / "html"
    pages = {page.resolve() for page in site_pages(html)}
    start = (html / "index.html").resolve()
    reached, frontier = {start}, [start]
    while frontier:
        page = frontier.pop()
        for href in parse(page).hrefs:
            target = local_target(page, href)
            if target in pages and target not in reached:
                reached.add(target)
                frontier.append(target)
    orphans = sorted(page.relative_to(html.resolve()).as_posix() for page in pages - reached)
    assert not orphans, f"no link leads to {orphans}"


def test_api_page_shows_only_docstrings_of_this_package(built):
    """An override without a docstring (``extra_repr``) must not show PyTorch's text for it."""
    text = (built / "html" / "book" / "api.html").read_text(encoding="utf-8")
    methods = re.findall(r'<dl class="py (?:method|property)">\s*<dt class="sig[^"]*" id="([\w.]+)"', text)
    assert methods, "the API page documents no method"
    for qualified_name in methods:
        module_name, _, rest = qualified_name.partition(".")
        owner = importlib.import_module(module_name)
        parts = rest.split(".")
        for part in parts[:-1]:
            try:
                owner = importlib.import_module(f"{owner.__name__}.{part}")
            except ImportError:
                owner = getattr(owner, part)
        member = vars(owner).get(parts[-1])
        assert member is not None and (member.__doc__ or "").strip(), (
            f"{qualified_name} is documented with a docstring it does not define"
        )


# ---------------------------------------------------------------------------------------------
# The chapters' code


MYST_LABEL = re.compile(
    r"^\(([\w-]+)\)=\s*$"  # (label)= before a heading or block
    r"|^:label:\s*([\w-]+)\s*$"  # :label: option of a directive
    r"|\$\$\s*\(([\w-]+)\)\s*$",  # $$ (label) after a displayed equation
    flags=re.MULTILINE,
)


def book_labels() -> set[str]:
    labels = set()
    for docname in toc_docnames():
        source = REPO / f"{docname}.md"
        if source.exists():
            for match in MYST_LABEL.finditer(source.read_text(encoding="utf-8")):
                labels.add(next(group for group in match.groups() if group))
    return labels


@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_code_names_no_label(docname):
    """Code cells are shown as written, so a label in a comment or docstring reaches readers as a
    label name, where the text shows an equation number or a title."""
    labels = book_labels()
    assert labels, "no MyST label found in the book: the pattern no longer matches"
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(labels))) + r")(?![\w-])")
    leaks = []
    for cell in jupytext.read(REPO / f"{docname}.md").cells:
        if cell.cell_type == "code":
            for line in cell.source.splitlines():
                if pattern.search(line):
                    leaks.append(line.strip())
    assert not leaks, f"labels in code cells of {docname}:\n" + "\n".join(leaks)


# ---------------------------------------------------------------------------------------------
# An executed page


PAGE_HEADER = """\
---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {name: python3, display_name: Python 3, language: python}
---

# Executed page
"""

PRINTS_AND_PROGRESS = """
```{code-cell} python3
import time

# A kernel sends what is printed in one go as one stream output; flushing and waiting between two
# prints makes two, as a training loop printing once per epoch does.
print("first line", flush=True)
time.sleep(0.5)
print("second line", flush=True)
```

```{code-cell} python3
from implicit_layers.config import static_output
from implicit_layers.notebook import progress

for step in progress(range(3), desc="steps"):
    pass
print("static output:", static_output())
```
"""

SHOWS_A_WIDGET = """
```{code-cell} python3
import ipywidgets

ipywidgets.IntSlider()
```
"""


def build_executed_page(source: Path, cells: str, *options: str) -> subprocess.CompletedProcess:
    """Build ``page.md`` made of ``cells`` in ``source``, executed, with the book's configuration."""
    (source / "page.md").write_text(PAGE_HEADER + cells)
    (source / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "page"}))
    config = book_config()
    config["execute"]["execute_notebooks"] = "force"
    sphinx = config["sphinx"]
    # The Colab notebooks need the book's git checkout and its chapters; the page needs neither.
    sphinx["local_extensions"] = {
        name: str(REPO / path) for name, path in sphinx["local_extensions"].items() if name != "colab_notebooks"
    }
    sphinx["config"] = {key: value for key, value in sphinx["config"].items() if not key.startswith("colab_notebooks")}
    # Paths in the configuration are relative to the book's folder, no longer the source folder.
    sphinx["config"]["html_static_path"] = [str(REPO / path) for path in sphinx["config"].get("html_static_path", [])]
    if config["html"].get("favicon"):
        config["html"]["favicon"] = str(REPO / config["html"]["favicon"])
    config["bibtex_bibfiles"] = [str(REPO / path) for path in config["bibtex_bibfiles"]]
    (source / "_config.yml").write_text(yaml.safe_dump(config))
    # Left unset here so that the page shows whether the build sets it for its kernels.
    environment = {key: value for key, value in os.environ.items() if key != "BOOK_STATIC_OUTPUT"}
    bin_folder = Path(sys.executable).parent
    environment["PATH"] = f"{bin_folder}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(
        [str(bin_folder / "jupyter-book"), "build", str(source), "--builder", "html", *options],
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, "BOOK_QUICK": "1"},
    )


@pytest.fixture(scope="module")
def executed_page(tmp_path_factory) -> str:
    """The HTML of a page that prints and shows a progress bar, executed by the book's build."""
    source = tmp_path_factory.mktemp("executed")
    result = build_executed_page(source, PRINTS_AND_PROGRESS)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return (source / "_build" / "html" / "page.html").read_text(encoding="utf-8")


def test_executed_page_merges_printed_streams(executed_page):
    outputs = re.findall(r'<div class="output stream[^"]*">(.*?)</div>\s*</div>', executed_page, re.DOTALL)
    first = [output for output in outputs if "first line" in output]
    assert len(first) == 1 and "second line" in first[0], outputs


def test_executed_page_is_static(executed_page):
    """The build's kernels run with BOOK_STATIC_OUTPUT=1, so the progress bar leaves no widget."""
    assert re.findall(r"static output: \w+", executed_page) == ["static output: True"]
    assert "application/vnd.jupyter.widget" not in executed_page, "the page holds a widget"


def test_page_showing_a_widget_fails_the_build(tmp_path):
    """A widget cannot run on the static site: the build names the page instead of publishing an
    empty output."""
    result = build_executed_page(tmp_path, SHOWS_A_WIDGET, "-W")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and re.search(r"page.*shows an ipywidget", output), output[-6000:]


# ---------------------------------------------------------------------------------------------
# The pages in a browser


def chromium_executable() -> str:
    """Debian's chromium (or the browser named by the environment variable CHROMIUM); without one
    the browser check cannot run, which CI must not take for a pass."""
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if executable:
        return executable
    reason = "no chromium on PATH: the site's browser check needs it (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(ci, outcome, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="chromium"):
        chromium_executable()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def site_url(built) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(built / "html"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def problems_on_page(context, url: str) -> list[str]:
    """Everything wrong with one page in the browser, as readable lines."""
    problems = []
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url} ({request.failure})"))
    page.on("response", lambda response: response.status >= 400 and problems.append(f"HTTP {response.status}: {response.url}"))

    def refuse_other_hosts(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            problems.append(f"request to another host: {route.request.url}")
            route.abort()

    page.route("**/*", refuse_other_hosts)
    page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
    report = page.evaluate(INSPECT_PAGE)
    page.close()
    if report["untypeset"]:
        problems.append(f"{len(report['untypeset'])} of {report['mathElements']} math elements not typeset, "
                        f"first: {report['untypeset'][0]!r}")
    problems += [f"TeX left in the text: {text!r}" for text in report["rawTex"][:5]]
    if report["scrollWidth"] > report["width"]:
        problems.append(f"{report['scrollWidth']} px wide in a {report['width']} px window, "
                        f"overflowing: {report['overflowing']}")
    return problems


@pytest.mark.parametrize("width", [DESKTOP_WIDTH, PHONE_WIDTH], ids=["desktop", "phone"])
def test_every_page_loads_cleanly_offline(built, site_url, browser, width):
    html = built / "html"
    pages = [page for page in site_pages(html) if not is_redirect(page)]
    assert len(pages) >= len(toc_docnames())
    context = browser.new_context(viewport={"width": width, "height": 900})
    problems = []
    for page in pages:
        name = page.relative_to(html).as_posix()
        problems += [f"{name}: {problem}" for problem in problems_on_page(context, urljoin(site_url, name))]
    context.close()
    assert not problems, f"{len(problems)} problems on {len(pages)} pages at {width} px:\n" + "\n".join(problems)
