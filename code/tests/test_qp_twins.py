"""The torch and JAX QP layers are twins: on the same problems they give the same solutions, multipliers,
iterations, statuses and gradients, and they refuse the same bad arguments with the same error and message (up
to the framework's own words). Float64 throughout."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from qp_problems import SHAPES, random_qp

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt

jax.config.update("jax_enable_x64", True)



def problems() -> dict:
    """The random problems of the framework tests (batches of four, so the JAX solve compiles once per shape),
    and a batch whose samples are feasible, primal infeasible twice (inequalities, equalities) and unbounded."""
    infeasible = dict(
        Q=np.array([[1.0, 0.0], [0.0, 0.0]]),
        p=np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]]),
        G=np.array([[[1.0, 0.0], [-1.0, 0.0]]] * 4),
        h=np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]]),
        A=np.array([[[1.0, 1.0], [1.0, 1.0]]] * 3 + [[[0.0, 0.0], [0.0, 0.0]]]),
        b=np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]]),
    )
    return {
        **{kind: random_qp(0, *SHAPES[kind], batch=4) for kind in SHAPES},
        "semidefinite": random_qp(1, 8, 6, 2, batch=4, rank=3),
        "linear program": random_qp(2, 8, 6, 2, batch=4, rank=0),
        "infeasible and unbounded": infeasible,
    }


def solve_both(problem: dict) -> tuple:
    """Each framework's solution, record and gradient of sum(g * x) with respect to every argument, as NumPy."""
    g = np.random.default_rng(0).standard_normal((4, problem["p"].shape[-1]))
    inputs = {name: torch.tensor(value, requires_grad=True) for name, value in problem.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the infeasible samples warn, in both frameworks
        x_t, result_t = ilt.qp(**inputs)
        gradients_t = torch.autograd.grad((torch.tensor(g) * x_t).nan_to_num().sum(), list(inputs.values()))

        def loss(inputs):
            x, result = ilj.qp(**inputs)
            return jnp.sum(jnp.nan_to_num(g * x)), (x, result)

        gradients_j, (x_j, result_j) = jax.grad(loss, has_aux=True)(
            {name: jnp.asarray(value) for name, value in problem.items()})
    torch_side = (x_t.detach().numpy(), result_t, {name: v.numpy() for name, v in zip(inputs, gradients_t)})
    jax_side = (np.asarray(x_j), result_j, {name: np.asarray(v) for name, v in gradients_j.items()})
    return torch_side, jax_side


@pytest.mark.parametrize("kind", sorted(SHAPES) + ["semidefinite", "linear program", "infeasible and unbounded"])
def test_solutions_records_and_gradients_agree(kind):
    (x_t, result_t, gradients_t), (x_j, result_j, gradients_j) = solve_both(problems()[kind])
    assert result_t.status == result_j.status
    np.testing.assert_array_equal(result_t.iterations.numpy(), np.asarray(result_j.iterations))
    assert result_t.nfe == int(result_j.nfe)
    np.testing.assert_allclose(x_t, x_j, rtol=0, atol=1e-10 * max(1.0, np.nanmax(np.abs(x_t))))
    for field in ("lam", "nu", "slack"):
        value_t = getattr(result_t, field).numpy()
        np.testing.assert_allclose(value_t, np.asarray(getattr(result_j, field)), rtol=0,
                                   atol=1e-8 * max(1.0, np.nanmax(np.abs(value_t), initial=0)), err_msg=field)
    for name in gradients_t:
        gradient_t, gradient_j = gradients_t[name], gradients_j[name]
        if kind == "infeasible and unbounded" and name in ("A", "b"):
            # The feasible sample's two equality constraints are the same, so only changes of A and b that keep
            # them the same are determined; how dL/dA and dL/db split between the two rows is set by the
            # regularization and by rounding (on an Intel CPU with AVX-512 the frameworks' splits differed by
            # 7e-8). Compare the sums over the rows.
            gradient_t, gradient_j = gradient_t.sum(axis=1), gradient_j.sum(axis=1)
        scale = max(1.0, np.nanmax(np.abs(gradient_t), initial=0))
        np.testing.assert_allclose(gradient_t, gradient_j, rtol=0, atol=1e-8 * scale, err_msg=name)


def bad_arguments(framework) -> dict:
    """The same refusals in both frameworks: ``framework`` makes an array from nested lists and a dtype name."""
    eye, zeros, ones = [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], [1.0, 1.0]
    return {
        "Q not square": dict(Q=framework([[1.0] * 3] * 2), p=framework(zeros)),
        "p of the wrong size": dict(Q=framework(eye), p=framework([0.0] * 3)),
        "G without h": dict(Q=framework(eye), p=framework(zeros), G=framework(eye)),
        "b without A": dict(Q=framework(eye), p=framework(zeros), b=framework(ones)),
        "A of the wrong width": dict(Q=framework(eye), p=framework(zeros), A=framework([[1.0] * 3]),
                                     b=framework([1.0])),
        "h of the wrong size": dict(Q=framework(eye), p=framework(zeros), G=framework(eye), h=framework([1.0] * 3)),
        "batch sizes disagree": dict(Q=framework([eye] * 3), p=framework([zeros] * 4)),
        "no variables": dict(Q=framework(np.zeros((0, 0))), p=framework(np.zeros(0))),
        "integer dtype": dict(Q=framework(eye, "int32"), p=framework(zeros)),
        "mixed dtypes": dict(Q=framework(eye), p=framework(zeros, "float32")),
        "NaN": dict(Q=framework(eye), p=framework([0.0, float("nan")])),
        "Inf in G": dict(Q=framework(eye), p=framework(zeros), G=framework([[float("inf"), 0.0]]), h=framework([1.0])),
        "not symmetric": dict(Q=framework([[1.0, 1.0], [0.0, 1.0]]), p=framework(zeros)),
        "indefinite": dict(Q=framework([[1.0, 0.0], [0.0, -1.0]]), p=framework(zeros)),
        "indefinite second sample": dict(Q=framework([eye, [[1.0, 2.0], [2.0, 1.0]]]), p=framework(zeros)),
        "tol": dict(Q=framework(eye), p=framework(zeros), tol=0.0),
        "max_iter": dict(Q=framework(eye), p=framework(zeros), max_iter=0),
        "strict": dict(Q=framework(eye), p=framework(zeros), strict=1),
        "warn": dict(Q=framework(eye), p=framework(zeros), warn="yes"),
    }


def torch_array(value, dtype="float64"):
    return torch.tensor(np.asarray(value), dtype=getattr(torch, dtype))


def jax_array(value, dtype="float64"):
    return jnp.asarray(np.asarray(value), dtype=dtype)


def refusal(run) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as caught:
        run()
    return type(caught.value), str(caught.value).replace("torch.", "")  # torch's dtypes read "torch.float32"


@pytest.mark.parametrize("case", sorted(bad_arguments(torch_array)))
def test_both_refuse_the_same_input_with_the_same_message(case):
    torch_refusal = refusal(lambda: ilt.qp(**bad_arguments(torch_array)[case]))
    jax_refusal = refusal(lambda: ilj.qp(**bad_arguments(jax_array)[case]))
    assert torch_refusal == jax_refusal


def test_both_refuse_an_argument_that_is_not_an_array_by_name():
    for qp, good in ((ilt.qp, torch_array), (ilj.qp, jax_array)):
        with pytest.raises(TypeError, match="p must be a .* got list"):
            qp(good([[1.0]]), [0.0])
