"""The data stage of a training run, before any model exists: rank 0 prepares the packed data
(corpus -> tokenizer -> shards, each stage skipped when its output is valid), every rank checks
the tokenizer against the model and opens its loaders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from lmforge.config import ConfigError, JobConfig
from lmforge.data.limits import cap_eval_batches, check_batch_fits_data
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.mixing import Mixing, build_mixing
from lmforge.data.pack import prepare_data
from lmforge.data.tokenizer import TextTokenizer


def prepare_training_data(cfg: JobConfig, is_main: bool, say: Callable[[str], None]) -> Path:
    """Rank 0 builds corpus/tokenizer/shards if missing; the others wait (a barrier). Returns the
    data directory once the tokenizer is known to fit `model.vocab_size`."""
    if is_main:
        prepare_data(cfg.data, cfg.tokenizer, log=say)
    dist.barrier()
    data_dir = Path(cfg.data.dir)
    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"must be >= the tokenizer's vocabulary ({tok.vocab_size}, {data_dir})")
    return data_dir


@dataclass
class Loaders:
    """This data-parallel rank's readers of the train and validation streams, and how many global
    batches an evaluation reads."""

    train: DistributedTokenLoader
    val: DistributedTokenLoader
    eval_batches: int
    mixing: Mixing | None = None  # the training domains' weights (None: the pack has no domains)


def open_loaders(cfg: JobConfig, data_dir: Path, dp_rank: int, dp_world: int,
                 say: Callable[[str], None]) -> Loaders:
    """The shuffled train loader (sampling domains by their weights when the pack has domains)
    and the in-order validation loader for this dp rank; refuses a global batch the data cannot
    fill and caps the evaluation at what the validation split holds."""
    train_set = TokenDataset(data_dir, "train")
    mixing = build_mixing(train_set.domains, cfg.data, cfg.train.global_batch_size)
    train = DistributedTokenLoader(train_set, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank, dp_world,
                                   seed=cfg.data.seed, shuffle=True, mixing=mixing and mixing.schedule,
                                   mixing_key=mixing.key if mixing else "", balanced=cfg.comm.load_balance)
    val = DistributedTokenLoader(TokenDataset(data_dir, "val"), cfg.train.seq_len, cfg.train.micro_batch_size,
                                 dp_rank, dp_world, seed=cfg.data.seed, shuffle=False)
    check_batch_fits_data(train.n_windows, cfg.train.global_batch_size, cfg.train.seq_len, str(data_dir))
    eval_batches = cap_eval_batches(val.n_windows, cfg.train.global_batch_size, cfg.train.eval_batches,
                                    say if cfg.train.eval_interval else lambda _: None)
    return Loaders(train=train, val=val, eval_batches=eval_batches, mixing=mixing)
