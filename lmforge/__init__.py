"""lmforge: train, evaluate, compress and serve LLMs with PyTorch-native parallelism."""

__version__ = "0.1.0"
