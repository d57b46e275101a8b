"""The weight-space watermark (lmforge/safety/model_watermark.py) on a small random model built here:
every bit read right after embedding with an exact binomial p-value, wrong keys and the unmarked
model not detected, and the mark still read after int8 per-row rounding, 30% magnitude pruning and
weight noise, while noise far past the margin erases it."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.compress.prune_masks import magnitude_scores, unstructured_mask
from lmforge.compress.quantize import int8_rows
from lmforge.config import ModelConfig
from lmforge.models.registry import family_of
from lmforge.safety.errors import SafetyError
from lmforge.safety.model_watermark import (
    ModelWatermarkConfig,
    binomial_p_value,
    carrier_tensors,
    embed_watermark,
    read_watermark,
)
from lmforge.safety.secret_key import WatermarkKey

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = WatermarkKey(b"the model owner's secret key")
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=32)


@pytest.fixture(scope="module")
def plain() -> torch.nn.Module:
    return family_of(CFG).build(CFG, "cpu", 0).eval()


@pytest.fixture(scope="module")
def marked(plain: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(plain)
    report = embed_watermark(model, KEY)
    assert report.bits == 256 and report.tensors == 14 and report.z_min_after >= 6.0 * 0.999
    assert report.z_min_before < 0 and report.bits_moved == 256
    # the change the module docstring predicts: sqrt(bits (margin^2 + 1) / weights)
    assert report.relative_change == pytest.approx((256 * 37 / report.weights) ** 0.5, rel=0.1)
    return model


def _carriers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in carrier_tensors(model.named_parameters())}


def _read(weights: dict[str, torch.Tensor], key: WatermarkKey = KEY):
    return read_watermark(weights.items(), key)


def test_every_bit_reads_right_after_embedding_and_p_is_exact(plain, marked) -> None:
    r = read_watermark(marked.named_parameters(), KEY)
    assert (r.errors, r.bit_error_rate, r.flipped, r.erased) == (0, 0.0, 0, 0)
    assert r.p_value == 2.0 ** -256 and r.p_value < 1e-6 and r.detected
    assert len(r.read) == 256 and set(r.read) == {"0", "1"} and r.z_min >= 5.99
    # only the block matrices moved; embeddings, norms and the head are untouched
    before, after = plain.state_dict(), marked.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == set(_carriers(plain)) and len(moved) == 14
    # the unmarked model read with the same key: chance level, not detected
    r0 = read_watermark(plain.named_parameters(), KEY)
    assert not r0.detected and r0.p_value > 0.01 and r0.bit_error_rate > 0.6


def test_a_hundred_wrong_keys_are_not_detected(marked) -> None:
    weights = _carriers(marked)
    readings = [_read(weights, WatermarkKey(f"a wrong key number {i:03d}".encode())) for i in range(100)]
    assert min(r.p_value for r in readings) > 0.01
    assert not any(r.detected for r in readings)
    # chance level: a wrong key reads about 16% of bits right (|z| >= 1 with the right sign)
    mean_ber = sum(r.bit_error_rate for r in readings) / len(readings)
    assert 0.80 < mean_ber < 0.88, mean_ber


def test_binomial_p_value_is_the_exact_lower_tail() -> None:
    assert binomial_p_value(0, 256) == 2.0 ** -256
    assert binomial_p_value(1, 10) == 11 / 1024
    assert binomial_p_value(10, 10) == 1.0
    assert binomial_p_value(127, 256) < 0.5 < binomial_p_value(128, 256)
    with pytest.raises(ValueError):
        binomial_p_value(11, 10)


def test_survives_int8_per_row_rounding(marked) -> None:
    weights = {}
    for n, w in _carriers(marked).items():
        q, scale = int8_rows(w)
        weights[n] = q.float() * scale[:, None]
        assert not torch.equal(weights[n], w)
    r = _read(weights)
    assert r.errors == 0 and r.p_value < 1e-6 and r.z_min > 5.0


def test_survives_30_percent_magnitude_pruning(marked) -> None:
    weights = {}
    for n, w in _carriers(marked).items():
        weights[n] = w * unstructured_mask(magnitude_scores(w), 0.3, per_row=False)
        assert abs(float((weights[n] == 0).float().mean()) - 0.3) < 0.01
    r = _read(weights)
    assert r.errors == 0 and r.p_value < 1e-6 and r.z_min > 3.0


def test_noise_below_the_margin_keeps_it_and_noise_far_above_erases_it(marked) -> None:
    g = torch.Generator().manual_seed(0)
    base = _carriers(marked)

    def noisy(scale: float) -> dict[str, torch.Tensor]:
        return {n: w + scale * w.std() * torch.randn(w.shape, generator=g) for n, w in base.items()}

    kept = _read(noisy(0.5))  # z moves by ~0.5 x N(0, 1) (up to a norm change)
    assert kept.errors == 0 and kept.p_value < 1e-6
    lost = _read(noisy(20.0))  # the weights are mostly noise now: z ~ 6 / 20
    assert not lost.detected and lost.bit_error_rate > 0.6


def test_exact_zeros_stay_zero_when_marking_a_pruned_model(plain) -> None:
    model = copy.deepcopy(plain)
    with torch.no_grad():
        for _, w in carrier_tensors(model.named_parameters()):
            w.mul_(unstructured_mask(magnitude_scores(w), 0.5, per_row=False))
    zeros = {n: w == 0 for n, w in _carriers(model).items()}
    embed_watermark(model, KEY)
    after = _carriers(model)
    assert all(torch.equal(after[n] == 0, z) for n, z in zeros.items())
    assert read_watermark(model.named_parameters(), KEY).errors == 0


def test_settings_are_checked_in_one_line(plain) -> None:
    for cfg, needle in ((ModelWatermarkConfig(bits=8), "bits = 8: must be in 32..512"),
                        (ModelWatermarkConfig(margin=0.5, dead_zone=1.0), "must be above the dead zone"),
                        (ModelWatermarkConfig(alpha=0), "alpha = 0: must be in (0, 1)"),
                        (ModelWatermarkConfig(bits=512, margin=float("nan")), "margin = nan")):
        with pytest.raises(SafetyError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            embed_watermark(copy.deepcopy(plain), KEY, cfg)
    with pytest.raises(SafetyError, match="need at least 64 per bit"):
        read_watermark([("layers.0.w.weight", torch.ones(64, 64))], KEY, ModelWatermarkConfig(bits=512))
    with pytest.raises(SafetyError, match="no block weight matrices"):
        read_watermark([("tok_embeddings.weight", torch.ones(64, 64))], KEY)
