"""The held-out split of a packed data directory as evaluation needs it: its tokens, where each
document starts, each document's text and domain, and the tokenizer its ids mean.

Why documents map to domains this way: the pack keeps, per split, the token offset where each
document starts (`val.idx.npy`) and the corpus line each document was (`val.docs.npy`); that line
of the corpus the pack was made from (the default pipeline's `pipeline/output.jsonl`, else
`corpus.jsonl`; the one whose sha256 the manifest records) carries the pipeline's label as
`metadata.domain`, exactly what `data/pack.py` read when it packed. Nothing is guessed from text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.config import ModelConfig
from lmforge.data.errors import DataError
from lmforge.data.files import packed_corpus, read_json
from lmforge.data.loader import TokenDataset
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.errors import EvalError

UNLABELLED = "unlabelled"  # the pack's name for documents without a domain (data/pack.py)


@dataclass
class HeldOut:
    """The validation split: tokens (`dataset`), document starts (`starts`, documents + 1 offsets),
    and per document its corpus line, text and domain (texts empty when the corpus is gone)."""

    data_dir: Path
    dataset: TokenDataset
    starts: np.ndarray
    rows: np.ndarray
    texts: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    corpus_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """Whether the pipeline's domain labels are known for these documents."""
        return bool(self.domains) and any(d != UNLABELLED for d in self.domains)

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """The document index of each token position of the split."""
        return np.searchsorted(self.starts, positions, side="right") - 1


def _read_rows(path: Path, rows: np.ndarray) -> dict[int, tuple[str, str]]:
    """{row: (text, domain)} for the wanted corpus lines, in one streamed pass."""
    wanted, out = {int(r) for r in rows}, {}
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f):
            if row in wanted:
                obj = json.loads(line)
                out[row] = (str(obj["text"]), str((obj.get("metadata") or {}).get("domain") or "") or UNLABELLED)
                if len(out) == len(wanted):
                    break
    return out


def open_heldout(data_dir: Path) -> HeldOut:
    """The validation split of `data_dir` (checked as the trainer checks it), with texts and domains
    when the corpus it was packed from is still there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"data dir {data_dir} does not exist; pass --data-dir DIR, a directory `lmforge data "
                        "prepare` wrote (manifest.json, val.bin)")
    dataset = TokenDataset(data_dir, "val")  # DataError in one line when it is not a valid pack
    try:
        starts = np.load(data_dir / "val.idx.npy")
        rows = np.load(data_dir / "val.docs.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"{data_dir}: cannot read the validation document index ({e.__class__.__name__}: {e}); "
                        "rerun `lmforge data prepare`") from None
    if len(starts) != dataset.n_documents + 1 or int(starts[-1]) != dataset.n_tokens or len(rows) != dataset.n_documents:
        raise DataError(f"{data_dir}: val.idx.npy / val.docs.npy do not match the manifest's {dataset.n_documents} "
                        f"documents and {dataset.n_tokens} tokens; rerun `lmforge data prepare`")
    held = HeldOut(data_dir, dataset, starts, rows)
    manifest = read_json(data_dir / "manifest.json") or {}
    corpus = packed_corpus(data_dir, manifest)
    if corpus is None:
        held.notes.append(f"no per-domain figures and no cloze task: the corpus {data_dir} was packed from is gone "
                          "or changed since (neither pipeline/output.jsonl nor corpus.jsonl has the manifest's sha256)")
        return held
    try:
        found = _read_rows(corpus, rows)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{corpus}: a line is not a corpus line written by lmforge; rerun `lmforge data prepare`") \
            from None
    if len(found) != len(rows):
        raise DataError(f"{corpus} has fewer lines than val.docs.npy names; rerun `lmforge data prepare`")
    held.corpus_file = corpus
    held.texts = [found[int(r)][0] for r in rows]
    held.domains = [found[int(r)][1] for r in rows]
    if not held.labelled:
        held.notes.append(f"no per-domain figures: the documents of {corpus.name} carry no domain label "
                          "(metadata.domain, the pipeline's `domain` step); overall figures only")
    return held


def check_tokenizer(data_dir: Path, cfg: ModelConfig, model_tokenizer: Path | None) -> TextTokenizer:
    """The data dir's tokenizer, refused in one line when its ids cannot be the model's: more ids
    than the model's vocabulary, or a vocabulary other than the tokenizer shipped with the model."""
    tok = TextTokenizer.from_file(Path(data_dir) / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise EvalError(f"data dir {data_dir}: its tokenizer has {tok.vocab_size} ids, more than the model's "
                        f"vocab_size {cfg.vocab_size}; pass --data-dir of the data this model was trained on")
    if model_tokenizer is not None:
        mine = TextTokenizer.from_file(model_tokenizer)
        if mine.backend.get_vocab(with_added_tokens=True) != tok.backend.get_vocab(with_added_tokens=True):
            raise EvalError(f"data dir {data_dir}: its tokenizer.json is not the model's ({model_tokenizer}): the "
                            "same ids would mean other text; pass --data-dir of the data this model was trained on")
    return tok
