import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tanh_problem(batch=5, n=8, scale=0.5, dtype=torch.float64, device="cpu", seed=0):
    """A map z -> tanh(W z + x) whose W has spectral norm ``scale`` (a contraction when scale < 1)."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=generator, dtype=torch.float64)
    W = (scale * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype=dtype, device=device)
    x = torch.randn(batch, n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return W, x


@pytest.fixture
def problem():
    return tanh_problem()
