"""Gradient compressors (lmforge.parallel.comm): each one's encode/decode error bound, wire bytes
equal to the payload's, error feedback (applied updates track the exact sum), results that do
not depend on where a parameter sits in a DDP bucket, PowerSGD's per-parameter state surviving a
new bucket layout, the byte accounting and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lmforge.config import JobConfig
from lmforge.config.comm import CommConfig
from lmforge.config.loader import ConfigError
from lmforge.parallel.comm.accounting import CommAccounting, allgather_bytes, allreduce_bytes
from lmforge.parallel.comm.compressors import (
    BlockQuantCompressor,
    CastCompressor,
    TopKCompressor,
    build_compressor,
)
from lmforge.parallel.comm.ddp_hooks import CompressionHook

pytestmark = pytest.mark.usefixtures("one_thread")

NUMELS = (3, 700, 64, 1000)  # a tiny parameter next to large ones; not multiples of the block


def _grad(seed: int = 0, numels: tuple[int, ...] = NUMELS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.cat([torch.full((n,), 10.0 ** (i - 2)) for i, n in enumerate(numels)])  # 1e-2 .. 10
    return torch.randn(sum(numels), generator=g) * scales


def _payload_bytes(payload: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload)


@pytest.fixture(scope="module")
def one_rank_group():
    """A world of one gloo rank: the hooks' collectives run, as on rank 0 of a real job."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_cast_error_is_half_width_rounding(dtype: torch.dtype, eps: float) -> None:
    x = _grad()
    c = CastCompressor(dtype)
    payload, y = c.roundtrip(x, NUMELS)
    assert payload[0].dtype == dtype
    err = (x - y).abs()
    assert (err <= x.abs() * eps).all() and err.max() > 0
    assert c.wire_bytes(NUMELS) == _payload_bytes(payload) == 2 * sum(NUMELS)


@pytest.mark.parametrize("bits,block", [(8, 256), (8, 64), (4, 256), (4, 32), (2, 256), (2, 32)])
def test_block_quant_error_within_half_a_level_of_each_block(bits: int, block: int) -> None:
    x = _grad(1)
    c = BlockQuantCompressor(bits, block)
    payload, y = c.roundtrip(x, NUMELS)
    qmax = 2 ** (bits - 1) - 1
    start = 0
    for n in NUMELS:  # blocks start at every parameter: a block's scale is its own values' absmax
        seg_x, seg_y = x[start:start + n], y[start:start + n]
        for b in range(0, n, block):
            bx, by = seg_x[b:b + block], seg_y[b:b + block]
            bound = bx.abs().max() / (2 * qmax)
            assert (bx - by).abs().max() <= bound * (1 + 1e-6), (n, b)
        start += n
    assert (x[:3] - y[:3]).abs().max() < 1e-2 / qmax  # the 1e-2-scale parameter keeps its own scale
    assert c.wire_bytes(NUMELS) == _payload_bytes(payload)
    blocks = sum(math.ceil(n / block) for n in NUMELS)
    assert c.wire_bytes(NUMELS) == blocks * (block * bits // 8 + 4)


def test_int8_sends_nearly_4x_fewer_bytes_than_fp32() -> None:
    numels = (256 * 400,)
    assert 4 * sum(numels) / BlockQuantCompressor(8, 256).wire_bytes(numels) == pytest.approx(1024 / 260)
    assert 4 * sum(numels) / BlockQuantCompressor(4, 256).wire_bytes(numels) == pytest.approx(1024 / 132)
    assert 4 * sum(numels) / BlockQuantCompressor(2, 256).wire_bytes(numels) == pytest.approx(1024 / 68)


def test_int2_is_ternary_and_int4_keeps_its_byte_layout() -> None:
    """int2 sends -1, 0 or +1 x the block's absmax (four a byte); int4's packing (low nibble first,
    offset 8) is what it was before int2 shared the code, so its checkpoints and bits are unchanged."""
    x = torch.tensor([1.0, -0.4, 0.6, -1.0, 0.2, -0.8, 0.0, 0.49])
    q2, y2 = BlockQuantCompressor(2, 8).roundtrip(x, (8,))
    assert y2.tolist() == [1.0, 0.0, 1.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    assert q2[0].numel() == 2 and q2[0].dtype == torch.int8
    q4, _ = BlockQuantCompressor(4, 8).roundtrip(x, (8,))
    levels = torch.div(x, 1 / 7).round().clamp(-7, 7).to(torch.int64) + 8  # 1..15
    assert q4[0].view(torch.uint8).tolist() == [int(levels[i] | (levels[i + 1] << 4)) for i in range(0, 8, 2)]


def test_topk_keeps_the_largest_of_each_parameter_exactly() -> None:
    x = _grad(2)
    c = TopKCompressor(0.01)
    payload, y = c.roundtrip(x, NUMELS)
    start = 0
    for n, k in zip(NUMELS, c.ks(NUMELS)):
        seg_x, seg_y = x[start:start + n], y[start:start + n]
        kept = seg_y != 0
        assert int(kept.sum()) == k == max(1, math.ceil(0.01 * n))
        assert torch.equal(seg_y[kept], seg_x[kept])  # sent exactly
        assert seg_x[~kept].abs().max() <= seg_x[kept].abs().min()  # dropped: never larger than kept
        start += n
    assert payload[1].dtype == torch.int32
    assert c.wire_bytes(NUMELS) == _payload_bytes(payload) == 8 * sum(c.ks(NUMELS))
    big = (100_000,)
    assert 4 * big[0] / c.wire_bytes(big) == pytest.approx(50.0)


def test_compact_topk_sends_the_same_values_in_bf16_at_half_the_bytes() -> None:
    """bf16 values and 16-bit positions in 64 Ki windows: the same coordinates as the fp32 payload
    (positions exact across windows, empty windows included), each value rounded to bf16, and
    the wire bytes the payload's: 4 a value plus 4 per window."""
    numels = (3, 70_000, 64, 250_000, 1000)  # 5 windows; parameters straddle window edges
    x = _grad(3, numels)
    x[80_000:200_000] *= 1e-6  # a stretch (all of window 2) from which nothing is picked
    full, compact = TopKCompressor(0.01), TopKCompressor(0.01, compact=True)
    y_full = full.roundtrip(x, numels)[1]
    payload, y = compact.roundtrip(x, numels)
    assert torch.equal(y != 0, y_full != 0)  # the same coordinates
    kept = y != 0
    assert torch.equal(y[kept], x[kept].to(torch.bfloat16).float())  # bf16 of the same values
    assert ((y[kept] - x[kept]).abs() <= x[kept].abs() * 2.0**-8).all()
    counts = payload[1]
    assert counts.tolist()[2] == 0 and counts.numel() == 5 and int(counts.sum()) == sum(compact.ks(numels))
    assert [t.dtype for t in payload] == [torch.int32, torch.int32]  # gloo sends no 16-bit integers
    assert compact.wire_bytes(numels) == _payload_bytes(payload) == 4 * sum(compact.ks(numels)) + 4 * 5
    big = (2**20,)
    assert 4 * big[0] / compact.wire_bytes(big) == pytest.approx(100.0, rel=2e-3)
    assert full.wire_bytes(big) / compact.wire_bytes(big) == pytest.approx(2.0, rel=2e-3)


def test_compact_topk_decodes_on_the_payload_device() -> None:
    """decode builds its tensors where the payload is (a CUDA bucket under NCCL), not on the default
    device: with the default device set to meta and the payload on CPU, a bare factory call in
    decode would put half of its tensors on meta and fail."""
    numels = (3, 70_000, 1000)
    x = _grad(4, numels)
    c = TopKCompressor(0.01, compact=True)
    payload, expected = c.roundtrip(x, numels)
    with torch.device("meta"):
        got = c.decode(payload, numels)
    assert got.device.type == "cpu" and got.dtype == torch.float32 and torch.equal(got, expected)


def _hook(kind: str, group, error_feedback: bool = True, **kw) -> CompressionHook:
    if kind == "topk-compact":
        kind, kw = "topk", {**kw, "topk_payload": "compact"}
    return CompressionHook(build_compressor(CommConfig(compression=kind, **kw)), group,
                           names={}, error_feedback=error_feedback)


@pytest.mark.parametrize("shape", ["normal", "heavy-tailed", "ramp", "mostly-zero", "ties"])
def test_topk_sampled_threshold_picks_exactly_the_largest(shape: str) -> None:
    """Large parameters take the sampled-threshold path: the kept magnitudes are exactly the k
    largest, whatever the distribution (a ramp puts them all in one corner, mostly-zero and ties
    defeat a threshold; the full top-k is the fallback)."""
    n = 300_000
    g = torch.Generator().manual_seed(7)
    x = {"normal": lambda: torch.randn(n, generator=g),
         "heavy-tailed": lambda: torch.randn(n, generator=g) ** 5,
         "ramp": lambda: torch.linspace(-1.0, 1.0, n) ** 3,
         "mostly-zero": lambda: torch.where(torch.rand(n, generator=g) < 0.004, torch.randn(n, generator=g), 0.0),
         "ties": lambda: torch.randint(-3, 4, (n,), generator=g).float()}[shape]()
    for fraction in (0.001, 0.01, 0.1):
        c = TopKCompressor(fraction)
        k = c.ks((n,))[0]
        values, indices = c.encode(x, (n,))
        assert indices.unique().numel() == k == values.numel()
        assert torch.equal(values, x[indices.long()])
        expected = torch.topk(x.abs(), k).values
        assert torch.equal(values.abs().sort(descending=True).values, expected), (shape, fraction)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int2", "topk", "topk-compact"])
def test_error_feedback_sum_of_updates_tracks_the_exact_sum(kind: str, one_rank_group) -> None:
    """sum(applied) + residual == sum(gradients) at every step, so the applied sum is off by the
    residual only, which stays bounded; without error feedback the gap grows with the steps."""
    names = [f"p{i}" for i in range(len(NUMELS))]
    bias = _grad(99) * 0.1  # a persistent direction under the noise: what compressors drop forever
    runs = {}
    for ef in (True, False):
        hook = _hook(kind, one_rank_group, ef, topk_fraction=0.05)
        exact = torch.zeros(sum(NUMELS))
        applied = torch.zeros(sum(NUMELS))
        for t in range(60):
            g = _grad(t) + bias
            exact += g
            applied += hook.reduce(g.clone(), names, NUMELS).wait()
            if ef:
                residual = torch.cat([hook.residuals[n] for n in names])
                torch.testing.assert_close(applied + residual, exact, rtol=0, atol=1e-3)
        runs[ef] = (applied - exact).norm() / exact.norm()
    assert runs[True] < runs[False] / 3, runs
    # top-k 5% sends a coordinate about once in 20 steps: its residual holds up to that many; int2
    # rounds each value to 0 or the block's absmax, so up to half of that stays behind
    assert runs[True] < (0.25 if kind.startswith("topk") else 0.15 if kind == "int2" else 0.05), runs


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "int2", "topk", "topk-compact"])
def test_result_does_not_depend_on_the_bucket_layout(kind: str, one_rank_group) -> None:
    """DDP re-lays out buckets after the first step (and a resumed run starts from the first
    layout): the same parameters in another order give each parameter the same bits."""
    names, x = [f"p{i}" for i in range(len(NUMELS))], _grad(5)
    pieces = dict(zip(names, x.split(NUMELS)))
    order = [2, 0, 3, 1]
    a, b = _hook(kind, one_rank_group), _hook(kind, one_rank_group)
    for step in range(3):
        out_a = dict(zip(names, a.reduce(torch.cat([pieces[n] for n in names]) * (step + 1), names, NUMELS).wait()
                         .split(NUMELS)))
        names_b = [names[i] for i in order]
        numels_b = tuple(NUMELS[i] for i in order)
        out_b = dict(zip(names_b, b.reduce(torch.cat([pieces[n] for n in names_b]) * (step + 1), names_b, numels_b).wait()
                         .split(numels_b)))
        for n in names:
            assert torch.equal(out_a[n], out_b[n]), (step, n)


def test_residuals_round_trip_through_state_dict(one_rank_group) -> None:
    names = [f"p{i}" for i in range(len(NUMELS))]
    a = _hook("int8", one_rank_group)
    a.reduce(_grad(0), names, NUMELS).wait()
    b = _hook("int8", one_rank_group)
    b.load_state_dict(a.state_dict())
    for t in range(1, 4):
        assert torch.equal(a.reduce(_grad(t), names, NUMELS).wait(), b.reduce(_grad(t), names, NUMELS).wait())


def test_powersgd_state_survives_a_new_bucket_layout(one_rank_group) -> None:
    """Error and P/Q memories cut per parameter and laid out again in another bucket order."""
    from lmforge.parallel.comm.powersgd import PowerSGDHook

    hook = PowerSGDHook(one_rank_group, names={}, rank=2)
    shapes = {"w1": torch.Size([16, 8]), "b1": torch.Size([16]), "w2": torch.Size([8, 16]), "w3": torch.Size([16, 8])}
    layout = list(shapes.items())
    st = hook.state
    g = torch.Generator().manual_seed(0)
    mats = hook._compressed(layout)
    assert [m[0] for m in mats] == ["w1", "w3", "w2"]  # torch's order: grouped by shape; b1 not compressed
    st.error_dict[0] = torch.randn(sum(s.numel() for s in shapes.values()), generator=g)
    st.p_memory_dict[0] = torch.randn(sum(n * r for _, n, _, r in mats), generator=g)
    st.q_memory_dict[0] = torch.randn(sum(m * r for _, _, m, r in mats), generator=g)
    hook.layouts[0] = layout
    before = hook._per_parameter()
    saved = hook.state_dict()
    fresh = PowerSGDHook(one_rank_group, names={}, rank=2)
    fresh.load_state_dict(saved)
    new_layout = [layout[i] for i in (2, 1, 3, 0)]
    fresh._unpark(0, new_layout)
    fresh.layouts[0] = new_layout
    assert not any(fresh.pending.values())
    after = fresh._per_parameter()
    for kind in ("error", "p", "q"):
        assert before[kind].keys() == after[kind].keys()
        for name in before[kind]:
            assert torch.equal(before[kind][name], after[kind][name]), (kind, name)


def test_accounting_ring_model_and_windows() -> None:
    assert allreduce_bytes(400, 2) == 400 and allreduce_bytes(400, 4) == 600
    assert allgather_bytes(100, 2) == 100 and allgather_bytes(100, 4) == 300
    acc = CommAccounting()
    acc.add_fp32_allreduce(sent=allgather_bytes(260, 2), numel=256, world=2)
    assert acc.window() == {"comm_bytes": 260.0, "comm_compression_ratio": pytest.approx(1024 / 260)}
    assert acc.window() == {"comm_bytes": 0.0, "comm_compression_ratio": 0.0}  # a new window
    assert acc.ratio() == pytest.approx(1024 / 260)


def _job(world: int, **parallel) -> JobConfig:
    cfg = JobConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_config_refuses_what_cannot_compress() -> None:
    cfg = _job(2, dp_shard=2)
    cfg.comm.compression = "int8"
    with pytest.raises(ConfigError, match=r"comm.compression = 'int8': not supported with FSDP2 \(parallel.dp_shard "
                                          r"= 2 > 1\): use bf16/fp16 or DDP"):
        cfg.validate(2)
    cfg.comm.compression = "bf16"  # FSDP2's reduce dtype
    cfg.validate(2)
    one = _job(1)
    one.comm.compression = "topk"
    with pytest.raises(ConfigError, match="one data-parallel rank"):
        one.validate(1)
    ddp = _job(2, dp_replicate=2, dp_shard=1)
    for kind in ("bf16", "fp16", "int8", "int4", "topk", "powersgd"):
        ddp.comm.compression = kind
        ddp.validate(2)
    ddp.comm.topk_payload = "compact"  # top-k's payload
    with pytest.raises(ConfigError, match="comm.topk_payload = 'compact': applies to comm.compression = 'topk' only"):
        ddp.validate(2)
    ddp.comm.compression = "topk"
    ddp.validate(2)


def test_fsdp_reduce_dtype_follows_the_cast() -> None:
    from lmforge.parallel.fsdp import FSDPPolicy
    from lmforge.tensors.dtypes import DTYPES

    policy = FSDPPolicy.from_config(_job(2).parallel, torch.device("cpu"), reduce_dtype=DTYPES["bf16"])
    assert policy.mp_policy.reduce_dtype == torch.bfloat16


def test_residuals_from_another_world_size_start_from_zero(one_rank_group) -> None:
    names = [f"p{i}" for i in range(len(NUMELS))]
    a = _hook("int8", one_rank_group)
    a.reduce(_grad(0), names, NUMELS).wait()
    saved = a.state_dict()
    assert saved["world"] == 1 and saved["residuals"]
    b = _hook("int8", one_rank_group)
    b.load_state_dict({**saved, "world": 2})
    assert b.residuals == {}
