"""Autoregressive text generation: sampling (temperature, top-k, top-p) with or without a KV cache,
and loading a model to generate from (a Hugging Face directory, an lmforge run or a checkpoint).

The cached path (one prefill forward, then one-token steps) and the recompute-everything path
make the same sampling calls in the same order, so with one seed they give the same tokens; the
tests hold them to that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.weights import load_model_weights
from lmforge.compress.artifact import load_quantized, read_quantized
from lmforge.config import ModelConfig
from lmforge.config.loader import ConfigError, build_dataclass
from lmforge.interop.hf.importer import import_hf
from lmforge.models.llama.model import Transformer
from lmforge.models.registry import family_of
from lmforge.serve.early_exit import EarlyExitDecoder, ExitPolicy
from lmforge.storage.layout import RunDir
from lmforge.storage.model_dir import is_run_dir, model_dir_kind


class GenerationError(ValueError):
    """Bad generation arguments or a source we cannot generate from; the message is one line."""


# -- sampling ----------------------------------------------------------------------------------


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 <= temperature < float("inf"):  # also refuses NaN; inf would divide every logit to 0
        raise GenerationError(f"temperature = {temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k = {top_k}: must be >= 1 or none")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p = {top_p}: must be in (0, 1] or none")


def context_note(max_new_tokens: int, prompt_len: int, max_seq_len: int) -> str | None:
    """The note to show when generation will stop at the context length before max_new_tokens."""
    room = max(0, max_seq_len - prompt_len)
    if max_new_tokens <= room:
        return None
    return (f"note: generating at most {room} of --max-new-tokens {max_new_tokens}: the model's context is "
            f"{max_seq_len} tokens and the prompt takes {prompt_len}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the nucleus: the smallest set of
    most likely tokens whose probability sums to >= top_p (the most likely token always stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,). temperature 0 is greedy (argmax)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- generation --------------------------------------------------------------------------------


def _prompt_tensor(prompt_ids: list[int] | list[list[int]] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(prompt_ids, torch.Tensor):
        tokens = prompt_ids if prompt_ids.dim() == 2 else prompt_ids.reshape(1, -1)
    elif prompt_ids and all(isinstance(row, list | tuple) for row in prompt_ids):
        if len({len(row) for row in prompt_ids}) != 1:
            raise GenerationError("prompts in one batch must have the same length (no padding support)")
        tokens = torch.tensor(prompt_ids, dtype=torch.long)
    else:
        tokens = torch.tensor([list(prompt_ids)], dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise GenerationError(f"prompt has shape {tuple(tokens.shape)}: need (batch, seq) with seq >= 1")
    return tokens.to(device=device, dtype=torch.long)


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int] | list[list[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, use_cache: bool = True, eos_id: int | None = None,
             logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             early_exit: ExitPolicy | None = None, exit_depths: list[int] | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt row (the prompt not included). A row stops at `eos_id` (which is
    kept as its last token), every row at `max_new_tokens` or at the model's max_seq_len.
    `logits_processor(tokens so far (batch, seq), logits (batch, vocab)) -> logits` runs on the raw
    logits before each sampling step, in both paths (e.g. safety/watermark.py's watermark).
    `early_exit`: adaptive depth (serve/early_exit.py; needs the cache): each decoded token comes
    from the first confident exit; the blocks each step ran are appended to `exit_depths`."""
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    device = next(model.parameters()).device
    tokens = _prompt_tensor(prompt_ids, device)
    batch, prompt_len = tokens.shape
    max_len = model.cfg.max_seq_len
    if prompt_len > max_len:
        raise GenerationError(f"prompt of {prompt_len} tokens is longer than the model's max_seq_len ({max_len})")
    if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
        raise GenerationError(f"prompt token ids must be in [0, {model.cfg.vocab_size})")
    budget = min(max_new_tokens, max_len - prompt_len)
    out: list[list[int]] = [[] for _ in range(batch)]
    if budget == 0:
        return out
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    try:
        if early_exit is not None:
            if not use_cache:
                raise GenerationError("early exit needs the KV cache (use_cache = True)")
            exiting = EarlyExitDecoder(model, batch, prompt_len + budget, early_exit)
        cache = model.new_kv_cache(batch, prompt_len + budget) if use_cache and early_exit is None else None
        logits = model(tokens, cache=cache)[:, -1] if early_exit is None else exiting.prefill(tokens)
        done = [False] * batch
        for step in range(budget):
            if logits_processor is not None:
                logits = logits_processor(tokens, logits)
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
            for row, tok in enumerate(nxt.tolist()):
                if not done[row]:
                    out[row].append(tok)
                    done[row] = tok == eos_id
            if all(done) or step == budget - 1:
                break
            if not use_cache or logits_processor is not None:  # the tokens so far: the input, or the processor's
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if early_exit is not None:
                logits = exiting.step(nxt[:, None])
            elif cache is not None:
                logits = model(nxt[:, None], cache=cache)[:, -1]
            else:
                logits = model(tokens)[:, -1]
    finally:
        model.train(was_training)
    if early_exit is not None and exit_depths is not None:
        exit_depths.extend(exiting.depths)
    return out


# -- loading -----------------------------------------------------------------------------------

def _read_run_config(run_dir: Path) -> dict:
    path = RunDir(run_dir).config
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GenerationError(f"{path}: cannot read run config ({e.__class__.__name__}: {e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise GenerationError(f"{path}: not an lmforge run config (no 'model' table)")
    return d


def newest_checkpoint(ckpt_root: Path) -> Path:
    """The newest valid checkpoint under `ckpt_root` (the manager verifies each against its manifest
    and skips, with a warning, incomplete or corrupt newer ones)."""
    found = CheckpointManager(ckpt_root, keep_last=1).latest_valid()
    if found is None:
        raise CheckpointError(f"{ckpt_root}: no valid checkpoint (step-N directories with a manifest)")
    return Path(found)


@dataclass(frozen=True)
class ModelSource:
    """What a path given to `generate`, `export` or `eval` is: a Hugging Face directory, an
    lmforge checkpoint (`step_dir`) with the run it belongs to (`run_dir`, whose config.json is
    `run_config`), or a quantized directory (`lmforge compress quantize`: `run_dir` is itself, its
    run_config.json the source run's config)."""

    path: Path
    kind: str  # "hf", "run" (its newest valid checkpoint), "checkpoint" (one step directory) or "quantized"
    step_dir: Path | None = None
    run_dir: Path | None = None
    run_config: dict = field(default_factory=dict)


def resolve_source(path: Path) -> ModelSource:
    """Which kind of model directory `path` is (storage/model_dir.py, from its marker files), and for
    a run its newest valid checkpoint."""
    path = Path(path)
    kind = model_dir_kind(path)
    if kind == "quantized":
        return ModelSource(path, "quantized", None, path, read_quantized(path).run_config)
    if kind == "hf":
        return ModelSource(path, "hf")
    if kind == "run":
        d = _read_run_config(path)
        ck = d.get("checkpoint") if isinstance(d.get("checkpoint"), dict) else {}
        step_dir = newest_checkpoint(RunDir(path, ck.get("folder", "checkpoints")).checkpoints)
        return ModelSource(path, "run", step_dir, path, d)
    run_dir = next((p for p in (path.parent.parent, path.parent) if is_run_dir(p)), None)
    if run_dir is None:
        raise GenerationError(f"{path}: checkpoint has no run config.json two levels up "
                              "(expected <run>/checkpoints/step-N)")
    return ModelSource(path, "checkpoint", path, run_dir, _read_run_config(run_dir))


def load_source(src: ModelSource, device: torch.device | str = "cpu", dequantize: bool = False
                ) -> tuple[Transformer, ModelConfig, Path | None]:
    """(model in eval mode, its config, tokenizer.json or None) of a resolved source; a quantized one
    with its recorded runtime, or with `dequantize` as plain fp32 weights equal to its stored numbers."""
    if src.kind == "quantized":
        return load_quantized(src.path, device, dequantize=dequantize)
    if src.kind == "hf":
        model, cfg = import_hf(src.path, device)
        tok = src.path / "tokenizer.json"
        return model.eval(), cfg, tok if tok.is_file() else None
    assert src.run_dir is not None and src.step_dir is not None
    try:
        cfg = build_dataclass(ModelConfig, src.run_config["model"], "model.", where=str(RunDir(src.run_dir).config))
        cfg.validate()
    except ConfigError as e:
        raise GenerationError(str(e)) from None
    model = family_of(cfg).build(cfg, device, 0)  # materialises buffers; the weights are overwritten
    load_model_weights(src.step_dir, model)  # verifies the manifest first; CheckpointError if invalid
    tok = RunDir(src.run_dir).tokenizer
    return model.eval(), cfg, tok if tok.is_file() else None


def load_for_generation(path: Path, device: torch.device | str = "cpu"
                        ) -> tuple[Transformer, ModelConfig, Path | None]:
    """(model in eval mode, its config, tokenizer.json or None) from a Hugging Face directory
    (config.json + model.safetensors), an lmforge run directory (newest checkpoint), one
    checkpoint step directory (<run>/checkpoints/step-N) or a quantized directory."""
    return load_source(resolve_source(Path(path)), device)
