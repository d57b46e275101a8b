"""Running an exported ONNX directory with onnxruntime: greedy generation with the KV cache (one
prefill call, then one-token steps, as serve/generate.py runs lmforge's model), whole-sequence
logits for perplexity (callable like a model: `lm(tokens, doc_start=...)`, so lmforge/eval's
`heldout_perplexity` scores it over the same windows as the PyTorch model), and decode latency.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.interop.onnx.errors import OnnxError
from lmforge.interop.onnx.export import FORMAT, META, io_names


def read_meta(export_dir: Path) -> dict:
    """onnx_export.json of `export_dir`, checked to be one this version reads."""
    path = Path(export_dir) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OnnxError(f"{path}: cannot read the ONNX export's description ({e.__class__.__name__}); pass a "
                        "directory `lmforge export --format onnx` wrote") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise OnnxError(f"{path}: not an lmforge ONNX export of format {FORMAT}; export again with this version")
    return meta


class OnnxLM:
    """An exported decoder in an onnxruntime CPU session. `threads`: intra-op threads (None:
    torch's current count, so timings compare with lmforge's own at the same parallelism)."""

    def __init__(self, export_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.meta = read_meta(self.dir)
        m = self.meta["model"]
        self.n_layers, self.vocab_size, self.max_seq_len = int(m["n_layers"]), int(m["vocab_size"]), int(m["max_seq_len"])
        kv = self.meta["inputs"][2]["shape"]
        self.kv_heads, self.head_dim = int(kv[1]), int(kv[3])
        self.input_names, self.output_names = io_names(self.n_layers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.dir / self.meta["model_file"]), opts,
                                            providers=["CPUExecutionProvider"])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layers)]

    def run(self, input_ids: np.ndarray, past: list[np.ndarray], doc_start: np.ndarray | None = None
            ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (batch, seq, vocab), present) for `input_ids` after `past`."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        starts = np.zeros_like(ids) if doc_start is None else np.ascontiguousarray(doc_start, dtype=np.int64)
        out = self.session.run(None, {"input_ids": ids, "doc_start": starts,
                                      **dict(zip(self.input_names[2:], past, strict=True))})
        return out[0], out[1:]

    def __call__(self, tokens: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of whole sequences (no past), as `Transformer.forward(tokens, doc_start=...)`."""
        logits, _ = self.run(tokens.cpu().numpy(), self.empty_past(tokens.shape[0]),
                             None if doc_start is None else doc_start.cpu().numpy())
        return torch.from_numpy(logits)

    def _check_prompt(self, tokens: np.ndarray) -> None:
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise OnnxError(f"prompt has shape {tuple(tokens.shape)}: need (batch, seq) with seq >= 1")
        if tokens.shape[1] > self.max_seq_len:
            raise OnnxError(f"prompt of {tokens.shape[1]} tokens is longer than the model's max_seq_len "
                            f"({self.max_seq_len})")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise OnnxError(f"prompt token ids must be in [0, {self.vocab_size})")

    def generate(self, prompt_ids: list[int] | list[list[int]], max_new_tokens: int,
                 eos_id: int | None = None) -> list[list[int]]:
        """Greedy new tokens for each prompt row (same-length rows), by the rules of
        serve/generate.py's `generate`: a row stops at `eos_id` (kept), every row at max_new_tokens
        or at max_seq_len."""
        if max_new_tokens < 0:
            raise OnnxError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
        rows = prompt_ids if prompt_ids and isinstance(prompt_ids[0], list | tuple) else [prompt_ids]
        if len({len(r) for r in rows}) != 1:
            raise OnnxError("prompts in one batch must have the same length (no padding support)")
        tokens = np.asarray(rows, dtype=np.int64)
        self._check_prompt(tokens)
        batch, prompt_len = tokens.shape
        budget = min(max_new_tokens, self.max_seq_len - prompt_len)
        out: list[list[int]] = [[] for _ in range(batch)]
        if budget <= 0:
            return out
        done = [False] * batch
        logits, past = self.run(tokens, self.empty_past(batch))
        for step in range(budget):
            nxt = logits[:, -1].argmax(-1)
            for row, tok in enumerate(nxt.tolist()):
                if not done[row]:
                    out[row].append(tok)
                    done[row] = tok == eos_id
            if all(done) or step == budget - 1:
                break
            logits, past = self.run(nxt[:, None], past)
        return out

    def decode_seconds(self, prompt: np.ndarray, new_tokens: int) -> float:
        """Seconds of `new_tokens` greedy one-token steps after a prefill of `prompt` (1, n)."""
        logits, past = self.run(prompt, self.empty_past(prompt.shape[0]))
        nxt = logits[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = self.run(nxt[:, None], past)
            nxt = logits[:, -1].argmax(-1)
        return time.perf_counter() - t0


def decode_ms_per_token(step_seconds, prompts: list[np.ndarray], new_tokens: int, repeats: int = 3) -> float:
    """Median over `repeats` of the prompt set's decode time, per token, in ms. `step_seconds(prompt,
    new_tokens)` times one generation's decode steps (a warm-up pass runs first)."""
    for p in prompts:
        step_seconds(p, new_tokens)
    runs = [sum(step_seconds(p, new_tokens) for p in prompts) for _ in range(repeats)]
    return 1000 * statistics.median(runs) / (len(prompts) * new_tokens)
