"""torchao's quantization API, imported without the notices torchao logs on a CPU machine.

Importing torchao logs that its CUDA-only extensions (mxfp8, cutlass) did not load and that Triton
is absent, and its enums make torch log a deprecation: four lines of a library's housekeeping in a
user's terminal on every `lmforge compress quantize` or int8 `eval`, none about their run. Every
lmforge module that needs torchao imports it through `torchao_quantization()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from lmforge.compress.errors import CompressError

# The loggers torchao's import writes to: its own (extensions, Triton) and torch's pytree (enums).
IMPORT_NOTICE_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def loggers_silenced(names: tuple[str, ...]) -> Iterator[None]:
    """Only errors from `names` while inside; their levels are put back after."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_quantization() -> ModuleType:
    """`torchao.quantization`, imported quietly; a CompressError saying how to install it if absent."""
    try:
        with loggers_silenced(IMPORT_NOTICE_LOGGERS):
            import torchao.quantization
    except ImportError as e:
        raise CompressError(f"quantization needs torchao ({e.__class__.__name__}: {e}); install it with "
                            "pip install -e '.[quant]'") from None
    return torchao.quantization
