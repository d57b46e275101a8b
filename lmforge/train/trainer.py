"""The training loop: one process or many under torchrun, the same code.

Setup order (docs/architecture.md): process group + mesh -> data stage (train/data_stage.py) ->
model on meta, parallelised and initialised (train/model_build.py -> parallel/parallelize.py) ->
optimizer, LR schedule -> loaders -> resume. Everything stateful goes into the checkpoint, so a
resume continues bit for bit. `train_step` returns a `StepResult`; `fit` logs, evaluates
(train/evaluate.py) and checkpoints around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lmforge.checkpoint.state import ModelOptimizerState, PerRank, RNGState
from lmforge.checkpoint.tiers import TieredCheckpoints
from lmforge.config import JobConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.common.sparse_attention import document_starts
from lmforge.observability.flops import training_flops_per_token
from lmforge.observability.memory import ActivationMeter, model_state_bytes
from lmforge.observability.metrics import MetricsLogger, StepTimer, memory_stats, stale_peak_warning
from lmforge.observability.peak import resolve_peak_flops
from lmforge.observability.plot import plot_loss_curve
from lmforge.observability.progress import ProgressBar
from lmforge.observability.step_flops import StepFlops
from lmforge.parallel.clip import clip_grad_norm_
from lmforge.parallel.mesh import DistInfo, build_mesh, init_distributed, shutdown_distributed
from lmforge.parallel.pp import broadcast_loss, pipeline_step
from lmforge.parallel.tp import full_value, loss_parallel_ctx, tp_cross_entropy
from lmforge.storage.atomic import atomic_copy, write_text_atomic
from lmforge.storage.layout import RunDir
from lmforge.storage.strict_json import dumps_strict
from lmforge.train.accounting import StepAccounting, make_breakdown
from lmforge.train.continual import Unfreezing, check_init_from, check_same_tokenizer, load_init_weights
from lmforge.train.data_stage import open_loaders, prepare_training_data
from lmforge.train.distill import Teacher, build_distiller
from lmforge.train.energy_log import RunEnergy
from lmforge.train.evaluate import local_validation_loss
from lmforge.train.exit_loss import ExitLoss
from lmforge.train.faults import FaultInjector
from lmforge.train.frozen_adamw import hand_over_frozen_variance
from lmforge.train.host_allocator import configure_host_allocator
from lmforge.train.lr_schedule import build_scheduler
from lmforge.train.model_build import build_training_model
from lmforge.train.optim import build_optimizer, local_moments_of
from lmforge.train.precision import (
    DTYPES,
    autocast_context,
    build_grad_scaler,
    check_same_precision_on_all_ranks,
    resolve_job_precision,
    warn_if_emulated,
)
from lmforge.train.router_balance import RouterBalance
from lmforge.train.stability import StabilityPolicy, StepCheck
from lmforge.train.stability_events import log_stability_event, rollback
from lmforge.train.state import TrainState
from lmforge.train.stragglers import StragglerMonitor
from lmforge.train.trace import SampleTracer, truncate_traces

log = logging.getLogger("lmforge.train")


@dataclass
class StepResult:
    """What one optimizer step (`Trainer.train_step`) hands to `fit`."""

    loss: torch.Tensor  # this rank's mean loss over the micro-batches (detached; 0 off the last pipeline stage)
    grad_norm: torch.Tensor  # global gradient norm, before clipping
    check: StepCheck | None = None  # the stability policy's verdict (None with the policy off)
    global_loss: float | None = None  # loss averaged over data-parallel ranks, when the policy read it
    memory: dict[str, int] | None = None  # tensor bytes by kind + activations: after the first step only


class Trainer:
    """Owns the process group for its lifetime when it created it; call `close()` at the end."""

    def __init__(self, cfg: JobConfig, *, echo: bool = True, teacher: Teacher | None = None):
        self._teacher = teacher  # distill.teacher loaded by the CLI (train/distill.py); None otherwise
        # Before the process group: "auto" becomes a concrete precision (and config.json says why).
        cfg, self.precision = resolve_job_precision(cfg)
        self.cfg = cfg
        self.init_from = check_init_from(cfg)  # continual pre-training: shapes checked before any process group
        self.info: DistInfo = init_distributed(cfg.parallel, cfg.train.device)
        try:
            self._setup(cfg, echo)
        except BaseException:
            shutdown_distributed(barrier=False)
            raise

    def _setup(self, cfg: JobConfig, echo: bool) -> None:
        self.is_main = self.info.rank == 0
        self.echo = echo and self.is_main
        self.mesh = build_mesh(self.info, cfg.parallel)
        self.loss_parallel = self.mesh.degrees.tp > 1 and cfg.parallel.loss_parallel
        self.dp_mesh = self.mesh.dp
        self.device = self.info.device
        self.run_dir = Path(cfg.train.output_dir)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)

        self.data_dir = prepare_training_data(cfg, self.is_main, self.say)
        if self.init_from is not None:
            check_same_tokenizer(self.init_from, self.data_dir)
        check_same_precision_on_all_ranks(self.precision)
        self.say(f"precision: {self.precision.mode} ({self.precision.reason})")
        if self.is_main:
            warn_if_emulated(self.precision, self.device)
        self.say(f"host memory: {configure_host_allocator(cfg.train.host_allocator, self.device.type)}")
        self.scaler = build_grad_scaler(cfg.train.mixed_precision, self.device)
        self.accum = cfg.accum_steps(self.info.world_size)
        breakdown = make_breakdown(cfg, self.device, self._dp_group() is not None)
        built = build_training_model(cfg, self.mesh, self.info, self.say,
                                     scale_loss=self.scaler.scale if self.scaler.is_enabled() else None,
                                     wrap_comm_hook=breakdown.wrap_comm_hook)
        self.model, self.pipe, self.comm = built.module, built.pipe, built.comm  # comm: compression hook or None
        self.eos_id = self._doc_mask_eos(cfg)
        self.unfreeze = Unfreezing.for_model(self.model, cfg)  # gradual unfreezing (train/continual.py) or None
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.unfreeze and self.unfreeze.units,
                                         freeze_variance_after=cfg.comm.variance_freeze_step(),
                                         local_moments=local_moments_of(self.comm, self.scaler.is_enabled(), breakdown))
        if self.unfreeze is not None:  # the header line; AdamW state for every stage made now (continual.py)
            self.unfreeze.start(self.optimizer, self.say, cfg.model.n_layers)
        self.router = RouterBalance.for_model(self.model, self._dp_group())  # None for dense models
        if self.pipe is not None and self.router is not None:  # every stage's router losses join in backward
            pipe, scaler = self.pipe, self.scaler
            self.router.train_through_pipeline(lambda: (scaler.get_scale() if scaler.is_enabled() else 1.0)
                                               / (pipe.n_microbatches * self.accum))
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.train.steps)
        self.state = TrainState()
        # Fault tolerance (lmforge.train.stability/stragglers/trace/faults): all off by default.
        self.faults = FaultInjector.from_env()
        self.stability = StabilityPolicy(cfg.stability, loss_scaling=self.scaler.is_enabled()) \
            if cfg.stability.enabled else None
        self.stragglers = StragglerMonitor(cfg.metrics.straggler_factor, self.device) \
            if cfg.metrics.straggler_factor and self.info.world_size > 1 else None
        self._measure_memory = True  # after the first step (memory/rank<r>.json, one metrics row)
        self.energy = RunEnergy(cfg, self.info.local_rank, self.device) if cfg.energy.enabled else None

        dp_rank, dp_world = self.dp_mesh.get_local_rank(), self.dp_mesh.size()
        loaders = open_loaders(cfg, self.data_dir, dp_rank, dp_world, self.say)
        self.train_loader, self.val_loader, self.eval_batches = loaders.train, loaders.val, loaders.eval_batches
        if loaders.mixing is not None:  # the header line, and config.json records what was sampled
            self.say(f"domains: {loaders.mixing.description}")
            self.cfg = cfg = replace(cfg, data=replace(cfg.data, mixing_resolved=loaders.mixing.description))

        # Distillation (distill.teacher set): the loss of train/distill.py in place of cross-entropy.
        self.distill, self.cfg = build_distiller(self.cfg, self._teacher, self.data_dir, self.device)
        cfg, self._teacher = self.cfg, None
        self.exit_loss = ExitLoss.for_model(cfg.model, self.device)  # early exits (model.early_exit) or None
        self.acct = StepAccounting(cfg, breakdown, self.model, self.train_loader, self.device, self.info.world_size,
                                   self._dp_group(), self.comm, self.say)
        self.faults.maybe_slow_network(self.model, self.acct.bd.wrap_comm_hook)  # test-only (LMFORGE_FAULTS)
        self.ckpt = TieredCheckpoints(cfg.checkpoint, self.run_dir)
        # torchrun restarted the workers after a failure: continue from the newest valid checkpoint
        # of this run, memory-tier snapshots included (resume 'auto'), whatever was configured.
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if self.restarts == 0 and cfg.checkpoint.resume.strip().lower() == "none":
            self.ckpt.clear_memory()  # snapshots of an earlier run in this directory are stale
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
        # MFU from each batch's documents (exact) when document masking cuts the sequences
        self.step_flops = StepFlops(cfg.model, cfg.train.seq_len) if self.eos_id is not None else None
        self.peak_flops = self._peak_flops() if self.is_main else 0.0
        # Global mean loss at each logged step (all-reduced only then: no per-step host sync).
        self.losses: list[float] = []
        if self.is_main:
            self._write_run_files()
        self.tracer = SampleTracer(self.run_dir, self.info.rank, dp_rank) if cfg.train.trace_samples else None
        self._resume()  # then, resumed past the freeze, top-k's divisors as the straight run had them
        self._frozen_handed = hand_over_frozen_variance(self.optimizer, self.comm)
        if self.tracer is not None:  # drop what a crashed or stopped run traced past the resume point
            if self.is_main:
                truncate_traces(self.run_dir, self.state.step)
            dist.barrier()
        # After the resume, so TensorBoard hides what a crashed run logged past the checkpoint.
        self.metrics = MetricsLogger(self.run_dir, jsonl=cfg.metrics.jsonl, tensorboard=cfg.metrics.tensorboard,
                                     enabled=self.is_main, purge_step=self.state.step + 1 if self.state.step else None)

    # -- setup -----------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        if self.echo:
            print(msg, flush=True)

    def _doc_mask_eos(self, cfg: JobConfig) -> int | None:
        """The end-of-text id that cuts packed sequences into documents (model.attention.doc_mask),
        or None when off. Under pipeline parallelism every pp rank loads the batch and hands the
        document starts to each of its stages (parallel/pp.py: pipeline_step)."""
        if not cfg.model.attention.doc_mask:
            return None
        return TextTokenizer.from_file(self.data_dir / "tokenizer.json").eos_id

    def _peak_flops(self) -> float:
        dtype = DTYPES[self.cfg.train.mixed_precision]
        try:
            return resolve_peak_flops(self.device, dtype, self.cfg.metrics.peak_flops)
        except Exception as e:  # MFU is informative; never fail a run for it
            log.warning("could not determine peak FLOP/s (%s); MFU will read 0", e)
            return 0.0

    def _write_run_files(self) -> None:
        write_text_atomic(RunDir(self.run_dir).config, dumps_strict(asdict(self.cfg), indent=2))
        atomic_copy(self.data_dir / "tokenizer.json", RunDir(self.run_dir).tokenizer)

    def checkpoint_state(self) -> dict:
        state = {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "loader": self.train_loader,
            "rng": RNGState(),
            "train": self.state,
        }
        if self.stability is not None:
            state["stability"] = self.stability
        if self.comm is not None:  # error-feedback residuals (and PowerSGD's factors): per rank
            state["comm"] = PerRank(self.comm)
        return state

    def _resume(self) -> None:
        if self.restarts > 0:  # the configured checkpoint only when this run has none yet
            path = self.ckpt.resolve_resume("auto") or self.ckpt.resolve_resume(self.cfg.checkpoint.resume)
            self.say(f"restart {self.restarts} (torchrun): resuming from {path or 'scratch'}")
        else:
            path = self.ckpt.resolve_resume(self.cfg.checkpoint.resume)
        if path is None:
            if self.init_from is not None:  # a new run from another's weights: fresh optimizer, step 0
                step = load_init_weights(self.ckpt, self.init_from, self.model, self.optimizer)
                self.say(f"init_from {self.init_from} (step {step}): model weights only; optimizer, LR schedule "
                         "and data start fresh")
            return
        step = self.ckpt.load(path, self.checkpoint_state())
        self.say(f"resumed from {path} at step {step}")

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
        doc_start = document_starts(x, self.eos_id) if self.eos_id is not None else None
        if self.step_flops is not None:
            self.step_flops.add(doc_start)
        if self.pipe is not None:
            with loss_parallel_ctx(self.loss_parallel), autocast_context(cfg.train.mixed_precision, self.device):
                loss = pipeline_step(self.pipe, x, y, doc_start)
            return loss.detach() if loss is not None else torch.zeros((), device=self.device)
        sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext()
        with sync, loss_parallel_ctx(self.loss_parallel):
            kwargs = {} if doc_start is None else {"doc_start": doc_start}
            with autocast_context(cfg.train.mixed_precision, self.device):
                # with early exits: the final logits and every exit's (train/exit_loss.py)
                logits, exit_logits = model(x, exits=True, **kwargs) if self.exit_loss else (model(x, **kwargs), None)
            loss = (self.distill.loss(logits, x, y) if self.distill is not None
                    else tp_cross_entropy(logits, y, self.loss_parallel, overwrite_logits=True))
            # MoE aux/z losses join the loss; the logged loss stays the LM loss
            aux = self.router.loss() if self.router is not None else None
            if self.faults.active:  # test-only injection (LMFORGE_FAULTS)
                loss = self.faults.poison_loss(self.state.step + 1, self.train_loader.last_positions.tolist(), loss)
            loss = loss * self.acct.loss_weight()  # by tokens, under load balancing (load_balance.py)
            if self.exit_loss is not None:  # joins the loss like the router's; the logged loss stays the LM loss
                exits = self.exit_loss.loss(exit_logits, y) * self.acct.loss_weight()
                aux = exits if aux is None else aux + exits
            if aux is not None and isinstance(loss, DTensor):  # loss parallel: MoE replicated over tp
                aux = DTensor.from_local(aux, loss.device_mesh, [Replicate()] * loss.device_mesh.ndim)
            self.scaler.scale((loss + aux if aux is not None else loss) / self.accum).backward()
        return full_value(loss).detach()

    def train_step(self) -> StepResult:
        """One optimizer step over `accum` micro-batches."""
        model = self.model
        total = torch.zeros((), device=self.device)
        if self.router is not None:
            self.router.start_step()
        activation_bytes = 0
        bd = self.acct.bd
        for i in range(self.accum):
            with bd.phase("data"):
                x, y = self.train_loader.next_batch()
                self.faults.maybe_slow_loader()
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.tracer is not None:
                self.tracer.add(self.train_loader.last_positions, self.train_loader.last_windows)
            meter = ActivationMeter([model]) if self._measure_memory and i == 0 else None
            with meter.measure() if meter else contextlib.nullcontext(), bd.forward_backward(i == self.accum - 1):
                self.faults.maybe_delay(self.info.rank, len(x), first=i == 0)
                total += self._forward_backward(x, y, last=i == self.accum - 1) / self.accum
            self.acct.micro_batch_done(len(x))
            if meter is not None:
                activation_bytes = meter.bytes
        self.faults.maybe_kill(self.state.step + 1, self.info.rank)
        with bd.phase("compute"):
            return self._update(total, activation_bytes)

    def _update(self, total: torch.Tensor, activation_bytes: int) -> StepResult:
        """Clipping, the stability check and the optimizer step after the micro-batches."""
        model, cfg = self.model, self.cfg
        if self.unfreeze is not None:  # frozen layers: no gradient, so AdamW leaves them and their state alone
            self.unfreeze.drop_frozen_grads(self.state.step)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf
        grad_norm = clip_grad_norm_(model.parameters(), max_norm,  # top-k after a warm-up: the dense norm
                                    pp_group=self.pipe.group if self.pipe is not None else None,
                                    total_norm=self.comm.dense_grad_norm() if self.comm is not None else None)
        result = StepResult(loss=total, grad_norm=grad_norm)
        if self.stability is not None:
            # One all-reduce + host sync per step, only with the policy on (stability.py).
            result.global_loss = self._global_mean(total)
            end = self.train_loader.position
            result.check = self.stability.check(self.state.step + 1, result.global_loss, float(grad_norm),
                                                (end - cfg.train.global_batch_size, end))
        skipped = result.check is not None and result.check.skip
        if not skipped:
            self.scaler.step(self.optimizer)
            self._frozen_handed = self._frozen_handed or hand_over_frozen_variance(self.optimizer, self.comm)
        self.scaler.update()
        if self.router is not None:  # aux-loss-free balancing: biases move from the load of all dp
            # ranks (not on a step the stability policy skipped)
            self.router.end_step(apply=not skipped)
        if self._measure_memory:  # once, after the first step: optimizer state now exists
            self._measure_memory = False
            result.memory = {**model_state_bytes([model], self.optimizer), "activations": activation_bytes}
            self._write_memory_report(result.memory)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return result

    def _write_memory_report(self, memory: dict[str, int]) -> None:
        """memory/rank<r>.json: what this rank holds, so each parallel dimension's effect shows."""
        report = {"rank": self.info.rank, "mesh": self.mesh.degrees.as_dict(), **memory, **memory_stats(self.device)}
        write_text_atomic(RunDir(self.run_dir).memory_report(self.info.rank), dumps_strict(report, indent=1))

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

    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_batches` global batches (the same every time,
        whatever the layout)."""
        local = local_validation_loss(self.model, self.pipe, self.val_loader, self.eval_batches * self.accum,
                                      self.device, self.loss_parallel, self.cfg.train.mixed_precision,
                                      self.eos_id)
        return self._global_mean(local)

    # -- fault tolerance ---------------------------------------------------------------------------


    def fit(self) -> list[float]:
        cfg = self.cfg
        steps, log_every = cfg.train.steps, cfg.metrics.log_interval
        stop = cfg.train.stop_at or steps
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.model.train()
        bar = ProgressBar(total=steps, initial=self.state.step, mode=cfg.metrics.progress if self.echo else "none",
                          description="train")
        # One window between log lines: steps and their time only (saves, evaluations and the
        # logging itself are paused out of both), so tokens/s and MFU are those of training.
        peak_warned = False
        memory: dict[str, int] = {}  # tensor accounting, once (every rank's is in memory/)
        timer = StepTimer(self.flops_per_token, self.peak_flops, self.info.world_size, device=self.device)
        self.acct.bd.start()
        if self.energy is not None:
            self.energy.start()
        with bar:
            while self.state.step < stop:
                if self.stragglers is not None:
                    self.stragglers.start_step()
                result = self.train_step()
                if self.energy is not None:
                    self.energy.step()
                if self.stragglers is not None:
                    self.stragglers.end_step()
                if result.memory is not None:  # logged at the next log step
                    memory = result.memory
                check = result.check
                if check is not None and check.skip:
                    log_stability_event(self, self.state.step + 1, result)
                if check is not None and check.verdict == "rollback" and rollback(self, check):
                    timer.start()  # the steps rolled back are gone: their window too
                    if self.step_flops is not None:
                        self.step_flops.reset()
                    continue
                self.state.step += 1
                self.acct.step_done(self.state.step)
                self.state.tokens_seen += tokens_per_step
                timer.add(tokens_per_step)
                step = self.state.step
                if self.tracer is not None:
                    self.tracer.end_step(step)
                if step % log_every == 0 or step in (steps, stop):
                    flops = self.step_flops.take(self._dp_group(), self.device) if self.step_flops else None
                    window = timer.measure(reset=False, flops=flops)
                    tps, mfu = window.tokens_per_s, window.mfu
                    warning = stale_peak_warning(mfu, self.peak_flops)
                    if warning and not peak_warned:
                        peak_warned = True
                        self.say(warning)
                    loss_value = result.global_loss if self.stability is not None else self._global_mean(result.loss)
                    self.losses.append(loss_value)
                    metrics = {"loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": float(result.grad_norm), "tokens_per_s": tps, "mfu": mfu,
                               "tokens_seen": self.state.tokens_seen, **memory_stats(self.device)}
                    if memory:
                        metrics.update({f"mem_{k}_bytes": v for k, v in memory.items()})
                        memory = {}
                    if cfg.train.mixed_precision == "fp16":
                        metrics["loss_scale"] = float(self.scaler.get_scale())
                    if self.stability is not None:
                        metrics.update(self.stability.counters())
                    if self.stragglers is not None:
                        metrics.update(self.stragglers.report_metrics(step, self.say, self.is_main))
                    if self.energy is not None:
                        metrics.update(self.energy.window_metrics())
                    if self.router is not None:
                        metrics.update(self.router.metrics())
                    if self.exit_loss is not None:  # exit_loss_<k>: each early exit's cross-entropy
                        metrics.update(self.exit_loss.window_metrics(self._dp_group()))
                    if self.distill is not None:  # distill_kl, distill_ce (and the cache's hit fraction)
                        metrics.update(self.distill.window_metrics(self._dp_group()))
                    metrics.update(self.acct.window_metrics())  # time parts, comm_bytes, comm_compression_ratio
                    self.metrics.log(step, metrics, prefix="train")
                    bar.update(step, metrics)
                    timer.start()
                if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == steps):
                    with timer.paused(), self.acct.bd.phase("eval"):
                        val = self.evaluate()
                        self.metrics.log(step, {"loss": val, "perplexity": math.exp(min(val, 50.0))}, prefix="val")
                        bar.update(step, {"val_loss": val})
                tier = self.ckpt.due(step, final=step in (steps, stop)) if cfg.checkpoint.enabled else None
                if tier is not None:
                    with timer.paused(), self.acct.bd.phase("ckpt"):
                        self.ckpt.save(step, self.checkpoint_state(), tier=tier)
                        self._log_checkpoint_stats()
        self._breakdown_summary()
        if self.energy is not None:
            energy, line = self.energy.summary()
            self.metrics.log(self.state.step, energy, prefix="energy")
            self.say(line)
        self.ckpt.wait()
        self._log_checkpoint_stats()
        if self.state.step >= steps:
            self.ckpt.clear_memory()  # the final durable checkpoint supersedes the snapshots
        if self.is_main and cfg.metrics.plot and cfg.metrics.jsonl:
            try:
                plot_loss_curve(RunDir(self.run_dir).metrics, RunDir(self.run_dir).loss_plot)
            except Exception as e:  # a plot must never fail a finished run
                log.warning("loss plot not written: %s", e)
        return self.losses

    def _breakdown_summary(self) -> None:
        """The run's time breakdown: a "summary" metrics row and one line ("communication-bound: ...")."""
        summary = self.acct.summary()
        if summary is not None:
            self.metrics.log(self.state.step, summary[0], prefix="summary")
            self.say(f"time breakdown: {summary[1]}")

    def _log_checkpoint_stats(self) -> None:
        """One `ckpt` metrics row per finished save: stall_s (step loop blocked), total_s (until
        published), bytes, memory_tier and incremental flags."""
        for tier, rec in self.ckpt.stats():
            step = int(rec.pop("step"))
            self.metrics.log(step, {**rec, "memory_tier": float(tier == "memory")}, prefix="ckpt")

    def close(self, clean: bool = True) -> None:
        """Finish the checkpoint writer, the logs and the process group. `clean=False` when
        leaving on an error: no barrier and no wait on collectives (the other ranks may be stuck
        or gone), so the error reaches the user instead of a hang."""
        if clean:
            self.ckpt.close()
        self.metrics.close()
        shutdown_distributed(barrier=clean)

