"""Time our batched ODE solvers beside torchdiffeq, torchode and diffrax on the same neural ODE.

Every library integrates the same float32 MLP vector field (see ``ode_problem.py``) with Dormand-Prince 5(4) at
the same tolerances; every answer is checked against a float64 SciPy reference (the state at t1, and the gradient
of a loss by the adjoint equations), and the table gives those errors next to the time. A second table gives the
peak memory of each of our gradient modes as the integration gets longer. Run it in the benchmark environment,
which ``make bench`` builds::

    python benchmarks/ode.py [--quick] [--repeats N] [--out PATH]
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
import numpy as np
import torch

import ode_jax
import ode_torch
from harness import (
    Measurement, compile_estimate, cpu_seconds, machine, others_share, parse_args, results_record,
    time_in_rounds, versions, write_report,
)
from implicit_layers import jax as ours_jax
from implicit_layers import torch as ours_torch
from ode_problem import Problem, make_problem, reference, relative_error
from ode_settings import Case, Settings

WARMUPS = 2
"""Calls before the timed repeats; the first is timed on its own (for JAX: compilation and one run)."""
PACKAGES = ("torch", "jax", "jaxlib", "numpy", "scipy", "torchdiffeq", "torchode", "diffrax", "equinox")
TITLE = "ODE solvers: ours beside torchdiffeq, torchode and diffrax"
MEMORY_HORIZONS = (1.0, 2.0, 4.0, 8.0)
"""End times of the memory table: a longer integration takes more steps."""
SWEEP_TOLERANCES = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
"""rtol = atol of the work-precision sweep of the forward solves: at one nominal tolerance the libraries reach
different accuracies (their error norms differ), so their times compare fairly only at equal error."""
SWEEP_REPEATS = 5


@dataclass(frozen=True)
class Row:
    case: Case
    nfe: Optional[int] = None
    y_error: Optional[float] = None
    grad_error: Optional[float] = None
    first_call_s: Optional[float] = None
    median_ms: Optional[float] = None
    ratio: str = ""
    note: str = ""
    grads: Optional[dict] = None  # kept for the comparison of our modes with each other


def measure_group(cases: list[Case], problem: Problem, settings: Settings, references, repeats: int) -> list[Row]:
    """Time one framework's cases of one task side by side (see ``harness.time_in_rounds``) and check each first
    call's answer against the float64 references."""
    y_reference, grad_reference = references
    rows, runs = {case: Row(case, note=case.unavailable or "") for case in cases}, {}
    for case in cases:
        if case.unavailable:
            continue
        try:
            runs[case] = case.prepare(problem, settings)
        except Exception as error:  # a peer's failure is a result to report, not a reason to stop the others
            rows[case] = _failed(rows[case], error)
    firsts, times, failures = time_in_rounds({case: run.call for case, run in runs.items()}, WARMUPS, repeats)
    for case, error in failures.items():
        rows[case] = _failed(rows[case], error)
    for case, (first, first_call_s) in firsts.items():
        outcome = runs[case].unpack(first)
        rows[case] = replace(
            rows[case],
            nfe=outcome.nfe,
            y_error=float(np.max(np.abs(outcome.y1 - y_reference))),
            grad_error=None if outcome.grads is None else relative_error(outcome.grads, grad_reference),
            grads=outcome.grads,
            first_call_s=first_call_s,
            median_ms=1e3 * statistics.median(times[case]),
        )
    return [rows[case] for case in cases]


def _failed(row: Row, error: Exception) -> Row:
    return replace(row, note=f"failed: {type(error).__name__}: {error}".replace("\n", " ")[:300])


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill "time / peer" in our rows: against every peer of the same framework and task (forward, or any
    gradient mode)."""
    def task(row: Row) -> str:
        return "forward" if row.case.gradient is None else "gradient"

    peers = [r for r in rows if r.case.library != "ours" and r.median_ms is not None]

    def ratio(row: Row) -> str:
        if row.case.library != "ours" or row.median_ms is None:
            return ""
        return ", ".join(
            f"{row.median_ms / peer.median_ms:.2f} ({peer.case.library} {peer.case.gradient or ''})".replace(" )", ")")
            for peer in peers if (peer.case.framework, task(peer)) == (row.case.framework, task(row)))

    return [replace(row, ratio=ratio(row)) for row in rows]


def results_table(rows: list[Row]) -> str:
    header = ("| framework | library | method | gradient | NFE | max abs error y(t1) | grad rel. error "
              "| first call (s) | median (ms) | time / peer | note |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        cells = [r.case.framework, r.case.library, r.case.method, r.case.gradient or "forward only",
                 "" if r.nfe is None else str(r.nfe), _number(r.y_error), _number(r.grad_error),
                 "" if r.first_call_s is None else f"{r.first_call_s:.2f}",
                 "" if r.median_ms is None else f"{r.median_ms:.3g}", r.ratio, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1e}"


def modes_compared(rows: list[Row]) -> str:
    """How far our checkpoint and adjoint gradients are from our backprop gradient of the same discrete solve:
    checkpointing must reproduce it to round-off; the adjoint differs by its own discretization error."""
    lines = ["| framework | method | checkpoint vs backprop | adjoint vs backprop |", "|---|---|---|---|"]
    ours = {(r.case.framework, r.case.method, r.case.gradient): r.grads for r in rows
            if r.case.library == "ours" and r.grads is not None}
    for framework, method in sorted({(f, m) for f, m, _ in ours}):
        backprop = ours.get((framework, method, "backprop"))
        cells = []
        for mode in ("checkpoint", "adjoint"):
            other = ours.get((framework, method, mode))
            cells.append("" if backprop is None or other is None else _number(relative_error(other, backprop)))
        lines.append(f"| {framework} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(problem_batch: int, settings: Settings, horizons: tuple[float, ...]) -> str:
    """Peak memory of our torch forward+backward per gradient mode as t1 grows (``peak_memory_bytes``: the highest
    level of allocated tensor memory during the call, CPU profiler or CUDA counters), and the bytes XLA plans for
    the jitted JAX gradient (``compiled_memory_bytes``: arguments, outputs, temporaries)."""
    lines = ["| t1 | NFE (forward, per_sample) | " + " | ".join(
        f"torch {mode} (MiB) | JAX {mode} (MiB)" for mode in settings.our_gradients) + " |"]
    lines.append("|" + "---|" * (2 + 2 * len(settings.our_gradients)))
    for t1 in horizons:
        problem = make_problem(problem_batch, t1=t1)
        cells, nfe = [], None
        for mode in settings.our_gradients:
            field, y0, c = ode_torch._inputs(problem)
            t = torch.tensor([0.0, t1])

            def forward_backward():
                ys, result = ours_torch.odeint(field, y0, t, method="dopri5", rtol=settings.rtol, atol=settings.atol,
                                               gradient=mode, warn=False)
                (ys[-1] * c).sum().backward()
                return result

            result, peak = ours_torch.peak_memory_bytes(forward_backward)
            nfe = int(result.nfe.max())
            jax_params, jax_y0, jax_c = ode_jax._inputs(problem)
            jax_t = jax.numpy.array([0.0, t1], jax.numpy.float32)

            def loss(p):
                bound = {"max_steps": ode_jax.CHECKPOINT_MAX_STEPS} if mode == "checkpoint" else {}
                ys, _ = ours_jax.odeint(lambda t, y, p: ode_jax.mlp(p, y), jax_y0, jax_t, p, method="dopri5",
                                        rtol=settings.rtol, atol=settings.atol, gradient=mode, warn=False, **bound)
                return (ys[-1] * jax_c).sum()

            planned = ours_jax.compiled_memory_bytes(jax.grad(loss), jax_params)
            cells += [f"{peak / 2**20:.2f}", f"{planned / 2**20:.2f}"]
        lines.append(f"| {t1:g} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def work_precision(problem: Problem, references, tolerances: tuple[float, ...], repeats: int) -> list[tuple]:
    """Every forward case at every tolerance: ``(tol, row)`` pairs, each framework's cases timed side by side at
    one tolerance as in the main table."""
    points = []
    for tol in tolerances:
        settings = Settings(rtol=tol, atol=tol)
        cases = sorted(ode_torch.cases(settings) + ode_jax.cases(settings), key=_table_order)
        for framework in ("torch", "jax"):
            group = [c for c in cases if c.framework == framework and c.gradient is None]
            for row in measure_group(group, problem, settings, references, repeats):
                print(f"sweep {tol:g} {framework} {row.case.library} {row.case.method}: {row.median_ms or 0:.1f} ms, "
                      f"error {row.y_error or 0:.1e} {row.note}", file=sys.stderr, flush=True)
                points.append((tol, row))
    return points


def work_precision_table(points: list[tuple]) -> str:
    lines = ["| framework | library | method | rtol = atol | NFE | max abs error y(t1) | median (ms) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for tol, r in sorted(points, key=lambda point: (_table_order(point[1].case), -point[0])):
        cells = [r.case.framework, r.case.library, r.case.method, f"{tol:g}", "" if r.nfe is None else str(r.nfe),
                 _number(r.y_error), "" if r.median_ms is None else f"{r.median_ms:.3g}", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_matched_accuracy(points: list[tuple]) -> list[dict]:
    """For each peer's run, our fastest run of the sweep (any step control, any tolerance) whose error is at
    most the peer's: a comparison of time at equal or better accuracy, with no interpolation between runs."""
    timed = [(tol, r) for tol, r in points
             if r.median_ms is not None and r.y_error is not None and np.isfinite(r.y_error)]
    matches = []
    for tol, peer in timed:
        if peer.case.library == "ours":
            continue
        candidates = [(r.median_ms, ours_tol, r) for ours_tol, r in timed if r.case.library == "ours"
                      and r.case.framework == peer.case.framework and r.y_error <= peer.y_error]
        match = dict(framework=peer.case.framework, peer=f"{peer.case.library}, {peer.case.method}", peer_tol=tol,
                     peer_error=peer.y_error, peer_ms=peer.median_ms, ours=None)
        if candidates:
            ours_ms, ours_tol, ours = min(candidates, key=lambda candidate: candidate[0])
            match.update(ours=f"{ours.case.method}, rtol = atol = {ours_tol:g}", ours_error=ours.y_error,
                         ours_ms=ours_ms, ratio=ours_ms / peer.median_ms)
        matches.append(match)
    return matches


def matched_accuracy_table(matches: list[dict]) -> str:
    lines = ["| framework | peer | peer rtol = atol | peer error | peer (ms) | ours: fastest run at least as accurate "
             "| ours error | ours (ms) | ours / peer |", "|---|---|---|---|---|---|---|---|---|"]
    for m in matches:
        ours = (["none of ours reached this error", "", "", ""] if m["ours"] is None else
                [m["ours"], _number(m["ours_error"]), f"{m['ours_ms']:.3g}", f"{m['ratio']:.2f}"])
        lines.append("| " + " | ".join([m["framework"], m["peer"], f"{m['peer_tol']:g}", _number(m["peer_error"]),
                                        f"{m['peer_ms']:.3g}", *ours]) + " |")
    return "\n".join(lines)


GRADIENT_TOLERANCES = (1e-5, 3e-6, 1e-6)
"""Forward rtol = atol of the gradient-accuracy table."""
ADJOINT_TIGHTENING = 100
"""The table's extra adjoint case solves the backward pass at the forward tolerance divided by this."""


def gradient_accuracy(problem: Problem, references, tolerances: tuple[float, ...]) -> str:
    """The gradient error of every torch gradient case, ours and the peers', as the tolerance shrinks, and of our
    adjoint with a hundred times tighter backward tolerances: whether an adjoint's error comes from its backward
    solve or from the forward solution it starts from. One untimed call per case."""
    _, grad_reference = references
    errors = {}  # case label -> {tol: error as text}
    for tol in tolerances:
        for adjoint_tol in (None, tol / ADJOINT_TIGHTENING):
            settings = Settings(rtol=tol, atol=tol, adjoint_tol=adjoint_tol)
            for case in ode_torch.cases(settings):
                if case.gradient is None or case.unavailable or (
                        adjoint_tol is not None and (case.gradient, case.library) != ("adjoint", "ours")):
                    continue
                label = f"{case.library}, {case.method}, {case.gradient}" + (
                    "" if adjoint_tol is None else f", adjoint tol / {ADJOINT_TIGHTENING}")
                try:
                    run = case.prepare(problem, settings)
                    error = _number(relative_error(run.unpack(run.call()).grads, grad_reference))
                except Exception as exception:  # a peer's failure is a result to report
                    error = f"failed: {type(exception).__name__}"
                errors.setdefault(label, {})[tol] = error
    lines = ["| case | " + " | ".join(f"rtol = atol = {tol:g}" for tol in tolerances) + " |",
             "|---|" + "---|" * len(tolerances)]
    lines += [f"| {label} | " + " | ".join(by_tol.get(tol, "") for tol in tolerances) + " |"
              for label, by_tol in sorted(errors.items(), key=lambda item: (not item[0].startswith("ours"), item[0]))]
    return "\n".join(lines)


def report(args, settings: Settings, batch: int, rows: list[Row], memory: str, sweep: list[tuple],
           matches: list[dict], accuracy: str, info: dict) -> str:
    modes = modes_compared(rows)
    listing = lambda d: "\n".join(f"- {key}: {value}" for key, value in d.items())  # noqa: E731
    return f"""# {TITLE}

`python benchmarks/ode.py {' '.join(sys.argv[1:])}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## Machine
{listing(info)}

## Versions
{listing(versions(PACKAGES))}

## Problem and settings
- The vector field is an MLP 2-64-64-2 with tanh (see `ode_problem.py`). The batch is {batch} states, float32,
  integrated from t = 0 to 1 with Dormand-Prince 5(4) at rtol = {settings.rtol:g} and atol = {settings.atol:g}.
  The loss is `L = sum(y(1) * c)`. The gradient is `dL/d(W1, b1, W2, b2, W3, b3)`.
- Checks: "max abs error y(t1)" compares with SciPy's DOP853 at 1e-12. "grad rel. error" is the largest relative
  Frobenius error over the six parameters, compared with the adjoint equations integrated by DOP853 at 1e-12
  along the dense forward solution. These are float64 references that share no code with any library measured.
- Step control: ours "per_sample" gives every sample its own step size and accept/reject decision; "shared" uses
  one step for the batch, set by its worst sample; "shared_rms" one step for the batch, set by the RMS error norm
  over all of it (the rule of torchdiffeq and of diffrax's batch as one state). torchdiffeq shares one step with
  an error norm over the whole batch. torchode steps per sample. diffrax "batch as one state" treats the batch as one system with an RMS error
  norm over all of it; "vmap over samples" integrates each sample on its own under `jax.vmap`.
- Gradients: ours "backprop" differentiates through every operation of the solver; "checkpoint" stores the
  accepted states and recomputes each step in the backward pass; "adjoint" solves the continuous adjoint backwards
  at the forward tolerances. torchdiffeq: `odeint` (backprop) and `odeint_adjoint`. torchode: `AutoDiffAdjoint`
  (backprop). diffrax: `RecursiveCheckpointAdjoint` (its default, backprop with checkpoints) and
  `BacksolveAdjoint`. In no library does the step size carry a gradient, except torchode, which differentiates
  through its controller.
- NFE is the number of batched evaluations of the vector field. In torch it is counted by wrapping the field and
  includes the backward pass. For our JAX solver it is the largest per-sample count of the forward solve. For
  diffrax it is derived from its step count as 6 per step plus 3, and covers the forward solve only.
- Timing is wall clock. The first call runs alone (for JAX this is compilation plus one run). One more warm-up
  call follows, then {args.repeats} rounds in which every case of the same framework and task runs once, in turn.
  The table gives the median per case. Torch and JAX cases are timed apart. "time / peer" is our median divided by
  the peer's, so a value above 1 means ours is slower.

## Results
{results_table(rows)}

## Our gradient modes against our backprop gradient
The largest relative Frobenius error over the parameters, taking our backprop gradient as the reference.

{modes}

## Memory of our gradient modes as the integration gets longer
Batch {batch}, the same field and tolerances, t from 0 to t1. The torch columns give the peak of the tensor memory
allocated during one forward and backward pass, from `peak_memory_bytes`. The JAX columns give the bytes XLA plans
for the jitted gradient, from `compiled_memory_bytes`: arguments, outputs and temporaries. JAX's "checkpoint"
allocates `max_steps` rows of step starts (here {ode_jax.CHECKPOINT_MAX_STEPS}, in the results table too; the default
is 10 000) and its "backprop" keeps about 2 sqrt(`max_steps`) loop states (at the default), so their plans do not
depend on how many steps are actually taken.

{memory}

## Work against precision: the forward solves over a range of tolerances
The libraries' error norms differ (per sample, or over the whole batch), so one nominal tolerance buys each a
different accuracy, and the results table compares times at unequal errors. Here every forward case runs at
rtol = atol from {max(tol for tol, _ in sweep):g} to {min(tol for tol, _ in sweep):g}, timed as above with
{SWEEP_REPEATS if not args.quick else args.repeats} rounds per tolerance, checked against the same reference.

{work_precision_table(sweep)}

### Time at equal accuracy
For each peer's run of the sweep, our fastest run of the sweep (any step control, any tolerance) whose error
in y(t1) is at most the peer's. A ratio below 1 means ours reached the peer's accuracy in less time.

{matched_accuracy_table(matches)}

## Gradient accuracy against tolerance (torch)
The relative gradient error of each torch gradient case against the float64 reference, one untimed call each, as
the forward tolerance shrinks; "adjoint tol / 100" solves our adjoint's backward pass at a hundred times tighter
tolerances than the forward pass. Where tightening the backward pass leaves the error unchanged, the error comes
from the forward solution that the adjoint starts from, y(t1), not from the backward solve.

{accuracy}
"""


def measurements(rows: list[Row]) -> list[Measurement]:
    """The rows for the appendix: the forward solve is one comparison, the gradient in any mode another."""
    return [Measurement(
        task="forward" if r.case.gradient is None else "gradient", framework=r.case.framework,
        library=r.case.library, method=r.case.method + ("" if r.case.gradient is None else f", {r.case.gradient}"),
        median_ms=r.median_ms, first_call_s=r.first_call_s,
        compile_s=compile_estimate(r.case.framework, r.first_call_s, r.median_ms), solution_error=r.y_error,
        gradient_error=r.grad_error, work="" if r.nfe is None else f"{r.nfe} NFE", note=r.note) for r in rows]


def _table_order(case: Case) -> tuple:
    return (case.framework != "torch", case.gradient is not None, case.library != "ours", case.library,
            case.method, case.gradient or "")


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "ode", "batch 16, 2 repeats, two horizons", default_repeats=10)
    settings = Settings()
    batch = 16 if args.quick else 256
    info = machine()
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other work shares the CPU, timings will be noisy",
              file=sys.stderr)
    start, started = cpu_seconds(), time.perf_counter()
    problem = make_problem(batch)
    references = reference(problem)
    cases = sorted(ode_torch.cases(settings) + ode_jax.cases(settings), key=_table_order)
    rows = []
    # Frameworks and tasks are timed apart: torch's OpenMP threads spin for a while after each call and slow a
    # JAX call that follows (seen in the fixed-point benchmark).
    for framework in ("torch", "jax"):
        for gradient in (False, True):
            group = [c for c in cases if c.framework == framework and (c.gradient is not None) == gradient]
            for row in measure_group(group, problem, settings, references, args.repeats):
                print(f"{framework} {row.case.library} {row.case.method} {row.case.gradient}: "
                      f"{row.median_ms or 0:.1f} ms {row.note}", file=sys.stderr, flush=True)
                rows.append(row)
    memory = memory_table(batch, settings, MEMORY_HORIZONS[:2] if args.quick else MEMORY_HORIZONS)
    sweep = work_precision(problem, references, SWEEP_TOLERANCES[::4] if args.quick else SWEEP_TOLERANCES,
                           args.repeats if args.quick else SWEEP_REPEATS)
    matches = at_matched_accuracy(sweep)
    accuracy = gradient_accuracy(problem, references, GRADIENT_TOLERANCES[:1] if args.quick else GRADIENT_TOLERANCES)
    info["CPU taken by other processes during the run"] = others_share(start, time.perf_counter() - started)
    text = report(args, settings, batch, with_ratios(rows), memory, sweep, matches, accuracy, info)
    errors = {"solution": "largest absolute error of y(t1), against SciPy's DOP853 at 1e-12 in float64",
              "gradient": "largest relative Frobenius error over the parameters, against the adjoint equations "
                          "integrated by DOP853 at 1e-12 in float64"}
    record = results_record("ode", TITLE, args, info, PACKAGES, measurements(rows), errors)
    # A solve that fell short of t1 has NaN in y(t1), hence in its error; JSON has no NaN, the record says None.
    record["work_precision"] = [
        dict(framework=r.case.framework, library=r.case.library, method=r.case.method, tol=tol, nfe=r.nfe,
             solution_error=r.y_error if r.y_error is not None and np.isfinite(r.y_error) else None,
             median_ms=r.median_ms, note=r.note) for tol, r in sweep]
    record["matched_accuracy"] = matches
    write_report(args.out, text, record)


if __name__ == "__main__":
    main()
