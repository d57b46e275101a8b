"""mixed_precision in a real (debug-sized) run: "auto" is resolved once and written to the run
header and config.json, a resume trains in the same precision, MFU divides by the peak of the
dtype actually used, and an explicit bf16 on a CPU without native bf16 warns once with a figure."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lmforge.config import load_job_config, parse_override_args
from lmforge.observability import peak
from lmforge.observability.flops import training_flops_per_token
from lmforge.train.precision import choose_precision, cpu_native_feature, detect_hardware
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

FAKE_PEAKS = {"fp32": 3e11, "bf16": 7e14}  # far apart: MFU shows which one was divided by


def run(data_dir: Path, out: Path, *extra: str, echo: bool = False) -> Trainer:
    args = tiny_run_args(data_dir, out, "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                         "--train.eval_interval", "0", "--metrics.peak_flops", "none", *extra)
    cfg = load_job_config(None, parse_override_args(args))
    trainer = Trainer(cfg, echo=echo)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


@pytest.fixture
def fake_peaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached CPU peaks for this machine and thread count, so no run measures one."""
    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path / "cache"))
    label, threads = peak.cpu_label(), torch.get_num_threads()
    peak._write_cache(peak.default_cache_path(), {
        peak._cache_key(label, key, 2048, threads): {"flops": value} for key, value in FAKE_PEAKS.items()})


def test_auto_is_resolved_recorded_and_kept_on_resume(tiny_data_dir: Path, tmp_path: Path, fake_peaks: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    expected = choose_precision("auto", detect_hardware("cpu"))
    out = tmp_path / "run"
    first = run(tiny_data_dir, out, "--train.mixed_precision", "auto", "--train.steps", "4", "--train.stop_at", "2",
                echo=True)
    header = capsys.readouterr().out
    assert f"precision: {expected.mode} ({expected.reason})\n" in header
    stored = json.loads((out / "config.json").read_text())["train"]
    assert stored["mixed_precision"] == expected.mode == first.cfg.train.mixed_precision
    assert stored["mixed_precision_reason"] == expected.reason and expected.reason.startswith("auto: ")

    # MFU = tokens/s x FLOPs/token / peak of the dtype the run used.
    rows = read_metrics(out)
    flops = training_flops_per_token(first.cfg.model, first.cfg.train.seq_len)
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / FAKE_PEAKS[expected.mode], rel=1e-9)

    resumed = run(tiny_data_dir, out, "--train.mixed_precision", "auto", "--train.steps", "4",
                  "--checkpoint.resume", "auto")
    assert resumed.state.step == 4
    again = json.loads((out / "config.json").read_text())["train"]  # same resolution, same record
    assert (again["mixed_precision"], again["mixed_precision_reason"]) == (expected.mode, expected.reason)


def test_explicit_bf16_without_native_bf16_warns_once(tiny_data_dir: Path, tmp_path: Path, fake_peaks: None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        trainer = run(tiny_data_dir, tmp_path / "run", "--train.mixed_precision", "bf16", "--train.steps", "2",
                      "--checkpoint.enabled", "false")
    warnings = [r.getMessage() for r in caplog.records if "mixed_precision" in r.getMessage()]
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert stored["mixed_precision"] == "bf16" == trainer.cfg.train.mixed_precision
    # The MFU of a bf16 run is against the bf16 peak.
    row = read_metrics(tmp_path / "run")[0]
    flops = training_flops_per_token(trainer.cfg.model, trainer.cfg.train.seq_len)
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / FAKE_PEAKS["bf16"], rel=1e-9)
    hw = detect_hardware("cpu")  # the CPU's flags and any ONEDNN_MAX_CPU_ISA cap, as `auto` reads them
    if cpu_native_feature("bf16", hw.cpu_flags, hw.onednn_isa_cap):
        assert warnings == [] and "native bf16" in stored["mixed_precision_reason"]
        return
    assert len(warnings) == 1, warnings
    factor = float(warnings[0].split("measured ")[1].split("x slower")[0])
    # emulated bf16 is slower than fp32: ~30x at 128x128 on a Zen 3 (AVX2), 3x on an Ice Lake Xeon
    # (AVX512F converts faster); native bf16 is at least about as fast (factor < 2)
    assert factor > 2
    assert "emulated" in stored["mixed_precision_reason"]
