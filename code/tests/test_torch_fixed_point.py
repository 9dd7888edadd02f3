import warnings

import pytest
import torch
from torch import nn

from implicit_layers.torch import (
    SOLVERS,
    ConvergenceError,
    ConvergenceWarning,
    FixedPointLayer,
    autograd_graph_bytes,
    default_device,
    fixed_point,
    seed_everything,
)

from conftest import DEVICES, tanh_problem

ROUTES = [  # (solver, backward, backward_solver)
    ("newton", "implicit", "forward_iteration"),
    ("newton", "implicit", "newton"),
    ("forward_iteration", "implicit", "forward_iteration"),
    ("forward_iteration", "unrolled", "forward_iteration"),
    ("newton", "unrolled", "forward_iteration"),
    ("anderson", "implicit", "anderson"),
    ("broyden", "implicit", "broyden"),
    ("anderson", "unrolled", "forward_iteration"),
    ("broyden", "unrolled", "forward_iteration"),
]


def solve_tanh(x, W, solver, backward, backward_solver, tol=1e-12):
    z, _ = fixed_point(
        lambda z: torch.tanh(z @ W.T + x),
        torch.zeros_like(x),
        solver=solver,
        backward=backward,
        backward_solver=backward_solver,
        tol=tol,
        max_iter=300,
        backward_tol=1e-13,
        backward_max_iter=500,
    )
    return z


@pytest.mark.parametrize("route", ROUTES)
def test_gradcheck_float64(route):
    W, x = tanh_problem(batch=3, n=5)
    inputs = (x.requires_grad_(), W.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, W: solve_tanh(x, W, *route), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_gradient_equals_unrolled_and_closed_form(device):
    W, x = tanh_problem(batch=4, n=6, scale=0.7, device=device)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype).to(device)
    gradients = {}
    for route in ROUTES:
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        z = solve_tanh(xr, Wr, *route)
        gradients[route] = torch.autograd.grad((z * upstream).sum(), (xr, Wr))
    # Closed form: dz*/dx = (I - D W)^{-1} D with D = diag(1 - z*^2), so the VJP is D (I - D W)^{-T} u.
    z_star = solve_tanh(x, W, "newton", "unrolled", "forward_iteration").detach()
    D = torch.diag_embed(1 - z_star**2)
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=device)
    adjoint = torch.linalg.solve((eye - D @ W).transpose(1, 2), upstream.unsqueeze(-1))
    expected_x = (D @ adjoint).squeeze(-1)
    expected_W = torch.einsum("bi,bj->ij", expected_x, z_star)
    for route, (grad_x, grad_W) in gradients.items():
        torch.testing.assert_close(grad_x, expected_x, atol=1e-10, rtol=1e-9, msg=f"route {route}")
        torch.testing.assert_close(grad_W, expected_W, atol=1e-10, rtol=1e-9, msg=f"route {route}")


def test_implicit_memory_does_not_grow_with_iterations():
    W, x = tanh_problem(batch=8, n=16, scale=0.9)
    W.requires_grad_()

    def graph_bytes(backward, tol):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return autograd_graph_bytes(lambda: solve_tanh(x, W, "forward_iteration", backward, "newton", tol))[1]

    assert graph_bytes("implicit", 1e-3) == graph_bytes("implicit", 1e-12)
    assert graph_bytes("unrolled", 1e-12) > 3 * graph_bytes("unrolled", 1e-3)
    assert graph_bytes("implicit", 1e-12) < graph_bytes("unrolled", 1e-3)


def test_solver_options_reach_both_solves():
    seed_everything(2)
    layer = FixedPointLayer(
        TanhCell(6, scale=0.9),
        solver="anderson",
        backward_solver="anderson",
        solver_options={"m": 2, "damping": 0.8},
        backward_solver_options={"m": 3},
        tol=1e-10,
    ).double()
    layer(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    assert layer.last_result.status == "converged" and layer.last_backward_result.status == "converged"
    with pytest.raises(ValueError, match="damping must lie in"):
        layer.options["solver_options"] = {"damping": 2.0}
        layer(torch.randn(3, 6, dtype=torch.float64))


def test_solution_under_no_grad_has_no_graph(problem):
    W, x = problem
    W.requires_grad_()
    with torch.no_grad():
        z = solve_tanh(x, W, "newton", "implicit", "forward_iteration")
    assert not z.requires_grad


class TanhCell(nn.Module):
    def __init__(self, n, scale=0.5):
        super().__init__()
        self.linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(scale / torch.linalg.matrix_norm(self.linear.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_layer_trains_its_parameters_and_records_results(backward):
    seed_everything(0)
    layer = FixedPointLayer(TanhCell(6), backward=backward, tol=1e-10).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    assert layer.last_result.status == "converged"
    z.square().sum().backward()
    assert layer.f.linear.weight.grad is not None and x.grad is not None
    if backward == "implicit":
        assert layer.last_backward_result.status == "converged"
    assert "backward=" in repr(layer)


def test_layer_gradcheck_and_batch_equals_per_sample():
    seed_everything(1)
    layer = FixedPointLayer(TanhCell(5), tol=1e-12, backward_tol=1e-13).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    whole = layer(x)
    for i in range(3):
        torch.testing.assert_close(layer(x[i : i + 1]), whole[i : i + 1], atol=1e-13, rtol=0)


def test_layer_rejects_bad_input_and_options():
    layer = FixedPointLayer(TanhCell(4))
    x = torch.randn(2, 4)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        layer(x)
    with pytest.raises(ValueError, match="unknown solver 'lbfgs'"):
        FixedPointLayer(TanhCell(4), solver="lbfgs")
    with pytest.raises(ValueError, match="unknown backward 'neumann'"):
        FixedPointLayer(TanhCell(4), backward="neumann")
    with pytest.raises(ValueError, match="unknown backward_solver 'cg'"):
        fixed_point(lambda z: z, torch.zeros(2, 2), backward_solver="cg")


def test_strict_backward_raises_when_the_adjoint_solve_stalls(problem):
    W, x = problem
    W = (W * 1.8).requires_grad_()
    z, _ = fixed_point(
        lambda z: torch.tanh(z @ W.T + x),
        torch.zeros_like(x),
        tol=1e-10,
        backward_solver="forward_iteration",
        backward_max_iter=1,
        strict=True,
    )
    with pytest.raises(ConvergenceError, match="did not converge"):
        z.sum().backward()


def test_solver_registry_and_device_choice(monkeypatch):
    assert set(SOLVERS) == {"forward_iteration", "newton", "anderson", "broyden"}
    monkeypatch.setenv("IMPLICIT_LAYERS_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.delenv("IMPLICIT_LAYERS_DEVICE")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_seed_everything_reproduces_draws():
    seed_everything(7)
    first = torch.randn(3)
    seed_everything(7)
    torch.testing.assert_close(torch.randn(3), first)


def symmetric_tanh(scale, n=12, batch=4, dtype=torch.float64, input_scale=1.0):
    generator = torch.Generator().manual_seed(5)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    W = (scale * (A + A.T) / torch.linalg.matrix_norm(A + A.T, ord=2)).to(dtype)
    return W, input_scale * torch.randn(batch, n, generator=generator, dtype=torch.float64).to(dtype)


def test_default_backward_solver_follows_the_forward_solver():
    # A small input keeps the solution near 0, where J is close to W with spectral radius 1.5: Newton finds
    # the fixed point, and the adjoint system g = J^T g + u has no convergent plain iteration.
    W, x = symmetric_tanh(1.5, input_scale=0.01)
    x.requires_grad_()
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    z, result = fixed_point(f, torch.zeros_like(x), tol=1e-12)
    assert result.status == "converged"
    (grad_x,) = torch.autograd.grad(z.sum(), x)
    z_star = z.detach()
    D = torch.diag_embed(1 - z_star**2)
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    expected = (D @ torch.linalg.solve((eye - D @ W).transpose(1, 2), torch.ones_like(x).unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(grad_x, expected)
    z, _ = fixed_point(f, torch.zeros_like(x), tol=1e-12, backward_solver="forward_iteration")
    with pytest.warns(ConvergenceWarning):
        torch.autograd.grad(z.sum(), x)


@pytest.mark.parametrize("gradient_scale", [1e-6, 1.0, 1e6])
def test_backward_tolerance_is_relative_to_the_gradient(gradient_scale):
    W, x = symmetric_tanh(0.9, dtype=torch.float32)
    W.requires_grad_()
    z, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), backward_solver="anderson")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # float32 reaches the default relative tolerance
        (grad_W,) = torch.autograd.grad(gradient_scale * z.sum(), W)
    assert bool(torch.isfinite(grad_W).all())


def test_failed_samples_pass_on_zero_gradient():
    W, x = tanh_problem(batch=3, n=4)
    x.requires_grad_()
    broken = torch.tensor([True, False, False]).view(-1, 1)
    # Sample 0 asks for z = z + 1: no fixed point, a singular Newton system.
    f = lambda z: torch.where(broken, z + 1.0 + 0.0 * x, torch.tanh(z @ W.T + x))  # noqa: E731
    with pytest.warns(ConvergenceWarning, match="singular"):
        z, result = fixed_point(f, torch.zeros_like(x), tol=1e-12)
    assert result.failed.tolist() == [True, False, False]
    with pytest.warns(ConvergenceWarning, match="1 of 3 samples"):  # its adjoint system is singular too
        (grad_x,) = torch.autograd.grad(z.sum(), x)
    assert bool((grad_x[0] == 0).all())
    x_healthy = x[1:].detach().requires_grad_()
    z_healthy, _ = fixed_point(lambda z: torch.tanh(z @ W.T + x_healthy), torch.zeros_like(x_healthy), tol=1e-12)
    (expected,) = torch.autograd.grad(z_healthy.sum(), x_healthy)
    torch.testing.assert_close(grad_x[1:], expected)
