"""Device choice, seeding and a memory measure used throughout the book."""

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
