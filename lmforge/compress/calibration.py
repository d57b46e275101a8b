"""Calibration data for quantization: a seeded sample of windows of a packed data dir's train split
(the data the model was trained on), with what identifies it (the data manifest's sha256, the
windows chosen), so a quantized directory records exactly what it was calibrated on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.compress.errors import CompressError
from lmforge.data.errors import DataError
from lmforge.data.loader import TokenDataset


@dataclass(frozen=True)
class CalibrationSet:
    """`tokens` (samples, seq_len) int64 windows of the train split, and their provenance."""

    tokens: torch.Tensor
    data_dir: Path
    manifest_sha256: str
    windows_sha256: str
    seed: int
    eos_id: int

    def provenance(self) -> dict:
        return {"data_dir": str(self.data_dir), "split": "train", "manifest_sha256": self.manifest_sha256,
                "samples": int(self.tokens.shape[0]), "seq_len": int(self.tokens.shape[1]), "seed": self.seed,
                "windows_sha256": self.windows_sha256}


def sample_calibration(data_dir: Path, samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> CalibrationSet:
    """`samples` distinct windows of `seq_len` tokens, drawn without replacement (seeded) from the
    train split of `data_dir`; refuses a split too small or a vocabulary larger than the model's."""
    if samples < 1:
        raise CompressError(f"--calib-samples {samples}: must be >= 1 (windows of the train split)")
    if seq_len < 2:
        raise CompressError(f"--calib-seq-len {seq_len}: must be >= 2 (tokens per calibration window)")
    try:
        ds = TokenDataset(data_dir, "train")
    except DataError as e:
        raise CompressError(f"calibration data {data_dir}: {e}") from None
    if ds.vocab_size > vocab_size:
        raise CompressError(f"calibration data {data_dir}: its tokenizer has {ds.vocab_size} ids but the model's "
                            f"vocabulary is {vocab_size}; pass --calib-data packed with the model's tokenizer")
    n = ds.n_windows(seq_len - 1)
    if n < samples:
        raise CompressError(f"calibration data {data_dir}: the train split holds {n} windows of {seq_len} tokens, "
                            f"fewer than --calib-samples {samples}; lower --calib-samples or --calib-seq-len")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=samples, replace=False))
    # window(i, L - 1) is L tokens: the model sees exactly seq_len tokens per sample
    tokens = torch.from_numpy(np.stack([ds.window(int(i), seq_len - 1) for i in idx]))
    manifest = hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()
    windows = hashlib.sha256(idx.astype(np.int64).tobytes() + str(seq_len).encode()).hexdigest()
    return CalibrationSet(tokens, Path(data_dir), manifest, windows, seed, ds.eos_id)
