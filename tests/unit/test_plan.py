"""The planner's units: cluster files (presets load, bad files are one line), the parameter
inventory against the family's count, the memory model against an in-process measurement, the
time model's collectives, and the search's validity oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.config import JobConfig
from lmforge.config.job import load_job_config
from lmforge.plan.cluster import ClusterError, load_cluster, preset_names
from lmforge.plan.params import total_params
from lmforge.plan.predict import predict
from lmforge.plan.search import layouts, search
from lmforge.plan.timing import reduce_scatter, ring_allreduce

REPO = Path(__file__).resolve().parents[2]


def test_presets_load_with_their_datasheet_figures() -> None:
    assert {"cpu", "a100", "h100", "h200", "b200"} <= set(preset_names())
    h100 = load_cluster("h100")
    assert h100.accelerator.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.accelerator.peak_flops("fp8") == pytest.approx(1978.9e12)
    assert load_cluster("a100").accelerator.peak_flops("fp8") == pytest.approx(312e12)  # no fp8: bf16
    assert load_cluster("h200").accelerator.memory_bytes == 141 * 2**30
    assert load_cluster("h100", nodes=4).world_size == 32
    assert h100.link(8, 1) is h100.intra and h100.link(2, 8) is h100.inter


_GOOD = ("name='x'\ndevices_per_node=8\n[accelerator]\nname='a'\npeak_bf16_tflops=1\npeak_fp32_tflops=1\n"
         "memory_gib=1\nhbm_gbps=1\npower_w=1\n[intra_node]\nbandwidth_gbps=1\nlatency_us=1\n[inter_node]\n"
         "bandwidth_gbps=1\nlatency_us=1\n")


@pytest.mark.parametrize("text, message", [
    ("name = 'x'", "missing table [accelerator]"),
    ("name = [", "not valid TOML"),
    (_GOOD.replace("peak_bf16_tflops=1", "peak_bf16_tflops=-1"), "peak_bf16_tflops = -1.0: must be a finite number > 0"),
    ("name='x'\ndevices_per_node=8\nbogus=1\n", "unknown key 'bogus'"),
    *[(_GOOD + f"[efficiency]\n{line}\n", message) for line, message in [
        ("attention_max = 1.5", "efficiency.attention_max = 1.5: must be in [0, 1] (a fraction)"),
        ("attention_max = 0", "efficiency.attention_max = 0.0: must be a finite number > 0"),
        ("activation_passes = -2", "efficiency.activation_passes = -2.0: must be a finite number > 0 (or 0)"),
        ("attention_half_gflop = 'x'", "efficiency.attention_half_gflop = 'x': must be a float")]],
])
def test_bad_cluster_files_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ClusterError) as err:
        load_cluster(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ClusterError, match="no such file and no such preset"):
        load_cluster("nonexistent-preset")


def test_parameter_inventory_equals_the_family_count() -> None:
    from lmforge.models.registry import FAMILIES

    for fam in FAMILIES.values():
        for cfg in fam.sizes.values():
            assert total_params(cfg) == fam.count_params(cfg)["total"]


def _measure_single(job: JobConfig) -> dict[str, int]:
    """What the trainer writes for one rank: parameters, gradients, AdamW state after a step and
    the activations of one micro-batch, measured with the trainer's own meter."""
    import torch

    from lmforge.models.common.cross_entropy import cross_entropy
    from lmforge.models.common.sparse_attention import document_starts
    from lmforge.models.llama.model import build_model
    from lmforge.observability.memory import ActivationMeter, model_state_bytes

    torch.manual_seed(0)
    model = build_model(job.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, s = job.train.micro_batch_size, job.train.seq_len
    x = torch.randint(1, job.model.vocab_size, (b, s + 1))
    x[:, ::37] = 0  # document boundaries (end-of-text id 0)
    meter = ActivationMeter([model])
    with meter.measure():
        cross_entropy(model(x[:, :-1], doc_start=document_starts(x[:, :-1], 0)), x[:, 1:]).backward()
    opt.step()
    return {**model_state_bytes([model], opt), "activations": meter.bytes}


@pytest.mark.parametrize("overrides", [
    [("model.dim", "64"), ("model.n_layers", "2"), ("model.vocab_size", "512"), ("train.seq_len", "64"),
     ("train.micro_batch_size", "2"), ("train.global_batch_size", "2"), ("tokenizer.vocab_size", "512")],
    [("model.dim", "64"), ("model.n_layers", "3"), ("model.vocab_size", "512"), ("train.seq_len", "300"),
     ("model.n_kv_heads", "2"), ("train.micro_batch_size", "1"), ("train.global_batch_size", "1"),
     ("model.max_seq_len", "512"), ("tokenizer.vocab_size", "512")],
])
@pytest.mark.parametrize("recipe", ["tiny-dense", "tiny-moe"])
def test_memory_model_equals_the_meter_in_process(recipe: str, overrides: list[tuple[str, str]]) -> None:
    """One process, exactly as the trainer measures (in-process, no launcher): within 2 %."""
    import torch

    from lmforge.plan.memory import predict_memory

    torch.set_num_threads(1)
    job = load_job_config(str(REPO / "recipes" / f"{recipe}.toml"), overrides)
    job.train.mixed_precision = "fp32"
    measured = _measure_single(job)
    pred = predict_memory(job, 1, "fp32", on_cpu=True)
    for key in ("params", "grads", "optimizer"):
        assert getattr(pred, key) == measured[key], key
    assert pred.activations == pytest.approx(measured["activations"], rel=0.02)


def test_time_model_counts_the_silu_output_swiglu_writes_but_does_not_keep() -> None:
    """silu_mul keeps gate, up and the product for backward, but silu(gate) is still written (in
    forward, and again in backward's recompute): the memory model leaves it out, the time model's
    memory passes keep it, one (tokens x ffn_hidden) tensor per dense block."""
    from lmforge.plan.memory import SWIGLU_PRODUCED, SWIGLU_SAVED, activation_bytes

    job = load_job_config(str(REPO / "recipes" / "tiny-dense.toml"), [("train.activation_checkpointing", "none")])
    r, m, micro = job.parallel.resolved(1), job.model, job.train.micro_batch_size
    saved = activation_bytes(job, r, 0, micro, 4, True)
    written = activation_bytes(job, r, 0, micro, 4, True, checkpointing=False)
    assert (SWIGLU_SAVED, SWIGLU_PRODUCED) == (3, 4)
    assert written - saved == m.n_layers * m.ffn_hidden_size * 4 * micro * job.train.seq_len


def test_collective_formulas() -> None:
    from lmforge.plan.cluster import Link

    link = Link(bytes_per_s=1e9, latency_s=1e-5)
    # ring all-reduce of 1 GB over 4 ranks: 2 * 3 * (lat + 0.25 s)
    assert ring_allreduce(1e9, 4, link) == pytest.approx(6 * (1e-5 + 0.25))
    assert reduce_scatter(1e9, 4, link) == pytest.approx(3 * (1e-5 + 0.25))
    assert ring_allreduce(1e9, 1, link) == 0.0
    # tiny messages: the tree's 2 log2(n) latencies beat the ring's 2 (n - 1)
    assert ring_allreduce(8, 64, link) == pytest.approx(2 * 6 * (1e-5 + 8e-9))


def test_compression_and_hierarchy_cut_dp_time() -> None:
    base = load_job_config(str(REPO / "recipes" / "tiny-dense.toml"),
                           [("parallel.dp_replicate", "16"), ("parallel.dp_shard", "1"), ("model.dim", "2048"),
                            ("model.n_heads", "16"), ("model.n_layers", "8"),
                            ("train.global_batch_size", "16"), ("train.micro_batch_size", "1")], world_size=16)
    cluster = load_cluster("h100", nodes=2)
    plain = predict(base, cluster, 16).step_time.dp_comm
    int8 = predict(replace(base, comm=replace(base.comm, compression="int8")), cluster, 16).step_time.dp_comm
    hier = predict(replace(base, comm=replace(base.comm, hierarchical=True)), cluster, 16).step_time.dp_comm
    assert int8 < 0.4 * plain and hier < plain
    # each rank's AdamW moments before the compression: the same bytes, sent after backward, unhidden
    topk = replace(base.comm, compression="topk")
    hidden = predict(replace(base, comm=topk), cluster, 16).step_time
    local = predict(replace(base, comm=replace(topk, adam_moments="local")), cluster, 16).step_time
    assert local.dp_comm == pytest.approx(hidden.dp_comm, rel=0.5) and local.dp_comm > 0
    assert local.exposed_comm >= hidden.exposed_comm + 0.99 * local.dp_comm


def test_search_yields_only_valid_fitting_layouts_best_first() -> None:
    base = load_job_config(str(REPO / "recipes" / "tiny-moe.toml"), [("train.global_batch_size", "8"),
                                                                     ("train.micro_batch_size", "8")])
    cluster = load_cluster("h100")
    all_layouts = layouts(base, 8)
    for job in all_layouts:
        job.validate(8)  # the oracle accepted every one
    assert any(j.parallel.ep > 1 for j in all_layouts) and any(j.parallel.pp > 1 for j in all_layouts)
    ranked, dropped = search(base, cluster, 8)
    rates = [c.prediction.tokens_per_s for c in ranked]
    assert rates == sorted(rates, reverse=True) and len(ranked) + dropped == len(all_layouts)
    # A model over one device's memory: every fitting layout shards it.
    big = load_job_config(None, [("model.dim", "8192"), ("model.n_layers", "80"), ("model.n_heads", "64"),
                                 ("model.n_kv_heads", "8"), ("model.vocab_size", "128256"),
                                 ("tokenizer.vocab_size", "8192"), ("train.seq_len", "2048"),
                                 ("train.global_batch_size", "8"), ("train.micro_batch_size", "1")])
    ranked, dropped = search(big, cluster, 8)
    assert dropped > 0 and all(c.prediction.memory.total <= cluster.accelerator.memory_bytes for c in ranked)
    assert all(c.job.parallel.dp_shard * c.job.parallel.tp * c.job.parallel.pp > 1 for c in ranked)
