"""Tokenizer stage: a byte-level BPE trained with Hugging Face `tokenizers` on corpus.jsonl.

Byte-level (GPT-2 style) so any text, in any script, encodes without unknown tokens and decodes
back to exactly the same string. One special token, `<|endoftext|>` (id 0), marks the end of a
document; the packer appends it by id. Literal "<|endoftext|>" inside a document is encoded as
ordinary text (`encode_special_tokens`), so data can never inject a document boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.corpus import iter_corpus_texts
from lmforge.data.errors import DataError
from lmforge.data.files import atomic_open, fingerprint, read_json, same_content, write_json_atomic

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FORMAT = 1


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE with our pre-tokenizer and decoder (no normaliser: exact round trip)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# Longest text handed to the Rust tokenizer in one piece: it keeps offsets and pre-token strings
# for a whole input, about 200 bytes per character, so a 50 MB document would take 10 GB at once.
MAX_PIECE_CHARS = 1 << 18


def _is_cut(text: str, i: int) -> bool:
    """Whether a piece may start at `i`: a space between two non-space characters. Every pattern of
    the byte-level pre-tokenizer (GPT-2's regex) takes a space only as its first character, and none
    looks behind, so a pre-token starts at such a space in the whole text as in the piece: pieces
    encode to exactly the ids of the whole (BPE merges never cross pre-tokens)."""
    return text[i] == " " and not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace()


def bounded_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `max_chars` characters, cut at pre-token boundaries
    (`_is_cut`), so that encoding piece by piece gives the ids of encoding the whole in bounded
    memory. A stretch of `max_chars` without such a space (one giant "word") is cut where the
    limit falls; only the tokens at that cut can differ."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + 1, end)
        while cut > start and not _is_cut(text, cut):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _batches(texts: Iterator[str], size: int = 1000, max_chars: int = 4 * MAX_PIECE_CHARS) -> Iterator[list[str]]:
    """Lists of up to `size` texts and about `max_chars` characters (bounded memory per call)."""
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def meta_path(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".meta.json")


def _inputs(corpus_jsonl: Path, vocab_size: int, min_frequency: int, known: dict | None) -> dict:
    old = (known or {}).get("corpus")
    return {"format": TOKENIZER_FORMAT, "corpus": fingerprint(corpus_jsonl, old), "vocab_size": vocab_size,
            "min_frequency": min_frequency}


def _comparable(inputs: dict) -> dict:
    """Inputs without file timestamps: a corpus rewritten with the same bytes is still the same input."""
    return {**inputs, "corpus": inputs["corpus"]["sha256"]}


def tokenizer_is_current(corpus_jsonl: Path, out_path: Path, vocab_size: int, min_frequency: int = 2) -> bool:
    """Whether `out_path` was trained from this corpus content with these settings and is intact."""
    meta = read_json(meta_path(out_path))
    if not meta or "inputs" not in meta or not Path(corpus_jsonl).is_file():
        return False
    try:
        inputs = _inputs(corpus_jsonl, vocab_size, min_frequency, meta["inputs"])
        same = _comparable(inputs) == _comparable(meta["inputs"])
    except (KeyError, TypeError):
        return False
    return same and same_content(out_path, meta.get("output"))


def train_tokenizer(corpus_jsonl: Path, out_path: Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE of at most `vocab_size` tokens (eos + 256 bytes + merges) on the
    corpus texts and save it atomically as `out_path` (tokenizer.json), with a sidecar
    `<stem>.meta.json` recording the inputs so `tokenizer_is_current` can skip retraining."""
    corpus_jsonl, out_path = Path(corpus_jsonl), Path(out_path)
    if vocab_size < 257:
        raise DataError(f"tokenizer.vocab_size = {vocab_size}: must be >= 257 (256 bytes + {EOS_TOKEN})")
    if not corpus_jsonl.is_file():
        raise DataError(f"tokenizer: corpus {corpus_jsonl} does not exist; build the corpus first")
    inputs = _inputs(corpus_jsonl, vocab_size, min_frequency, None)
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    pieces = (piece for text in iter_corpus_texts(corpus_jsonl) for piece in bounded_pieces(text))
    tok.train_from_iterator(_batches(pieces), trainer=trainer)  # same word counts as whole texts
    if tok.token_to_id(EOS_TOKEN) != 0:  # invariant the packer and generation rely on
        raise RuntimeError(f"{EOS_TOKEN} got id {tok.token_to_id(EOS_TOKEN)}, expected 0")
    with atomic_open(out_path, "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=False))
    write_json_atomic(meta_path(out_path), {"inputs": inputs, "output": fingerprint(out_path),
                                            "vocab_size": tok.get_vocab_size()})
    return out_path


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the few operations training and serving need.

    `encode` never adds special tokens and treats "<|endoftext|>" in text as text; `decode` keeps
    special tokens, so `decode(encode(x)) == x` for every string x.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS_TOKEN, source: str = "<memory>"):
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise DataError(f"tokenizer {source} has no {eos_token!r} token; retrain it with "
                            "`lmforge data prepare` or pass its end-of-text token")
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eos_id: int = eos
        self.eos_token = eos_token

    @classmethod
    def from_file(cls, path: Path | str, eos_token: str = EOS_TOKEN) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; run `lmforge data prepare` first")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise DataError(f"tokenizer file {path} is not a valid tokenizers JSON ({e})") from None
        return cls(tok, eos_token, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding table needs at least this many rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel on the Rust side (the fast path for packing)."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
