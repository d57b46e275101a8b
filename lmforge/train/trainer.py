"""The training loop: one process or many under torchrun, the same code.

Build order (DESIGN.md): model on meta -> parallelism from outside (activation checkpointing ->
compile -> data parallel) -> materialise + init -> optimizer -> resume. Everything stateful goes
into the checkpoint, so a resume continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.state import ModelOptimizerState, RNGState
from lmforge.config import JobConfig
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.pack import prepare_data
from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.llama.model import Transformer
from lmforge.observability.flops import training_flops_per_token
from lmforge.observability.memory import ActivationMeter, model_state_bytes
from lmforge.observability.metrics import MetricsLogger, memory_stats
from lmforge.observability.peak import resolve_peak_flops
from lmforge.observability.plot import plot_loss_curve
from lmforge.observability.progress import ProgressBar
from lmforge.parallel.ac import apply_activation_checkpointing
from lmforge.parallel.clip import clip_grad_norm_
from lmforge.parallel.compile import apply_compile
from lmforge.parallel.ddp import apply_ddp
from lmforge.parallel.ep import apply_ep, apply_expert_fsdp
from lmforge.parallel.fsdp import apply_fsdp
from lmforge.parallel.mesh import DistInfo, build_mesh, init_distributed, shutdown_distributed
from lmforge.parallel.pp import (
    PipelineParts,
    broadcast_loss,
    build_schedule,
    materialise_part,
    parts_module,
    pipeline_eval,
    pipeline_step,
    plan_pipeline,
    split_model,
)
from lmforge.parallel.tp import apply_tp, local_value, loss_parallel_ctx, tp_cross_entropy
from lmforge.train.moe import moe_layers, moe_metrics, router_loss, update_expert_biases
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import DTYPES, autocast_context, build_grad_scaler
from lmforge.train.schedule import build_scheduler
from lmforge.train.state import TrainState

log = logging.getLogger("lmforge.train")


class Trainer:
    """Owns the process group for its lifetime when it created it; call `close()` at the end."""

    def __init__(self, cfg: JobConfig, *, echo: bool = True):
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.parallel, cfg.train.device)
        try:
            self._setup(cfg, echo)
        except BaseException:
            shutdown_distributed(barrier=False)
            raise

    def _setup(self, cfg: JobConfig, echo: bool) -> None:
        r = cfg.parallel.resolved(self.info.world_size)
        self.loss_parallel = r.tp > 1 and r.loss_parallel
        self.is_main = self.info.rank == 0
        self.echo = echo and self.is_main
        self.mesh = build_mesh(self.info, cfg.parallel)
        self.dp_mesh = self.mesh.dp
        self.device = self.info.device
        self.run_dir = Path(cfg.train.output_dir)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)

        self.data_dir = self._prepare_data()
        self.scaler = build_grad_scaler(cfg.train.mixed_precision, self.device)
        self.accum = cfg.accum_steps(self.info.world_size)
        self.pipe: PipelineParts | None = None
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.moe = moe_layers(self.model)  # (block index, MoE) pairs; empty for dense models
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.train.steps)
        self.state = TrainState()
        self._measure_activations = True
        self.activation_bytes = 0
        self.state_bytes: dict[str, int] = {}

        dp_rank, dp_world = self.dp_mesh.get_local_rank(), self.dp_mesh.size()
        self.train_loader = DistributedTokenLoader(
            TokenDataset(self.data_dir, "train"), cfg.train.seq_len, cfg.train.micro_batch_size,
            dp_rank, dp_world, seed=cfg.data.seed, shuffle=True)
        self.val_loader = DistributedTokenLoader(
            TokenDataset(self.data_dir, "val"), cfg.train.seq_len, cfg.train.micro_batch_size,
            dp_rank, dp_world, seed=cfg.data.seed, shuffle=False)

        self.ckpt = CheckpointManager(self.run_dir / cfg.checkpoint.folder, cfg.checkpoint.keep_last,
                                      process_group=None)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops = self._peak_flops() if self.is_main else 0.0
        # Global mean loss at each logged step (all-reduced only then: no per-step host sync).
        self.losses: list[float] = []
        if self.is_main:
            self._write_run_files()
        self._resume()
        # After the resume, so TensorBoard hides what a crashed run logged past the checkpoint.
        self.metrics = MetricsLogger(self.run_dir, jsonl=cfg.metrics.jsonl, tensorboard=cfg.metrics.tensorboard,
                                     enabled=self.is_main, purge_step=self.state.step + 1 if self.state.step else None)

    # -- setup -----------------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.echo:
            print(msg, flush=True)

    def _prepare_data(self) -> Path:
        """Rank 0 builds corpus/tokenizer/shards if missing (each stage skips when done)."""
        if self.is_main:
            prepare_data(self.cfg.data, self.cfg.tokenizer, log=self._say)
        dist.barrier()
        data_dir = Path(self.cfg.data.dir)
        tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
        if tok.vocab_size > self.cfg.model.vocab_size:
            from lmforge.config import ConfigError
            raise ConfigError("model.vocab_size", self.cfg.model.vocab_size,
                              f"must be >= the tokenizer's vocabulary ({tok.vocab_size}, {data_dir})")
        return data_dir

    def _full_init(self, model: torch.nn.Module) -> bool:
        """Initialise the whole model before sharding when it is small (every layout then starts
        from the weights one process would have); big models initialise their shards after
        sharding, so they never exist whole in one process."""
        mode = self.cfg.train.init
        if mode != "auto":
            return mode == "full"
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return nbytes <= 2 * 2**30

    def _materialise(self, model: torch.nn.Module) -> None:
        model.to_empty(device=self.device)
        # Same seed on every rank: replicas start identical without a broadcast.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            model.init_weights(self.device)

    def _parallelize(self, module: torch.nn.Module, pipeline: bool) -> None:
        """TP -> EP -> activation checkpointing -> compile -> FSDP2, in place (DESIGN.md's order)."""
        cfg, degrees = self.cfg, self.mesh.degrees
        if degrees["tp"] > 1:
            apply_tp(module, self.mesh["tp"], cfg.parallel.sequence_parallel, cfg.parallel.loss_parallel)
        if degrees["ep"] > 1:
            apply_ep(module, self.mesh["ep"])
        apply_activation_checkpointing(module, cfg.train.activation_checkpointing, cfg.train.ac_every)
        if cfg.train.compile:
            apply_compile(module)
        if degrees["ep"] > 1:  # experts over dp_shard / ep first; the blocks then leave them alone
            apply_expert_fsdp(module, self.mesh.expert_fsdp, cfg.parallel, self.device, pipeline=pipeline)
        if degrees["dp_shard"] > 1:
            apply_fsdp(module, self.mesh.fsdp, cfg.parallel, self.device, pipeline=pipeline)

    def _build_model(self) -> torch.nn.Module:
        """meta -> (full init) -> [pipeline split] -> TP -> AC -> compile -> FSDP2 or DDP -> (sharded
        init). Returns the module whose state dict is checkpointed (under pipelining a view of this
        rank's stages with the model's own parameter names; the schedule in `self.pipe` runs them)."""
        cfg, degrees = self.cfg, self.mesh.degrees
        with torch.device("meta"):
            model = Transformer(cfg.model)
        n_params = sum(p.numel() for p in model.parameters())
        use_fsdp = degrees["dp_shard"] > 1
        # DDP and one process need whole weights; so does TP on CPU, where DTensor has no RNG
        # tracker and shards initialised after sharding would repeat each other.
        full = self._full_init(model) or not use_fsdp or (degrees["tp"] > 1 and self.device.type == "cpu") \
            or (degrees["ep"] > 1 and self.device.type == "cpu")
        if full:
            self._materialise(model)
        layout = " x ".join(f"{k}={v}" for k, v in degrees.items() if v > 1) or "single process"
        self._say(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, dim {cfg.model.dim}; "
                  f"world size {self.info.world_size} ({self.info.backend}): {layout}")
        if degrees["pp"] > 1:
            return self._build_pipeline(model, full)
        self._parallelize(model, pipeline=False)
        if not full:
            self._materialise(model)
        if not use_fsdp and degrees["dp_replicate"] > 1:
            return apply_ddp(model, self.mesh["dp_replicate"])
        return model

    def _build_pipeline(self, model: Transformer, materialised: bool) -> torch.nn.Module:
        cfg, pp_mesh = self.cfg, self.mesh["pp"]
        plan = plan_pipeline(cfg.parallel, cfg.model, pp_mesh.size(), cfg.train.seq_len)
        parts = split_model(model, plan, pp_mesh.get_local_rank())
        del model
        for part, stage in zip(parts, plan.local_stages(pp_mesh.get_local_rank())):
            self._parallelize(part, pipeline=True)
            if not materialised:
                materialise_part(part, self.device, cfg.train.seed, stage)
        n_micro = cfg.parallel.pp_microbatches or plan.n_stages
        loss_parallel = self.loss_parallel

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return tp_cross_entropy(logits, targets, loss_parallel)

        self.pipe = build_schedule(parts, plan, pp_mesh, loss_fn, n_micro, self.device, accum_steps=self.accum,
                                   scale_loss=self.scaler.scale if self.scaler.is_enabled() else None)
        return parts_module(parts)

    def _peak_flops(self) -> float:
        dtype = DTYPES[self.cfg.train.mixed_precision]
        try:
            return resolve_peak_flops(self.device, dtype, self.cfg.metrics.peak_flops)
        except Exception as e:  # MFU is informative; never fail a run for it
            log.warning("could not determine peak FLOP/s (%s); MFU will read 0", e)
            return 0.0

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(asdict(self.cfg), indent=2))
        tmp.replace(self.run_dir / "config.json")
        shutil.copyfile(self.data_dir / "tokenizer.json", self.run_dir / "tokenizer.json.tmp")
        (self.run_dir / "tokenizer.json.tmp").replace(self.run_dir / "tokenizer.json")

    def checkpoint_state(self) -> dict:
        return {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "loader": self.train_loader,
            "rng": RNGState(),
            "train": self.state,
        }

    def _resume(self) -> None:
        path = self.ckpt.resolve_resume(self.cfg.checkpoint.resume)
        if path is None:
            return
        step = self.ckpt.load(path, self.checkpoint_state())
        self._say(f"resumed from {path} at step {step}")

    # -- steps -----------------------------------------------------------------------------------

    def _sync_grads(self, last: bool) -> None:
        """FSDP2 reduce-scatters gradients only on the last micro-batch of an accumulation."""
        modules = self.pipe.parts if self.pipe is not None else [self.model]
        for m in modules:
            if hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(last)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        """One micro-batch; returns its mean loss (detached; zero on pipeline ranks without the last stage)."""
        cfg, model = self.cfg, self.model
        self._sync_grads(last)
        if self.pipe is not None:
            with loss_parallel_ctx(self.loss_parallel), autocast_context(cfg.train.mixed_precision, self.device):
                loss = pipeline_step(self.pipe, x, y)
            return loss.detach() if loss is not None else torch.zeros((), device=self.device)
        sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext()
        with sync, loss_parallel_ctx(self.loss_parallel):
            with autocast_context(cfg.train.mixed_precision, self.device):
                logits = model(x)
            loss = tp_cross_entropy(logits, y, self.loss_parallel)
            aux = router_loss(self.moe)  # MoE aux/z losses join the loss; the logged loss stays the LM loss
            if aux is not None and isinstance(loss, DTensor):  # loss parallel: MoE replicated over tp
                aux = DTensor.from_local(aux, loss.device_mesh, [Replicate()] * loss.device_mesh.ndim)
            self.scaler.scale((loss + aux if aux is not None else loss) / self.accum).backward()
        return local_value(loss).detach()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (local mean loss, grad norm)."""
        model, cfg = self.model, self.cfg
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            meter = ActivationMeter([model]) if self._measure_activations and i == 0 else None
            with meter.measure() if meter else contextlib.nullcontext():
                total += self._forward_backward(x, y, last=i == self.accum - 1) / self.accum
            if meter is not None:
                self.activation_bytes = meter.bytes
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf
        grad_norm = clip_grad_norm_(model.parameters(), max_norm,
                                    pp_group=self.pipe.group if self.pipe is not None else None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.moe:  # aux-loss-free balancing: biases move from the load of all dp ranks
            update_expert_biases(self.moe, self._dp_group())
        if self._measure_activations:  # once, after the first step: optimizer state now exists
            self._measure_activations = False
            self.state_bytes = model_state_bytes([model], self.optimizer)
            self._write_memory_report()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total, grad_norm

    def _write_memory_report(self) -> None:
        """memory/rank<r>.json: what this rank holds, so each parallel dimension's effect shows."""
        report = {"rank": self.info.rank, "mesh": self.mesh.degrees, **self.state_bytes,
                  "activations": self.activation_bytes, **memory_stats(self.device)}
        out = self.run_dir / "memory"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"rank{self.info.rank}.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out / f"rank{self.info.rank}.json")

    def _dp_group(self) -> dist.ProcessGroup | None:
        return self.dp_mesh.get_group() if self.info.world_size > 1 else None

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean over data-parallel ranks (after taking the pipeline's last stage's value)."""
        if self.pipe is not None:
            value = broadcast_loss(self.pipe, value)
        value = value.detach().clone()
        if self.info.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG, group=self.dp_mesh.get_group())
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_batches` global batches (the same every time)."""
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        # eval_batches global batches, whatever the layout: every layout sees the same sequences.
        n = self.cfg.train.eval_batches * self.accum
        for _ in range(n):
            x, y = self.val_loader.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            with loss_parallel_ctx(self.loss_parallel):
                with autocast_context(self.cfg.train.mixed_precision, self.device):
                    if self.pipe is not None:
                        loss = pipeline_eval(self.pipe, x, y)
                        total += loss if loss is not None else 0.0
                        continue
                    logits = self.model(x)
                total += local_value(tp_cross_entropy(logits, y, self.loss_parallel))
        self.model.train()
        return self._global_mean(total / n)

    def fit(self) -> list[float]:
        cfg = self.cfg
        steps, log_every = cfg.train.steps, cfg.metrics.log_interval
        stop = cfg.train.stop_at or steps
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.model.train()
        bar = ProgressBar(total=steps, initial=self.state.step, mode=cfg.metrics.progress if self.echo else "none",
                          description="train")
        window_start, window_steps = time.perf_counter(), 0
        with bar:
            while self.state.step < stop:
                loss, grad_norm = self.train_step()
                self.state.step += 1
                self.state.tokens_seen += tokens_per_step
                window_steps += 1
                step = self.state.step
                if step % log_every == 0 or step in (steps, stop):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * tokens_per_step / elapsed
                    mfu = tps * self.flops_per_token / (self.peak_flops * self.info.world_size) \
                        if self.peak_flops else 0.0
                    loss_value = self._global_mean(loss)
                    self.losses.append(loss_value)
                    metrics = {"loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "tokens_per_s": tps, "mfu": mfu,
                               "tokens_seen": self.state.tokens_seen, **memory_stats(self.device)}
                    if self.state_bytes:  # tensor accounting, once (every rank's is in memory/)
                        metrics.update({f"mem_{k}_bytes": v for k, v in self.state_bytes.items()})
                        metrics["mem_activations_bytes"] = self.activation_bytes
                        self.state_bytes = {}
                    if cfg.train.mixed_precision == "fp16":
                        metrics["loss_scale"] = float(self.scaler.get_scale())
                    if self.moe:
                        metrics.update(moe_metrics(self.moe, self._dp_group()))
                    self.metrics.log(step, metrics, prefix="train")
                    bar.update(step, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == steps):
                    val = self.evaluate()
                    self.metrics.log(step, {"loss": val, "perplexity": math.exp(min(val, 50.0))}, prefix="val")
                    bar.update(step, {"val_loss": val})
                if cfg.checkpoint.enabled and (step % cfg.checkpoint.interval == 0 or step in (steps, stop)):
                    self.ckpt.save(step, self.checkpoint_state())
                    window_start = time.perf_counter()  # do not charge checkpoint time to throughput
        if self.is_main and cfg.metrics.plot and cfg.metrics.jsonl:
            try:
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            except Exception as e:  # a plot must never fail a finished run
                log.warning("loss plot not written: %s", e)
        return self.losses

    def close(self) -> None:
        self.metrics.close()
        shutdown_distributed()

