"""The one error type of `lmforge.compress`: a model, checkpoint or option a compression method
cannot take; the message is one complete line (the CLI prints it and exits 2)."""


class CompressError(ValueError):
    """A source or option that quantization, pruning or distillation cannot handle."""
