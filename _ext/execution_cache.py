"""Keep MyST-NB's execution cache honest about what it cannot see.

jupyter-cache reuses a page's outputs as long as the page's code is unchanged. Two things that
change the outputs are invisible to it:

- quick mode (``BOOK_QUICK=1``) shrinks every experiment, so quick and full executions live in
  separate caches (``_build/.jupyter_cache_quick`` and ``_build/.jupyter_cache``);
- the ``implicit_layers`` package and ``requirements.txt``: a cache is dropped when their
  contents differ from those it was filled with, so the site never shows outputs of old code.
  CI keys its saved cache on the same files, and ``make clean`` drops every cache;
- the stored benchmark records (``benchmarks/results/*.json``), which the benchmarks appendix
  reads: when they change, only that page's cached execution is dropped, since dropping the whole
  cache would re-execute every chapter (about 25 minutes in full mode).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import implicit_layers
from jupyter_cache import get_cache
from implicit_layers.config import quick_mode
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)


def package_fingerprint(root: Path) -> str:
    """Hash of the package's Python sources and of ``root/requirements.txt``."""
    package = Path(implicit_layers.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    requirements = root / "requirements.txt"
    if requirements.is_file():
        digest.update(requirements.read_bytes())
    return digest.hexdigest()[:16]


BENCHMARKS_PAGE = Path("book") / "benchmarks.md"
"""The page that shows the stored benchmark records, relative to the source folder."""


def benchmarks_fingerprint(root: Path) -> str:
    """Hash of the stored benchmark records, ``root/benchmarks/results/*.json``, names and contents."""
    digest = hashlib.sha256()
    for path in sorted((root / "benchmarks" / "results").glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def drop_benchmarks_page(cache: Path, root: Path) -> None:
    """Forget the benchmarks page's cached executions in ``cache`` when the stored records differ from those
    they were made with, and note the records' fingerprint in a marker file there. Other pages keep theirs."""
    marker = cache / f"benchmarks-{benchmarks_fingerprint(root)}"
    if marker.exists():
        return
    page = (root / BENCHMARKS_PAGE).resolve()
    if (cache / "global.db").exists():  # jupyter-cache's database; a new cache has none yet
        jupyter_cache = get_cache(cache)
        for record in jupyter_cache.list_cache_records():
            if Path(record.uri).resolve() == page:
                LOGGER.info("benchmark records changed: dropping the cached execution of %s", BENCHMARKS_PAGE)
                jupyter_cache.remove_cache(record.pk)
    for old in cache.glob("benchmarks-*"):
        old.unlink()
    marker.touch()


def select_cache(app: Sphinx, config: Config) -> None:
    name = ".jupyter_cache_quick" if quick_mode() else ".jupyter_cache"
    cache = Path(app.outdir).parent / name
    config.nb_execution_cache_path = str(cache)
    if config.nb_execution_mode != "cache":
        return
    marker = cache / f"package-{package_fingerprint(Path(app.srcdir))}"
    if not marker.exists():
        if cache.exists():
            LOGGER.info("implicit_layers or requirements.txt changed: dropping %s", cache)
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        marker.touch()
    drop_benchmarks_page(cache, Path(app.srcdir))


def setup(app: Sphinx) -> dict[str, Any]:
    # MyST-NB reads the cache path when the builder starts, after config-inited.
    app.connect("config-inited", select_cache)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
