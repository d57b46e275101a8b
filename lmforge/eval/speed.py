"""Generation speed and memory at batch 1: prefill tokens/s (the prompt in one forward that fills
the KV cache) and decode tokens/s (one token per forward, greedy), as `lmforge generate` runs with
its cache (serve/generate.py makes the same calls: one prefill forward, then one-token steps).

A fixed prompt set (seeded token ids: speed does not depend on what the tokens say) runs once to
warm up, then `repeats` times; each figure is the median over the repeats of the set's total time.
Timings and the process's peak memory vary from run to run: they are reported, never compared.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from torch import nn

PROMPTS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


@torch.inference_mode()
def _one(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, KV cache bytes) of one greedy generation."""
    device = prompt.device
    cache = model.new_kv_cache(1, prompt.shape[1] + new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    nxt = model(prompt, cache=cache)[:, -1].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    kv = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
    return t1 - t0, t2 - t1, kv


def measure_speed(model: nn.Module, vocab_size: int, max_seq_len: int, device: torch.device,
                  repeats: int = 3) -> dict:
    """Prefill and decode tokens/s (medians over `repeats`), the KV cache's size and peak memory."""
    prompt_len = max(1, min(128, max_seq_len // 2))
    new_tokens = max(1, min(64, max_seq_len - prompt_len))
    prompts = [torch.randint(0, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(i)).to(device)
               for i in range(PROMPTS)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    try:
        for p in prompts:  # warm-up: kernel choices, allocator, caches
            _one(model, p, new_tokens)
        runs = [[_one(model, p, new_tokens) for p in prompts] for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill = statistics.median(sum(r[0] for r in run) for run in runs)
    decode = statistics.median(sum(r[1] for r in run) for run in runs)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = {"parameter_bytes": params, "kv_cache_bytes": runs[0][0][2]}
    if device.type == "cuda":
        memory["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        memory["peak_rss_bytes"] = _peak_rss_bytes()  # of the whole process so far, loading included
    return {"batch": 1, "prompts": PROMPTS, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
            "prefill_tokens_per_s": PROMPTS * prompt_len / prefill, "decode_tokens_per_s": PROMPTS * new_tokens / decode,
            "prefill_s": prefill, "decode_s": decode, "memory": memory}
