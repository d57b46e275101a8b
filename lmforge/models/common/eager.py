"""`torch.compiler.disable` without importing torch._dynamo at module load.

The decorator imports torch._dynamo (~0.7 s on a 2-core CPU) where it is applied, so a module
that uses it makes every process that imports the model pay for the compiler, compiled or not.
`eager_under_compile` defers that to the first call made while torch.compile traces, when
dynamo is loaded anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def eager_under_compile(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` that always runs eagerly: called directly outside torch.compile, and through
    torch.compiler.disable while dynamo traces (a graph break there, as with the decorator; the
    graphs compiled and their count are the same)."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
