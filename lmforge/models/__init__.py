"""Model families as plain single-device PyTorch modules: one folder per family (`llama/`: dense and
MoE Llama-style decoders, its named sizes and its tensor-parallel plan) reusing the building blocks
in `common/` (attention, RMSNorm, RoPE, SwiGLU, MoE, KV cache, fast fp32 linear). No process groups
here: parallelism is applied from outside by `lmforge.parallel`.
"""
