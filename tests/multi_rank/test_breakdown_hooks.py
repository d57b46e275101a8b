"""The breakdown under a comm hook that blocks: a compressor that reduces inside the hook call (as
an all-gather of int8 payloads does) stalls backward before the last gradient is ready, so the
end-of-backward wait alone would count it as compute. Registered through
`StepBreakdown.wrap_comm_hook`, its time is exposed communication. 2 gloo ranks, DDP; the hook
sleeps SLOW_S per bucket besides reducing (a slow link)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.observability.breakdown import GradReadyClock, StepBreakdown
from tests.helpers.spawn import run_ranks

SLOW_S, STEPS = 0.05, 3


def blocking_hook(state, bucket):  # noqa: ANN001, ANN201 - DDP checks the annotations
    state.append(1)  # count the calls
    buf = bucket.buffer()
    buf.div_(dist.get_world_size())
    dist.all_reduce(buf)  # inside the call: backward waits for it
    time.sleep(SLOW_S)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _rank(rank: int, world: int) -> dict[str, tuple[float, float]]:
    out = {}
    for wrapped in (False, True):
        torch.manual_seed(0)
        # small buckets: several hook calls per backward, all but the last before the final gradient
        model = DDP(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]), bucket_cap_mb=0.01)
        bd = StepBreakdown(torch.device("cpu"), GradReadyClock(model.parameters()))
        calls: list[int] = []
        model.register_comm_hook(calls, bd.wrap_comm_hook(blocking_hook) if wrapped else blocking_hook)
        for _ in range(STEPS):
            with bd.forward_backward(sync=True):
                model(torch.randn(8, 64)).sum().backward()
            bd.step_done()
        b = bd.window()
        out["wrapped" if wrapped else "plain"] = (b.parts["compute"], b.parts["comm_exposed"], len(calls) // STEPS)
    return out


@pytest.mark.timed
def test_blocking_hook_time_is_exposed_communication(tmp_path: Path) -> None:
    for res in run_ranks(_rank, 2, tmp_path):
        compute, comm, buckets = res["wrapped"]
        assert buckets >= 2, res
        assert comm >= STEPS * buckets * SLOW_S, res  # every bucket's stall
        assert compute < STEPS * SLOW_S, res  # the model is tiny: its compute is milliseconds
        plain_compute, plain_comm, _ = res["plain"]
        # without the wrapper all but the last bucket's stall hides in compute
        assert plain_compute >= STEPS * (buckets - 1) * SLOW_S and plain_comm < comm, res
