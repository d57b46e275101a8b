"""Conversions between lmforge models or runs and other ecosystems' formats (today Hugging Face:
`lmforge.interop.hf`).

Layering: interop may import `config`, `models`, `checkpoint` and `storage`; none of those imports
interop, so a model stays plain PyTorch that knows nothing of file formats.
"""
