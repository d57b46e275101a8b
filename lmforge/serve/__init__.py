"""Serving trained models: generation with a KV cache (generate.py), passages sampled into a jsonl
for the data pipeline's synthetic-text detector (sample.py: `lmforge data sample`) and, as the
platform grows, the HTTP server (FastAPI + uvicorn, bound to 127.0.0.1 by default), batching and
the safety filters around it. Serving loads weights through `lmforge.checkpoint` or `lmforge.interop`; it never
trains.
"""
