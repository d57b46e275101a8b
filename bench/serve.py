"""`lmforge serve` under load, loopback only, about two minutes.

1. Throughput: 16 concurrent clients (non-streaming, greedy, max_tokens 64) against the server
   in its own process, vs the baseline: the same requests one after another through generate()
   with a KV cache, which is what `lmforge generate` runs (its process start not counted).
   Target: >= 5x generated tokens/s.
2. Unloaded latency: one client at a time; p99.
3. Overload: open-loop arrivals at 2x the measured capacity (requests/s of step 1) for 20 s, each
   request with a deadline of 1.9x the unloaded p99 (its latency objective); the server admits a
   request only when a slot is free (--max-queue 0: drop rather than queue, vllm#17736) and drops
   an admitted one at its deadline (504). Admitted = answered 200 or dropped 504. Targets: the server stays up (/health), sheds with 429/503, the
   admitted requests' p99 latency <= 2x the unloaded p99, and no answer arrives after its deadline.

    python bench/serve.py [RUN_DIR]     (default: runs/tiny-dense of the main job)
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._check import verdict  # noqa: E402

MAX_TOKENS = 64
CLIENTS = 16
DEADLINE_X = 1.9  # each overload request's deadline: 1.9x the unloaded p99 (the latency objective)
PROMPTS = ["KING HENRY.", "And the LORD said unto Moses,", "FIRST LORD.", "O Romeo,", "In the beginning",
           "HAMLET.", "Then said Jesus", "My lord,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_tokens_per_s(run: Path, n: int) -> float:
    """generate() one request at a time, as `lmforge generate` does (one thread, KV cache)."""
    import torch

    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import generate, load_for_generation

    torch.set_num_threads(1)
    model, _, tok_json = load_for_generation(run)
    tok = TextTokenizer.from_file(tok_json)
    generate(model, tok.encode(PROMPTS[0]), 8)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in range(n):
        out = generate(model, tok.encode(PROMPTS[i % len(PROMPTS)]), MAX_TOKENS, eos_id=tok.eos_id)[0]
        tokens += len(out)
    return tokens / (time.perf_counter() - t0)


def body(i: int, **extra) -> dict:
    return {"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


async def closed_loop(url: str, clients: int, per_client: int) -> tuple[float, float, list[float]]:
    """(tokens/s, requests/s, latencies) with `clients` each sending `per_client` requests in turn."""
    lat: list[float] = []
    tokens = 0

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            t = time.perf_counter()
            r = await c.post("/v1/completions", json=body(w * per_client + k))
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c, w) for w in range(clients)])
        wall = time.perf_counter() - t0
    return tokens / wall, clients * per_client / wall, lat


async def open_loop(url: str, rate: float, seconds: float, deadline_s: float) -> list[tuple[int, float, float]]:
    """Poisson arrivals at `rate`/s; (status, latency seen by the client, the server's own
    arrival-to-answer time from its X-Request-Seconds header, nan when absent) of each."""
    rng = random.Random(0)
    out: list[tuple[int, float, float]] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        t = time.perf_counter()
        try:
            r = await c.post("/v1/completions", json=body(i, deadline_s=deadline_s))
            out.append((r.status_code, time.perf_counter() - t, float(r.headers.get("x-request-seconds", "nan"))))
        except httpx.HTTPError:
            out.append((-1, time.perf_counter() - t, float("nan")))

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1000)) as c:
        tasks, end, i = [], time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(c, i)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return out


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")


def main() -> int:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "runs" / "tiny-dense"
    if not run.exists():
        print(f"{run}: no such run; train it first (bash scripts/run_default.sh) or pass a run directory",
              file=sys.stderr)
        return 2
    print(f"model: {run}")
    base = baseline_tokens_per_s(run, 16)
    print(f"baseline (sequential generate(), KV cache, 1 thread): {base:,.0f} tokens/s")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                               "--model-name", "m", "--threads", "1", "--no-access-log", "--log-level", "warning",
                               "--slots", "16", "--max-batch-tokens", "256", "--max-queue", "0"],
                              env=env, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    status = 0
    try:
        for _ in range(300):
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(closed_loop(url, 4, 2))  # warm-up
        tps, rps, lat16 = asyncio.run(closed_loop(url, CLIENTS, 4))
        print(f"16 clients: {tps:,.0f} tokens/s, {rps:.2f} requests/s, p99 latency {p99(lat16):.3f} s")
        status |= verdict("serve_throughput", "sequential generate()", "tokens/s ratio at 16 clients", tps / base, 5.0)
        _, _, lat1 = asyncio.run(closed_loop(url, 1, 12))
        unloaded = p99(lat1)
        print(f"unloaded (1 client): p99 latency {unloaded:.3f} s, median {sorted(lat1)[len(lat1) // 2]:.3f} s")
        deadline = round(DEADLINE_X * unloaded, 2)
        print(f"overload requests carry deadline_s = {deadline} ({DEADLINE_X:g}x the unloaded p99)")
        res = asyncio.run(open_loop(url, 2 * rps, 20.0, deadline))
        codes = [c for c, _, _ in res]
        ok_lat = [t for c, t, _ in res if c == 200]
        admitted = [t for c, t, _ in res if c in (200, 504)]
        late = [s for c, _, s in res if c == 200 and not s <= deadline]  # by the server's clock (nan: late)
        late_client = [t - deadline for t in ok_lat if t > deadline]
        shed = sum(c in (429, 503) for c in codes)
        print(f"overload at {2 * rps:.1f} requests/s (2x capacity) for 20 s: {len(res)} requests, "
              f"{codes.count(200)} answered, {codes.count(429)} x 429, {codes.count(503)} x 503, "
              f"{codes.count(504)} x 504 (dropped at the deadline), {codes.count(-1)} transport errors; "
              f"admitted p99 {p99(admitted):.3f} s ({p99(admitted) / unloaded:.2f}x unloaded), answered (200) p99 "
              f"{p99(ok_lat):.3f} s ({p99(ok_lat) / unloaded:.2f}x); answers after their deadline: {len(late)} by the "
              f"server's clock; by the client's, {len(late_client)}"
              + (f" (at most {1000 * max(late_client):.0f} ms over: the way there and back)" if late_client else ""))
        up = httpx.get(url + "/health").status_code == 200
        print(f"server up after the overload: {up}")
        status |= verdict("serve_overload_p99", "2x unloaded p99", "2x unloaded p99 / admitted p99 at 2x capacity",
                          2 * unloaded / p99(admitted), 1.0)
        status |= verdict("serve_overload_shed", "requests at 2x capacity", "shed share (429/503) > 0, server up, "
                          "none late, no transport error",
                          float(up and shed > 0 and not late and codes.count(-1) == 0), 1.0)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return status


if __name__ == "__main__":
    sys.exit(main())
