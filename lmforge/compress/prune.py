"""`lmforge compress prune`: magnitude or Wanda pruning of a loaded model, unstructured or N:M,
an optional recovery fine-tune with the masks held, and the pruned model written as a run
directory with its report (prune_output.py).

The pieces: prune_options.py (what was asked, checked), prune_masks.py (scores and masks),
prune_layers.py (in place, block by block; Wanda sequential), train_data.py (calibration windows
from the train split), prune_recover.py, prune_report.py (the sparsity counted from the weights).
The CLI loads the source (lmforge.serve) and hands the model over as a `PruneSource`: this package
never imports `serve`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmforge.compress.errors import CompressError
from lmforge.compress.prune_layers import check_prunable, prune_magnitude, prune_wanda
from lmforge.compress.prune_options import TARGET_ROLES, TARGETS, PruneOptions
from lmforge.compress.prune_output import output_config, write_pruned_run
from lmforge.compress.prune_recover import RecoverySetup, recover
from lmforge.compress.prune_report import sparsity_table
from lmforge.compress.train_data import TrainData, calibration_windows, open_train_data
from lmforge.config import ModelConfig, TrainConfig

FORMAT = 1
NOT_PRUNED = ("token embeddings, output head and norms stay dense (as Wanda and SparseGPT do); so do any biases")
SEQUENTIAL = ("sequential, block by block: each block's linears are scored on the calibration activations that "
              "the already-pruned blocks below produce, then the pruned block's outputs feed the next block")


@dataclass
class PruneSource:
    """A loaded model and where it came from (the CLI fills it from lmforge.serve's ModelSource)."""

    model: nn.Module
    cfg: ModelConfig
    path: Path
    kind: str  # "run", "checkpoint" or "hf"
    tokenizer: Path | None = None
    step_dir: Path | None = None
    step: int | None = None
    run_config: dict | None = None  # the run's config.json (None for an HF source)


def data_dir_of(src: PruneSource, calib_data: Path | None) -> tuple[Path | None, str]:
    """The packed data to read: --calib-data, else the run's data.dir; (None, "") for an HF source
    without --calib-data."""
    if calib_data is not None:
        return Path(calib_data), "--calib-data"
    data = (src.run_config or {}).get("data")
    if isinstance(data, dict) and data.get("dir"):
        return Path(data["dir"]), f"data.dir of {src.path}"
    return None, ""


def check_data_named(kind: str, has_data: bool, opts: PruneOptions) -> None:
    """Refuse (before loading anything) a method that needs training data when none is named."""
    if not opts.needs_data or has_data:
        return
    what = "wanda scores weights by calibration activations" if opts.needs_activations else \
        "--recover-steps fine-tunes on training data"
    where = "a Hugging Face directory names no training data" if kind == "hf" else "the run names no data.dir"
    raise CompressError(f"{what}, but {where}; pass --calib-data DIR (a packed data dir with the model's tokenizer)")


def _train_section(src: PruneSource) -> TrainConfig:
    train = (src.run_config or {}).get("train")
    train = train if isinstance(train, dict) else {}
    d = TrainConfig()
    return TrainConfig(seq_len=int(train.get("seq_len", min(d.seq_len, src.cfg.max_seq_len))),
                       micro_batch_size=int(train.get("micro_batch_size", d.micro_batch_size)),
                       global_batch_size=int(train.get("global_batch_size", d.global_batch_size)),
                       eval_batches=int(train.get("eval_batches", d.eval_batches)))


def prune_source(src: PruneSource, opts: PruneOptions, out: Path, *, calib_data: Path | None = None,
                 overwrite: bool = False, say: Callable[[str], None] = lambda _: None) -> dict:
    """Prune `src.model` in place as `opts` asks, write `out` (prune_output.py), return the report."""
    opts.check()
    model, cfg = src.model, src.cfg
    check_prunable(model, cfg, opts)
    train = _train_section(src)
    calib_len = opts.calib_seq_len or train.seq_len
    if opts.needs_activations and not 1 <= calib_len <= cfg.max_seq_len:
        what = "--calib-seq-len" if opts.calib_seq_len else "the run's train.seq_len"
        raise CompressError(f"calibration windows of {calib_len} tokens ({what}): must be in [1, {cfg.max_seq_len}], "
                            "the model's max_seq_len")
    data_dir, origin = data_dir_of(src, calib_data)
    check_data_named(src.kind, data_dir is not None, opts)
    data: TrainData | None = None
    if opts.needs_data:
        assert data_dir is not None
        data = open_train_data(data_dir, origin, cfg, src.tokenizer, (src.run_config or {}).get("data"))
    eos = data.eos_id if data is not None and cfg.attention.doc_mask else None

    t0 = time.perf_counter()
    calibration, outliers = None, None
    if opts.method == "wanda":
        assert data is not None
        calib = calibration_windows(data, opts.calib_samples, calib_len, opts.calib_seed)
        tokens, calibration = calib.tokens, calib.provenance
        say(f"calibration: {calibration['samples']} windows x {calib_len} tokens of {data.data_dir} "
            f"(train split, {calibration['sampling']})")
        masks, outliers = prune_wanda(model, cfg, opts, tokens, eos, say)
    else:
        masks = prune_magnitude(model, opts)
    prune_s = time.perf_counter() - t0

    recovery = None
    if opts.recover_steps:
        assert data is not None
        n_eval = train.eval_batches * max(1, train.global_batch_size // train.micro_batch_size)
        setup = RecoverySetup(opts.recover_steps, opts.recover_lr, min(train.seq_len, cfg.max_seq_len),
                              train.micro_batch_size, n_eval, seed=opts.calib_seed + 1)
        recovery = recover(model, masks, data, setup, eos, say)
    model.eval()

    report = {
        "format": FORMAT, "method": opts.method, "scheme": opts.scheme, "sparsity_target": opts.sparsity,
        "pattern": f"{opts.pattern[0]}:{opts.pattern[1]}" if opts.pattern else None,
        "comparison_group": opts.comparison_group,
        "score": "|W_ij| * ||X_j||_2 over calibration tokens" if opts.method == "wanda" else "|W_ij|",
        "targets": {t: TARGETS[t] for t in opts.targets},
        "target_roles": {t: TARGET_ROLES[t] for t in opts.targets},
        "not_pruned": NOT_PRUNED,
        "procedure": SEQUENTIAL if opts.method == "wanda" else "each layer from its own weights (no data)",
        "source": {"path": str(src.path), "kind": src.kind, "checkpoint": str(src.step_dir) if src.step_dir else None,
                   "step": src.step},
        "calibration": calibration,
        "sparsity": sparsity_table(model, list(masks), outliers),
        "recovery": recovery,
        "storage": "dense fp32 weights holding the zeros (same size as the source; no sparse kernels on CPU)",
        "seconds": {"prune": prune_s, "recover": recovery["seconds"] if recovery else 0.0},
    }
    config = output_config(src.run_config, cfg, Path(out), data_dir)
    write_pruned_run(Path(out), model, config, src.tokenizer, report, overwrite)
    return report
