"""Serving trained models: generation with a KV cache (generate.py), passages sampled into a jsonl
for the data pipeline's synthetic-text detector (sample.py: `lmforge data sample`) and the
OpenAI-compatible HTTP server of `lmforge serve` (server/: FastAPI + uvicorn, bound to 127.0.0.1 by
default, continuous batching, admission, circuit breaker, metrics, feedback; static/: its chat
page). Serving loads weights through `lmforge.checkpoint` or `lmforge.interop`; it never trains.
"""
