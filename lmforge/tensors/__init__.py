"""Tensor-level primitives every layer shares, written once: dtype names (dtypes.py) and the
DTensor-or-plain helpers (dtensor.py). Imports nothing of lmforge, so anything may import it."""
