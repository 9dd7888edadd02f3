"""odeint in JAX: accuracy against SciPy and closed forms, orders of convergence, step control, dense output,
composition with jit, vmap and grad, gradients in every mode, and every refusal and warning. Float64 throughout.

Most solves go through one jitted ``solve`` (options static), so that a repeated configuration compiles once."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import implicit_layers.jax as ilj
import ode_problems as problems
from implicit_layers._tableaus import ODE_METHODS
from implicit_layers.errors import ConvergenceError, ConvergenceWarning
from implicit_layers.jax.ode._loop import rk_step

jax.config.update("jax_enable_x64", True)
# A program identical to one compiled earlier in the session (an op-by-op solve, a gradient of a new lambda) is
# loaded instead of compiled again; the cache is a fresh temporary directory, so every run compiles afresh.
ilj.cache_compilations()

ADAPTIVE = ("bosh3", "dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4")
OPTIONS = ("method", "rtol", "atol", "dt", "num_steps", "first_step", "step_control", "max_steps", "gradient",
           "adjoint_rtol", "adjoint_atol", "strict", "warn")
solve = jax.jit(ilj.odeint, static_argnums=0, static_argnames=OPTIONS)

def stacked(components):
    """A field of ``ode_problems`` as ``f(t, y, theta)`` returning one array (theta unused)."""
    def field(t, y, _):
        return jnp.stack(components(y), axis=1)
    return field


linear = stacked(problems.linear)
FIELDS = {name: stacked(components) for name, (components, _, _) in problems.PROBLEMS.items()}
ROTATION = problems.ROTATION
linear_exact = problems.linear_exact


# The three planar problems, all solved to t = 5, as one batch: sample b follows PLANAR[WHICH[b]]. Each sample
# keeps its own steps, so each is solved as if alone, and one compiled solve serves the three.
PLANAR = ("linear", "lotka_volterra", "van_der_pol")


def planar_field(t, y, which):
    values = [FIELDS[name](t, y, None) for name in PLANAR]
    return jnp.select([which[:, None] == index for index in range(len(PLANAR))], values)


@pytest.mark.parametrize(
    "method, names",
    [("dopri5", PLANAR), ("dopri5", ("lorenz",)), ("tsit5", ("lorenz",)), ("bosh3", PLANAR)],
)
def test_adaptive_methods_match_scipy_within_a_multiple_of_the_tolerance(method, names):
    """Max error over outputs and samples, in units of rtol * (1 + max|y|): below 20 at every tolerance, and it
    falls at least 20-fold per 100-fold tighter tolerance. Every problem with dopri5 (each tolerance is a
    compilation, the cost of this test, so the planar problems share one), the planar ones with bosh3, Lorenz
    with tsit5."""
    f = planar_field if names == PLANAR else FIELDS["lorenz"]
    y0 = np.concatenate([problems.PROBLEMS[name][1] for name in names])
    which = jnp.repeat(jnp.arange(len(names)), 2)
    times = problems.scipy_reference(names[0])[0]
    references = {name: problems.scipy_reference(name)[1] for name in names}
    if "linear" in names:
        np.testing.assert_allclose(references["linear"], linear_exact(y0[:2], times), rtol=0, atol=1e-10)
    errors = {name: [] for name in names}
    for rtol in (1e-4, 1e-6, 1e-8):
        ys, result = solve(f, jnp.asarray(y0), jnp.asarray(times), which, method=method, rtol=rtol, atol=rtol)
        assert result.status == "converged"
        for index, name in enumerate(names):
            reference = references[name]
            error = float(np.abs(np.asarray(ys[:, 2 * index : 2 * index + 2]) - reference).max())
            assert error <= 20 * rtol * (1 + float(np.abs(reference).max())), (name, rtol, error)
            errors[name].append(error)
    for name, (coarse, middle, fine) in errors.items():
        assert middle < coarse / 20 and fine < middle / 20, (name, coarse, middle, fine)


def observed_order(final_state, steps=(16, 32)):
    """The slope of the error at t = 2 of the damped rotation against the number of uniform steps."""
    exact = linear_exact([[1.0, 0.5]], [2.0])[0]
    coarse, fine = (float(np.abs(np.asarray(final_state(n)) - exact).max()) for n in steps)
    return math.log2(coarse / fine)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_methods_converge_at_their_order(method):
    """n uniform steps to t = 2 as n / 16 solves of 16 steps each (the field is autonomous), so that one
    compiled solve serves every n."""

    def final_state(num_steps):
        y = jnp.array([[1.0, 0.5]])
        edges = np.linspace(0.0, 2.0, num_steps // 16 + 1)
        for start, end in zip(edges[:-1], edges[1:]):
            y = solve(linear, y, jnp.array([start, end]), ROTATION, method=method, num_steps=16)[0][-1]
        return y

    assert observed_order(final_state) == pytest.approx(ODE_METHODS[method].order, abs=0.3)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_tableaus_main_and_embedded_weights_converge_at_their_orders(method):
    """Fixed steps through the solver's own step function: y1 has the tableau's order, y1 - error one less."""
    tableau = ODE_METHODS[method]

    def field(t, y):
        return linear(t, y, ROTATION)

    @jax.jit
    def step(y, dt):
        y1, _, error, _ = rk_step(field, jnp.zeros(1), y, field(0.0, y), jnp.full(1, dt), tableau)
        return y1, y1 - error

    def final_state(num_steps, which):
        y = jnp.array([[1.0, 0.5]])
        for _ in range(num_steps):
            y = step(y, 2.0 / num_steps)[which]
        return y

    assert observed_order(lambda n: final_state(n, 0), steps=(8, 16)) == pytest.approx(tableau.order, abs=0.3)
    assert observed_order(lambda n: final_state(n, 1), steps=(8, 16)) == pytest.approx(tableau.order - 1, abs=0.3)


def test_fixed_steps_dt_and_num_steps_agree():
    y0 = jnp.array([[1.0, 0.0]])
    by_dt, result = solve(linear, y0, jnp.array([0.0, 1.0]), ROTATION, method="rk4", dt=0.1)
    by_count, _ = solve(linear, y0, jnp.array([0.0, 1.0]), ROTATION, method="rk4", num_steps=10)
    assert result.num_accepted.tolist() == [10]
    np.testing.assert_allclose(by_dt, by_count, rtol=0, atol=1e-13)


RATES = jnp.asarray(problems.RATES)
EASY_HARD_Y0 = jnp.asarray(problems.EASY_HARD_Y0)
easy_and_hard_exact = problems.easy_and_hard_exact


def easy_and_hard(t, y, rates):
    return jnp.stack(problems.easy_and_hard(y, rates), axis=1)


def test_per_sample_control_takes_fewer_steps_on_the_easy_sample_than_shared():
    times = jnp.linspace(0, 2, 5)
    steps = {}
    for control in ("per_sample", "shared", "shared_rms"):
        ys, result = solve(easy_and_hard, EASY_HARD_Y0, times, RATES, step_control=control, rtol=1e-8, atol=1e-8)
        assert float(np.abs(ys - easy_and_hard_exact(EASY_HARD_Y0, times)).max()) < 1e-6
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
    times = jnp.linspace(0, 2, 5)
    options = dict(rtol=1e-7, atol=1e-7, first_step=1e-3)
    ys, result = solve(easy_and_hard, EASY_HARD_Y0, times, RATES, step_control="shared_rms", **options)

    def as_one_state(t, y, rates):
        return easy_and_hard(t, y.reshape(2, 2), rates).reshape(1, 4)

    ys_one, result_one = solve(as_one_state, EASY_HARD_Y0.reshape(1, 4), times, RATES, **options)
    np.testing.assert_allclose(np.asarray(ys).reshape(5, 1, 4), ys_one, rtol=0, atol=1e-12)
    assert result.num_accepted.tolist() == 2 * result_one.num_accepted.tolist()  # the one count, per sample
    assert result.num_rejected.tolist() == 2 * result_one.num_rejected.tolist()


def test_a_batched_solve_equals_one_solve_per_sample():
    """With fixed steps; an adaptive solve is checked the same way, by vmap, in the jit and vmap test below."""
    options = dict(method="rk4", dt=0.01)
    times = jnp.array([0.0, 0.7, 1.5])
    batched, result = solve(easy_and_hard, EASY_HARD_Y0, times, RATES, **options)
    for index in range(2):
        alone, alone_result = solve(easy_and_hard, EASY_HARD_Y0[index : index + 1], times,
                                    RATES[index : index + 1], **options)
        np.testing.assert_allclose(batched[:, index : index + 1], alone, rtol=0, atol=1e-14)
        assert result.num_accepted[index] == alone_result.num_accepted[0]


@pytest.mark.parametrize("method", ("dopri5", "rk4"))
def test_a_decreasing_grid_integrates_backwards(method):
    y0 = jnp.array([[1.0, 0.0], [0.5, 0.3]])
    times = np.linspace(3.0, 0.0, 4)
    options = dict(rtol=1e-9, atol=1e-9) if method == "dopri5" else dict(dt=0.01)
    ys, result = solve(linear, y0, jnp.asarray(times), ROTATION, method=method, **options)
    np.testing.assert_allclose(ys, linear_exact(y0, times - 3.0), rtol=0, atol=1e-8)
    assert result.t_reached.tolist() == [0.0, 0.0]
    assert bool((result.final_dt < 0).all())


@pytest.mark.parametrize("method", ADAPTIVE)
def test_dense_output_at_many_times_is_accurate_without_extra_steps(method):
    """At the default tolerances, so that dopri5's solve to the end alone is the counters test's program."""
    y0 = jnp.array([[1.0, 0.0]])
    many = jnp.linspace(0.0, 5.0, 401)
    ys, result = solve(linear, y0, many, ROTATION, method=method)
    _, ends_only = solve(linear, y0, many[jnp.array([0, 400])], ROTATION, method=method)
    assert result.num_accepted.tolist() == ends_only.num_accepted.tolist()
    assert float(np.abs(ys - linear_exact(y0, many)).max()) < 1e-6


def test_counters_and_record():
    y0 = jnp.array([[1.0, 0.0]])
    _, result = solve(linear, y0, jnp.array([0.0, 1.0]), ROTATION)
    # One initial derivative, one trial of the initial step selection, six new stages per attempted step (FSAL).
    attempted = result.num_accepted + result.num_rejected
    assert result.nfe.tolist() == (2 + 6 * attempted).tolist()
    assert result.converged.tolist() == [True] and result.failed.tolist() == [False]
    assert result.status == "converged" and isinstance(result, ilj.ODEResult)
    _, result = solve(linear, y0, jnp.array([0.0, 1.0]), ROTATION, method="rk4", num_steps=10)
    assert result.nfe.tolist() == [1 + 4 * 10]


def test_jit_and_vmap_give_the_eager_solution():
    """jit (t traced, so its direction is found on the device), and vmap over an extra leading axis of the batch
    and of theta, which makes every sample's clock a batch of clocks."""
    times = np.array([1.5, 0.7, 0.0])
    eager, eager_result = ilj.odeint(easy_and_hard, EASY_HARD_Y0, times, RATES)
    jitted, jitted_result = solve(easy_and_hard, EASY_HARD_Y0, jnp.asarray(times), RATES)
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-14)
    assert jitted_result.num_accepted.tolist() == eager_result.num_accepted.tolist()
    mapped, mapped_result = jax.jit(jax.vmap(lambda y0, rates: ilj.odeint(easy_and_hard, y0, times, rates)))(
        EASY_HARD_Y0[:, None], RATES[:, None]
    )
    np.testing.assert_allclose(mapped[:, :, 0].transpose(1, 0, 2), eager, rtol=0, atol=1e-14)
    assert mapped_result.num_accepted[:, 0].tolist() == eager_result.num_accepted.tolist()


# Gradients ---------------------------------------------------------------------------------------------------


def tanh_field(t, y, weight):
    return jnp.tanh(y @ weight.T) - 0.2 * y


def solve_for_gradient(gradient, method="dopri5", times=(0.0, 0.4, 1.0), **options):
    def run(y0, weight):
        ys, _ = solve(tanh_field, y0, jnp.asarray(times), weight, method=method, gradient=gradient, **options)
        return ys[1:]

    return run


def gradient_inputs():
    y0, weight = np.random.default_rng(0).standard_normal((2, 2, 2))
    return jnp.asarray(y0), jnp.asarray(weight)


def gradient_of_squares(run, y0, weight):
    """The gradient of the sum of squares of the outputs, as one jitted program (one compilation)."""
    return jax.jit(jax.grad(lambda y0, weight: jnp.sum(run(y0, weight) ** 2), argnums=(0, 1)))(y0, weight)


@pytest.mark.parametrize("gradient", ("backprop", "checkpoint"))
def test_discrete_gradients_pass_check_grads(gradient):
    """rk4 with fixed steps is a smooth map, so finite differences see exactly what autodiff differentiates."""
    check_grads(solve_for_gradient(gradient, method="rk4", num_steps=8), gradient_inputs(), order=1,
                modes=["rev"], atol=1e-7, rtol=1e-7)


def test_the_adjoint_passes_check_grads_at_tight_tolerances():
    """Step sizes carry no gradient, so finite differences see them move: at rtol 1e-11 that is below 1e-6. (The
    other modes pass check_grads above, with fixed steps, and equal each other below.)"""
    run = solve_for_gradient("adjoint", rtol=1e-11, atol=1e-11)
    check_grads(run, gradient_inputs(), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


def test_adjoint_approaches_backprop_as_its_tolerances_shrink():
    exact = gradient_of_squares(solve_for_gradient("checkpoint", rtol=1e-12, atol=1e-12, max_steps=300),
                                *gradient_inputs())
    gaps = []
    for tolerance in (1e-4, 1e-7, 1e-10):
        run = solve_for_gradient("adjoint", rtol=1e-12, atol=1e-12, adjoint_rtol=tolerance, adjoint_atol=tolerance)
        adjoint = gradient_of_squares(run, *gradient_inputs())
        gaps.append(max(float(np.abs(a - b).max()) for a, b in zip(adjoint, exact)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-8, gaps


@pytest.mark.parametrize(
    "method, options",
    [("rk4", dict(num_steps=200)), ("dopri5", dict(step_control="shared")), ("bosh3", dict(step_control="shared_rms")),
     ("tsit5", dict(times=(1.0, 0.6, 0.0)))],
)
def test_adjoint_matches_backprop_across_methods_controls_and_directions(method, options):
    """And, with tsit5, checkpoint equals backprop to round-off."""
    if method != "rk4":
        options = dict(options, rtol=1e-10, atol=1e-10, max_steps=500)
    gradients = ("backprop", "adjoint", "checkpoint") if method == "tsit5" else ("backprop", "adjoint")
    grads = {
        gradient: gradient_of_squares(solve_for_gradient(gradient, method=method, **options), *gradient_inputs())
        for gradient in gradients
    }
    for with_checkpoint, with_backprop in zip(grads.get("checkpoint", ()), grads["backprop"]):
        np.testing.assert_allclose(with_checkpoint, with_backprop, rtol=0, atol=1e-10)
    # rk4's discrete gradient differs from the continuous one by its O(dt**4) error; the adaptive ones by rtol.
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)


@pytest.mark.parametrize("gradient", ("checkpoint", "adjoint"))
def test_gradients_compose_with_vmap_and_take_any_pytree(gradient):
    """A dict for theta, and per-example gradients by vmap over a leading axis: each equals its own grad. (The
    custom rules are what vmap could break; backprop is JAX's own autodiff.)"""

    def field(t, y, theta):
        return tanh_field(t, y, theta["weight"]) * theta["scale"]

    def loss(y0, theta):
        ys, _ = ilj.odeint(field, y0, [0.0, 0.5], theta, gradient=gradient, rtol=1e-9, atol=1e-9, max_steps=200)
        return jnp.sum(ys[-1] ** 2)

    y0, weight = gradient_inputs()
    theta = dict(weight=weight, scale=jnp.array(0.7))
    mapped = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None)))(y0[:, None], theta)
    grad_alone = jax.jit(jax.grad(loss, argnums=1))
    for index in range(2):
        alone = grad_alone(y0[index : index + 1], theta)
        for key in theta:
            np.testing.assert_allclose(mapped[key][index], alone[key], rtol=1e-12, atol=1e-14)


def test_backprop_keeps_non_array_theta_leaves_and_differentiates_closures():
    """In backprop mode theta may hold a string and an int that f loops over, and a value f closes over gets its
    derivative: y' = -n k s y, so sum y(1) = 3 exp(-n k s) with n = 2, s = 1.5."""
    y0 = jnp.array([[1.0], [2.0]])
    theta = dict(label="decay", repeats=2, scale=jnp.array(1.5))

    def loss(k):
        def f(t, y, theta):
            rate = sum(k for _ in range(theta["repeats"]))
            return -rate * theta["scale"] * y

        ys, _ = ilj.odeint(f, y0, [0.0, 1.0], theta, method="rk4", num_steps=40)
        return jnp.sum(ys[-1])

    value, gradient = jax.jit(jax.value_and_grad(loss))(0.5)
    np.testing.assert_allclose([value, gradient], [3 * math.exp(-1.5), -9 * math.exp(-1.5)], rtol=1e-7)


@pytest.mark.parametrize("gradient", ("checkpoint", "adjoint"))
def test_custom_gradient_modes_differentiate_traced_closures(gradient):
    """A field closing over a value traced by jit and grad (like a CNF's probe drawn inside a jitted step) gets
    that value's derivative in every mode: y' = -k s y, so sum y(1) = 3 exp(-k s) with s = 1.5."""
    y0 = jnp.array([[1.0], [2.0]])

    def loss(k, scale):
        ys, _ = ilj.odeint(lambda t, y, scale: -k * scale * y, y0, [0.0, 1.0], scale, method="rk4", num_steps=40,
                           gradient=gradient)
        return jnp.sum(ys[-1])

    value, gradients = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(1.0, jnp.array(1.5))
    np.testing.assert_allclose([value, *gradients], 3 * math.exp(-1.5) * np.array([1.0, -1.5, -1.0]), rtol=1e-7)


@pytest.mark.parametrize("gradient, steps", [("backprop", dict(num_steps=4)), ("checkpoint", dict(dt=0.3))])
def test_a_fixed_step_solve_runs_only_its_steps_whatever_max_steps(gradient, steps):
    """A differentiated solve scans (a checkpointed one stores) its loop's length: for rk4 with a known number of
    steps that is those steps, not the default max_steps of 10,000 (which once asked for 45 GB)."""
    y0, weight = gradient_inputs()

    def program(max_steps):
        def loss(y0, weight):
            ys, _ = ilj.odeint(tanh_field, y0, [0.0, 1.0], weight, method="rk4", gradient=gradient,
                               max_steps=max_steps, **steps)
            return jnp.sum(ys[-1] ** 2)

        return jax.grad(loss, argnums=(0, 1))

    needed = 4
    assert ilj.compiled_memory_bytes(program(10_000), y0, weight) == ilj.compiled_memory_bytes(
        program(needed), y0, weight)
    np.testing.assert_allclose(jax.jit(program(10_000))(y0, weight), jax.jit(program(needed))(y0, weight), rtol=0,
                               atol=0)


def test_finished_samples_never_evaluate_f_past_the_end():
    """f = -k y sqrt(1 - t) is NaN past t = 1; the fast sample finishes first and must not step beyond it, or
    its discarded steps would put NaN into the gradient. y(1) = y0 exp(-2k/3)."""
    rates = jnp.array([0.1, 30.0])

    def f(t, y, rates):
        return -rates[:, None] * y * jnp.sqrt(1 - t)[:, None]

    def final(y0):
        ys, result = ilj.odeint(f, y0, [0.0, 1.0], rates, rtol=1e-10, atol=1e-10, max_steps=300)
        return jnp.sum(ys[-1]), result

    (_, result), gradient = jax.jit(jax.value_and_grad(final, has_aux=True))(jnp.ones((2, 1)))
    assert result.num_accepted[0] < result.num_accepted[1]
    np.testing.assert_allclose(gradient[:, 0], jnp.exp(-2 * rates / 3), rtol=1e-7, atol=1e-10)


# Refusals and warnings ---------------------------------------------------------------------------------------

Y0 = jnp.array([[1.0, 0.0]])


@pytest.mark.parametrize(
    "arguments, error, message",
    problems.OPTION_REFUSALS + [
        (dict(t=[[0.0, 1.0]]), ValueError, "t must be a 1-D grid"),
        (dict(t=[0.0]), ValueError, "t needs at least two times"),
        (dict(t=[0.0, 1.0, 0.5]), ValueError, "strictly increasing or strictly decreasing"),
        (dict(t=[0.0, math.nan]), ValueError, "t contains NaN or Inf"),
        (dict(y0=jnp.array([[math.inf, 0.0]])), ValueError, "y0 contains NaN or Inf"),
        (dict(y0=jnp.array([[1, 0]])), TypeError, "y0 must have a floating-point dtype"),
        (dict(y0=jnp.array([1.0, 0.0])), ValueError, "y0 must have shape"),
        (dict(f=lambda t, y, a: y[:, :1]), ValueError, "f\\(t, y, theta\\) must return an array of y's shape"),
        (dict(f=lambda t, y, a: y.astype(jnp.float32)), ValueError,
         "f\\(t, y, theta\\) must return an array of y's dtype"),
        (dict(f=lambda t, y, a: 1.0), TypeError, "f\\(t, y, theta\\) must return a JAX array"),
        (dict(theta=dict(a=ROTATION, n=3), gradient="checkpoint"), TypeError,
         r"theta\['n'\] must be a floating-point array for gradient='checkpoint'"),
    ],
)
def test_bad_arguments_are_refused_by_name(arguments, error, message):
    call = {**dict(f=linear, y0=Y0, t=[0.0, 1.0], theta=ROTATION), **arguments}
    theta = call.pop("theta")
    f = call.pop("f")
    if isinstance(theta, dict) and f is linear:
        f = lambda t, y, theta: linear(t, y, theta["a"])  # noqa: E731
    with pytest.raises(error, match=message):
        ilj.odeint(f, call.pop("y0"), call.pop("t"), theta, **call)


def test_shape_checks_still_run_under_jit():
    with pytest.raises(ValueError, match="t needs at least two times"):
        solve(linear, Y0, jnp.array([0.0]), ROTATION)
    with pytest.raises(ValueError, match="must return an array of y's shape"):
        solve(lambda t, y, a: y[:, :1], Y0, jnp.array([0.0, 1.0]), ROTATION)


def test_running_out_of_steps_warns_with_what_was_reached_or_raises_when_strict():
    with pytest.warns(ConvergenceWarning, match=r"did not reach t1 for 1 of 2 samples \(max_steps=20\): furthest t="):
        ys, result = ilj.odeint(easy_and_hard, EASY_HARD_Y0, [0.0, 1.0, 2.0], RATES, max_steps=20)
    assert result.converged.tolist() == [True, False] and result.status == "max_steps"
    assert 0 < float(result.t_reached[1]) < 2.0 and bool(jnp.isnan(ys[-1, 1]).all())
    with pytest.raises(ConvergenceError, match="raise max_steps"):
        ilj.odeint(easy_and_hard, EASY_HARD_Y0, [0.0, 2.0], RATES, max_steps=20, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ilj.odeint(easy_and_hard, EASY_HARD_Y0, [0.0, 2.0], RATES, max_steps=20, warn=False)


def test_under_jit_the_warning_comes_from_the_device_only_when_a_sample_falls_short():
    with pytest.warns(ConvergenceWarning, match=r"did not reach t1 for 1 of 2 samples \(max_steps=20\)"):
        jax.block_until_ready(solve(easy_and_hard, EASY_HARD_Y0, jnp.array([0.0, 2.0]), RATES, max_steps=20))
        jax.effects_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(solve(easy_and_hard, EASY_HARD_Y0, jnp.array([0.0, 2.0]), RATES))
        jax.effects_barrier()


def square(t, y, _):
    return y**2


@pytest.mark.parametrize("method", ("dopri5", "euler"))
def test_a_blow_up_marks_the_sample_failed(method):
    """y' = y**2 from y(0) = 1 blows up at t = 1; the sample starting at 0.1 lives to t = 10, past the end at 2."""
    y0 = jnp.array([[1.0], [0.1]])
    options = dict(dt=0.01) if method == "euler" else {}
    with pytest.warns(ConvergenceWarning, match="1 stopped on NaN/Inf or a step size underflow"):
        _, result = solve(square, y0, jnp.array([0.0, 2.0]), None, method=method, **options)
        jax.effects_barrier()
    assert result.failed.tolist() == [True, False] and result.converged.tolist() == [False, True]
    assert result.status == "failed"
    # The adaptive solver stops at the singularity; explicit Euler lags the blow-up and overflows a little later.
    assert float(result.t_reached[0]) < (1.0 + 1e-6 if method == "dopri5" else 2.0)


def test_an_adjoint_solve_that_runs_out_of_steps_warns_in_the_backward_pass():
    """The forward solve runs from t = 2 to 0; the backward one from 0 towards 2 stops short, and says where."""
    y0, weight = gradient_inputs()

    def loss(y0, weight):
        ys, result = ilj.odeint(tanh_field, y0, [2.0, 0.0], weight, rtol=1e-3, atol=1e-3, max_steps=12,
                                gradient="adjoint", adjoint_rtol=1e-12, adjoint_atol=1e-12)
        return jnp.sum(ys[-1]), result

    with pytest.warns(ConvergenceWarning, match=r"odeint\(dopri5, adjoint\) did not reach t1 .*furthest t=0\.\d"):
        (_, result), _ = jax.jit(jax.value_and_grad(loss, has_aux=True))(y0, weight)
        jax.effects_barrier()
    assert result.status == "converged"
