"""The one error type of ONNX export and of running an exported directory."""

from __future__ import annotations


class OnnxError(ValueError):
    """A model, option, prompt or directory the ONNX export or its runtime cannot handle; the
    message is one line."""
