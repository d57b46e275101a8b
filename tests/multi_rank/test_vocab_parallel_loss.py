"""lmforge's vocab-parallel cross-entropy (parallel/vocab_parallel_loss.py, what `tp_cross_entropy`
runs on CPU) against F.cross_entropy on the whole logits in fp64: the loss, the gradient of every
shard, an uneven split of the vocabulary, rows in several cache chunks, bf16 logits and a scaled
incoming gradient (gradient accumulation); and how many logits a training step exponentiates."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.spawn import run_ranks

VOCAB = 301  # odd: DTensor splits it 151 / 150 over two ranks
PRELOAD = ("torch", "torch.distributed.tensor", "lmforge.parallel.tp", __name__)


def _worker(rank: int, world: int) -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lmforge.models.common.cross_entropy import chunk_rows
    from lmforge.parallel.gloo import mesh_backend_override
    from lmforge.parallel.tp import tp_cross_entropy
    from lmforge.parallel.vocab_parallel_loss import vocab_parallel_cross_entropy
    from tests.helpers.exponentials import ExponentialCounter

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",),
                            backend_override=mesh_backend_override("cpu", ("tp",)))
    g = torch.Generator().manual_seed(3)
    rows = 2 * chunk_rows(VOCAB // world) + 37  # three chunks per rank, the last one short
    out: dict = {"chunks": -(-2 * (rows // 2 + 1) // chunk_rows(VOCAB // world + 1))}
    for dtype, scale in ((torch.float32, 1.0), (torch.bfloat16, 0.25)):
        full = (torch.randn(2, rows // 2 + 1, VOCAB, generator=g) * 4).to(dtype)
        targets = torch.randint(0, VOCAB, full.shape[:2], generator=g)
        targets[0, :5] = torch.tensor([0, 150, 151, 299, 300])  # both edges of both shards
        ref_logits = full.double().requires_grad_()
        ref = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
        (ref * scale).backward()
        sharded = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_()
        loss = tp_cross_entropy(sharded, targets, loss_parallel=True)
        (loss * scale).backward()
        grad = sharded.grad.full_tensor()
        name = str(dtype).removeprefix("torch.")
        out[name] = {"plain": type(loss) is torch.Tensor, "loss": loss.item(), "ref": ref.item(),
                     "grad_err": (grad.double() - ref_logits.grad).abs().max().item(),
                     "grad_max": ref_logits.grad.abs().max().item(), "grad_dtype": grad.dtype,
                     "local_cols": sharded.grad.to_local().shape[-1]}
        local = sharded.detach().to_local().clone().requires_grad_()
        start = 151 * rank  # DTensor's split of 301 columns: 151 / 150
        with ExponentialCounter() as counter:
            vocab_parallel_cross_entropy(local, targets, start, mesh.get_group()).backward()
        out[name] |= {"exponentiated": counter.elements, "local_logits": local.numel(),
                      "rows": local.numel() // local.shape[-1]}
    return out


def test_vocab_parallel_loss_matches_the_whole_vocabulary(tmp_path: Path) -> None:
    results = run_ranks(_worker, 2, tmp_path, preload=PRELOAD)
    assert [r["float32"]["local_cols"] for r in results] == [151, 150]
    assert results[0]["chunks"] == 3
    for r in results:
        f32, bf16 = r["float32"], r["bfloat16"]
        assert f32["plain"] and bf16["plain"]  # the CPU path, not torch's loss_parallel DTensor
        assert abs(f32["loss"] - f32["ref"]) <= 1e-6 * f32["ref"]
        assert f32["grad_err"] <= 1e-5 * f32["grad_max"]  # fp32 exp of z - lse, |z| up to ~16
        assert f32["grad_dtype"] == torch.float32
        # bf16 logits: fp32 math on the same (rounded) values; the gradient is stored in bf16
        assert abs(bf16["loss"] - bf16["ref"]) <= 1e-6 * bf16["ref"]
        assert bf16["grad_err"] <= 2**-8 * bf16["grad_max"] and bf16["grad_dtype"] == torch.bfloat16
        # fp32: the first pass's exp(z - m) stay in the gradient, the second only scales them (before,
        # every logit was exponentiated again there), plus two per-row factors. bf16 keeps the second
        # exponential rather than hold fp32 copies of the whole shard across the all-reduces.
        assert f32["exponentiated"] == f32["local_logits"] + 2 * f32["rows"]
        assert bf16["exponentiated"] == 2 * bf16["local_logits"] + bf16["rows"]
    assert results[0]["float32"]["loss"] == results[1]["float32"]["loss"]  # the same value on every rank

