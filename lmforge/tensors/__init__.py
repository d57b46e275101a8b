"""Tensor-level primitives every layer shares, written once: dtype names (dtypes.py), the
DTensor-or-plain helpers (dtensor.py) and which dtypes the CPU multiplies natively
(cpu_features.py). Imports nothing of lmforge, so anything may import it."""
