"""The planner: predicts memory and speed of a training job from its config before anything runs
(parameter, gradient, optimizer and activation bytes per rank for a parallel layout; step time from
FLOPs and a measured peak), and ranks layouts for a machine. Pure arithmetic over `lmforge.config`:
it imports no model code, allocates no tensors and starts no process group.
"""
