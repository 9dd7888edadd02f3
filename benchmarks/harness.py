"""What every benchmark records beside its timings: the machine, the load from other processes, the versions
measured, and which copy of our package ran."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import implicit_layers
import torch


def machine() -> dict[str, str]:
    """CPU, cores, OS, thread counts and load: what a reader needs to compare two results files."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; platform.processor() is often empty there
    if cpuinfo.exists():
        models = [line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = models[0].strip() if models else cpu
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "OS": platform.platform(),
        "python": platform.python_version(),
        "torch threads": str(torch.get_num_threads()),
        "load average (1, 5, 15 min) before the run": load,
    }


def cpu_seconds() -> Optional[tuple[float, float]]:
    """CPU seconds used so far by the whole machine and by this process; None where ``/proc/stat`` is missing."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    # The first line sums all cores: user nice system idle iowait irq softirq steal ...; idle and iowait are not work.
    ticks = [int(value) for value in stat.read_text().split("\n", 1)[0].split()[1:9]]
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def others_share(start: Optional[tuple[float, float]], wall_s: float) -> str:
    """The share of the machine's cores that other processes used since ``start``: the load average cannot tell
    them from the benchmark itself, and they are what makes timings noisy."""
    end = cpu_seconds()
    if start is None or end is None:
        return "unknown (no /proc/stat)"
    others = (end[0] - start[0]) - (end[1] - start[1])
    return f"{max(others, 0.0) / (wall_s * os.cpu_count()):.0%} of all cores, over the {wall_s:.0f} s run"


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the frameworks and peers, and which copy of our package was measured."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["implicit_layers"] = our_package()
    return found


def our_package() -> str:
    """The directory our package was imported from and its git commit (the before/after runs differ here)."""
    source = Path(implicit_layers.__file__).resolve().parent
    git = ["git", "-C", str(source)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return f"{source} (not in a git checkout)"
    changes = " with uncommitted changes" if dirty.stdout.strip() else ""
    return f"{source} at commit {commit.stdout.strip()}{changes}"


def time_in_rounds(calls: dict, warmups: int, repeats: int) -> tuple[dict, dict, dict]:
    """Time ``calls`` (key -> zero-argument callable) side by side: each one's first call alone, its other
    ``warmups - 1`` warm-up calls untimed, then ``repeats`` rounds in which every call runs once in turn, so that a
    slow spell of the machine hits all of them alike.

    Returns the first call's output and seconds per key, the timed rounds' seconds per key, and the exception of
    every key that raised (a peer's failure is a result to report, not a reason to stop the others)."""
    firsts, failures = {}, {}
    for key, call in calls.items():
        try:
            start = time.perf_counter()
            firsts[key] = (call(), time.perf_counter() - start)
            for _ in range(warmups - 1):
                call()
        except Exception as error:
            failures[key] = error
    times = {key: [] for key in firsts}
    for _ in range(repeats):
        for key in list(times):
            try:
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
            except Exception as error:
                failures[key] = error
                del times[key], firsts[key]
    return firsts, times, failures


RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, name: str, quick_help: str, default_repeats: int) -> argparse.Namespace:
    """The command line every benchmark script takes: ``--quick`` (a smoke run, described by ``quick_help``),
    ``--repeats`` (timed rounds, ``default_repeats`` unless quick) and ``--out`` (by default
    ``results/<name>-<machine>-<cores>cpu[-quick].md``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}")
    parser.add_argument("--repeats", type=int,
                        help=f"timed rounds after the warm-ups (default {default_repeats}, quick 2)")
    parser.add_argument("--out", type=Path, help="markdown file for the results, the JSON record beside it "
                        "(default: under benchmarks/results)")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.quick else default_repeats
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.out is None:
        label = f"{platform.machine()}-{os.cpu_count()}cpu" + ("-quick" if args.quick else "")
        args.out = RESULTS / f"{name}-{label}.md"
    return args


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed case in the machine-readable results that the book's benchmarks appendix reads: the same fields
    for every benchmark, so that its tables and plots need no per-script code."""

    task: str
    """What was timed, the same for every case compared with each other ("forward", "gradient", ...)."""
    framework: str
    library: str
    method: str
    """The method and the settings that tell this case apart from the library's others."""
    median_ms: Optional[float] = None
    first_call_s: Optional[float] = None
    """The first call, timed alone (for JAX: compilation and one run)."""
    compile_s: Optional[float] = None
    """JAX only: the compile time, measured apart or as the first call minus the median."""
    solution_error: Optional[float] = None
    gradient_error: Optional[float] = None
    work: str = ""
    """The solver's own count of its work (iterations, NFE), as text."""
    note: str = ""
    """Why a case has no time or did not converge; empty when it ran and converged."""


def compile_estimate(framework: str, first_call_s: Optional[float], median_ms: Optional[float]) -> Optional[float]:
    """A JAX case's compile time where it was not measured apart: its first call minus the median, the rest of
    which is one run. None for torch, which compiles nothing."""
    if framework != "jax" or first_call_s is None or median_ms is None:
        return None
    return first_call_s - median_ms / 1e3


def results_record(name: str, title: str, args: argparse.Namespace, info: dict, packages: tuple[str, ...],
                   measurements: list[Measurement], errors: dict[str, str]) -> dict:
    """Everything the appendix shows about one run: what ran, where, with which versions, and each case's numbers.
    ``errors`` says what "solution_error" and "gradient_error" measure in this benchmark."""
    def finite(value):  # JSON has no NaN or infinity; a number that is not finite is reported as missing
        return value if not isinstance(value, float) or math.isfinite(value) else None

    return {
        "benchmark": name,
        "title": title,
        "command": f"python benchmarks/{name}.py {' '.join(sys.argv[1:])}".strip(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "quick": bool(args.quick),
        "repeats": args.repeats,
        "machine": info,
        "versions": versions(packages),
        "errors": errors,
        "measurements": [{key: finite(value) for key, value in dataclasses.asdict(m).items()} for m in measurements],
    }


def write_report(path: Path, text: str, record: dict) -> None:
    """Write a benchmark's report to ``path`` (creating its folder) and its machine-readable record beside it
    (``.json``), and show the report, saying where both went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    print(f"written to {path} and {path.with_suffix('.json')}", file=sys.stderr)
