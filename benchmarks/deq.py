"""Time one training step of a convolutional DEQ classifier with our fixed_point beside torchdeq, jaxopt and
optimistix.

Every library takes the same step (see ``deq_problem.py``): the forward solve of the ``ConvDEQCell`` on a batch
of 64 digits with 16 channels, the exact implicit backward pass, and the gradients of every parameter, from the
same float32 parameters, with Anderson acceleration (optimistix: fixed-point iteration, it has no Anderson) at
the same tolerances and iteration limits. Every answer is checked against a float64 reference; the table gives the
iterations, the residual and the gradient error next to the time. If our torch step is slower than torchdeq's,
a torch.profiler table of ours follows. Run it in the benchmark environment, which ``make bench`` builds::

    python benchmarks/deq.py [--quick] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Optional

import deq_jax
import deq_torch
from deq_problem import Case, Problem, Settings, accuracy, make_problem
from harness import (
    Measurement, compile_estimate, cpu_seconds, machine, others_share, parse_args, results_record,
    time_in_rounds, versions, write_report,
)

WARMUPS = 2
"""Calls before the timed repeats; the first is timed on its own (for JAX: compilation and one run)."""
PACKAGES = ("torch", "jax", "jaxlib", "numpy", "scipy", "scikit-learn", "torchdeq", "jaxopt", "optimistix",
            "equinox", "lineax")
TITLE = "A convolutional DEQ's training step: ours beside torchdeq, jaxopt and optimistix"


@dataclass(frozen=True)
class Row:
    case: Case
    forward_steps: Optional[int] = None
    backward_steps: Optional[int] = None
    residual: Optional[float] = None
    grad_error: Optional[float] = None
    worst_parameter: str = ""
    first_call_s: Optional[float] = None
    median_ms: Optional[float] = None
    note: str = ""


def measure_group(cases: list[Case], problem: Problem, settings: Settings, repeats: int) -> list[Row]:
    """Time one framework's cases side by side (``harness.time_in_rounds``) and check each first answer."""
    rows, runs = {}, {}
    for case in cases:
        rows[case] = Row(case, note=case.unavailable or "")
        if case.unavailable:
            continue
        try:
            runs[case] = case.prepare(problem, settings)
        except Exception as error:  # a peer's failure is a result to report, not a reason to stop the others
            rows[case] = _failed(rows[case], error)
    firsts, times, failures = time_in_rounds({case: run.call for case, run in runs.items()}, WARMUPS, repeats)
    for case, error in failures.items():
        rows[case] = _failed(rows[case], error)
        runs.pop(case)
    for case, run in runs.items():
        first, first_call_s = firsts[case]
        outcome = run.unpack(first)
        checked = accuracy(problem, settings, outcome.z, outcome.grads)
        rows[case] = replace(
            rows[case],
            forward_steps=outcome.forward_steps,
            backward_steps=outcome.backward_steps,
            residual=checked.residual,
            grad_error=checked.grad_error,
            worst_parameter=checked.worst_parameter,
            first_call_s=first_call_s,
            median_ms=1e3 * statistics.median(times[case]),
            note="not converged: residual > 2 tol" if checked.residual > 2 * settings.tol else "",
        )
    return [rows[case] for case in cases]


def _failed(row: Row, error: Exception) -> Row:
    """A failure as a note: the innermost error's line (a JAX runtime error wraps it in a long traceback)."""
    text = f"{type(error).__name__}: {error}"
    lines = [line for line in text.splitlines() if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return replace(row, note=f"failed: {(lines[-1] if lines else text)}".replace("\n", " ")[:300])


def results_table(rows: list[Row]) -> str:
    header = ("| framework | library | method | forward iterations | backward iterations | max residual "
              "| grad rel. error | worst parameter (rel. error) | first call (s) | compile (s) | median step (ms) "
              "| note |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        compile_s = compile_estimate(r.case.framework, r.first_call_s, r.median_ms)
        compile_s = "" if compile_s is None else f"{compile_s:.2f}"
        cells = [
            r.case.framework, r.case.library, r.case.method,
            _integer(r.forward_steps), _integer(r.backward_steps) or "n/a",
            _number(r.residual), _number(r.grad_error), r.worst_parameter,
            "" if r.first_call_s is None else f"{r.first_call_s:.2f}", compile_s,
            "" if r.median_ms is None else f"{r.median_ms:.3g}", r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measurements(rows: list[Row]) -> list[Measurement]:
    """The rows for the appendix: one comparison, the whole training step."""
    def work(r: Row) -> str:
        if r.forward_steps is None:
            return ""
        backward = "" if r.backward_steps is None else f", {r.backward_steps} backward"
        return f"{r.forward_steps} forward{backward} iterations"

    return [Measurement(
        task="training step", framework=r.case.framework, library=r.case.library, method=r.case.method,
        median_ms=r.median_ms, first_call_s=r.first_call_s,
        compile_s=compile_estimate(r.case.framework, r.first_call_s, r.median_ms), solution_error=r.residual,
        gradient_error=r.grad_error, work=work(r), note=r.note) for r in rows]


def _integer(value: Optional[int]) -> str:
    return "" if value is None else str(value)


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1e}"


def goal(rows: list[Row]) -> str:
    """The issue's goal: our torch step at most 1.0x torchdeq's time, at no more solver iterations, against each
    torchdeq row that converged."""
    timed = [r for r in rows if r.case.framework == "torch" and r.median_ms is not None]
    ours = next((r for r in timed if r.case.library == "ours"), None)
    peers = [r for r in timed if r.case.library.startswith("torchdeq") and not r.note]
    if ours is None or not peers:
        return "not measured: ours has no time, or no torchdeq row converged, in this run."
    verdicts = []
    for peer in peers:
        ratio = ours.median_ms / peer.median_ms
        ours_iterations = (ours.forward_steps or 0) + (ours.backward_steps or 0)
        peer_iterations = (peer.forward_steps or 0) + (peer.backward_steps or 0)
        met = ratio <= 1.0 and ours_iterations <= peer_iterations
        verdicts.append(f"against {peer.case.library}: {ratio:.2f}x its time, {ours_iterations} iterations "
                        f"(forward + backward) against {peer_iterations}: {'met' if met else 'NOT met'}")
    return "; ".join(verdicts) + "."


def profile_ours(problem: Problem, settings: Settings) -> str:
    """torch.profiler's table of our torch step (self CPU time per operator), after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    run = next(c for c in deq_torch.cases(settings) if c.library == "ours").prepare(problem, settings)
    run.call()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run.call()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def report(args, settings: Settings, rows: list[Row], info: dict, profile_text: str) -> str:
    listing = lambda d: "\n".join(f"- {key}: {value}" for key, value in d.items())  # noqa: E731
    settings_lines = "\n".join(f"| {c.case.framework} | {c.case.library} | {c.case.settings or c.note} |" for c in rows)
    profile_section = ""
    if profile_text:
        profile_section = f"\n## Where our torch step spends its time (torch.profiler, one step)\n```\n{profile_text}\n```\n"
    return f"""# {TITLE}

`python benchmarks/deq.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## Machine
{listing(info)}

## Versions
{listing(versions(PACKAGES))}

## Problem and settings
- The classifier of `deq_problem.py`: stem (3x3 conv 1 -> {settings.channels} channels, group norm), the
  `ConvDEQCell({settings.channels}, {settings.inner_channels}, groups={settings.groups})` solved from `z0 = 0`, head
  (mean over pixels, linear {settings.channels} -> 10); mean cross-entropy on the first {settings.batch} training
  digits (8x8); float32; parameters from torch's default initialization, seed 0, the same values for everyone.
- One step: forward solve, exact implicit backward, gradients of all parameters (torch: `autograd.grad`; JAX:
  `jit(grad)` of the whole step).
- Forward: tolerance {settings.tol:g} on every sample's `||f(z) - z||_2` (torchdeq `stop_mode="abs"`: its largest
  per-sample residual), at most {settings.max_iter} iterations. Anderson m = {settings.anderson_m}, ridge
  {settings.anderson_ridge:g} (ours relative to the history's mean squared residual, the peers absolute).
- Backward: ours to {settings.backward_rtol:g} relative to each sample's `||dL/dz*_b||`, at most
  {settings.backward_max_iter} iterations; torchdeq to the absolute `{settings.backward_rtol:g} * min_b ||dL/dz*_b||`;
  jaxopt and optimistix relative to the right-hand side, as listed below.
- Checked against a float64 reference (Newton-GMRES forward to residual < 1e-10, GMRES adjoint to 1e-12, SciPy
  with exact autograd products): "max residual" is the largest `||f(z) - z||_2` in float64 at the returned `z`;
  "grad rel. error" is the relative error of all parameter gradients as one vector; the worst single parameter is
  named. Iterations are each library's own count (most over the samples); JAX backward counts are not reported
  from inside a compiled gradient.
- Timing: wall clock; the first call alone (JAX: compilation + one run; "compile" is the first call minus the
  median), {WARMUPS - 1} more warm-up call, then {args.repeats} rounds in which each framework's cases run once in
  turn; the median. The frameworks are timed apart.

## Results
{results_table(rows)}

Goal (issue 10): {goal(rows)}

## Options per case
| framework | library | options |
|---|---|---|
{settings_lines}
{profile_section}"""


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "deq", "batch 16, 2 repeats", default_repeats=7)
    settings = Settings(batch=16) if args.quick else Settings()
    info = machine()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work shares the CPU, timings will be noisy",
              file=sys.stderr)
    start, started = cpu_seconds(), time.perf_counter()
    problem = make_problem(settings)
    print(f"reference ready after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for framework_cases in (deq_torch.cases(settings), deq_jax.cases(settings)):
        group = measure_group(framework_cases, problem, settings, args.repeats)
        for row in group:
            print(f"{row.case.framework} {row.case.library}: {row.median_ms or 0:.1f} ms {row.note}",
                  file=sys.stderr, flush=True)
        rows += group
    slower = "NOT met" in goal(rows)
    profile_text = profile_ours(problem, settings) if slower else ""
    info["CPU taken by other processes during the run"] = others_share(start, time.perf_counter() - started)
    errors = {"solution": "largest residual ||f(z) - z||_2 over the samples, in float64 at the returned z (the "
                          "fixed point itself is not compared)",
              "gradient": "relative error of all parameter gradients as one vector, against a float64 "
                          "Newton-GMRES reference"}
    write_report(args.out, report(args, settings, rows, info, profile_text),
                 results_record("deq", TITLE, args, info, PACKAGES, measurements(rows), errors))


if __name__ == "__main__":
    main()
