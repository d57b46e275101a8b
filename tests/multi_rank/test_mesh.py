"""The DeviceMesh of every layout kind on 4 gloo ranks, in-process: the data-parallel and FSDP
meshes hold the right ranks, and building and using them raises no warning (torch deprecates
slicing a flattened dimension back out of the root mesh; lmforge keeps the flattened meshes)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.spawn import run_ranks

LAYOUTS = {
    "hsdp": {"dp_replicate": 2, "dp_shard": 2},
    "ep2-hsdp": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    "ep2": {"dp_shard": 4, "ep": 2},
    "fsdp-x-tp": {"dp_shard": 2, "tp": 2},
    "pp-x-fsdp": {"pp": 2, "dp_shard": 2},
}


def _meshes(rank: int, world: int) -> dict:
    import warnings

    import torch
    import torch.distributed as dist

    from lmforge.config import ParallelConfig
    from lmforge.parallel.mesh import DistInfo, build_mesh

    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"), backend="gloo")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, kw in LAYOUTS.items():
            m = build_mesh(info, ParallelConfig(**kw))
            out[name] = {"dp": dist.get_process_group_ranks(m.dp.get_group()), "fsdp": m.fsdp.mesh.tolist(),
                         "dp_shard": m["dp_shard"].mesh.tolist()}
    return out


def test_meshes_have_the_right_ranks_and_warn_nothing(tmp_path: Path) -> None:
    got = run_ranks(_meshes, 4, tmp_path)
    for rank, meshes in enumerate(got):
        assert meshes["hsdp"] == {"dp": [0, 1, 2, 3], "fsdp": [[0, 1], [2, 3]], "dp_shard": [rank // 2 * 2, rank // 2 * 2 + 1]}
        assert meshes["ep2-hsdp"] == meshes["hsdp"]  # ep borrows from dp_shard: the same data-parallel meshes
        assert meshes["ep2"] == {"dp": [0, 1, 2, 3], "fsdp": [0, 1, 2, 3], "dp_shard": [0, 1, 2, 3]}
        pair = [rank % 2, rank % 2 + 2]  # tp is the innermost dimension
        assert meshes["fsdp-x-tp"] == {"dp": pair, "fsdp": pair, "dp_shard": pair}
        stage = [rank // 2 * 2, rank // 2 * 2 + 1]  # pp is the outermost dimension
        assert meshes["pp-x-fsdp"] == {"dp": stage, "fsdp": stage, "dp_shard": stage}
