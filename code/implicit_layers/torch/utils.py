"""Device choice, seeding and the memory measures used throughout the book."""

from __future__ import annotations

import os
import random
import weakref
from typing import Any, Callable

import numpy as np
import torch

DEVICE_ENV_VAR = "IMPLICIT_LAYERS_DEVICE"


def default_device() -> torch.device:
    """The device every chapter computes on: CUDA when present, else the CPU.

    The environment variable ``IMPLICIT_LAYERS_DEVICE`` (for example ``cpu``) overrides the choice.
    """
    requested = os.environ.get(DEVICE_ENV_VAR)
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autograd_graph_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and measure the bytes of the tensors its autograd graph holds for the backward pass.

    Every tensor autograd saves while ``fn`` runs is tracked; those still alive when ``fn`` returns (parts of
    the graph that nothing refers to any more have been freed by reference counting) are counted, once per storage, whichever device they
    live on. This is the memory a backward pass of ``fn``'s output keeps alive, so it compares gradient
    methods on a CPU as well as on a GPU. It includes tensors that exist anyway, such as weights saved by a
    matrix product.

    Parameters
    ----------
    fn : callable
        Takes no argument; runs the forward computation to be measured.

    Returns
    -------
    output : Any
        What ``fn`` returned.
    nbytes : int
        Bytes of the distinct storages saved for backward while ``fn`` ran and still held when it returned.
    """
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    storages = {}
    for reference in saved:
        tensor = reference()
        # Forward-mode AD (Newton's Jacobian) saves symbolic zeros, which own no memory and have no storage.
        if tensor is not None and not tensor._is_zerotensor():
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return output, sum(storages.values())


_measuring_peak = False


def peak_memory_bytes(fn: Callable[[], Any], *, device: Any = None) -> tuple[Any, int]:
    """Run ``fn()`` and measure the peak of the bytes PyTorch allocated on ``device`` while it ran, above what
    was allocated when it started.

    Pass a closure that runs the whole computation to be measured, forward pass and backward pass: this counts
    everything the two allocate, the working memory of the backward pass included (the Jacobians of a Newton
    solve, the Krylov basis of GMRES), which :func:`autograd_graph_bytes` does not see.

    What is counted: tensor storages allocated through PyTorch's allocator for ``device`` while ``fn`` runs,
    whoever holds them, including temporaries freed inside an operation. Not counted: Python objects, memory
    that libraries allocate by themselves (BLAS and LAPACK workspaces), JAX/XLA buffers, and other devices. A
    tensor that existed before ``fn`` ran and is freed during it lowers the level on CUDA; on the CPU the
    profiler does not know its size (PyTorch says so once, on stderr) and it does not, so the CPU figure is
    then an upper bound.

    On CUDA the allocator's own counters are read (``torch.cuda.reset_peak_memory_stats`` and
    ``torch.cuda.max_memory_allocated``), which count the caching allocator's blocks (sizes rounded up to
    multiples of 512 bytes). PyTorch keeps no such counter for the CPU, so there ``fn`` runs under
    ``torch.profiler`` with ``profile_memory=True`` and the allocation and free events it records are replayed
    in order, the running total's maximum being the peak: exact, at the cost of the profiler's per-operation
    overhead (a Newton forward and backward pass through :func:`fixed_point`, batch 32, 64 states, took 25% to
    30% longer under it on a 2-core CPU), so time nothing inside it.

    Parameters
    ----------
    fn : callable
        Takes no argument; runs the computation to be measured.
    device : torch.device or str, optional
        ``"cpu"`` or a CUDA device; by default :func:`default_device`.

    Returns
    -------
    output : Any
        What ``fn`` returned.
    nbytes : int
        The highest number of bytes allocated at any moment while ``fn`` ran, minus those allocated when it
        started (0 if ``fn`` never rose above its starting level).

    Raises
    ------
    RuntimeError
        When called inside another ``peak_memory_bytes`` or while a ``torch.profiler`` session is running:
        either would corrupt the other's measurement.
    """
    global _measuring_peak
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no argument, got {type(fn).__name__}")
    device = default_device() if device is None else torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be the CPU or a CUDA device, got {device}")
    if _measuring_peak or torch._C._autograd._profiler_enabled():
        raise RuntimeError(
            "peak_memory_bytes cannot run inside another peak_memory_bytes call or a torch.profiler session: "
            "measure the outer computation only"
        )
    _measuring_peak = True
    try:
        if device.type == "cuda":
            return _cuda_peak(fn, device)
        return _cpu_peak(fn)
    finally:
        _measuring_peak = False


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    output = fn()
    torch.cuda.synchronize(device)
    return output, max(torch.cuda.max_memory_allocated(device) - start, 0)


def _cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    # Kineto, the profiler's backend, prints a line to the process's stderr when a session starts and stops,
    # which a notebook shows as output; level 6 silences it. It is read when Kineto first starts, and a value
    # the user set is left alone.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as session:
        output = fn()
    # "[memory]" events carry the signed size of each allocation (+) or free (-), in the order they happened.
    events = [
        event
        for event in session.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda event: event.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return output, peak
