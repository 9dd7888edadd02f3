"""The convolutional DEQ cell: torch and JAX compute the same function, its gradients are right, and bad sizes
are refused with the argument named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from implicit_layers.jax.fixed_points.conv_cell import conv_deq_cell, conv_deq_cell_init
from implicit_layers.torch.fixed_points.conv_cell import ConvDEQCell

jax.config.update("jax_enable_x64", True)

SHAPE = (2, 4, 3, 3)  # batch, channels, height, width: small, for a float64 gradcheck of every weight


def torch_cell(seed=0):
    """A float64 cell with non-trivial normalization weights, so scale and offset are checked too."""
    torch.manual_seed(seed)
    cell = ConvDEQCell(4, 6, groups=2).double()
    with torch.no_grad():
        for k in (1, 2, 3):
            norm = getattr(cell, f"norm{k}")
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return cell


def params_of(cell, gradients=False):
    """The torch cell's weights (or their gradients) as the JAX cell's params dict."""
    params = {"conv1": cell.conv1.weight, "conv2": cell.conv2.weight}
    for k in (1, 2, 3):
        norm = getattr(cell, f"norm{k}")
        params[f"norm{k}_scale"], params[f"norm{k}_offset"] = norm.weight, norm.bias
    return {name: jnp.asarray((value.grad if gradients else value).detach().numpy()) for name, value in params.items()}


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*SHAPE, generator=generator, dtype=torch.float64) for _ in range(2))


def test_torch_and_jax_cells_agree_on_the_same_weights():
    cell = torch_cell()
    z, x = inputs()
    expected = cell(z, x).detach().numpy()
    got = conv_deq_cell(jnp.asarray(z.numpy()), jnp.asarray(x.numpy()), params_of(cell), groups=2)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)
    # The last group normalization leaves each group of each sample with zero mean and unit variance before
    # its scale and offset: a property of the output, not only of agreement between the two.
    scale, offset = cell.norm3.weight.detach().numpy(), cell.norm3.bias.detach().numpy()
    unscaled = ((expected - offset[:, None, None]) / scale[:, None, None]).reshape(SHAPE[0], 2, -1)
    np.testing.assert_allclose(unscaled.mean(axis=2), 0, atol=1e-12)
    np.testing.assert_allclose(unscaled.var(axis=2), 1, atol=1e-3)  # 1 - eps / variance


def test_torch_and_jax_gradients_agree():
    cell = torch_cell()
    z, x = inputs()
    z.requires_grad_(True)
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (cell(z, x) * weights).sum().backward()
    params = params_of(cell)

    def loss(z, params):
        return (conv_deq_cell(z, jnp.asarray(x.numpy()), params, groups=2) * jnp.asarray(weights.numpy())).sum()

    dz, dparams = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(z.detach().numpy()), params)
    # Equal to torch's gradients, which the float64 gradcheck below checks against finite differences.
    np.testing.assert_allclose(np.asarray(dz), z.grad.numpy(), rtol=0, atol=1e-12)
    torch_gradients = {name: np.asarray(value) for name, value in params_of(cell, gradients=True).items()}
    for name, value in dparams.items():
        np.testing.assert_allclose(np.asarray(value), torch_gradients[name], rtol=0, atol=1e-12, err_msg=name)


def test_torch_cell_gradcheck():
    cell = torch_cell()
    z, x = inputs()
    z.requires_grad_(True)
    x.requires_grad_(True)
    names = [name for name, _ in cell.named_parameters()]

    def apply(z, x, *weights):
        return torch.func.functional_call(cell, dict(zip(names, weights)), (z, x))

    weights = tuple(p.detach().clone().requires_grad_(True) for p in cell.parameters())
    assert torch.autograd.gradcheck(apply, (z, x, *weights), fast_mode=True)


def test_jax_cell_jits_vmaps_and_initializes_like_torch():
    params = conv_deq_cell_init(jax.random.key(0), 8, 16, groups=4)
    assert params["conv1"].shape == (16, 8, 3, 3) and params["conv2"].shape == (8, 16, 3, 3)
    assert params["norm1_scale"].shape == (16,) and params["norm3_offset"].shape == (8,)
    # torch's default draw for a conv: uniform in +-1/sqrt(fan_in)
    assert float(jnp.abs(params["conv1"]).max()) <= 1 / np.sqrt(8 * 9)
    assert float(jnp.abs(params["conv1"]).max()) > 0.9 / np.sqrt(8 * 9)
    # vmap over an extra leading axis equals the cell on the batches laid end to end, both under jit
    z, x = jax.random.normal(jax.random.key(1), (2, 2, 3, 8, 4, 4))
    mapped = jax.jit(jax.vmap(conv_deq_cell, in_axes=(0, 0, None)))(z, x, params)
    flat = jax.jit(conv_deq_cell)(z.reshape(6, 8, 4, 4), x.reshape(6, 8, 4, 4), params)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(flat).reshape(mapped.shape), atol=1e-12)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(channels=6, inner_channels=8, groups=4), "channels must be divisible by groups"),
        (dict(channels=8, inner_channels=6, groups=4), "inner_channels must be divisible by groups"),
        (dict(channels=8, inner_channels=8, groups=0), "groups must be a positive integer"),
        (dict(channels=0, inner_channels=8, groups=4), "channels must be a positive integer"),
    ],
)
def test_bad_sizes_name_the_argument(sizes, message):
    with pytest.raises(ValueError, match=message):
        ConvDEQCell(**sizes)
    with pytest.raises(ValueError, match=message):
        conv_deq_cell_init(jax.random.key(0), **sizes)


def test_bad_shapes_name_the_argument():
    cell = ConvDEQCell(8, 16)
    params = conv_deq_cell_init(jax.random.key(0), 8, 16)
    z = torch.zeros(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8, H, W\)"):
        cell(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="x must have z's shape"):
        cell(z, torch.zeros(2, 8, 4, 5))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8, H, W\)"):
        conv_deq_cell(jnp.zeros((2, 4, 4, 4)), jnp.zeros((2, 4, 4, 4)), params)
    with pytest.raises(ValueError, match="x must have z's shape"):
        conv_deq_cell(jnp.zeros((2, 8, 4, 4)), jnp.zeros((2, 8, 4, 5)), params)
    with pytest.raises(ValueError, match="channels must be divisible by groups"):
        conv_deq_cell(jnp.zeros((2, 8, 4, 4)), jnp.zeros((2, 8, 4, 4)), params, groups=3)
