"""Time model: seconds of one optimizer step on the slowest rank, by cause.

- compute: training FLOPs (lmforge/observability/flops.py, the one counter: 3 x forward, causal
  pairs exactly) of this rank's share (its pipeline stage's layers / tp), component by component
  (attention projections, scores and values, feed-forward, output) at peak x an efficiency that
  grows with the size of that component's matmul (`Efficiency.of`: small matmuls do not saturate
  the device; attention scores and values on the attention kernel's own curve where the cluster
  file measured one, `Efficiency.of_attention`), plus memory-bound work: `activation_passes` over
  each activation byte the model produces, at the memory bandwidth (3 unless calibrated: written
  in forward, read twice in backward);
- recompute: activation checkpointing runs the checkpointed blocks' forward again (1/3 of their
  training FLOPs and memory passes; "op" recomputes elementwise work only, no matmuls). The
  memory passes count every activation the blocks produce: recomputation moves no fewer bytes;
- optimizer: AdamW reads parameters, gradients and both moments and writes three of them (28
  bytes per local fp32 parameter) at the memory bandwidth;
- overhead: a fixed time per operator (kernel launch, Python dispatch) x operators per step, and
  fixed costs where the cluster file gives them (`Efficiency`: per forward, per forward and per
  block under tp, per FSDP unit, per MoE layer, per MoE layer under ep; `lmforge bench cluster`
  measures them);
- communication from message sizes on the link the group crosses (`Cluster.link`): ring
  all-reduce 2 (n-1) (lat + B / (n bw)), reduce-scatter and all-gather half of that, all-to-all
  (n-1) (lat + B / (n bw)); a tree all-reduce 2 log2(n) (lat + B / bw) where cheaper (small
  messages); a cluster file's measured `[collectives]` table instead, for groups of its size
  inside a node; FSDP gathers and reduces each wrapped unit (block, root) as its own message;
  hierarchical (comm.hierarchical): reduce-scatter inside nodes, all-reduce across
  nodes of 1/devices_per_node of the bytes, all-gather inside. Gradient compression
  (comm.compression) scales the data-parallel bytes (bf16/fp16 1/2, int8 1/4, int4 1/8 plus one
  fp32 scale per quant_block, topk 2 x fraction: values and indices (compact payload: 1 x),
  powersgd rank x (rows + cols) per matrix);
- TP (and SP) collectives sit on the critical path (exposed); FSDP all-gathers and
  reduce-scatters, DP all-reduces and EP all-to-alls hide behind compute up to the cluster's
  `comm_overlap` fraction (GPUs: copy engines, 1.0; CPU: 0, the same cores do both);
- pipeline bubble: (pp - 1) / (micro-batches x stages per rank) of the compute for 1F1B-like
  and GPipe schedules, a third of that for the zero-bubble ones (zbv, dualpipev, interleaved_zb)."""

from __future__ import annotations

import math

from lmforge.config import JobConfig
from lmforge.config.parallel import ParallelConfig
from lmforge.observability.flops import flops_breakdown
from lmforge.plan.cluster import Cluster, Link
from lmforge.plan.memory import activation_bytes, local_numel, recomputed_bytes, stage_tensors
from lmforge.plan.params import ParamTensor, stage_layers
from lmforge.plan.prediction import StepTime

OPS_PER_BLOCK = 60  # forward + backward operators of one block (measured order of magnitude: ~20 fwd, ~40 bwd)
DDP_BUCKET_BYTES = 25 * 2**20
ZERO_BUBBLE = ("zbv", "dualpipev", "interleaved_zb")


def ring_allreduce(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    ring = 2 * (n - 1) * (link.latency_s + nbytes / (n * link.bytes_per_s))
    tree = 2 * math.ceil(math.log2(n)) * (link.latency_s + nbytes / link.bytes_per_s)
    return link.call_overhead_s + min(ring, tree)


def reduce_scatter(nbytes: float, n: int, link: Link) -> float:
    """Also the time of an all-gather of the same total size."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return link.call_overhead_s + (n - 1) * (link.latency_s + nbytes / (n * link.bytes_per_s))


def all_to_all(nbytes: float, n: int, link: Link) -> float:
    return reduce_scatter(nbytes, n, link)


_FORMULAS = {"all_reduce": ring_allreduce, "all_gather": reduce_scatter, "reduce_scatter": reduce_scatter,
             "all_to_all": all_to_all}


def collective(kind: str, nbytes: float, n: int, link: Link, cluster: Cluster) -> float:
    """Seconds of one collective: the cluster's measured table where it covers the group (same size,
    inside a node), else the link model."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    table = cluster.collectives
    measured = table.time(kind, nbytes, n) if table is not None and link is cluster.intra else None
    return link.call_overhead_s + measured if measured is not None else _FORMULAS[kind](nbytes, n, link)


def hierarchical_allreduce(nbytes: float, n: int, cluster: Cluster) -> float:
    """Reduce-scatter in the node, all-reduce of the node's share across nodes, all-gather back."""
    per_node = min(n, cluster.devices_per_node)
    nodes = max(1, n // per_node)
    return (2 * reduce_scatter(nbytes, per_node, cluster.intra)
            + ring_allreduce(nbytes / per_node, nodes, cluster.inter))


def compression_ratio(job: JobConfig, matrices: list[tuple[int, int]]) -> float:
    """Bytes sent / fp32 bytes for the data-parallel gradient reduction (comm.compression)."""
    c = job.comm
    if c.compression in ("bf16", "fp16"):
        return 0.5
    if c.compression in ("int8", "int4", "int2"):
        return int(c.compression[3:]) / 32 + 1 / c.quant_block
    if c.compression == "topk":  # 8 bytes a value (fp32 + int32 position), compact 4
        return (1 if c.topk_payload == "compact" else 2) * c.topk_fraction
    if c.compression == "powersgd" and matrices:
        full = sum(a * b for a, b in matrices)
        return sum(min(a * b, c.powersgd_rank * (a + b)) for a, b in matrices) / full
    return 1.0


def _stage_flops_per_token(job: JobConfig, r: ParallelConfig, stage: int,
                           whole: dict[str, float] | None = None) -> dict[str, float]:
    """Training FLOPs per token of one pipeline stage by component (its layers' attention
    projections, attention scores and values, feed-forward; the output projection on the last
    stage), from the one FLOP counter (`whole`: its breakdown, when the caller has it already)."""
    m, seq = job.model, job.train.seq_len
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    whole = whole or flops_breakdown(m, seq)
    share = len(stage_layers(m, n_stages, r.pp_layers_per_stage)[stage]) / m.n_layers  # equal blocks
    out = {k: 3.0 * whole[k] * share for k in ("attention_projections", "attention_scores_and_values", "ffn")}
    out["output"] = 3.0 * whole["output"] if stage == n_stages - 1 else 0.0
    return out


def _matmul_sizes(job: JobConfig, r: ParallelConfig, tokens: int) -> dict[str, float]:
    """FLOPs of one typical matmul of each component in one forward of `tokens` tokens on one
    rank: what the efficiency curve is keyed to (small matmuls run further from the peak)."""
    m = job.model
    ffn_width = m.ffn_hidden_size
    ffn_tokens = tokens
    if m.moe.n_experts:  # routed experts see tokens * top_k / n_experts tokens each
        ffn_width, ffn_tokens = m.expert_hidden_size, max(1, tokens * m.moe.top_k // m.moe.n_experts)
    return {"attention_projections": 2.0 * tokens * m.dim * m.dim / r.tp,
            "attention_scores_and_values": 2.0 * job.train.seq_len * job.train.seq_len * m.head_dim,
            "ffn": 2.0 * ffn_tokens * m.dim * ffn_width / (1 if m.moe.n_experts else r.tp),
            "output": 2.0 * tokens * m.dim * m.vocab_size / r.tp}


def fsdp_param_bytes(r: ParallelConfig) -> int:
    """Bytes per parameter element FSDP gathers (its param dtype)."""
    return 2 if r.fsdp_param_dtype == "bf16" else 4


def _fsdp_units(tensors: list[ParamTensor], r: ParallelConfig, per_element: int) -> list[float]:
    """Unsharded bytes of each FSDP2 unit of a stage: one per block (its layer's tensors) and the
    root (embedding, final norm, output), each gathered and reduced as one message."""
    by_unit: dict[int | None, float] = {}
    for x in tensors:
        by_unit[x.layer] = by_unit.get(x.layer, 0.0) + local_numel(x, r, False) * per_element
    return list(by_unit.values())


def bubble_fraction(r: ParallelConfig, n_micro: int) -> float:
    """Pipeline idle time over busy time: (pp - 1) / (micro-batches x stages per rank), a third
    of it for the zero-bubble schedules; 0 without pp."""
    if r.pp <= 1:
        return 0.0
    return (r.pp - 1) / (n_micro * r.stages_per_rank) * (1 / 3 if r.pp_schedule in ZERO_BUBBLE else 1.0)


def predict_step_time(job: JobConfig, cluster: Cluster, world_size: int, precision: str = "bf16",
                      on_cpu: bool = False) -> StepTime:
    """Seconds of one optimizer step (the slowest pipeline rank) of `job` on `world_size` ranks."""
    r = job.parallel.resolved(world_size)
    m, t = job.model, job.train
    acc, eff = cluster.accelerator, cluster.efficiency
    peak = acc.peak_flops(precision)
    act = 4 if precision == "fp32" else 2
    accum = job.accum_steps(world_size)
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    n_micro = (r.pp_microbatches or n_stages) if r.pp > 1 else 1
    micro = t.micro_batch_size // n_micro  # sequences per forward of one stage
    forwards = accum * n_micro  # forwards per step per stage

    # Ranks of a mesh dimension are `stride` apart (mesh order pp, dp_replicate, dp_shard, tp).
    tp_link = cluster.link(r.tp, 1)
    shard_link = cluster.link(r.dp_shard, r.tp)
    rep_link = cluster.link(r.dp_replicate, r.tp * r.dp_shard)
    pp_link = cluster.link(r.pp, r.tp * r.dp_shard * r.dp_replicate)
    ep_link = cluster.link(r.ep, r.tp)

    whole = flops_breakdown(m, t.seq_len)  # once, not per stage: it walks every layer
    worst: StepTime | None = None
    for pp_rank in range(max(r.pp, 1)):
        stages = [s for s in range(n_stages) if s % max(r.pp, 1) == pp_rank]
        tokens = micro * t.seq_len * forwards
        sizes = _matmul_sizes(job, r, micro * t.seq_len)
        flops = matmul_time = block_matmul_time = 0.0
        for s in stages:
            for k, f in _stage_flops_per_token(job, r, s, whole).items():
                flops += f * tokens / r.tp
                curve = eff.of_attention if k == "attention_scores_and_values" else eff.of
                seconds = f * tokens / r.tp / (peak * curve(sizes[k]))
                matmul_time += seconds
                block_matmul_time += seconds if k != "output" else 0.0
        produced = sum(activation_bytes(job, r, s, micro, act, on_cpu, checkpointing=False)
                       for s in stages) * forwards
        compute = matmul_time + eff.activation_passes * produced / acc.hbm_bytes_per_s
        ac = t.activation_checkpointing
        layers_here = sum(len(stage_layers(m, n_stages, r.pp_layers_per_stage)[s]) for s in stages)
        share = {"full": 1.0, "selective": 1.0 / t.ac_every, "op": 0.0}.get(ac, 0.0)
        # the checkpointed blocks' forward again: a third of their matmuls and of their memory passes
        rerun = sum(recomputed_bytes(job, r, s, micro, act, on_cpu) for s in stages) * forwards
        recompute = share * block_matmul_time / 3 + eff.activation_passes / 3 * rerun / acc.hbm_bytes_per_s
        if ac == "op":  # the forward's passes over the outputs it did not save
            saved = sum(activation_bytes(job, r, s, micro, act, on_cpu) for s in stages) * forwards
            recompute = eff.activation_passes / 3 * (produced - saved) / acc.hbm_bytes_per_s
        tensors = [x for s in stages for x in stage_tensors(job, r, s)]
        local = sum(local_numel(x, r, r.dp_shard > 1) for x in tensors)
        optimizer = 28 * local / acc.hbm_bytes_per_s
        overhead = eff.op_overhead_s * (OPS_PER_BLOCK * layers_here * forwards * (1 + share) + 12 * len(tensors))
        moe_layers = sum(m.is_moe_layer(i) for s in stages for i in stage_layers(m, n_stages, r.pp_layers_per_stage)[s])
        overhead += forwards * (eff.forward_s + (eff.tp_forward_s if r.tp > 1 else 0.0))
        overhead += forwards * (1 + share) * (
            eff.moe_layer_s * moe_layers + (eff.ep_layer_s * moe_layers if r.ep > 1 else 0.0)
            + (eff.tp_block_s * layers_here if r.tp > 1 else 0.0))
        units = _fsdp_units(tensors, r, fsdp_param_bytes(r)) if r.dp_shard > 1 else []
        overhead += forwards * eff.fsdp_unit_s * len(units)

        # TP: with SP two all-gathers and two reduce-scatters per block forward, the same backward;
        # without SP two all-reduces each way. Messages: the block's (micro, seq, dim) activations.
        msg = micro * t.seq_len * m.dim * act
        if r.tp > 1:
            per_block = (2 * (collective("all_gather", msg, r.tp, tp_link, cluster)
                              + collective("reduce_scatter", msg, r.tp, tp_link, cluster)) if r.sequence_parallel
                         else 2 * collective("all_reduce", msg, r.tp, tp_link, cluster))
            tp_comm = 2 * per_block * layers_here * forwards * (1 + share)
        else:
            tp_comm = 0.0
        # FSDP: gather parameters forward and backward, reduce-scatter gradients, every forward.
        dp_comm = 0.0
        if r.dp_shard > 1:
            gathers = 1 if r.fsdp_reshard_after_forward == "never" else 2
            grad_ratio = compression_ratio(job, []) if job.comm.compression in ("bf16", "fp16") else 1.0
            for pbytes in units:
                dp_comm += forwards * (gathers * collective("all_gather", pbytes, r.dp_shard, shard_link, cluster)
                                       + collective("reduce_scatter", pbytes * grad_ratio, r.dp_shard, shard_link,
                                                    cluster))
        after_backward = 0.0  # comm.adam_moments = "local": the updates travel in the optimizer step, unhidden
        if r.dp_replicate > 1:
            matrices = [(x.shape[0], math.prod(x.shape[1:])) for x in tensors if len(x.shape) >= 2]
            rbytes = local * 4 * compression_ratio(job, matrices)
            buckets = max(1, math.ceil(rbytes / DDP_BUCKET_BYTES))
            if job.comm.hierarchical:
                dp_comm += hierarchical_allreduce(rbytes, r.dp_replicate, cluster)
            elif job.comm.adam_moments == "local":
                after_backward = collective("all_reduce", rbytes, r.dp_replicate, rep_link, cluster)
                dp_comm += after_backward
            else:
                dp_comm += buckets * collective("all_reduce", rbytes / buckets, r.dp_replicate, rep_link, cluster)
        # PP: each stage boundary sends the activations forward and their gradient back.
        pp_comm = 0.0
        if r.pp > 1:
            sp = r.tp if (r.tp > 1 and r.sequence_parallel) else 1
            pp_comm = 2 * forwards * len(stages) * (pp_link.time(micro * t.seq_len * m.dim / sp * act)
                                                    + pp_link.call_overhead_s)
        # EP: dispatch and combine all-to-alls per MoE layer, forward and backward.
        ep_comm = 0.0
        if r.ep > 1 and moe_layers:
            a2a = micro * t.seq_len * m.moe.top_k * m.dim * act
            ep_comm = 4 * moe_layers * forwards * collective("all_to_all", a2a, r.ep, ep_link, cluster)
        hideable = dp_comm - after_backward + ep_comm
        exposed = tp_comm + pp_comm + after_backward + max(hideable - eff.comm_overlap * compute, hideable * (1 - eff.comm_overlap))
        busy = compute + recompute
        bubble = busy * bubble_fraction(r, n_micro)
        st = StepTime(compute=compute, recompute=recompute, optimizer=optimizer, overhead=overhead, tp_comm=tp_comm,
                      dp_comm=dp_comm, pp_comm=pp_comm, ep_comm=ep_comm, exposed_comm=exposed, bubble=bubble)
        if worst is None or st.total > worst.total:
            worst = st
    assert worst is not None
    return worst
