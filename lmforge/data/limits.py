"""How much a packed split can serve: a training batch larger than the data, and more evaluation
batches than the validation split holds, are caught when the loaders open (before step one)."""

from __future__ import annotations

from collections.abc import Callable

from lmforge.config.loader import ConfigError


def check_batch_fits_data(n_windows: int, global_batch: int, seq_len: int, where: str) -> None:
    """A global batch of more windows than the training split has would repeat samples inside one
    optimizer step: refuse it in one line."""
    if global_batch > n_windows:
        raise ConfigError("train.global_batch_size", global_batch,
                          f"must be <= the {n_windows} windows of seq_len {seq_len} that the training split "
                          f"{where} holds (one step would repeat data); lower it or train.seq_len, or add data")


def cap_eval_batches(n_windows: int, global_batch: int, requested: int, note: Callable[[str], None]) -> int:
    """Evaluation batches that the validation split really holds (at least one): `requested`
    capped, with one note when it is, so a huge train.eval_batches does not evaluate forever on
    repeated data."""
    available = max(1, n_windows // global_batch)
    if requested <= available:
        return requested
    note(f"note: train.eval_batches = {requested} capped to {available}: the validation split holds "
         f"{n_windows} windows, {available} global batch(es) of {global_batch}")
    return available
