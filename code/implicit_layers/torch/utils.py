"""Device choice, seeding and a memory measure used throughout the book."""

from __future__ import annotations

import os
import random
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
    """Run ``fn()`` and measure the bytes of the tensors autograd saves for its backward pass.

    This is the memory a backward pass keeps alive, counted once per storage whichever device it lives on, so
    it compares gradient methods on a CPU as well as on a GPU. It includes tensors that exist anyway, such as
    weights saved by a matrix product.

    Parameters
    ----------
    fn : callable
        Takes no argument; runs the forward computation to be measured.

    Returns
    -------
    output : Any
        What ``fn`` returned.
    nbytes : int
        Bytes of distinct storages saved for backward while ``fn`` ran.
    """
    storages: dict[tuple[torch.device, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    return output, sum(storages.values())
