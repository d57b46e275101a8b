"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model.

One concern per module: `app.py` (routes), `schemas.py` (request bodies), `engine.py` (the
continuous-batching loop on its own thread) with `scheduler.py` (what each step runs under the
token budget), `admission.py` (the bounded queue and deadlines), `breaker.py` (the circuit
breaker), `auth.py`, `metrics.py` (Prometheus), `text.py` (incremental detokenizing, stop strings,
the chat prompt), `feedback.py` (preference records), `options.py` (the limits), `errors.py`.
"""
