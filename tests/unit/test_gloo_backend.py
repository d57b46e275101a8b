"""The tensor-parallel groups of a CPU run use gloo with one worker thread (lmforge.parallel.gloo):
torch 2.13's gloo corrupts the heap when two functional all-gathers run on its threads at once,
which DTensor's tensor parallelism does. The crash itself is a matter of chance
(scripts/gloo_funcol_check.py shows it); what is checked here is which groups get the one thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from lmforge.config import ParallelConfig
from lmforge.parallel.gloo import GLOO_ONE_THREAD, mesh_backend_override
from lmforge.parallel.mesh import (
    EP_MESH_DIMS,
    MESH_DIMS,
    DistInfo,
    build_mesh,
    init_distributed,
    shutdown_distributed,
)


def _worker_threads(group: dist.ProcessGroup) -> int:
    return group._get_backend(torch.device("cpu")).options._threads


@pytest.fixture
def one_rank_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistInfo]:
    """The default group as a single-process run starts it (gloo, an in-process store)."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(ParallelConfig(), "cpu")
    yield info
    shutdown_distributed(barrier=False)
    assert not dist.is_initialized()


def test_only_the_tp_group_has_one_gloo_worker_thread(one_rank_run: DistInfo) -> None:
    mesh = build_mesh(one_rank_run, ParallelConfig())
    threads = {d: _worker_threads(mesh.world[d].get_group()) for d in MESH_DIMS}
    assert threads == {"pp": 2, "dp_replicate": 2, "dp_shard": 2, "tp": 1}  # 2: torch's default
    assert _worker_threads(dist.group.WORLD) == 2 and _worker_threads(mesh.flat["dp"].get_group()) == 2
    backends = {d: dist.get_backend(mesh.world[d].get_group()) for d in MESH_DIMS}
    assert backends == {"pp": "gloo", "dp_replicate": "gloo", "dp_shard": "gloo", "tp": GLOO_ONE_THREAD}


def test_the_override_covers_the_expert_mesh_and_leaves_gpus_alone(one_rank_run: DistInfo) -> None:
    assert mesh_backend_override("cpu", EP_MESH_DIMS) == {"tp": GLOO_ONE_THREAD}
    assert mesh_backend_override("cuda", EP_MESH_DIMS) == {}
    assert mesh_backend_override("cpu", ("dp_shard",)) == {}
