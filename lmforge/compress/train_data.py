"""Training data for compression: calibration windows (GPTQ's input Hessians for quantize, Wanda's
input activations for prune) and the prune recovery fine-tune's batches, all read from the packed
train split through the trainer's loader (data/loader.py), plus what the outputs record about them.

Why the train split: it is what the model learnt from (GPTQ and Wanda calibrate on C4, close to
their models' training data), and the val split stays untouched for `lmforge eval`. A run's own packed
data (its data.dir, or --calib-data when data.dir is not found from here: the data moved) is
sampled with the run's domain mixture (its data section: domain weights or mixing temperature, the
start weights when it had a curriculum); any other data dir (an HF source's only option)
uniformly over its windows. Either way from a seeded shuffle, so the same
options give the same windows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.compress.errors import CompressError
from lmforge.config import ConfigError, DataConfig, ModelConfig
from lmforge.config.loader import build_dataclass
from lmforge.data.files import sha256_file
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.mixing import build_mixing
from lmforge.data.tokenizer import TextTokenizer
from lmforge.storage.guard import resolved


@dataclass(frozen=True)
class CalibrationSet:
    """`tokens` (samples, seq_len) int64 train windows, the split's end-of-document id (GPTQ's
    document masking) and their provenance (recorded in the compressed output)."""

    tokens: torch.Tensor
    eos_id: int
    provenance: dict


@dataclass(frozen=True)
class TrainData:
    """The packed train split pruning reads, and how it samples it."""

    data_dir: Path
    dataset: TokenDataset
    eos_id: int
    manifest_sha256: str
    data_cfg: DataConfig | None  # the run's data section when `data_dir` is the run's data; else None

    def loader(self, seq_len: int, batch: int, seed: int) -> tuple[DistributedTokenLoader, str]:
        """A shuffled reader of `batch` windows of `seq_len` tokens per call, and how it samples."""
        mixing = None
        if self.data_cfg is not None and self.dataset.domains:
            cfg = dataclasses.replace(self.data_cfg, seed=seed, curriculum_steps=0, domain_weights_end=[])
            try:
                mixing = build_mixing(self.dataset.domains, cfg, batch)
            except ConfigError as e:
                raise CompressError(f"data dir {self.data_dir}: the run's domain mixture does not fit it ({e})") from None
        loader = DistributedTokenLoader(self.dataset, seq_len, batch, seed=seed, shuffle=True, prefetch=False,
                                        mixing=mixing and mixing.schedule)
        how = f"the run's domain mixture: {mixing.description}" if mixing is not None else \
            "uniform over the split's windows"
        return loader, how


def open_train_data(data_dir: Path, origin: str, cfg: ModelConfig, model_tokenizer: Path | None,
                    run_data: dict | None) -> TrainData:
    """The train split of `data_dir` (named by `origin` in errors), refused in one line when it is
    missing, not packed, or tokenized with another vocabulary than the model's."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CompressError(f"data dir {data_dir} ({origin}) does not exist; pass --calib-data DIR, a directory "
                            "`lmforge data prepare` wrote")
    dataset = TokenDataset(data_dir, "train")  # DataError in one line when it is not a valid pack
    if dataset.vocab_size > cfg.vocab_size:
        raise CompressError(f"data dir {data_dir} ({origin}): its tokenizer has {dataset.vocab_size} ids, more than "
                            f"the model's vocab_size {cfg.vocab_size}; pass --calib-data of the model's data")
    if model_tokenizer is not None and (data_dir / "tokenizer.json").is_file():
        mine = TextTokenizer.from_file(model_tokenizer).backend.get_vocab(with_added_tokens=True)
        theirs = TextTokenizer.from_file(data_dir / "tokenizer.json").backend.get_vocab(with_added_tokens=True)
        if mine != theirs:
            raise CompressError(f"data dir {data_dir} ({origin}): its tokenizer.json is not the model's "
                                f"({model_tokenizer}): the same ids would mean other text; pass --calib-data of the "
                                "data this model was trained on")
    data_cfg = None
    run_data_dir = str(run_data.get("dir") or "") if run_data is not None else ""
    # the run's data, or (its data.dir not found from here) the run's data moved to --calib-data
    if run_data_dir and (resolved(run_data_dir) == resolved(data_dir) or not Path(run_data_dir).is_dir()):
        try:
            data_cfg = build_dataclass(DataConfig, run_data, "data.")
        except ConfigError:
            data_cfg = None  # an older run's data section: sample uniformly (the report says so)
    return TrainData(data_dir, dataset, dataset.eos_id, sha256_file(data_dir / "manifest.json"), data_cfg)


def calibration_windows(data: TrainData, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """`samples` train windows of `seq_len` input token ids, and their provenance."""
    loader, how = data.loader(seq_len, min(samples, 64), seed)
    rows: list[torch.Tensor] = []
    n = 0
    while n < samples:
        x, _ = loader.next_batch()
        rows.append(x[: samples - n])
        n += rows[-1].shape[0]
    tokens = torch.cat(rows)
    info = {"data_dir": str(data.data_dir), "split": "train", "manifest_sha256": data.manifest_sha256,
            "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "seed": seed, "sampling": how,
            "windows_in_split": loader.n_windows}
    if samples > loader.n_windows:
        info["note"] = f"{samples} samples from {loader.n_windows} windows: some windows were read twice"
    return CalibrationSet(tokens, data.eos_id, info)
