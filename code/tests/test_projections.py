"""The simplex and capped-simplex projections (project_simplex, sparsemax, soft_topk) in both frameworks: exact
solutions against CVXPY, their closed-form Jacobians against autodiff and finite differences, gradient checks of
first and second order, the twins agreeing, JAX transformations, dtypes and every refused argument."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from torch.autograd import forward_ad

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt

from conftest import DEVICES

jax.config.update("jax_enable_x64", True)

FRAMEWORKS = {"torch": ilt, "jax": ilj}


def both(name, x, *args, **kwargs):
    """``name`` applied to the float64 NumPy array ``x`` in each framework; the twins agree to 1e-12."""
    torch_y = getattr(ilt, name)(torch.tensor(x), *args, **kwargs).numpy()
    jax_y = np.asarray(getattr(ilj, name)(jnp.asarray(x), *args, **kwargs))
    np.testing.assert_allclose(torch_y, jax_y, rtol=0, atol=1e-12)
    return torch_y


def exact_projection(v, *, total, upper=None):
    """argmin ||y - v||^2 subject to 0 <= y (<= upper) and sum(y) = total, by CVXPY's interior-point solver
    Clarabel at tight tolerances."""
    cp = pytest.importorskip("cvxpy")
    y = cp.Variable(v.size)
    constraints = [y >= 0, cp.sum(y) == total] + ([y <= upper] if upper is not None else [])
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - v)), constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert problem.status == "optimal"
    return y.value


def face_jacobian(free):
    """diag(1_F) - 1_F 1_F^T / |F| for a boolean vector ``free``."""
    mask = free.astype(float)
    return np.diag(mask) - np.outer(mask, mask) / max(mask.sum(), 1.0)


# Every case is a batch of three vectors of six entries, so that JAX compiles one program for them all.
rng = np.random.default_rng(17)
SIMPLEX_CASES = {
    "random": rng.standard_normal((3, 6)),
    "wide spread": 30.0 * rng.standard_normal((3, 6)),
    "ties": np.array([[0.3, 0.3, 0.3, -1.0, -1.0, -2.0], [2.0, 2.0, 0.0, 0.0, 0.0, 0.0], np.full(6, -4.0)]),
    "on the simplex": rng.dirichlet(np.ones(6), size=3),
}
TOPK_CASES = {
    "random": (rng.standard_normal((3, 6)), 3),
    "wide spread": (5.0 * rng.standard_normal((3, 6)), 2),
    "ties": (np.array([[3.0, 1.0, 1.0, 0.0, -1.0, -1.0], np.full(6, 0.5), [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]), 2),
    "inside the box": (rng.uniform(-0.15, 0.15, size=(3, 6)), 2),
    "k = n - 1": (rng.standard_normal((3, 6)), 5),
}


@pytest.mark.parametrize("radius", [1.0, 2.5])
@pytest.mark.parametrize("case", SIMPLEX_CASES)
def test_project_simplex_is_the_exact_projection(case, radius):
    x = SIMPLEX_CASES[case]
    if case == "on the simplex":
        x = radius * x
    y = both("project_simplex", x, radius=radius)
    for v, solution in zip(x, y):
        np.testing.assert_allclose(solution, exact_projection(v, total=radius), atol=1e-8)
    np.testing.assert_allclose(y.sum(-1), radius, rtol=1e-14)
    assert (y >= 0).all()
    if case == "on the simplex":
        np.testing.assert_allclose(y, x, atol=1e-15)
    # A projection is idempotent and ignores a constant added to every entry.
    np.testing.assert_allclose(both("project_simplex", y, radius=radius), y, atol=1e-14)
    np.testing.assert_allclose(both("project_simplex", x + 10.0, radius=radius), y, atol=1e-12)


def test_sparsemax_is_the_unit_simplex_projection_and_sparse():
    x = SIMPLEX_CASES["random"]
    np.testing.assert_array_equal(both("sparsemax", x), both("project_simplex", x))
    # In the second row a logit ahead of the others by more than 1 takes all the mass, where softmax would leave
    # some to every logit; equal logits share it equally.
    logits = np.array([[1.0, 0.8, -1.0, -1.0, -2.0, -3.0], [2.5, 1.0, 0.9, -3.0, -3.0, -3.0], np.zeros(6)])
    expected = [[0.6, 0.4, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], np.full(6, 1 / 6)]
    np.testing.assert_allclose(both("sparsemax", logits), expected, atol=1e-15)
    # A logit that dwarfs the radius still gets all the mass (the entries are measured from the largest), and
    # scores with a large common offset keep their soft top-k.
    np.testing.assert_array_equal(both("sparsemax", np.array([1e17, 3.0, 2.0, 0.0, 0.0, 0.0])), [1, 0, 0, 0, 0, 0])
    offset = SIMPLEX_CASES["random"]
    np.testing.assert_allclose(both("soft_topk", offset + 1e6, 2), both("soft_topk", offset, 2), atol=1e-9)
    # A vector of one entry has one point on its simplex.
    np.testing.assert_array_equal(both("project_simplex", np.array([[3.0], [-2.0]]), radius=2.5), [[2.5], [2.5]])


@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("case", TOPK_CASES)
def test_soft_topk_is_the_exact_capped_simplex_projection(case, temperature):
    scores, k = TOPK_CASES[case]
    y = both("soft_topk", scores, k, temperature=temperature)
    for s, solution in zip(scores / temperature, y):
        np.testing.assert_allclose(solution, exact_projection(s, total=k, upper=1.0), atol=1e-8)
    np.testing.assert_allclose(y.sum(-1), k, rtol=1e-13)
    assert (y >= 0).all() and (y <= 1).all()


def bisection_projection(v, *, total, upper):
    """The projection clip(v - t, 0, upper) with t found by 200 bisection steps on the decreasing function
    t -> sum(clip(v - t, 0, upper)), per row of ``v``: slow and sure, the reference of the random batches."""
    low, high = v.min(-1, keepdims=True) - total, v.max(-1, keepdims=True)
    for _ in range(200):
        middle = (low + high) / 2
        above = np.clip(v - middle, 0, upper).sum(-1, keepdims=True) > total
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return np.clip(v - (low + high) / 2, 0, upper)


def test_random_batches_with_ties_and_gaps_against_bisection():
    """Wide scores with gaps above 1 (so that the capped simplex's phi has flat stretches at integer heights, where
    rounding once chose the wrong segment) and, in half the rows, values on a grid of 1/2 (ties between entries
    and between an entry's two breakpoints and another's)."""
    x = np.random.default_rng(8).standard_normal((400, 6)) / 0.3
    x[::2] = np.round(2 * x[::2]) / 2
    for radius in (1.0, 3.5):
        y = both("project_simplex", x, radius=radius)
        np.testing.assert_allclose(y, bisection_projection(x, total=radius, upper=np.inf), atol=1e-9)
    hard_masks = 0
    for k in range(1, 6):
        y = both("soft_topk", x, k)
        np.testing.assert_allclose(y, bisection_projection(x, total=k, upper=1.0), atol=1e-9)
        np.testing.assert_allclose(y.sum(-1), k, rtol=1e-14)
        hard_masks += int(np.all((y == 0) | (y == 1), axis=-1).sum())
    assert hard_masks > 100


def test_soft_topk_becomes_the_hard_mask_as_temperature_falls():
    scores = np.array([0.4, -1.2, 2.0, 0.9, 0.35, -0.1])  # top 3: entries 2, 3, 0; the 3rd and 4th are 0.05 apart
    hard = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    errors = [np.abs(both("soft_topk", scores, 3, temperature=t) - hard).max() for t in (3.0, 0.3, 0.1, 0.06)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    for temperature in (0.049, 1e-3, 1e-8):  # below the gap between the 3rd and 4th largest scores
        np.testing.assert_allclose(both("soft_topk", scores, 3, temperature=temperature), hard, atol=1e-12)
    # Scores tied at the k-th place share the last unit of mass at every temperature.
    tied = np.array([3.0, 1.0, 1.0, 0.0, -1.0, -2.0])
    np.testing.assert_allclose(both("soft_topk", tied, 2, temperature=1e-6), [1, 0.5, 0.5, 0, 0, 0])
    # At a high temperature no entry reaches a bound: the mask is k / n plus the centred scaled scores.
    np.testing.assert_allclose(both("soft_topk", scores, 3, temperature=1e6), 0.5 + (scores - scores.mean()) / 1e6,
                               atol=1e-15)


def jacobians(name, x, *args, **kwargs):
    """The Jacobian of ``name`` at the vector ``x`` in reverse and forward mode in each framework (torch's forward
    mode column by column, with dual numbers)."""
    f_torch = lambda v: getattr(ilt, name)(v, *args, **kwargs)  # noqa: E731
    f_jax = lambda v: getattr(ilj, name)(v, *args, **kwargs)  # noqa: E731
    columns = []
    for direction in torch.eye(x.size, dtype=torch.float64):
        with forward_ad.dual_level():
            columns.append(forward_ad.unpack_dual(f_torch(forward_ad.make_dual(torch.tensor(x), direction))).tangent)
    return [
        torch.autograd.functional.jacobian(f_torch, torch.tensor(x)).numpy(),
        torch.stack(columns, dim=1).numpy(),
        np.asarray(jax.jacrev(f_jax)(jnp.asarray(x))),
        np.asarray(jax.jacfwd(f_jax)(jnp.asarray(x))),
    ]


@pytest.mark.parametrize(
    "name, args, kwargs, free",
    [
        ("project_simplex", (), dict(radius=1.7), lambda y: y > 0),
        ("sparsemax", (), {}, lambda y: y > 0),
        ("soft_topk", (3,), dict(temperature=0.7), lambda y: (y > 0) & (y < 1)),
    ],
)
def test_jacobian_is_the_closed_form_and_the_finite_difference(name, args, kwargs, free):
    x = 0.5 * np.random.default_rng(5).standard_normal(6)
    y = both(name, x, *args, **kwargs)
    expected = face_jacobian(free(y)) / kwargs.get("temperature", 1.0)
    assert 1 < free(y).sum() < 6  # a face with free and bound entries, whose Jacobian tells them apart
    for jacobian in jacobians(name, x, *args, **kwargs):
        np.testing.assert_allclose(jacobian, expected, atol=1e-15)
    # Central differences, all 2n shifted vectors in one batch, in torch (the twins' values agree everywhere
    # else); the face stays put over a step this small.
    step = 1e-6
    shifted = getattr(ilt, name)(torch.tensor(np.concatenate([x + step * np.eye(6), x - step * np.eye(6)])), *args,
                                 **kwargs).numpy()
    np.testing.assert_allclose((shifted[:6] - shifted[6:]).T / (2 * step), expected, atol=1e-8)


def test_derivative_where_an_entry_sits_on_a_bound_is_the_one_with_that_entry_held():
    # x_3 equals the threshold 0.25: y_3 = 0 with x_3 neither above nor below the support's edge.
    x = np.array([1.0, 0.5, 0.25, -1.0, -2.0, -3.0])
    np.testing.assert_array_equal(both("project_simplex", x), [0.75, 0.25, 0, 0, 0, 0])
    for jacobian in jacobians("project_simplex", x):
        np.testing.assert_allclose(jacobian, face_jacobian(np.arange(6) < 2), atol=1e-15)
    # s - t = (1, 0, -1, ...) with t = 1: the first entry at its cap and the second at zero, both held.
    s = np.array([2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    np.testing.assert_array_equal(both("soft_topk", s, 1), [1, 0, 0, 0, 0, 0])
    for jacobian in jacobians("soft_topk", s, 1):
        np.testing.assert_array_equal(jacobian, np.zeros((6, 6)))


CALLS = {
    "project_simplex": lambda module, x: module.project_simplex(x, radius=1.3),
    "sparsemax": lambda module, x: module.sparsemax(x),
    "soft_topk": lambda module, x: module.soft_topk(x, 2, temperature=0.6),
}


@pytest.mark.parametrize("name", CALLS)
def test_torch_first_and_second_derivatives_pass_gradcheck(name):
    """Forward mode, reverse mode, and the derivative of the backward pass: the Jacobian is constant on each face,
    so the exact second derivative in x is zero and the backward pass is linear in the incoming gradient."""
    x = torch.tensor(np.random.default_rng(4).standard_normal((3, 6)), requires_grad=True)
    function = lambda x: CALLS[name](ilt, x)  # noqa: E731
    assert torch.autograd.gradcheck(function, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(function, (x,))
    # y is piecewise linear, so the Hessian of ||y||^2 / 2 is J^T J, which is J (a symmetric projection).
    y = function(x[0]).detach()
    free = (y > 0) & (y < (1.0 if name == "soft_topk" else np.inf))
    scale = 0.6 if name == "soft_topk" else 1.0
    hessian = torch.autograd.functional.hessian(lambda v: function(v).pow(2).sum() / 2, x[0].detach())
    np.testing.assert_allclose(hessian.numpy(), face_jacobian(free.numpy()) / scale**2, atol=1e-14)


@pytest.mark.parametrize("name", CALLS)
def test_jax_derivatives_of_first_and_second_order_pass_check_grads(name):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 6)))
    check_grads(lambda x: CALLS[name](ilj, x), (x,), order=2, modes=("fwd", "rev"))


def test_jax_composes_with_jit_vmap_and_grad_and_agrees_with_torch():
    x = np.random.default_rng(5).standard_normal((3, 6))

    def loss(module, v, k):
        return module.soft_topk(v, k, temperature=0.5)[..., 1::2].sum() + (module.sparsemax(v) ** 2).sum()

    gradients = jax.jit(jax.vmap(jax.grad(lambda v: loss(ilj, v, 2))))(jnp.asarray(x))
    one_by_one = np.stack([np.asarray(jax.grad(lambda v: loss(ilj, v, 2))(jnp.asarray(v))) for v in x])
    np.testing.assert_allclose(np.asarray(gradients), one_by_one, atol=1e-14)
    x_torch = torch.tensor(x, requires_grad=True)
    (torch_gradients,) = torch.autograd.grad(loss(ilt, x_torch, 2), x_torch)
    np.testing.assert_allclose(torch_gradients.numpy(), one_by_one, atol=1e-12)
    # A batch along the leading axis gives what vmap over its vectors gives under jit.
    mapped = jax.jit(jax.vmap(lambda v: ilj.project_simplex(v, radius=2.0)))(jnp.asarray(x))
    np.testing.assert_allclose(mapped, ilj.project_simplex(jnp.asarray(x), radius=2.0), atol=1e-15)


@pytest.mark.parametrize("name", CALLS)
def test_any_leading_shape_and_lower_precision(name):
    x = np.random.default_rng(6).standard_normal((3, 6))
    for module, to_array in ((ilt, torch.tensor), (ilj, jnp.asarray)):
        y = np.asarray(CALLS[name](module, to_array(x)))
        # Two leading axes in float32; one vector in float16, which is solved in float32 and rounded back.
        single = CALLS[name](module, to_array(x[None].astype(np.float32)))
        assert single.dtype == to_array(np.float32(0)).dtype and single.shape == (1, 3, 6)
        np.testing.assert_allclose(np.asarray(single), y[None], atol=1e-6)
        half = CALLS[name](module, to_array(x[1].astype(np.float16)))
        assert half.dtype == to_array(np.float16(0)).dtype and half.shape == (6,)
        np.testing.assert_allclose(np.asarray(half, dtype=np.float64), y[1], atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_devices(device):
    x = torch.tensor(np.random.default_rng(7).standard_normal((3, 6)), device=device, requires_grad=True)
    y = ilt.soft_topk(x, 2) + ilt.project_simplex(x)
    (gradient,) = torch.autograd.grad(y.pow(2).sum(), x)
    assert y.device == gradient.device == x.device
    np.testing.assert_allclose(y.detach().cpu().numpy(), both("soft_topk", x.detach().cpu().numpy(), 2)
                               + both("project_simplex", x.detach().cpu().numpy()), atol=1e-12)


X = np.array([[0.1, 0.2, 0.7]])
REFUSALS = [
    (lambda m, t: m.project_simplex([0.1, 0.9]), TypeError, "x must be a (torch.Tensor|JAX array), got list"),
    (lambda m, t: m.project_simplex(t(np.array([1, 2]))), TypeError, "x must have a floating-point dtype"),
    (lambda m, t: m.project_simplex(t(np.array(1.0))), ValueError, "x must have at least one dimension"),
    (lambda m, t: m.project_simplex(t(np.zeros((3, 0)))), ValueError, r"x must have at least 1 entry .* \(3, 0\)"),
    (lambda m, t: m.project_simplex(t(np.array([0.0, np.inf]))), ValueError, "x contains NaN or Inf"),
    (lambda m, t: m.project_simplex(t(X), radius=0.0), ValueError, "radius must be a positive finite number"),
    (lambda m, t: m.project_simplex(t(X), radius=-1.0), ValueError, "radius must be a positive finite number"),
    (lambda m, t: m.project_simplex(t(X), radius=np.inf), ValueError, "radius must be a positive finite number"),
    (lambda m, t: m.sparsemax(t(np.array([np.nan, 1.0]))), ValueError, "logits contains NaN or Inf"),
    (lambda m, t: m.sparsemax(t(np.array([1, 2]))), TypeError, "logits must have a floating-point dtype"),
    (lambda m, t: m.soft_topk(t(np.array([1.0])), 1), ValueError, "scores must have at least 2 entries"),
    (lambda m, t: m.soft_topk(t(X), 0), ValueError, r"k must be an integer from 1 to 2 .* got 0"),
    (lambda m, t: m.soft_topk(t(X), 3), ValueError, r"k must be an integer from 1 to 2 .* got 3"),
    (lambda m, t: m.soft_topk(t(X), 1.0), ValueError, r"k must be an integer .* got 1.0"),
    (lambda m, t: m.soft_topk(t(X), True), ValueError, r"k must be an integer .* got True"),
    (lambda m, t: m.soft_topk(t(X), 1, temperature=0.0), ValueError, "temperature must be a positive finite"),
    (lambda m, t: m.soft_topk(t(np.array([[1.0, np.nan]])), 1), ValueError, "scores contains NaN or Inf"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("call, error, message", REFUSALS)
def test_bad_arguments_are_refused_naming_them(framework, call, error, message):
    to_array = torch.tensor if framework == "torch" else jnp.asarray
    with pytest.raises(error, match=message):
        call(FRAMEWORKS[framework], to_array)


def test_the_torch_docstring_examples_hold():
    import implicit_layers.torch.optimization.projections as projections

    results = doctest.testmod(projections, extraglobs={"torch": torch})
    assert results.attempted >= 5 and results.failed == 0
