"""Memory model: the bytes one rank holds, by cause, from the config alone.

Parameters, gradients and AdamW state are the local shards of `params.param_tensors` under the
layout (tp splits columns or rows, ep splits experts, FSDP splits dim 0 over dp_shard, padded as
FSDP2 pads; pipeline stages hold their layers). Activations are what autograd saves for backward
over one micro-batch, tensor by tensor as this code base's modules save them (measured with
lmforge/observability/memory.py: ActivationMeter, which is what the trainer reports):

- per block: the norms' x_hat and 1/rms (fp32), the normed input the projections read (whole
  sequence: sequence parallelism all-gathers it first), q and k after RoPE, v, the attention
  output and its log-sum-exp, the reshaped output wo reads; SwiGLU's gate, up and
  silu(gate) * up (models/common/mlp.py: silu_mul recomputes silu(gate) in backward); an MoE
  layer's router scores, k copies of the token for each routed expert (gathered input, output,
  weighted output) and the expert SwiGLU's three tensors per copy;
- on CPU with document masks (the default) each block's blocked attention also saves its fp32
  mask, one (rows x keys) tile per 256-query block (keys from 0: the bound when a document
  starts the sequence, exact for the first block);
- the final norm, the logits (vocabulary-sharded under loss parallel), the token ids;
- under FSDP the gathered weights a matmul saves for its backward are counted too (they are
  storages the meter sees; FSDP frees them after backward).

Divided by tp where Megatron's plan shards heads and hidden units, by tp again for the norms
under sequence parallelism; activation checkpointing keeps each checkpointed block's input only.
Pipeline schedules keep several micro-batches in flight (`in_flight`); `temporary` is what FSDP
gathers (two blocks at a time: the running one and the prefetched one), gradient buckets and MoE
all-to-all buffers."""

from __future__ import annotations

import math

from lmforge.config import JobConfig
from lmforge.config.parallel import ParallelConfig
from lmforge.plan.params import ParamTensor, param_tensors, stage_layers
from lmforge.plan.prediction import MemoryBreakdown

F32 = 4
INT64 = 8
DOC_QUERY_BLOCK = 256  # lmforge/models/common/sparse_attention.py: _full_with_docs(Bq=256)
# Hidden-size tensors of one SwiGLU: kept for backward (gate, up, silu(gate) * up: silu_mul keeps
# no silu(gate)), and written (silu(gate) as well, in forward and again in backward's recompute).
SWIGLU_SAVED = 3
SWIGLU_PRODUCED = 4


def local_numel(t: ParamTensor, r: ParallelConfig, fsdp: bool) -> int:
    """Elements of `t` on one rank: tp and ep shards, then FSDP's dim-0 shard padded up (FSDP2
    gives every rank ceil(dim0 / n) rows)."""
    shape = list(t.shape)
    if r.tp > 1 and t.tp == "col":
        shape[0] = math.ceil(shape[0] / r.tp)
    elif r.tp > 1 and t.tp == "row":
        shape[1] = math.ceil(shape[1] / r.tp)
    n_fsdp = r.dp_shard
    if t.expert and r.ep > 1:
        shape[0] //= r.ep
        n_fsdp = r.dp_shard // r.ep
    if fsdp and n_fsdp > 1:
        shape[0] = math.ceil(shape[0] / n_fsdp)
    return math.prod(shape)


def _unsharded_numel(t: ParamTensor, r: ParallelConfig) -> int:
    return local_numel(t, r, fsdp=False)


def stage_tensors(job: JobConfig, r: ParallelConfig, stage: int) -> list[ParamTensor]:
    """The parameter tensors pipeline stage `stage` holds (all of them without pp)."""
    m = job.model
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    if n_stages == 1:
        return param_tensors(m)
    return param_tensors(m, stage_layers(m, n_stages, r.pp_layers_per_stage)[stage], first=stage == 0,
                         last=stage == n_stages - 1)


def _block_activation_bytes(job: JobConfig, r: ParallelConfig, layer: int, seq: int, act: int,
                            on_cpu: bool, produced: bool = False) -> float:
    """Bytes one block saves per token of one sequence (see the module docstring); `produced`:
    the bytes it writes, which differ in SwiGLU's silu(gate) (SWIGLU_PRODUCED)."""
    m = job.model
    d, hd = m.dim, m.head_dim
    tp = r.tp
    sp = tp if (tp > 1 and r.sequence_parallel) else 1
    norm = 2 * ((d / sp + 1 / sp) * F32 + d * act)  # two norms: x_hat + rstd, and their output
    attn = (2 * m.n_heads * hd + 2 * m.kv_heads * hd + m.n_heads * hd) / tp * act + m.n_heads / tp * F32
    if on_cpu and m.attention.doc_mask:
        blocks = [(s, min(seq, s + DOC_QUERY_BLOCK)) for s in range(0, seq, DOC_QUERY_BLOCK)]
        attn += F32 * sum((e - s) * e for s, e in blocks) / seq  # the fp32 masks, per token
    swiglu = SWIGLU_PRODUCED if produced else SWIGLU_SAVED
    if not m.is_moe_layer(layer):
        return norm + attn + swiglu * m.ffn_hidden_size / tp * act
    moe, k, he = m.moe, m.moe.top_k, m.expert_hidden_size
    routed = moe.capacity_factor * k if moe.router == "expert_choice" else k
    # expert parallel: one more token copy per routed assignment (the received tokens reordered for
    # the grouped matmul, which saves them). Fitted to tiny-moe ep2 measured, not read off the code:
    # two while the ep path fell back to the padded bmm, whose padded input was saved as well
    copies = 3 + (1 if r.ep > 1 else 0)
    ffn = (routed * (swiglu * he + copies * d) * act + 2 * moe.n_experts * F32 + routed * (3 * INT64 + 2 * F32)
           + 2 * F32 + swiglu * moe.n_shared_experts * he * act)
    return norm + attn + ffn


def _checkpointed(job: JobConfig, layer: int) -> bool:
    ac = job.train.activation_checkpointing
    return ac == "full" or (ac == "selective" and layer % job.train.ac_every == 0)


def activation_bytes(job: JobConfig, r: ParallelConfig, stage: int, micro_batch: int, act: int,
                     on_cpu: bool, checkpointing: bool = True) -> int:
    """What autograd saves over one forward of `micro_batch` sequences on pipeline stage `stage`
    (`checkpointing=False`: what the blocks produce, as if none were checkpointed; the time model's
    memory traffic, which recomputation does not remove)."""
    m, seq = job.model, job.train.seq_len
    tp = r.tp
    sp = tp if (tp > 1 and r.sequence_parallel) else 1
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    per_token = 0.0
    for layer in stage_layers(m, n_stages, r.pp_layers_per_stage)[stage]:
        if checkpointing and _checkpointed(job, layer):
            per_token += m.dim / sp * act  # the block input
        else:
            block = _block_activation_bytes(job, r, layer, seq, act, on_cpu, produced=not checkpointing)
            if checkpointing and job.train.activation_checkpointing == "op":  # elementwise outputs recomputed
                block *= 0.75
            per_token += block
    if stage == 0:
        per_token += INT64  # the token ids the embedding gathers with
    if stage == n_stages - 1:
        vocab = m.vocab_size / tp if (tp > 1 and r.loss_parallel) else m.vocab_size
        per_token += (m.dim / sp + 1 / sp) * F32 + m.dim * act + vocab * act + F32 + INT64
    rope = 2 * seq * (m.head_dim // 2) * F32
    return int(per_token * micro_batch * seq + rope)


def recomputed_bytes(job: JobConfig, r: ParallelConfig, stage: int, micro_batch: int, act: int,
                     on_cpu: bool) -> float:
    """Activation bytes the checkpointed blocks of stage `stage` produce again in backward (their
    forward rerun) over one forward of `micro_batch` sequences; 0 without full / selective."""
    m, seq = job.model, job.train.seq_len
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    return sum(_block_activation_bytes(job, r, layer, seq, act, on_cpu, produced=True) for layer in
               stage_layers(m, n_stages, r.pp_layers_per_stage)[stage] if _checkpointed(job, layer)) * micro_batch * seq


def in_flight_microbatches(r: ParallelConfig, stage: int, n_micro: int) -> int:
    """Micro-batches whose activations pipeline stage `stage` holds at its peak: all of them for
    GPipe (all forwards first), min(n, pp - rank) for 1F1B-like schedules, and for interleaved /
    V schedules the warm-up depth of each of the rank's stages."""
    if r.pp <= 1:
        return 1
    rank = stage % r.pp
    if r.pp_schedule in ("gpipe", "looped_bfs"):
        return n_micro * (r.stages_per_rank if r.pp_schedule == "looped_bfs" else 1)
    if r.stages_per_rank == 1:
        return min(n_micro, r.pp - rank)
    return min(n_micro * r.stages_per_rank, 2 * (r.pp - rank) + (r.stages_per_rank - 1) * r.pp)


def predict_memory(job: JobConfig, world_size: int, precision: str = "fp32", on_cpu: bool = True,
                   pp_rank: int = 0) -> MemoryBreakdown:
    """Bytes on a rank of pipeline rank `pp_rank` (every rank when pp = 1) for `job` on
    `world_size` ranks. `precision` is the training precision (fp32 keeps fp32 activations; bf16
    / fp16 autocast saves matmul outputs in 2 bytes, norms and softmax statistics stay fp32)."""
    r = job.parallel.resolved(world_size)
    fsdp = r.dp_shard > 1
    act = F32 if precision == "fp32" else 2
    n_stages = r.pp * r.stages_per_rank if r.pp > 1 else 1
    stages = [s for s in range(n_stages) if (s % r.pp if r.pp > 1 else 0) == pp_rank] or [0]
    if r.pp > 1 and r.pp_schedule in ("zbv", "dualpipev"):  # V style: rank r holds r and 2pp-1-r
        stages = [pp_rank, 2 * r.pp - 1 - pp_rank]
    tensors = [t for s in stages for t in stage_tensors(job, r, s)]
    param_dtype = 2 if r.fsdp_param_dtype == "bf16" else F32
    local = sum(local_numel(t, r, fsdp) for t in tensors)
    params = local * F32
    grads = params
    if r.tp > 1 and not fsdp:  # the embedding's gradient is the whole table, not its vocabulary shard
        grads += F32 * sum(t.numel - local_numel(t, r, fsdp) for t in tensors if t.name.startswith("tok_embeddings"))
    optimizer = 2 * params + F32 * len(tensors)  # exp_avg, exp_avg_sq, and one fp32 step per tensor

    n_micro = r.pp_microbatches or (r.pp * r.stages_per_rank) if r.pp > 1 else 1
    micro = job.train.micro_batch_size // n_micro if r.pp > 1 else job.train.micro_batch_size
    acts = 0
    in_flight = 0
    for s in stages:
        one = activation_bytes(job, r, s, micro, act, on_cpu)
        acts += one
        if r.pp > 1:
            in_flight += one * (in_flight_microbatches(r, s, n_micro) - 1)
    saved_weights = temporary = 0
    if fsdp:
        # FSDP2 keeps the root's parameters (embedding, final norm, output) gathered from forward to
        # backward and about two blocks at a time (the running one and the prefetched one); a
        # block's gathered weights are freed after its forward and gathered again for backward.
        blocks: dict[int, int] = {}
        saved: dict[int, int] = {}
        for t in tensors:
            if t.layer is not None:
                blocks[t.layer] = blocks.get(t.layer, 0) + _unsharded_numel(t, r)
                saved[t.layer] = saved.get(t.layer, 0) + (_unsharded_numel(t, r) if t.matmul else 0)
        root = sum(_unsharded_numel(t, r) for t in tensors if t.layer is None)
        root_saved = sum(_unsharded_numel(t, r) for t in tensors if t.layer is None and t.matmul)
        # What the meter counts: the weights matmuls saved at distinct storages (root + two blocks).
        saved_weights = (root_saved + sum(sorted(saved.values(), reverse=True)[:2])) * param_dtype
        # gathered parameters (root + two blocks) and the unsharded gradients of two blocks
        temporary += (root + 2 * sum(sorted(blocks.values(), reverse=True)[:2])) * param_dtype
    elif r.dp_replicate > 1:
        temporary += min(params, 25 * 2**20)  # one DDP bucket in flight
    if job.model.moe.n_experts and r.ep > 1:
        tokens = micro * job.train.seq_len * job.model.moe.top_k
        temporary += 2 * tokens * job.model.dim * act  # all-to-all send + receive buffers
    offloaded = 0
    if r.cpu_offload:
        offloaded = params + grads + optimizer
        params = grads = optimizer = 0
    return MemoryBreakdown(params=params, grads=grads, optimizer=optimizer, activations=acts,
                           in_flight=in_flight, temporary=temporary, offloaded=offloaded,
                           fsdp_saved_weights=saved_weights)
