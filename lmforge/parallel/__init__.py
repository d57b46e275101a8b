"""Parallelism applied to plain models from outside: the DeviceMesh (mesh.py), FSDP2, DDP, tensor
and sequence parallel, expert parallel, pipeline parallel, activation checkpointing, compile and
global grad-norm clipping. Generic mechanisms only: a model family's own layout (its
tensor-parallel plan) lives beside the model in `lmforge/models/<family>/`.
"""
