"""Time our batched QP layer beside qpth, proxsuite's QPLayer, cvxpylayers and qpax on the same quadratic programs.

Every library solves the same float64 batch (see ``qp_problem.py``: 128 QPs, 50 variables, 50 inequalities) and
backpropagates the same loss to Q, p, G and h; every solution and gradient is checked against an exact float64
reference, and the table gives those errors next to the time. Two more tables give the time of ours and of the
fastest peers as the batch grows and as the problem grows. Run it in the benchmark environment, which
``make bench`` builds::

    python benchmarks/qp.py [--quick] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Optional

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists: the benchmark is float64 throughout

import numpy as np  # noqa: E402

import qp_jax  # noqa: E402
import qp_torch  # noqa: E402
from harness import (  # noqa: E402
    Measurement, cpu_seconds, machine, others_share, parse_args, results_record, time_in_rounds, versions,
    write_report,
)
from qp_problem import ARGUMENTS, Case, Problem, make_problem, reference, relative_errors  # noqa: E402

WARMUPS = 2
"""Calls before the timed repeats (the JAX programs are compiled before these, and timed apart)."""
SCALING_REPEATS = 3
"""Timed rounds per point of the scaling tables, after the first call alone and no other warm-up (fewer calls than
the main table's: there are many points, and the largest take seconds per call)."""
PACKAGES = ("torch", "jax", "jaxlib", "numpy", "scipy", "qpth", "proxsuite", "cvxpylayers", "cvxpy", "diffcp",
            "clarabel", "scs", "qpax")
TITLE = "QP layers: ours beside qpth, proxsuite, cvxpylayers and qpax"
BASELINES = {"torch": ("proxsuite", "qpth"), "jax": ("qpax",)}
"""The peers our time is divided by, per framework: those the issue sets goals against (their default settings)."""
SCALED = (("torch", "ours"), ("torch", "proxsuite"), ("jax", "ours"), ("jax", "qpax"))
"""The cases of the scaling tables: ours and the fastest peer of each framework, each at its default settings."""


@dataclass(frozen=True)
class Row:
    case: Case
    compile_s: Optional[float] = None
    first_call_s: Optional[float] = None
    median_ms: Optional[float] = None
    x_error: Optional[float] = None
    grad_errors: Optional[dict[str, float]] = None
    ratio: str = ""
    note: str = ""


def measure_group(cases: list[Case], problem: Problem, repeats: int, warmups: int, check=None) -> list[Row]:
    """Time one framework's cases side by side (see ``harness.time_in_rounds``); with ``check`` (the reference),
    compare each first call's answer with it."""
    rows, runs = {case: Row(case, note=case.unavailable or "") for case in cases}, {}
    for case in cases:
        if case.unavailable:
            continue
        try:
            runs[case] = case.prepare(problem)
        except Exception as error:  # a peer's failure is a result to report, not a reason to stop the others
            rows[case] = _failed(rows[case], error)
    firsts, times, failures = time_in_rounds({case: run.call for case, run in runs.items()}, warmups, repeats)
    for case, error in failures.items():
        rows[case] = _failed(rows[case], error)
    for case, (first, first_call_s) in firsts.items():
        try:
            outcome = runs[case].unpack(first)
        except Exception as error:
            rows[case] = _failed(rows[case], error)
            continue
        row = replace(rows[case], compile_s=runs[case].compile_s, first_call_s=first_call_s,
                      median_ms=1e3 * statistics.median(times[case]))
        if check is not None:
            row = replace(row, x_error=float(np.max(np.abs(outcome.x - check.x)) / np.max(np.abs(check.x))),
                          grad_errors=relative_errors(outcome.grads, check.grads))
        rows[case] = row
    return [rows[case] for case in cases]


def _failed(row: Row, error: Exception) -> Row:
    return replace(row, note=f"failed: {type(error).__name__}: {error}".replace("\n", " ")[:300])


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill "time / peer" in our rows: our median over each baseline peer's (its first row: default settings)."""
    def ratio(row: Row) -> str:
        if row.case.library != "ours" or row.median_ms is None:
            return ""
        cells = []
        for library in BASELINES[row.case.framework]:
            peer = next((r for r in rows if (r.case.framework, r.case.library) == (row.case.framework, library)), None)
            if peer is not None and peer.median_ms is not None:
                cells.append(f"{row.median_ms / peer.median_ms:.2f} ({library})")
        return ", ".join(cells)

    return [replace(row, ratio=ratio(row)) for row in rows]


def results_table(rows: list[Row]) -> str:
    header = ("| framework | library | settings | compile (s) | median fwd+bwd (ms) | time / peer | x rel. error "
              "| " + " | ".join(f"grad {name} rel. error" for name in ARGUMENTS) + " | worst grad | note |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        grads = [_number(None if r.grad_errors is None else r.grad_errors[name]) for name in ARGUMENTS]
        worst = _number(None if r.grad_errors is None else max(r.grad_errors.values()))
        cells = [r.case.framework, r.case.library, r.case.settings,
                 "" if r.compile_s is None else f"{r.compile_s:.1f}",
                 "" if r.median_ms is None else f"{r.median_ms:.3g}", r.ratio, _number(r.x_error), *grads, worst,
                 r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1e}"


def scaling_table(cases: list[Case], sizes: list[tuple[int, int]], label: str, repeats: int) -> str:
    """Median fwd+bwd time (ms) of ``cases`` for each (batch, n) in ``sizes`` (m = n inequalities); JAX compile
    times in brackets."""
    columns = [f"{case.framework} {case.library}" for case in cases]
    lines = [f"| {label} | " + " | ".join(f"{c} (ms)" for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for batch, n in sizes:
        problem = make_problem(batch, n, n)
        rows = []
        for framework in ("torch", "jax"):
            group = [c for c in cases if c.framework == framework]
            rows += measure_group(group, problem, repeats, warmups=1)
        cells = []
        for row in rows:
            if row.median_ms is None:
                cells.append(row.note or "")
            else:
                compiled = "" if row.compile_s is None else f" [{row.compile_s:.1f} s]"
                cells.append(f"{row.median_ms:.3g}{compiled}")
        lines.append(f"| {batch if label == 'batch' else n} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def measurements(rows: list[Row]) -> list[Measurement]:
    """The rows of the main table for the appendix: one comparison, forward and backward pass together."""
    return [Measurement(
        task="forward and backward", framework=r.case.framework, library=r.case.library, method=r.case.settings,
        median_ms=r.median_ms, first_call_s=r.first_call_s, compile_s=r.compile_s, solution_error=r.x_error,
        gradient_error=None if r.grad_errors is None else max(r.grad_errors.values()), note=r.note) for r in rows]


def report(args, problem: Problem, check, rows: list[Row], batch_table: str, size_table: str, info: dict) -> str:
    listing = lambda d: "\n".join(f"- {key}: {value}" for key, value in d.items())  # noqa: E731
    return f"""# {TITLE}

`python benchmarks/qp.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## Machine
{listing(info)}

## Versions
{listing(versions(PACKAGES))}

## Problem and settings
- A batch of {problem.batch} QPs `min 1/2 x'Qx + p'x subject to Gx <= h`, each with its own data, n = {problem.n}
  variables and m = {problem.m} inequalities, float64 (see `qp_problem.py`): `Q = LL' + 0.1 I`, `h = G x0 + s0`
  with `x0` strictly feasible. {check.active_share:.0%} of the constraints are active at the solutions; the
  smallest max(multiplier, slack) over all constraints is {check.margin:.1e}, so no constraint is weakly active.
- Every run is one forward pass and one backward pass of `L = sum(c * x)` to Q, p, G and h, for a fixed
  Gaussian `c`.
- Reference: Clarabel at tolerances of 1e-11 names each sample's active set (multiplier above slack); the
  solution and the gradient are then exact for that set, from NumPy's dense solve of the KKT system. No library
  measured shares code with it.
- Errors: "x rel. error" is the largest absolute error of the solutions over the largest absolute entry of the
  reference solutions. Each "grad ... rel. error" is the same measure for the gradient with respect to that
  argument, over the whole batch; "worst grad" is the largest of the four. The gradient with respect to Q is
  symmetrized before the comparison (only symmetric changes of Q stay in the problem class).
- Libraries, each with its defaults unless the row says otherwise. Ours: `qp(Q, p, G, h)`, float64 tolerance
  1e-9; the second row runs it with `torch.set_num_threads(1)`. qpth: `QPFunction` (eps 1e-12, at most 20
  iterations). proxsuite: `proxsuite.torch.qplayer.QPFunction` with `l = -1e20` (eps 1e-9 forward, eps_backward
  1e-4; its backward pass fills float32 buffers). cvxpylayers: `CvxpyLayer` on the DPP problem with
  `0.5 |L'x|^2 + p'x` and `L = cholesky(Q)` in torch, first with its defaults (diffcp with SCS and the lsqr
  derivative), then with diffcp's `solve_method="Clarabel"` and `mode="dense"`. qpax: `solve_qp_primal` per
  sample under `vmap`, in chunks of {qp_jax.QPAX_CHUNK} run by `lax.map` (one vmap over 128 deadlocked XLA's CPU pool
  here), jitted; it differentiates a relaxed QP (`target_kappa`), so its gradient error depends on that setting.
- Timing is wall clock. JAX programs (forward and gradient together) are compiled first; "compile (s)" is that
  time. Then each case runs once alone and once more untimed, then {args.repeats} rounds in which every case of
  the same framework runs once, in turn. Torch and JAX cases are timed apart. The table gives the median per
  case. "time / peer" is our median divided by the peer's (its default-settings row), so a value above 1 means
  ours is slower. The goals in issue #9 are torch at most 1.0x proxsuite and 0.5x qpth, JAX at most 1.0x qpax.

## Results (batch {problem.batch}, n = {problem.n}, m = {problem.m})
{results_table(rows)}

## Time as the batch grows (n = m = {problem.n})
Median fwd+bwd in ms over {min(args.repeats, SCALING_REPEATS)} rounds after one call alone, JAX compile time in
brackets. Each of ours
checks that every sample was solved; qpax, which reports no status, that every solution is finite. The answers
are not compared with a reference here.

{batch_table}

## Time as the problem grows (batch {problem.batch}, m = n inequalities)
As above.

{size_table}
"""


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "qp",
                      "batch 8, 2 repeats, batch up to 4 and n = 10 in the scaling tables", default_repeats=5)
    batch, n = (8, 50) if args.quick else (128, 50)
    batches = [1, 4] if args.quick else [1, 4, 16, 64, 256, 1024]
    sizes = [10] if args.quick else [10, 25, 50, 100, 200]
    info = machine()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work shares the CPU, timings will be noisy",
              file=sys.stderr)
    start, started = cpu_seconds(), time.perf_counter()
    problem = make_problem(batch, n, n)
    check = reference(problem)
    cases = qp_torch.cases() + qp_jax.cases()
    rows = []
    # Frameworks are timed apart: torch's OpenMP threads spin for a while after each call and slow a JAX call that
    # follows (seen in the fixed-point benchmark).
    for framework in ("torch", "jax"):
        group = [c for c in cases if c.framework == framework]
        for row in measure_group(group, problem, args.repeats, WARMUPS, check):
            print(f"{framework} {row.case.library} {row.case.settings}: {row.median_ms or 0:.1f} ms {row.note}",
                  file=sys.stderr, flush=True)
            rows.append(row)
    scaled = [next(c for c in cases if (c.framework, c.library) == key) for key in SCALED]
    repeats = min(args.repeats, SCALING_REPEATS)
    batch_table = scaling_table(scaled, [(b, n) for b in batches], "batch", repeats)
    size_table = scaling_table(scaled, [(batch, size) for size in sizes], "n", repeats)
    info["CPU taken by other processes during the run"] = others_share(start, time.perf_counter() - started)
    text = report(args, problem, check, with_ratios(rows), batch_table, size_table, info)
    errors = {"solution": "largest absolute error of the solutions over the largest absolute entry of the exact "
                          "float64 reference",
              "gradient": "the same measure for the gradients to Q, p, G and h, the worst of the four"}
    write_report(args.out, text, results_record("qp", TITLE, args, info, PACKAGES, measurements(rows), errors))


if __name__ == "__main__":
    main()
