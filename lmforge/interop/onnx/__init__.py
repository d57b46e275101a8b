"""ONNX export of lmforge decoders (`lmforge export --format onnx`) and running the result in
onnxruntime: `export.py` (the directory, refusals, int8), `decoder.py` (the model as a function of
explicit KV-cache tensors: what is exported), `runtime.py` (greedy generation with the cache,
perplexity logits, decode latency). onnx, onnxruntime and onnxscript are the `export` extra."""
