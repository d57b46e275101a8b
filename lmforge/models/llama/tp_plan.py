"""The Llama Transformer's tensor- and sequence-parallel plan (Megatron-style, Shoeybi et al.,
2019; sequence parallelism, Korthikanti et al., 2022), the same as torchtitan's Llama plan. It
lives beside the model because it names the model's modules; `lmforge.parallel.tp.apply_tp`
applies whatever plan a model returns and knows no module names.

- attention wq/wk/wv and feed-forward w1/w3 are column-parallel (each rank owns whole heads /
  hidden units), wo and w2 row-parallel: one all-reduce (or reduce-scatter) per sub-layer;
- with sequence parallelism the residual stream, the norms and the dropout-free elementwise work
  between sub-layers are sharded along the sequence (dim 1); attention and feed-forward all-gather
  the sequence on entry and reduce-scatter it on exit, so activation memory between sub-layers is
  divided by the TP degree at no extra communication volume;
- the token embedding is row-parallel (vocabulary-sharded) and the output projection
  column-parallel; with loss parallelism its logits stay vocabulary-sharded (a DTensor) and the
  cross-entropy runs on the shards, so the (batch, seq, vocab) logits are never gathered;
- an MoE feed-forward is replicated over tp (expert parallelism splits it instead).

Attention reshapes with `view(b, s, -1, head_dim)`, so it runs unchanged on the local heads; the
RoPE tables are buffers and stay plain tensors.

With pipeline parallelism, stages exchange the residual stream as it is between blocks: the plain
local tensor, (batch, seq / tp, dim) under sequence parallelism. The first block of a later stage
takes it as Shard(1) like any other block (its SequenceParallel norm does), and each attention
slices the RoPE tables to the whole sequence it sees after the all-gather, not to the shard the
stage received.

Only torch's parallel styles are used here (a plan is data); nothing of lmforge.parallel.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
)

# Arguments of Attention.forward as TransformerBlock passes them: (x, cos, sin, cache, layer,
# doc_start). Only x is converted; the rest (document starts: the whole sequence) pass untouched.
ATTENTION_ARGS = 6


def tp_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Module path (from the model root) -> parallel style, for `model` as it is: a pipeline stage
    with some of tok_embeddings / norm / output set to None and only its own layers gets the plan
    of what it holds. With `loss_parallel` the output projection returns vocabulary-sharded
    DTensor logits, otherwise plain replicated logits."""
    sp = sequence_parallel
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        # Vocabulary-sharded table: each rank looks up the ids it owns, the partial sums are
        # reduce-scattered along the sequence (SP) or all-reduced.
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                 output_layouts=Shard(1) if sp else Replicate())
    if sp and model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    for name, block in model.layers.items():
        plan |= {f"layers.{name}.{path}": style for path, style in _block_plan(block.is_moe, sp).items()}
    return plan


def _block_plan(moe: bool, sp: bool) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate()),
    }
    if not moe:
        plan |= {
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate()),
        }
    if sp:
        rest = (None,) * (ATTENTION_ARGS - 1)
        plan |= {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                            desired_input_layouts=(Replicate(), *rest)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
        }
        if moe:
            # The MoE is replicated over tp (plain weights): all-gather the sequence and hand it a
            # plain tensor, keep this rank's part of its (identical) output. Backward all-gathers
            # the output gradient: every tp rank computes the same MoE gradients. Without
            # sequence parallelism the MoE needs no plan: its input is already replicated.
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
    return plan
