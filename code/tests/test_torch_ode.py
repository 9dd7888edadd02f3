"""odeint in PyTorch: accuracy against SciPy and closed forms, orders of convergence, step control, dense output,
gradients in every mode, and every refusal and warning. Float64 throughout."""

import math
import warnings

import pytest
import torch

import implicit_layers.torch as ilt
import ode_problems as problems
from implicit_layers._tableaus import ODE_METHODS
from implicit_layers.errors import ConvergenceError, ConvergenceWarning
from implicit_layers.torch.ode._loop import rk_step

ADAPTIVE = ("bosh3", "dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4")
DTYPE = torch.float64

def stacked(components):
    """A field of ``ode_problems`` as ``f(t, y)`` returning one tensor."""
    def field(t, y):
        return torch.stack(components(y), dim=1)
    return field


linear = stacked(problems.linear)
FIELDS = {name: stacked(components) for name, (components, _, _) in problems.PROBLEMS.items()}


def linear_exact(y0, times):
    return torch.as_tensor(problems.linear_exact(torch.as_tensor(y0).numpy(), times))


@pytest.mark.parametrize("problem", list(problems.PROBLEMS))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_match_scipy_within_a_multiple_of_the_tolerance(problem, method):
    """Max error over outputs and samples, in units of rtol * (1 + max|y|): below 20 at every tolerance, and it
    falls at least 20-fold per 100-fold tighter tolerance."""
    f, y0 = FIELDS[problem], torch.tensor(problems.PROBLEMS[problem][1], dtype=DTYPE)
    times, reference = (torch.as_tensor(array) for array in problems.scipy_reference(problem))
    if problem == "linear":
        torch.testing.assert_close(reference, linear_exact(y0, times), rtol=0, atol=1e-10)
    errors = []
    for rtol in (1e-4, 1e-6, 1e-8):
        ys, result = ilt.odeint(f, y0, times, method=method, rtol=rtol, atol=rtol)
        assert result.status == "converged"
        error = float((ys - reference).abs().max())
        assert error <= 20 * rtol * (1 + float(reference.abs().max())), (rtol, error)
        errors.append(error)
    assert errors[1] < errors[0] / 20 and errors[2] < errors[1] / 20, errors


def global_error_of_fixed_steps(step, num_steps):
    """Error at t = 2 of the damped rotation after ``num_steps`` uniform steps of ``step(t, y, dt) -> y``."""
    y = torch.tensor([[1.0, 0.5]], dtype=DTYPE)
    dt = torch.full((1,), 2.0 / num_steps, dtype=DTYPE)
    t = torch.zeros(1, dtype=DTYPE)
    for _ in range(num_steps):
        y = step(t, y, dt)
        t = t + dt
    return float((y - linear_exact(torch.tensor([[1.0, 0.5]], dtype=DTYPE), [2.0])[0]).abs().max())


def observed_order(step, steps=(16, 32)):
    coarse, fine = (global_error_of_fixed_steps(step, n) for n in steps)
    return math.log2(coarse / fine)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_methods_converge_at_their_order(method):
    def step(t, y, dt):
        ys, _ = ilt.odeint(linear, y, torch.stack([t[0], t[0] + dt[0]]), method=method, num_steps=1)
        return ys[-1]

    assert observed_order(step) == pytest.approx(ODE_METHODS[method].order, abs=0.3)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_tableaus_main_and_embedded_weights_converge_at_their_orders(method):
    """Fixed steps through the solver's own step function: y1 has the tableau's order, y1 - error one less."""
    tableau = ODE_METHODS[method]

    def main(t, y, dt):
        return rk_step(linear, t, y, linear(t, y), dt, tableau)[0]

    def embedded(t, y, dt):
        y1, _, error, _ = rk_step(linear, t, y, linear(t, y), dt, tableau)
        return y1 - error

    assert observed_order(main, steps=(8, 16)) == pytest.approx(tableau.order, abs=0.3)
    assert observed_order(embedded, steps=(8, 16)) == pytest.approx(tableau.order - 1, abs=0.3)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_steps_dt_and_num_steps_agree(method):
    y0 = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    by_dt, result = ilt.odeint(linear, y0, [0.0, 1.0], method=method, dt=0.1)
    by_count, _ = ilt.odeint(linear, y0, [0.0, 1.0], method=method, num_steps=10)
    assert result.num_accepted.tolist() == [10]
    torch.testing.assert_close(by_dt, by_count, rtol=0, atol=1e-13)


def easy_and_hard():
    """``ode_problems``' easy and hard samples: the field, and the exact solution as a tensor."""
    rates = torch.as_tensor(problems.RATES)

    def f(t, y):
        return torch.stack(problems.easy_and_hard(y, rates), dim=1)

    def exact(y0, times):
        return torch.as_tensor(problems.easy_and_hard_exact(y0.numpy(), times.numpy()))

    return f, exact


def test_per_sample_control_takes_fewer_steps_on_the_easy_sample_than_shared():
    f, exact = easy_and_hard()
    y0 = torch.tensor(problems.EASY_HARD_Y0)
    times = torch.linspace(0, 2, 5, dtype=DTYPE)
    steps = {}
    for control in ("per_sample", "shared", "shared_rms"):
        ys, result = ilt.odeint(f, y0, times, step_control=control, rtol=1e-8, atol=1e-8)
        assert float((ys - exact(y0, times)).abs().max()) < 1e-6
        steps[control] = result.num_accepted.tolist()
    assert steps["shared"][0] == steps["shared"][1]
    assert steps["shared_rms"][0] == steps["shared_rms"][1]
    assert steps["per_sample"][0] * 5 < steps["shared"][0]
    assert steps["per_sample"][1] == pytest.approx(steps["shared"][1], rel=0.2)
    # the easy sample's small error dilutes the hard one's in the batch's norm
    assert steps["shared_rms"][0] < steps["shared"][0]


def test_shared_rms_control_steps_the_batch_as_one_state():
    """The batch (2, 2) under ``"shared_rms"`` takes the steps that one state of 4 entries takes on its own,
    given the same first step (by default a shared control starts from the smallest per-sample estimate)."""
    f, _ = easy_and_hard()
    y0 = torch.tensor(problems.EASY_HARD_Y0)
    times = torch.linspace(0, 2, 5, dtype=DTYPE)
    options = dict(rtol=1e-7, atol=1e-7, first_step=1e-3)
    ys, result = ilt.odeint(f, y0, times, step_control="shared_rms", **options)
    ys_one, result_one = ilt.odeint(lambda t, y: f(t, y.reshape(2, 2)).reshape(1, 4), y0.reshape(1, 4), times,
                                    **options)
    torch.testing.assert_close(ys.reshape(5, 1, 4), ys_one, rtol=0, atol=1e-12)
    assert result.num_accepted.tolist() == 2 * result_one.num_accepted.tolist()  # the one count, per sample
    assert result.num_rejected.tolist() == 2 * result_one.num_rejected.tolist()


@pytest.mark.parametrize("method", ("rk4", "tsit5"))
def test_a_batched_solve_equals_one_solve_per_sample(method):
    f, _ = easy_and_hard()
    y0 = torch.tensor(problems.EASY_HARD_Y0)
    options = dict(method=method, dt=0.01) if method == "rk4" else dict(method=method)
    batched, result = ilt.odeint(f, y0, [0.0, 0.7, 1.5], **options)
    for index in range(2):
        rates_f = lambda t, y, i=index: f(t.expand(2), y.expand(2, -1))[i : i + 1]  # noqa: E731
        alone, alone_result = ilt.odeint(rates_f, y0[index : index + 1], [0.0, 0.7, 1.5], **options)
        torch.testing.assert_close(batched[:, index : index + 1], alone, rtol=0, atol=1e-14)
        assert result.num_accepted[index] == alone_result.num_accepted[0]


@pytest.mark.parametrize("method", ("dopri5", "rk4"))
def test_a_decreasing_grid_integrates_backwards(method):
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=DTYPE)
    times = torch.linspace(3.0, 0.0, 4, dtype=DTYPE)
    options = dict(rtol=1e-9, atol=1e-9) if method == "dopri5" else dict(dt=0.01)
    ys, result = ilt.odeint(linear, y0, times, method=method, **options)
    torch.testing.assert_close(ys, linear_exact(y0, times - 3.0), rtol=0, atol=1e-8)
    assert result.t_reached.tolist() == [0.0, 0.0]
    assert bool((result.final_dt < 0).all())


@pytest.mark.parametrize("method", ADAPTIVE)
def test_dense_output_at_many_times_is_accurate_without_extra_steps(method):
    y0 = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    many = torch.linspace(0.0, 5.0, 401, dtype=DTYPE)
    ys, result = ilt.odeint(linear, y0, many, method=method, rtol=1e-8, atol=1e-8)
    _, ends_only = ilt.odeint(linear, y0, many[[0, -1]], method=method, rtol=1e-8, atol=1e-8)
    assert result.num_accepted.tolist() == ends_only.num_accepted.tolist()
    assert float((ys - linear_exact(y0, many)).abs().max()) < 1e-6


def test_counters_and_record():
    y0 = torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    _, result = ilt.odeint(linear, y0, [0.0, 1.0], method="dopri5")
    # One initial derivative, one trial of the initial step selection, six new stages per attempted step (FSAL).
    attempted = result.num_accepted + result.num_rejected
    assert result.nfe.tolist() == (2 + 6 * attempted).tolist()
    assert result.converged.tolist() == [True] and result.failed.tolist() == [False]
    assert result.status == "converged" and isinstance(result, ilt.ODEResult)
    _, result = ilt.odeint(linear, y0, [0.0, 1.0], method="rk4", num_steps=5)
    assert result.nfe.tolist() == [1 + 4 * 5]


# Gradients ---------------------------------------------------------------------------------------------------


def make_field(weight):
    def f(t, y):
        return torch.tanh(y @ weight.T) - 0.2 * y
    return f


def solve_for_gradient(gradient, method="dopri5", **options):
    def run(y0, weight):
        extra = dict(params=[weight]) if gradient == "adjoint" else {}
        ys, _ = ilt.odeint(make_field(weight), y0, [0.0, 0.4, 1.0], method=method, gradient=gradient,
                           **extra, **options)
        return ys[1:]
    return run


def gradient_inputs():
    generator = torch.Generator().manual_seed(0)
    y0 = torch.randn(2, 2, generator=generator, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(2, 2, generator=generator, dtype=DTYPE, requires_grad=True)
    return y0, weight


@pytest.mark.parametrize("gradient", ("backprop", "checkpoint"))
def test_discrete_gradients_pass_gradcheck(gradient):
    """rk4 with fixed steps is a smooth map, so finite differences see exactly what autograd differentiates."""
    assert torch.autograd.gradcheck(solve_for_gradient(gradient, method="rk4", num_steps=8), gradient_inputs())


@pytest.mark.parametrize("gradient", ("backprop", "checkpoint", "adjoint"))
def test_adaptive_gradients_pass_gradcheck_at_tight_tolerances(gradient):
    """Step sizes carry no gradient, so finite differences see them move: at rtol 1e-11 that is below 1e-6."""
    run = solve_for_gradient(gradient, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(run, gradient_inputs(), atol=1e-6, rtol=1e-5)


def test_checkpoint_equals_backprop():
    y0, weight = gradient_inputs()
    gradients = []
    for gradient in ("backprop", "checkpoint"):
        ys = solve_for_gradient(gradient, method="tsit5", rtol=1e-6, atol=1e-6)(y0, weight)
        gradients.append(torch.autograd.grad((ys**2).sum(), (y0, weight)))
    for with_backprop, with_checkpoint in zip(*gradients):
        torch.testing.assert_close(with_checkpoint, with_backprop, rtol=0, atol=1e-10)


def test_adjoint_approaches_backprop_as_its_tolerances_shrink():
    y0, weight = gradient_inputs()
    exact = torch.autograd.grad((solve_for_gradient("backprop", rtol=1e-12, atol=1e-12)(y0, weight) ** 2).sum(),
                                (y0, weight))
    gaps = []
    for tolerance in (1e-4, 1e-7, 1e-10):
        ys = solve_for_gradient("adjoint", rtol=1e-12, atol=1e-12, adjoint_rtol=tolerance,
                                adjoint_atol=tolerance)(y0, weight)
        adjoint = torch.autograd.grad((ys**2).sum(), (y0, weight))
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(adjoint, exact)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-8, gaps


def test_adjoint_takes_a_modules_parameters_by_default():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DTYPE)
    field = type("Field", (torch.nn.Module,), {"forward": lambda self, t, y: module(y)})()
    field.net = module
    y0 = torch.randn(3, 2, dtype=DTYPE)
    grads = {}
    for gradient in ("backprop", "adjoint"):
        ys, _ = ilt.odeint(field, y0, [0.0, 1.0], gradient=gradient, rtol=1e-10, atol=1e-10)
        grads[gradient] = torch.autograd.grad(ys[-1].sum(), list(module.parameters()))
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "method, options",
    [("rk4", dict(num_steps=200)), ("dopri5", dict(step_control="shared")), ("bosh3", dict(step_control="shared_rms")),
     ("tsit5", dict(decreasing=True))],
)
def test_adjoint_matches_backprop_across_methods_controls_and_directions(method, options):
    options = dict(options)
    times = [1.0, 0.6, 0.0] if options.pop("decreasing", False) else [0.0, 0.4, 1.0]
    if method != "rk4":
        options.update(rtol=1e-10, atol=1e-10)
    y0, weight = gradient_inputs()
    grads = {}
    for gradient in ("backprop", "adjoint"):
        extra = dict(params=[weight]) if gradient == "adjoint" else {}
        ys, _ = ilt.odeint(make_field(weight), y0, times, method=method, gradient=gradient, **extra, **options)
        grads[gradient] = torch.autograd.grad((ys[1:] ** 2).sum(), (y0, weight))
    # rk4's discrete gradient differs from the continuous one by its O(dt**4) error; the adaptive ones by rtol.
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_finished_samples_never_evaluate_f_past_the_end():
    """f = -k y sqrt(1 - t) is NaN past t = 1; the fast sample finishes first and must not step beyond it, or
    its discarded steps would put NaN into the gradient. y(1) = y0 exp(-2k/3)."""
    rates = torch.tensor([0.1, 30.0], dtype=DTYPE)
    y0 = torch.ones(2, 1, dtype=DTYPE, requires_grad=True)
    ys, result = ilt.odeint(lambda t, y: -rates[:, None] * y * torch.sqrt(1 - t)[:, None], y0, [0.0, 1.0],
                            rtol=1e-10, atol=1e-10)
    assert result.num_accepted[0] < result.num_accepted[1]
    (gradient,) = torch.autograd.grad(ys[-1].sum(), y0)
    torch.testing.assert_close(gradient[:, 0], torch.exp(-2 * rates / 3), rtol=1e-7, atol=1e-10)


def test_a_solve_in_inference_mode_leaves_later_gradients_working():
    """The coefficients a step caches are made outside inference mode, so a later solve can save them."""
    from implicit_layers.torch.ode import _loop

    _loop._coefficients.cache_clear()  # so that the solve in inference mode is the first to ask for them
    _loop._constant.cache_clear()
    layer = torch.nn.Linear(2, 2).to(DTYPE)
    y0 = torch.randn(3, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ilt.odeint(lambda t, y: layer(y), y0, [0.0, 1.0], method="tsit5")
    ys, _ = ilt.odeint(lambda t, y: layer(y), y0, [0.0, 1.0], method="tsit5")
    ys[-1].sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_at_most_one_host_synchronization_per_step(monkeypatch):
    """Every way of reading a tensor's value on the host is counted while a batch of samples integrates."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    f, _ = easy_and_hard()
    y0 = torch.tensor(problems.EASY_HARD_Y0)
    _, result = ilt.odeint(f, y0, torch.linspace(0, 2, 5, dtype=DTYPE), rtol=1e-8, atol=1e-8)
    monkeypatch.undo()
    loop_steps = int((result.num_accepted + result.num_rejected).max())
    assert loop_steps > 50 and len(reads) <= loop_steps + 5, (loop_steps, len(reads))


def test_memory_checkpoint_keeps_less_than_backprop_and_the_adjoint_least():
    """Bytes autograd holds for the backward pass: every stage's activations (backprop), each step's input state
    and derivative (checkpoint), the outputs alone (adjoint)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(DTYPE)
    y0 = torch.randn(16, 4, dtype=DTYPE)
    held = {}
    for gradient in ("backprop", "checkpoint", "adjoint"):
        extra = dict(params=list(network.parameters())) if gradient == "adjoint" else {}
        (_, result), held[gradient] = ilt.autograd_graph_bytes(
            lambda: ilt.odeint(lambda t, y: network(y), y0, [0.0, 3.0], gradient=gradient, **extra)
        )
    assert int(result.num_accepted.max()) > 10
    assert held["adjoint"] * 5 < held["checkpoint"] and held["checkpoint"] * 3 < held["backprop"], held


# Refusals and warnings ---------------------------------------------------------------------------------------

Y0 = torch.tensor([[1.0, 0.0]], dtype=DTYPE)


@pytest.mark.parametrize(
    "arguments, error, message",
    problems.OPTION_REFUSALS + [
        (dict(t=[[0.0, 1.0]]), ValueError, "t must be a 1-D grid"),
        (dict(t=[0.0]), ValueError, "t needs at least two times"),
        (dict(t=[0.0, 1.0, 0.5]), ValueError, "strictly increasing or strictly decreasing"),
        (dict(t=[0.0, math.nan]), ValueError, "t contains NaN or Inf"),
        (dict(y0=torch.tensor([[math.inf, 0.0]])), ValueError, "y0 contains NaN or Inf"),
        (dict(y0=torch.tensor([[1, 0]])), TypeError, "y0 must have a floating-point dtype"),
        (dict(y0=torch.tensor([1.0, 0.0])), ValueError, "y0 must have shape"),
        (dict(f=lambda t, y: y[:, :1]), ValueError, "f\\(t, y\\) must return a tensor of y's shape"),
        (dict(f=lambda t, y: y.float()), ValueError, "f\\(t, y\\) must return a tensor of y's dtype"),
        (dict(gradient="adjoint"), ValueError, "gradient='adjoint' needs to know which tensors.*params="),
        (dict(params=[torch.ones(1)]), ValueError, "params= lists the tensors that gradient='adjoint'"),
        (dict(gradient="adjoint", params=[1.0]), TypeError, "params\\[0\\] must be a floating-point torch.Tensor"),
        (dict(f=lambda t, y: y * torch.ones(2, dtype=DTYPE, requires_grad=True), gradient="adjoint", params=[]),
         ValueError, r"f uses 1 tensor\(s\) that require grad but are not in params \(shapes \(2,\)\)"),
    ],
)
def test_bad_arguments_are_refused_by_name(arguments, error, message):
    call = {**dict(f=linear, y0=Y0, t=[0.0, 1.0]), **arguments}
    with pytest.raises(error, match=message):
        ilt.odeint(call.pop("f"), call.pop("y0"), call.pop("t"), **call)


def test_running_out_of_steps_warns_with_what_was_reached_or_raises_when_strict():
    f, _ = easy_and_hard()
    y0 = torch.tensor(problems.EASY_HARD_Y0)
    with pytest.warns(ConvergenceWarning, match=r"did not reach t1 for 1 of 2 samples \(max_steps=20\): furthest t="):
        ys, result = ilt.odeint(f, y0, [0.0, 1.0, 2.0], max_steps=20)
    assert result.converged.tolist() == [True, False] and result.status == "max_steps"
    assert 0 < float(result.t_reached[1]) < 2.0 and bool(torch.isnan(ys[-1, 1]).all())
    with pytest.raises(ConvergenceError, match="raise max_steps"):
        ilt.odeint(f, y0, [0.0, 2.0], max_steps=20, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ilt.odeint(f, y0, [0.0, 2.0], max_steps=20, warn=False)


@pytest.mark.parametrize("method", ("dopri5", "euler"))
def test_a_blow_up_marks_the_sample_failed(method):
    """y' = y**2 from y(0) = 1 blows up at t = 1; the sample starting at 0.1 lives to t = 10, past the end at 2."""
    y0 = torch.tensor([[1.0], [0.1]], dtype=DTYPE)
    options = dict(dt=0.01) if method == "euler" else {}
    with pytest.warns(ConvergenceWarning, match="1 stopped on NaN/Inf or a step size underflow"):
        _, result = ilt.odeint(lambda t, y: y**2, y0, [0.0, 2.0], method=method, **options)
    assert result.failed.tolist() == [True, False] and result.converged.tolist() == [False, True]
    assert result.status == "failed"
    # The adaptive solver stops at the singularity; explicit Euler lags the blow-up and overflows a little later.
    assert float(result.t_reached[0]) < (1.0 + 1e-6 if method == "dopri5" else 2.0)


def test_an_adjoint_solve_that_runs_out_of_steps_warns_in_the_backward_pass():
    """The forward solve runs from t = 2 to 0; the backward one from 0 towards 2 stops short, and says where."""
    y0, weight = gradient_inputs()
    ys, result = ilt.odeint(make_field(weight), y0, [2.0, 0.0], rtol=1e-3, atol=1e-3, max_steps=12,
                            gradient="adjoint", params=[weight], adjoint_rtol=1e-12, adjoint_atol=1e-12)
    assert result.status == "converged"
    with pytest.warns(ConvergenceWarning, match=r"odeint\(dopri5, adjoint\) did not reach t1 .*furthest t=0\.\d"):
        ys[-1].sum().backward()

