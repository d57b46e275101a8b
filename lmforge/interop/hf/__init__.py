"""Hugging Face interop: an lmforge model <-> a directory `transformers` loads (config.json,
safetensors weights, tokenizer files), for Llama, Mixtral and Qwen2-MoE.

    base.py       HFFormatError, the HFAdapter interface each family implements, shared helpers
    llama.py      the Llama adapter and the Llama decoder layout the MoE families extend
    moe.py        what Mixtral and Qwen2-MoE share (router checks, per-expert weight layout)
    mixtral.py    the Mixtral adapter
    qwen2_moe.py  the Qwen2-MoE adapter
    registry.py   model_type -> adapter; picks the adapter for a config.json or a ModelConfig
    io.py         the files: config.json, safetensors (sharded or not), tokenizer files
    exporter.py   export_hf: a model -> an HF directory
    importer.py   import_hf: an HF directory -> a model; import_to_run: -> an lmforge run directory

Adding a family is one adapter module (an `HFAdapter` subclass) and one line in
`registry.ADAPTERS`. `transformers` is not needed: the files are read and written directly, so an
export works where only torch and safetensors are installed.
"""
