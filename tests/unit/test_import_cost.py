"""What a process that trains or loads a model imports: not torch's compiler or pipelining,
unless it compiles or pipelines. Each costs ~0.7 s per process on a 2-core CPU, paid by every
CLI command, every torchrun rank and every test that starts one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.models.common.eager import eager_under_compile
from lmforge.parallel.pp import SCHEDULES, schedule_class

HEAVY = ("torch._dynamo", "torch.distributed.pipelining")


def test_importing_the_trainer_and_the_cli_loads_neither_the_compiler_nor_pipelining() -> None:
    code = ("import sys, lmforge.cli, lmforge.train.trainer, lmforge.models.llama, lmforge.train.evaluate; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_schedule_name_resolves_to_torchs_schedule_class() -> None:
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

    for name, cls_name in SCHEDULES.items():
        cls = schedule_class(name)
        assert cls.__name__ == cls_name and issubclass(cls, (PipelineScheduleSingle, PipelineScheduleMulti))


def _graphs_and_calls(decorate) -> tuple[int, list[int], list[torch.Tensor]]:
    """Compile a function around a data-dependent call made eager by `decorate`; run it on 6
    inputs. -> (graphs dynamo compiled, the values the eager call saw, the outputs)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    seen: list[int] = []

    @decorate
    def host_side(x: torch.Tensor) -> torch.Tensor:
        seen.append(int(x.sum()))  # a host sync and Python state: must run eagerly every call
        return x * 2

    def f(x: torch.Tensor) -> torch.Tensor:
        return host_side(x.sin() + 1).cos() - 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, backend="eager")
    outs = [compiled(torch.full((3,), float(i))) for i in range(6)]
    return counters["stats"]["unique_graphs"], seen, outs


@pytest.mark.parametrize("decorate", [eager_under_compile, torch.compiler.disable], ids=["lazy", "decorator"])
def test_eager_under_compile_runs_the_function_eagerly_on_every_call(decorate) -> None:
    graphs, seen, outs = _graphs_and_calls(decorate)
    expected = [(torch.full((3,), float(i)).sin() + 1).mul(2).cos() - 1 for i in range(6)]
    assert seen == [int((torch.full((3,), float(i)).sin() + 1).sum()) for i in range(6)]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want)
    assert graphs == 2  # before and after the eager call; no recompile per call


def test_eager_under_compile_is_the_plain_function_outside_compile() -> None:
    calls: list[int] = []

    @eager_under_compile
    def f(x: int) -> int:
        calls.append(x)
        return x + 1

    assert f(2) == 3 and calls == [2] and f.__name__ == "f"
