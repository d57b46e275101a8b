"""Document masking under pipeline parallelism: every pp rank hands the batch's document starts to
each of its stages, so pp = 2 (one stage per rank, and two per rank with a V schedule) reaches the
losses and weights of one document-masked process. Short documents (several per sequence) make
the masks matter: the same run without them differs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_in_process, train_ranks
from tests.helpers.parity import WEIGHT_PARITY, assert_same_final_weights

STEPS = 4
COMMON = ["--model.n_layers", "4", "--train.steps", str(STEPS), "--train.global_batch_size", "8",
          "--train.eval_interval", "4", *WEIGHT_PARITY]


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A corpus of 3-12 word documents (the packer ends each with end-of-text) and its data dir."""
    root = tmp_path_factory.mktemp("short-docs")
    rng = random.Random(0)
    words = ("thou art the king of france and all his men went up the hill to see what "
             "god hath made in the beginning of days").split()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 12)))}) + "\n"
                              for _ in range(600)))
    return corpus, root / "data"


def run_args(short_docs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    corpus, data = short_docs
    args = tiny_run_args(data, out, "--data.corpus", str(corpus), *COMMON, *extra)
    args[args.index("--data.max_documents") + 1] = "600"
    return args


def losses(run: Path, prefix: str = "train") -> list[float]:
    return [r["loss"] for r in read_metrics(run, prefix)]


@pytest.fixture(scope="module")
def reference(short_docs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("single")
    train_in_process(run_args(short_docs, run, "--train.micro_batch_size", "8"))
    unmasked = tmp_path_factory.mktemp("single-unmasked")
    train_in_process(run_args(short_docs, unmasked, "--train.micro_batch_size", "8", "--model.attention.doc_mask", "false"))
    # the masks change the result here (else the pipeline cases below would prove nothing)
    assert max(abs(a - b) / a for a, b in zip(losses(run)[1:], losses(unmasked)[1:])) > 1e-3
    return run


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_pp2_with_document_masks_matches_single_process(schedule: str, short_docs: tuple[Path, Path],
                                                        reference: Path, tmp_path: Path) -> None:
    train_ranks(run_args(short_docs, tmp_path, "--parallel.pp", "2", "--parallel.dp_shard", "1",
                         "--parallel.pp_schedule", schedule, "--parallel.pp_microbatches", "2",
                         "--train.micro_batch_size", "4"), nproc=2)
    for name in ("train", "val"):
        ref, got = losses(reference, name), losses(tmp_path, name)
        assert len(got) == len(ref) > 0
        for a, b in zip(ref, got):
            assert abs(a - b) <= 1e-5 * abs(a), f"{schedule} {name}: {ref} vs {got}"
    assert_same_final_weights(reference, tmp_path, schedule)
