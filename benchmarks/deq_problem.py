"""The training step every library takes in ``deq.py``, its shared settings, and its float64 reference.

The model is the book's convolutional DEQ classifier on scikit-learn's 8x8 digits: a 3x3 stem convolution (without bias)
and a group normalization lift each image to ``C`` channels of unit scale, the injected input ``x``; the state is the fixed point ``z* = cell(z*, x)`` of the
``ConvDEQCell`` (C channels, 8x8 pixels: 1,024 numbers per sample); the head averages ``z*`` over the pixels and
maps the C averages to 10 logits by a linear layer. The loss is the mean cross-entropy over the batch. One step is
the forward solve, the implicit backward pass and the gradients of every parameter (stem, cell, head).

The parameters are drawn once, by torch's default initialization under a fixed seed, and handed to every library
as the same float32 values (as a dict of NumPy arrays named for the JAX cell's params). The reference runs in
float64: our Anderson brings the residual to 1e-8, then Newton's method on ``z - f(z) = 0``, whose linear systems
SciPy's GMRES solves with exact Jacobian-vector products (``torch.func.jvp``), takes it below 1e-10; the gradient is
the implicit function theorem's, its adjoint system solved by SciPy's GMRES with exact vector-Jacobian products to
1e-10 relative, none of the backward solvers compared. (Dense per-sample Jacobians, 1024 x 1024 for each of 64
samples, took over ten minutes on the 2-core machine.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from implicit_layers.datasets import load_digits
from implicit_layers.torch import ConvDEQCell, anderson

CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """What every library gets, each in its own vocabulary (the case modules translate)."""

    channels: int = 16
    inner_channels: int = 32
    groups: int = 4
    batch: int = 64
    tol: float = 1e-3
    """Absolute tolerance on each sample's residual ``||f(z) - z||_2``; the state's norm is about 32 (1,024
    entries of unit scale after the cell's last group normalization), so this is about 3e-5 relative."""
    max_iter: int = 100
    """Iteration limit of the forward solve."""
    anderson_m: int = 6
    anderson_ridge: float = 1e-4
    """Anderson's ridge: torchdeq's and jaxopt's absolute lambda; ours is relative to the history's mean
    squared residual (the only kind it has)."""
    backward_rtol: float = 1e-4
    """Tolerance of the adjoint solve relative to each sample's incoming gradient ``||dL/dz*_b||``."""
    backward_max_iter: int = 100


@dataclass(frozen=True)
class Problem:
    """The batch, the parameters (float32) and the float64 reference answers."""

    images: np.ndarray  # (B, 1, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (B,) int64
    params: dict[str, np.ndarray]  # float32, see PARAMETERS
    z_ref: np.ndarray  # (B, C, 8, 8) float64 fixed point
    grads_ref: dict[str, np.ndarray]  # float64 gradient of the loss, per parameter
    incoming_grad_norms: np.ndarray  # (B,) float64 ||dL/dz*_b||: sets the peers' absolute backward tolerances

    @property
    def z0(self) -> np.ndarray:
        """The initial guess every solver starts from."""
        return np.zeros(self.z_ref.shape, dtype=np.float32)


PARAMETERS = {
    "stem_conv": "stem.0.weight",
    "stem_norm_scale": "stem.1.weight",
    "stem_norm_offset": "stem.1.bias",
    "conv1": "cell.conv1.weight",
    "conv2": "cell.conv2.weight",
    "norm1_scale": "cell.norm1.weight",
    "norm1_offset": "cell.norm1.bias",
    "norm2_scale": "cell.norm2.weight",
    "norm2_offset": "cell.norm2.bias",
    "norm3_scale": "cell.norm3.weight",
    "norm3_offset": "cell.norm3.bias",
    "head_weight": "head.weight",
    "head_bias": "head.bias",
}
"""Each parameter's name in the problem's dict (the JAX cell's names for the cell) -> its name in the torch model."""


class DEQClassifierParts(nn.Module):
    """The stem, the cell and the head of the classifier, without a solver: each library wraps the cell in its own."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, settings.channels, 3, padding=1, bias=False), nn.GroupNorm(settings.groups, settings.channels)
        )
        self.cell = ConvDEQCell(settings.channels, settings.inner_channels, settings.groups)
        self.head = nn.Linear(settings.channels, CLASSES)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z.mean(dim=(2, 3)))

    def load(self, params: dict[str, np.ndarray]) -> "DEQClassifierParts":
        """Set the parameters from the problem's dict (copies, so that each library has its own)."""
        named = dict(self.named_parameters())
        with torch.no_grad():
            for name, torch_name in PARAMETERS.items():
                named[torch_name].copy_(torch.from_numpy(np.array(params[name])))
        return self


def make_problem(settings: Settings, seed: int = 0) -> Problem:
    """The first ``settings.batch`` training digits, parameters from torch's default initialization under
    ``seed``, and the float64 reference."""
    split = load_digits()
    images = split.x_train[: settings.batch].reshape(-1, 1, 8, 8)
    labels = split.y_train[: settings.batch]
    torch.manual_seed(seed)
    parts = DEQClassifierParts(settings)
    named = dict(parts.named_parameters())
    params = {name: named[torch_name].detach().numpy().copy() for name, torch_name in PARAMETERS.items()}
    z_ref, grads_ref, incoming = reference(settings, images, labels, params)
    return Problem(images, labels, params, z_ref, grads_ref, incoming)


def reference(
    settings: Settings, images: np.ndarray, labels: np.ndarray, params: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The fixed point, the gradient of every parameter and each sample's ``||dL/dz*||``, in float64."""
    parts = DEQClassifierParts(settings).double().load(params)
    x = parts.stem(torch.from_numpy(images).double())
    with torch.no_grad():
        # A starting point close enough for Newton: a residual is a residual whichever solver brought it down,
        # and Newton's steps below take it to round-off (the table's residuals are measured directly).
        start, _ = anderson(lambda z: parts.cell(z, x), torch.zeros_like(x), m=6, tol=1e-8, max_iter=300, warn=False)
        z = newton_krylov(lambda z: parts.cell(z, x), start)
    z = z.requires_grad_()
    loss = nn.functional.cross_entropy(parts.logits(z), torch.from_numpy(labels))
    incoming = torch.autograd.grad(loss, z)[0]
    # The adjoint h = (I - J)^{-T} dL/dz*, pushed through one application of f (which reaches the stem through
    # x), plus the head's own gradient at z*.
    fz = parts.cell(z, x)
    vjp = lambda v: torch.autograd.grad(fz, z, v, retain_graph=True)[0]  # noqa: E731
    adjoint = gmres_solve(lambda v: v - vjp(v), incoming, rtol=1e-10)
    named = dict(parts.named_parameters())
    through_f = torch.autograd.grad(parts.cell(z.detach(), x), list(named.values()), adjoint, allow_unused=True)
    loss = nn.functional.cross_entropy(parts.logits(z.detach()), torch.from_numpy(labels))
    direct = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    total = {name: sum(g for g in (a, b) if g is not None) for name, a, b in zip(named, through_f, direct)}
    grads = {name: total[torch_name].numpy() for name, torch_name in PARAMETERS.items()}
    return z.detach().numpy(), grads, incoming.flatten(1).norm(dim=1).numpy()


def newton_krylov(f: Callable, z: torch.Tensor, tol: float = 1e-10, max_iter: int = 10) -> torch.Tensor:
    """Newton's method on ``z - f(z) = 0``, each step's system ``(I - J) dz = f(z) - z`` solved by GMRES with
    exact Jacobian-vector products. The batch is one block-diagonal system (``f`` acts on each sample alone)."""
    for _ in range(max_iter):
        residual = f(z) - z
        if residual.flatten(1).norm(dim=1).max() < tol:
            return z
        jvp = lambda v: torch.func.jvp(f, (z,), (v,))[1]  # noqa: E731
        z = z + gmres_solve(lambda v: v - jvp(v), residual, rtol=1e-6)
    raise RuntimeError(f"the float64 reference did not converge in {max_iter} Newton steps")


def gmres_solve(operator: Callable, rhs: torch.Tensor, rtol: float) -> torch.Tensor:
    """Solve ``operator(v) = rhs`` with SciPy's GMRES, for a linear ``operator`` on tensors shaped like ``rhs``."""
    from scipy.sparse.linalg import LinearOperator, gmres

    size = rhs.numel()
    matvec = lambda v: operator(torch.from_numpy(v).reshape(rhs.shape)).reshape(-1).numpy()  # noqa: E731
    solution, info = gmres(
        LinearOperator((size, size), matvec=matvec, dtype=np.float64),
        rhs.reshape(-1).numpy(), rtol=rtol, atol=0.0, restart=100, maxiter=20,
    )
    if info != 0:
        raise RuntimeError(f"the reference's GMRES did not reach rtol {rtol:g} (info {info})")
    return torch.from_numpy(solution).reshape(rhs.shape)


@dataclass(frozen=True)
class Accuracy:
    """How close one library's answer is to the float64 reference."""

    residual: float  # max over samples of ||f(z) - z||_2, evaluated in float64 at the returned z
    grad_error: float  # relative error of the whole gradient (all parameters as one vector)
    worst_parameter: str  # the parameter with the largest relative error, and that error


def accuracy(problem: Problem, settings: Settings, z: np.ndarray, grads: dict[str, np.ndarray]) -> Accuracy:
    parts = DEQClassifierParts(settings).double().load(problem.params)
    with torch.no_grad():
        x = parts.stem(torch.from_numpy(problem.images).double())
        z64 = torch.from_numpy(np.asarray(z, dtype=np.float64))
        residual = float((parts.cell(z64, x) - z64).flatten(1).norm(dim=1).max())
    flat = lambda d: np.concatenate([np.asarray(d[name], dtype=np.float64).ravel() for name in PARAMETERS])  # noqa: E731
    reference_flat = flat(problem.grads_ref)
    grad_error = float(np.linalg.norm(flat(grads) - reference_flat) / np.linalg.norm(reference_flat))
    per_parameter = {
        name: float(np.linalg.norm(np.asarray(grads[name], np.float64) - problem.grads_ref[name])
                    / np.linalg.norm(problem.grads_ref[name]))
        for name in PARAMETERS
    }
    worst = max(per_parameter, key=per_parameter.get)
    return Accuracy(residual, grad_error, f"{worst} {per_parameter[worst]:.1e}")


@dataclass(frozen=True)
class Outcome:
    """What one step returned, as NumPy arrays, and the iterations the library reports."""

    z: np.ndarray
    grads: dict[str, np.ndarray]
    forward_steps: Optional[int]
    backward_steps: Optional[int]


@dataclass(frozen=True)
class Run:
    """A prepared step: ``call()`` is timed and returns once the work is done (JAX results blocked on);
    ``unpack`` turns its output into an :class:`Outcome`, outside the timing."""

    call: Callable[[], Any]
    unpack: Callable[[Any], Outcome]


@dataclass(frozen=True)
class Case:
    """One library's training step: ``prepare(problem, settings)`` builds a :class:`Run`; ``unavailable`` says
    why a peer that failed to import has none."""

    framework: str
    library: str
    method: str
    settings: str
    prepare: Optional[Callable[[Problem, Settings], Run]] = None
    unavailable: Optional[str] = None
