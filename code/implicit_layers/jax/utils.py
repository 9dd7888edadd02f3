"""The memory measure of the JAX chapters; the twin of ``implicit_layers.torch.utils``."""

from __future__ import annotations

from typing import Any, Callable

import jax


def compiled_memory_bytes(fn: Callable, *args: Any) -> int:
    """The bytes one call of ``fn(*args)``, compiled by XLA, needs on the device: arguments, outputs and
    temporaries.

    ``fn`` is compiled for ``args`` (``jax.jit(fn).lower(*args).compile()``; a function already wrapped in
    ``jax.jit`` is lowered with its own settings, such as donated arguments) and nothing runs. XLA assigns
    every intermediate buffer of the program to slots of one temporary allocation, reusing a slot once its
    buffer is dead, so the total below is what exists on the device during a call: the counterpart of
    :func:`implicit_layers.torch.peak_memory_bytes` for a computation that is compiled as a whole. Pass the
    whole computation, for example ``jax.grad(loss)``, so that the backward pass's working memory is counted.

    Parameters
    ----------
    fn : callable
        The function to compile, or a function already wrapped in ``jax.jit``.
    *args
        Example arguments (arrays or ``jax.ShapeDtypeStruct``), as ``fn`` will be called with.

    Returns
    -------
    int
        ``argument + output + temporary - alias`` bytes of XLA's memory analysis: the argument and output
        buffers, the temporary allocation, less the outputs written into donated arguments (counted once).
        Not counted: the compiled code, host memory and Python objects.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable, got {type(fn).__name__}")
    compiled = fn if hasattr(fn, "lower") else jax.jit(fn)
    analysis = compiled.lower(*args).compile().memory_analysis()
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
