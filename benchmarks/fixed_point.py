"""Time our batched fixed-point solvers beside torchdeq, jaxopt and optimistix on the same problems.

Every library solves the same float32 tanh layers (see ``fixed_point_problem.py``) to comparable accuracy; every
answer is checked against a float64 reference, and the table gives the residual and errors each one reached
next to its time. Run it in the benchmark environment, which ``make bench`` builds::

    python benchmarks/fixed_point.py [--quick] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Optional

import fixed_point_jax
import fixed_point_torch
from fixed_point_torch import METHODS
from fixed_point_problem import INPUT_SCALE, TASKS, Case, Problem, Settings, accuracy, make_problems
from harness import (
    Measurement, compile_estimate, cpu_seconds, machine, others_share, parse_args, our_package, results_record,
    time_in_rounds, versions, write_report,
)

WARMUPS = 2
"""Calls before the timed repeats; the first is timed on its own (for JAX: compilation and one run)."""
PACKAGES = ("torch", "jax", "jaxlib", "numpy", "scipy", "torchdeq", "jaxopt", "optimistix", "equinox", "lineax")
TITLE = "Fixed-point solvers: ours beside torchdeq, jaxopt and optimistix"


@dataclass(frozen=True)
class Row:
    """One line of the results table: a case on one problem and task."""

    case: Case
    problem: str
    task: str
    steps: Optional[int] = None
    residual: Optional[float] = None
    z_error: Optional[float] = None
    grad_error: Optional[float] = None
    first_call_s: Optional[float] = None
    median_ms: Optional[float] = None
    ratio: str = ""
    note: str = ""


def measure_group(cases: list[Case], problem: Problem, settings: Settings, task: str, repeats: int) -> list[Row]:
    """Time the cases of one method side by side: each case's first call alone, its other warm-ups untimed, then
    ``repeats`` rounds in which every case runs once, so that a slow spell of the machine hits all of them alike;
    the median per case. The first call's answer is checked against the reference. A failure becomes a note."""
    rows, runs = {}, {}
    for case in cases:
        rows[case] = Row(case, problem.name, task)
        if case.unavailable:
            rows[case] = replace(rows[case], note=case.unavailable)
            continue
        try:
            runs[case] = case.prepare(problem, settings, task)
        except Exception as error:  # a peer's failure is a result to report, not a reason to stop the others
            rows[case] = _failed(rows[case], error)
    firsts, times, failures = time_in_rounds({case: run.call for case, run in runs.items()}, WARMUPS, repeats)
    for case, error in failures.items():
        rows[case] = _failed(rows[case], error)
        del runs[case]
    for case, run in runs.items():
        first, first_call_s = firsts[case]
        outcome = run.unpack(first)
        checked = accuracy(problem, outcome.z, outcome.grads)
        rows[case] = replace(
            rows[case],
            steps=outcome.steps,
            residual=checked.residual,
            z_error=checked.z_error,
            grad_error=checked.grad_error,
            first_call_s=first_call_s,
            median_ms=1e3 * statistics.median(times[case]),
            # A solver's own float32 residual has rounding errors of a few percent of tol, so only a clear excess
            # of the float64 residual says that a sample did not converge.
            note="not converged: residual > 2 tol" if checked.residual > 2 * settings.tol else "",
        )
    return [rows[case] for case in cases]


def _failed(row: Row, error: Exception) -> Row:
    return replace(row, note=f"failed: {type(error).__name__}: {error}".replace("\n", " ")[:300])


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill "time / same-method peer" in our rows: against each peer with the same method, framework, problem and
    task; our torch Newton, which has no torch peer, against optimistix's Newton in JAX."""
    peers = [r for r in rows if r.case.library != "ours" and r.median_ms is not None]

    def ratio(row: Row) -> str:
        if row.case.library != "ours" or row.median_ms is None:
            return ""
        parts = []
        for peer in peers:
            same_work = (peer.case.method, peer.problem, peer.task) == (row.case.method, row.problem, row.task)
            same_framework = peer.case.framework == row.case.framework
            if same_work and (same_framework or row.case.method == "newton"):
                label = peer.case.library if same_framework else f"{peer.case.library}, {peer.case.framework}"
                parts.append(f"{row.median_ms / peer.median_ms:.2f} ({label})")
        return ", ".join(parts)

    return [replace(row, ratio=ratio(row)) for row in rows]


def results_table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    header = (
        "| problem | task | framework | library | method | steps | max residual | z error | grad rel. error "
        "| first call (s) | median (ms) | time / same-method peer | note |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        cells = [
            r.problem, r.task, r.case.framework, r.case.library, r.case.method,
            "" if r.steps is None else str(r.steps),
            _number(r.residual), _number(r.z_error), _number(r.grad_error),
            "" if r.first_call_s is None else f"{r.first_call_s:.2f}",
            "" if r.median_ms is None else f"{r.median_ms:.3g}",
            r.ratio, r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1e}"


def settings_table(cases: list[Case]) -> str:
    """What each case was given beyond the shared settings."""
    lines = ["| framework | library | method | options |", "|---|---|---|---|"]
    lines += [f"| {c.framework} | {c.library} | {c.method} | {c.settings or c.unavailable or ''} |" for c in cases]
    return "\n".join(lines)


def report(args, settings: Settings, n: int, batch: int, cases: list[Case], rows: list[Row], info: dict) -> str:
    """The whole results file."""
    listing = lambda d: "\n".join(f"- {key}: {value}" for key, value in d.items())  # noqa: E731
    return f"""# {TITLE}

`python benchmarks/fixed_point.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## Machine
{listing(info)}

## Versions
{listing(versions(PACKAGES))}

## Problems and settings
- `f(z) = tanh(z W^T + x)`, n = {n}, batch {batch}, float32, `z0 = 0`; `x ~ N(0, {INPUT_SCALE}^2)`. "easy": Gaussian
  `W` scaled to spectral norm 0.5; "hard": symmetric `W` scaled to spectral norm 0.9.
- "forward": solve only. "gradient": solve and `d/d(W, x)` of `sum(z* * c)` by the implicit function theorem.
- Tolerance {settings.tol:g} on every sample's `||f(z) - z||_2`, in each library's terms: ours per sample; torchdeq
  `stop_mode="abs"` (largest per-sample norm in the batch); jaxopt and optimistix `vmap`-ed, one solve per sample,
  optimistix with `rtol=0, atol=tol, norm=two_norm` (its default is a max norm with relative part).
- No library checks convergence after the solve (ours `warn=False`, optimistix `throw=False`; torchdeq and jaxopt
  have no such check): the accuracy columns are the check.
- Iteration limit {settings.max_iter} ({settings.newton_max_iter} for Newton), forward and backward. Anderson
  m = {settings.anderson_m}; ours with ridge {settings.anderson_ridge:g} times the history's mean squared residual,
  the peers with an absolute ridge of {settings.peer_anderson_ridge:g} (= tol^2: a larger absolute ridge outweighs
  the Gram matrix near convergence, and Anderson then slows to averaged plain iteration). Broyden memory
  {settings.broyden_m}.
- Backward: ours and torchdeq solve the adjoint fixed point with the forward method; ours to
  {settings.backward_rtol:g} relative to each sample's `||c_b||`, torchdeq to the absolute
  `{settings.backward_rtol:g} * min_b ||c_b||`; jaxopt by conjugate gradients on the normal equations (its default)
  to relative {settings.backward_rtol:g}; optimistix by a dense LU solve (the default of `ImplicitAdjoint`).
- Checked against a float64 Newton solve (residual < 1e-12) and the float64 implicit-function-theorem gradient:
  "max residual" is the largest `||f(z) - z||_2` over samples, evaluated in float64 at the `z` the library
  returned; "z error" the largest `||z - z_ref||_2`; "grad rel. error" the larger of the relative Frobenius errors
  of `dL/dW` and `dL/dx`. "steps" is the solver's own count (torchdeq: the step of its best iterate, per sample).
- Timing: wall clock; the first call alone (JAX: compilation + one run), {WARMUPS - 1} more warm-up call, then
  {args.repeats} rounds in which every library's solver of the same method and framework runs once, in turn,
  so that a slow spell of the machine hits them alike; the median per solver (JAX results blocked on). torch
  threads left at their default. "time / same-method peer": our median over the peer's, above 1 where ours is
  slower.

## Results
{results_table(rows)}

## Options per case
{settings_table(cases)}
"""


def measurements(rows: list[Row]) -> list[Measurement]:
    """The rows for the appendix: each problem and task is one comparison."""
    return [Measurement(
        task=f"{r.problem} {r.task}", framework=r.case.framework, library=r.case.library, method=r.case.method,
        median_ms=r.median_ms, first_call_s=r.first_call_s,
        compile_s=compile_estimate(r.case.framework, r.first_call_s, r.median_ms), solution_error=r.z_error,
        gradient_error=r.grad_error, work="" if r.steps is None else f"{r.steps} steps", note=r.note) for r in rows]


def _table_order(case: Case) -> tuple:
    """Torch before JAX, then by method, ours first among the libraries with that method."""
    return (case.framework != "torch", METHODS.index(case.method), case.library != "ours", case.library)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "fixed_point", "n=32, batch 8, 2 repeats", default_repeats=15)
    settings = Settings()
    n, batch = (32, 8) if args.quick else (256, 64)
    info = machine()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work shares the CPU, timings will be noisy",
              file=sys.stderr)
    print(f"implicit_layers from {our_package()}", file=sys.stderr)
    start, started = cpu_seconds(), time.perf_counter()
    problems = make_problems(n, batch)
    cases = sorted(fixed_point_torch.cases(settings) + fixed_point_jax.cases(settings), key=_table_order)
    rows = []
    for problem in problems:
        for task in TASKS:
            # Frameworks are timed apart: in rounds that mixed them, the JAX solver that ran right after a torch
            # one was up to 1.6x slower than alone (torch's OpenMP threads wait by spinning for a while).
            for framework, method in sorted({(c.framework, c.method) for c in cases}):
                group = [c for c in cases if (c.framework, c.method) == (framework, method)]
                group = measure_group(group, problem, settings, task, args.repeats)
                for row in group:
                    print(f"{problem.name} {task} {framework} {row.case.library} {method}: "
                          f"{row.median_ms or 0:.1f} ms {row.note}", file=sys.stderr, flush=True)
                rows += group
    order = [problem.name for problem in problems]
    rows.sort(key=lambda row: (order.index(row.problem), TASKS.index(row.task), _table_order(row.case)))
    info["CPU taken by other processes during the run"] = others_share(start, time.perf_counter() - started)
    text = report(args, settings, n, batch, cases, with_ratios(rows), info)
    errors = {"solution": "largest ||z - z_ref||_2 over the samples, against a float64 Newton solve",
              "gradient": "relative Frobenius error of dL/d(W, x), the larger of the two, against the float64 "
                          "implicit-function-theorem gradient"}
    write_report(args.out, text, results_record("fixed_point", TITLE, args, info, PACKAGES, measurements(rows), errors))


if __name__ == "__main__":
    main()
