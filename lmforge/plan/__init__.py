"""The planner: predicts memory and speed of a training job from its config before anything runs
(parameter, gradient, optimizer and activation bytes per rank for a parallel layout; step time from
FLOPs and a measured peak), and ranks layouts for a machine. Pure arithmetic over `lmforge.config`
and the one FLOP counter (`lmforge.observability.flops`): it imports no model code and no torch,
allocates no tensors and starts no process group. Entry point: `predict.predict(job, cluster,
world_size)`; `lmforge plan` (lmforge/cli_plan.py) runs `search.search` over it, and for its
scaling and cost tables `sweep.sweep` (the fastest layout at each world size, by the same model).
"""
