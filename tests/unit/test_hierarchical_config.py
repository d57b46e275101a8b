"""comm.hierarchical is checked before any process group: the layouts it cannot run on and a
node_size that does not divide the data-parallel degree are refused in one line each."""

from __future__ import annotations

import pytest

from lmforge.config import load_job_config, parse_override_args
from tests.helpers.config import BASE, check_parallel_rule

DDP4 = ["--train.micro_batch_size", "2", "--parallel.dp_replicate", "4", "--parallel.dp_shard", "1",
        "--comm.hierarchical", "true"]


def test_ddp_layout_with_node_size_dividing_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for node in ("0", "1", "2", "4"):
        cfg = load_job_config(None, parse_override_args(BASE + DDP4 + ["--comm.node_size", node]), world_size=4)
        assert cfg.comm.hierarchical and cfg.comm.node_size == int(node)


@pytest.mark.parametrize(("overrides", "key", "phrase"), [
    (["--comm.node_size", "3"], "comm.node_size", "must divide the data-parallel degree"),
    (["--comm.compression", "int8"], "comm.compression", "must be 'none' with comm.hierarchical"),
])
def test_ddp_layout_refusals(overrides: list[str], key: str, phrase: str) -> None:
    check_parallel_rule("hierarchical", 4, DDP4 + overrides, key, phrase)


def test_node_size_from_local_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # e.g. torchrun --nproc-per-node 3 on 4 dp ranks: refused
    check_parallel_rule("hierarchical", 4, DDP4, "comm.node_size", "(0: LOCAL_WORLD_SIZE)")


def test_fsdp_points_at_hsdp() -> None:
    check_parallel_rule("hierarchical", 4, ["--train.micro_batch_size", "2", "--comm.hierarchical", "true"],
                        "parallel.dp_shard", "use HSDP instead")

