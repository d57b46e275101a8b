"""Observability: FLOPs per token (flops), peak FLOP/s (peak), throughput/MFU, memory and the
metrics log (metrics), progress display (progress) and the loss plot (plot). Import the
submodules directly; this package imports nothing heavy on its own."""
