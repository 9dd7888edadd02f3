"""The memory measure of the JAX chapters (the twin of ``implicit_layers.torch.utils``) and their compilation
cache."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional, Union

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


def cache_compilations(directory: Optional[Union[str, os.PathLike]] = None) -> str:
    """Let JAX compile each distinct program once per session, even outside ``jit``.

    A solver called outside ``jax.jit`` (or ``jax.grad`` called on a new function) traces and compiles its loop
    again on every call, because the function it closes over is a new Python object each time; JAX's
    in-memory cache is keyed by that object. JAX's persistent compilation cache is keyed by the compiled
    program instead, so with it a program identical to an earlier one is loaded rather than compiled. This
    turns it on for every program, however quick to compile (JAX's default caches only those taking over a
    second). Call it before the first computation: JAX fixes its cache when it first compiles.

    Parameters
    ----------
    directory : str or Path, optional
        Where the compiled programs are kept; by default a new temporary directory, so nothing outlives the
        session's files in the system's temporary folder and no earlier session's programs are reused.

    Returns
    -------
    str
        The cache directory.
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix="implicit-layers-jax-cache-")
    elif isinstance(directory, (str, os.PathLike)):
        directory = os.fspath(directory)
    else:
        raise TypeError(f"directory must be a path or None, got {type(directory).__name__}")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
