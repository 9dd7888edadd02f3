"""The benchmark records and what reads them: the record format written by ``benchmarks/harness.py`` reads back
through ``benchmarks/summary.py``, the ratio to the best peer counts only converged peers of the same task and
framework, the stored records exist for every benchmark and say where and with what they ran, the README's table is
the one summary.py renders from them, and the book's execution cache forgets only the benchmarks page when the
stored records change.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from types import SimpleNamespace

import nbformat
import pytest
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/ is a folder of scripts, as in the appendix page
sys.path.insert(0, str(REPO / "_ext"))
import execution_cache  # noqa: E402
import harness  # noqa: E402
import summary  # noqa: E402


def case(task="forward", framework="torch", library="ours", method="m", median_ms=1.0, note="", **errors) -> dict:
    """A measurement as the records hold it, with the fields a test does not care about left empty."""
    return {"task": task, "framework": framework, "library": library, "method": method, "median_ms": median_ms,
            "first_call_s": None, "compile_s": None, "solution_error": errors.get("solution_error"),
            "gradient_error": errors.get("gradient_error"), "work": "", "note": note}


def record(*measurements, name="fixed_point", date="2026-01-01 00:00", quick=False) -> dict:
    return {"benchmark": name, "title": name, "command": f"python benchmarks/{name}.py", "date_utc": date,
            "quick": quick, "repeats": 3, "machine": {"CPU": "test CPU", "cores": "2"}, "versions": {"torch": "2"},
            "errors": {"solution": "s", "gradient": "g"}, "measurements": list(measurements)}


# ---------------------------------------------------------------------------------------------------------------
# The record format


def test_record_written_by_the_harness_reads_back(tmp_path):
    args = argparse.Namespace(quick=True, repeats=2)
    measurements = [
        harness.Measurement("forward", "jax", "ours", "anderson", median_ms=2.0, first_call_s=1.5,
                            compile_s=harness.compile_estimate("jax", 1.5, 2.0), solution_error=1e-6, work="9 steps"),
        harness.Measurement("forward", "jax", "jaxopt", "anderson", median_ms=4.0, solution_error=float("nan"),
                            note="did not converge"),
    ]
    written = harness.results_record("fixed_point", "A title", args, {"CPU": "test CPU", "cores": "2"}, ("torch",),
                                     measurements, {"solution": "what s is", "gradient": "what g is"})
    harness.write_report(tmp_path / "fixed_point-test-2cpu.md", "# report\n", written)

    records = summary.latest_records(tmp_path)
    assert list(records) == ["fixed_point"]
    read = records["fixed_point"]
    assert read == json.loads(json.dumps(written, allow_nan=False))  # JSON without NaN: it was written as null
    assert read["quick"] is True and read["repeats"] == 2 and read["versions"]["torch"]
    ours, peer = read["measurements"]
    assert ours["compile_s"] == pytest.approx(1.5 - 2.0e-3) and ours["work"] == "9 steps"
    assert peer["solution_error"] is None and peer["note"] == "did not converge"
    assert (tmp_path / "fixed_point-test-2cpu.md").read_text() == "# report\n"


def test_latest_records_takes_the_newest_full_run_of_each_benchmark(tmp_path):
    def write(file, **options):
        (tmp_path / file).write_text(json.dumps(record(case(), **options)))

    write("qp-a.json", name="qp", date="2026-01-02 00:00")
    write("qp-b.json", name="qp", date="2026-01-01 00:00")
    write("qp-x-quick.json", name="qp", date="2026-01-03 00:00")  # a smoke run under its default name
    write("deq-a.json", name="deq", quick=True)  # a smoke run stored under a full run's name still counts
    write("fixed_point-a.json")
    records = summary.latest_records(tmp_path)
    assert list(records) == ["fixed_point", "qp", "deq"]  # the order of summary.BENCHMARKS
    assert records["qp"]["date_utc"] == "2026-01-02 00:00"
    assert records["deq"]["quick"] is True


# ---------------------------------------------------------------------------------------------------------------
# Ratios


def test_ratio_is_to_the_fastest_converged_peer_of_the_same_task_and_framework():
    ours = case(median_ms=6.0)
    run = record(
        ours,
        case(library="ours", method="failed", median_ms=None, note="raised"),
        case(library="ours", method="unconverged", median_ms=0.5, note="did not converge"),
        case(library="a", median_ms=3.0),
        case(library="b", median_ms=1.0, note="did not converge"),  # faster, but not converged: ignored
        case(library="c", median_ms=None, note="failed"),  # no time: ignored
        case(library="d", median_ms=0.1, framework="jax"),  # another framework
        case(library="e", median_ms=0.1, task="gradient"),  # another task
        case(library="ours", median_ms=2.0, task="gradient", framework="jax"),
    )
    assert summary.fastest_peer(run, "forward", "torch")["library"] == "a"
    assert summary.ratio_to_best_peer(run, ours) == pytest.approx(2.0)
    assert summary.ratio_to_best_peer(run, run["measurements"][1]) is None  # ours failed
    assert summary.ratio_to_best_peer(run, run["measurements"][2]) is None  # ours did not converge
    assert summary.ratio_to_best_peer(run, run["measurements"][3]) is None  # a peer has no ratio
    assert summary.ratio_to_best_peer(run, run["measurements"][-1]) is None  # no peer in this task and framework

    rows = {(row["task"], row["framework"]): row for row in summary.headline(run)}
    assert set(rows) == {("forward", "torch"), ("forward", "jax"), ("gradient", "torch"), ("gradient", "jax")}
    forward = rows["forward", "torch"]
    assert forward["ours"] is ours and forward["peer"]["library"] == "a" and forward["ratio"] == pytest.approx(2.0)
    assert rows["forward", "jax"]["ours"] is None and rows["forward", "jax"]["ratio"] is None
    assert rows["gradient", "jax"]["peer"] is None and rows["gradient", "jax"]["ratio"] is None
    assert summary.median_ratio(run) == pytest.approx(2.0)  # the only pair where both sides converged


def test_tables_show_missing_values_as_dashes_and_ours_in_bold():
    run = record(case(median_ms=2.0, solution_error=1e-6), case(library="a", median_ms=None, note="failed"))
    table = summary.case_table(run)
    assert "| **ours** |" in table and "| failed |" in table
    header, rule, *rows = summary.headline_table({"fixed_point": run}).splitlines()
    assert len(rows) == 1 and "none converged" in rows[0] and "| – |" in rows[0]
    assert header.count("|") == rule.count("|")


def test_library_colors_keep_ours_and_tell_peers_apart():
    colors = summary.library_colors({"a": record(case(), case(library="b")), "c": record(case(library="a"))})
    assert colors["ours"] == summary.OUR_COLOR
    assert len(set(colors.values())) == len(colors) == 3


# ---------------------------------------------------------------------------------------------------------------
# The stored records and the README


STORED = summary.latest_records()


@pytest.mark.parametrize("name", summary.BENCHMARKS)
def test_stored_record_says_when_where_and_with_what(name):
    assert name in STORED, f"no record of {name} in benchmarks/results: run `make bench` and commit the .json files"
    stored = STORED[name]
    assert stored["date_utc"] and stored["command"].startswith(f"python benchmarks/{name}.py")
    assert {"CPU", "cores", "load average (1, 5, 15 min) before the run",
            "CPU taken by other processes during the run"} <= set(stored["machine"])
    assert {"torch", "jax", "implicit_layers"} <= set(stored["versions"])
    assert set(stored["errors"]) == {"solution", "gradient"}
    libraries = {case["library"] for case in stored["measurements"]}
    assert "ours" in libraries and len(libraries) > 1
    assert all(value is None or math.isfinite(value) for case in stored["measurements"]
               for value in case.values() if isinstance(value, float))


def test_readme_names_each_machine_with_the_benchmarks_it_ran():
    records = {"fixed_point": record(), "ode": record(name="ode")}
    assert summary.machines_line(records) == "test CPU with 2 cores"
    records["ode"]["machine"] = {"CPU": "other CPU", "cores": "4"}
    assert summary.machines_line(records) == "test CPU with 2 cores (fixed_point) and other CPU with 4 cores (ode)"
    assert "test CPU with 2 cores (fixed_point) and other CPU with 4 cores (ode)" in summary.readme_section(records)


def test_readme_table_is_rendered_from_the_stored_records():
    readme = (REPO / "README.md").read_text()
    expected = summary.readme_section(STORED)
    assert summary.readme_section_in(readme) == expected, (
        "README.md's benchmark summary differs from the stored records: run "
        "`.venv/bin/python benchmarks/summary.py --write-readme` and commit README.md")


# ---------------------------------------------------------------------------------------------------------------
# The execution cache


def cache_page(cache, uri, code):
    """Put an executed notebook of one code cell into the jupyter-cache at ``cache``, as MyST-NB does."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    get_cache(cache).cache_notebook_bundle(CacheBundleIn(notebook, str(uri)), check_validity=False, overwrite=True)


def cached_uris(cache):
    return sorted(record.uri for record in get_cache(cache).list_cache_records())


def test_cache_forgets_only_the_benchmarks_page_when_the_records_change(tmp_path, monkeypatch):
    monkeypatch.delenv("BOOK_QUICK", raising=False)
    source = tmp_path / "source"
    (source / "benchmarks" / "results").mkdir(parents=True)
    results = source / "benchmarks" / "results" / "qp-x.json"
    results.write_text("{}")
    app = SimpleNamespace(outdir=str(tmp_path / "_build" / "html"), srcdir=str(source))
    config = SimpleNamespace(nb_execution_mode="cache", nb_execution_cache_path=None)
    cache = tmp_path / "_build" / ".jupyter_cache"
    page, chapter = source / "book" / "benchmarks.md", source / "book" / "01_chapter.md"

    execution_cache.select_cache(app, config)  # a new cache: both markers written
    assert config.nb_execution_cache_path == str(cache)
    markers = sorted(path.name for path in cache.iterdir() if "-" in path.name)
    assert [name.split("-")[0] for name in markers] == ["benchmarks", "package"]
    cache_page(cache, page, "print('benchmarks')")
    cache_page(cache, chapter, "print('chapter')")

    execution_cache.select_cache(app, config)  # nothing changed: nothing dropped
    assert cached_uris(cache) == sorted([str(page), str(chapter)])

    results.write_text('{"changed": true}')
    execution_cache.select_cache(app, config)
    assert cached_uris(cache) == [str(chapter)], "the chapter must stay cached, the benchmarks page must go"
    assert len(list(cache.glob("benchmarks-*"))) == 1 and len(list(cache.glob("package-*"))) == 1

    cache_page(cache, page, "print('benchmarks')")
    (source / "benchmarks" / "results" / "deq-x.json").write_text("{}")  # a new record file counts too
    execution_cache.select_cache(app, config)
    assert cached_uris(cache) == [str(chapter)]
