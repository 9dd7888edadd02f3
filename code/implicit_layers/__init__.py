"""Batched solvers for implicit layers, with implicit gradients, in PyTorch and JAX."""

__version__ = "0.1.0"
