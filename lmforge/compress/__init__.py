"""Model compression after training: quantization (torchao), pruning and distillation, one method
per module, each taking a checkpoint and writing a new one (temp then rename) that
`lmforge.serve` and `lmforge.eval` can load. Compression reads and writes checkpoints; it does not
import the trainer.
"""
