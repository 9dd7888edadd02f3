"""Memory measures: the peak of a whole computation in torch, the compiled footprint in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import implicit_layers.jax as ilj
import implicit_layers.torch as ilt

MIB = 1 << 20


def test_peak_counts_a_freed_temporary_and_what_is_kept():
    def fn():
        temporary = torch.empty(MIB, dtype=torch.uint8)
        del temporary
        return torch.empty(3 * MIB, dtype=torch.uint8)

    kept, peak = ilt.peak_memory_bytes(fn, device="cpu")
    assert kept.numel() == 3 * MIB
    assert peak == 3 * MIB


def test_peak_is_the_highest_level_not_the_sum_of_allocations():
    def fn():
        first = torch.empty(2 * MIB, dtype=torch.uint8)
        second = torch.empty(MIB, dtype=torch.uint8)
        del first, second
        return torch.empty(MIB, dtype=torch.uint8)

    assert ilt.peak_memory_bytes(fn, device="cpu")[1] == 3 * MIB


def test_peak_of_a_forward_and_backward_pass_matches_its_analysis():
    n = 1000
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    incoming = torch.randn(n, dtype=torch.float64)

    def forward_and_backward():
        # exp saves its output for the backward pass (n doubles); the backward pass allocates the gradient
        # incoming * exp(x) (n doubles), which becomes x.grad; nothing else is allocated.
        x.exp().backward(incoming)

    assert ilt.peak_memory_bytes(forward_and_backward, device="cpu")[1] == 2 * n * 8
    # x.grad now exists, so the second backward pass adds a temporary into it: same peak.
    assert ilt.peak_memory_bytes(forward_and_backward, device="cpu")[1] == 2 * n * 8
    torch.testing.assert_close(x.grad, 2 * incoming * x.detach().exp())


def test_peak_of_a_linear_layer_counts_its_output_and_its_weight_gradients():
    layer = torch.nn.Linear(100, 50, dtype=torch.float64)
    inputs, incoming = torch.randn(32, 100, dtype=torch.float64), torch.randn(32, 50, dtype=torch.float64)
    _, peak = ilt.peak_memory_bytes(lambda: layer(inputs).backward(incoming), device="cpu")
    assert peak == (32 * 50 + 50 * 100 + 50) * 8  # output, weight gradient, bias gradient


def test_peak_sees_the_newton_backward_jacobians_that_graph_bytes_miss():
    batch, n = 4, 30
    weight = (0.5 * torch.randn(n, n) / n**0.5).requires_grad_()
    x = torch.randn(batch, n)

    def loss():
        z, _ = ilt.fixed_point(lambda z: torch.tanh(z @ weight.T + x), torch.zeros(batch, n), backward_solver="newton")
        return z.sum()

    output, graph_bytes = ilt.autograd_graph_bytes(loss)
    _, peak = ilt.peak_memory_bytes(lambda: loss().backward(), device="cpu")
    jacobians = batch * n * n * 4
    assert graph_bytes < jacobians
    assert peak >= jacobians


def test_nothing_allocated_gives_zero_and_older_tensors_freed_do_not_count_on_the_cpu():
    pool = [torch.empty(4 * MIB, dtype=torch.uint8) for _ in range(2)]

    def free_more_than_allocated():
        pool.pop()
        return torch.empty(MIB, dtype=torch.uint8)

    assert ilt.peak_memory_bytes(lambda: None, device="cpu") == (None, 0)
    assert ilt.peak_memory_bytes(lambda: pool.pop(), device="cpu")[1] == 0
    # The profiler never saw the freed block allocated, so the level does not drop below the start: the
    # documented upper bound (CUDA would report 0 here).
    assert ilt.peak_memory_bytes(free_more_than_allocated, device="cpu")[1] == MIB


def test_nested_measurements_are_refused_and_the_outer_one_recovers():
    def nested():
        return ilt.peak_memory_bytes(lambda: None, device="cpu")

    with pytest.raises(RuntimeError, match="inside another peak_memory_bytes"):
        ilt.peak_memory_bytes(nested, device="cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match="torch.profiler session"):
            ilt.peak_memory_bytes(lambda: None, device="cpu")
    assert ilt.peak_memory_bytes(lambda: torch.empty(MIB, dtype=torch.uint8), device="cpu")[1] == MIB


def test_peak_arguments_are_checked():
    with pytest.raises(TypeError, match="fn must be a callable"):
        ilt.peak_memory_bytes(torch.empty(3))
    with pytest.raises(ValueError, match="device must be the CPU or a CUDA device"):
        ilt.peak_memory_bytes(lambda: None, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_counts_allocator_blocks():
    def fn():
        temporary = torch.empty(MIB, dtype=torch.uint8, device="cuda")
        del temporary
        return torch.empty(3 * MIB, dtype=torch.uint8, device="cuda")

    assert ilt.peak_memory_bytes(fn, device="cuda")[1] == 3 * MIB


def test_compiled_footprint_counts_arguments_outputs_and_temporaries():
    x = jnp.ones((1000,), jnp.float32)
    assert ilj.compiled_memory_bytes(lambda x: 2 * x, x) == 2 * 1000 * 4
    # Donating the argument lets XLA write the output into it: one buffer, counted once.
    donated = jax.jit(lambda x: 2 * x, donate_argnums=0)
    assert ilj.compiled_memory_bytes(donated, x) == 1000 * 4


def test_compiled_footprint_of_an_unrolled_gradient_grows_with_iterations_and_implicit_does_not():
    weight = jnp.asarray(0.5 * np.random.default_rng(0).standard_normal((20, 20)) / 20**0.5)
    x = jnp.ones((8, 20))

    def footprint(backward, iterations):
        def loss(x):
            z, _ = ilj.fixed_point(lambda z, x: jnp.tanh(z @ weight.T + x), jnp.zeros_like(x), x,
                                   solver="forward_iteration", backward=backward, max_iter=iterations, warn=False)
            return z.sum()

        return ilj.compiled_memory_bytes(jax.grad(loss), x)

    assert footprint("unrolled", 80) > footprint("unrolled", 40) + 40 * 8 * 20 * 4
    assert footprint("implicit", 80) == footprint("implicit", 40)


def test_compiled_footprint_arguments_are_checked():
    with pytest.raises(TypeError, match="fn must be a callable"):
        ilj.compiled_memory_bytes(jnp.ones(3))
