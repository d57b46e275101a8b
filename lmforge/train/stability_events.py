"""What the trainer does when the stability policy (train/stability.py) skips a step or calls for a
rollback: the metrics record and log line of each event, and the reload of the newest valid
checkpoint from before the spikes with the loader skipping the data that led to them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from lmforge.train.rollback import rollback_target
from lmforge.train.stability import StepCheck
from lmforge.train.trace import truncate_traces


class TrainerView(Protocol):
    """What these reactions use of lmforge.train.trainer.Trainer (not imported: it imports this)."""

    is_main: bool
    run_dir: Path
    info: Any  # DistInfo
    stability: Any  # StabilityPolicy | None
    metrics: Any  # MetricsLogger
    ckpt: Any  # TieredCheckpoints
    train_loader: Any  # DistributedTokenLoader
    tracer: Any  # SampleTracer | None

    def say(self, msg: str) -> None: ...
    def checkpoint_state(self) -> dict: ...


log = logging.getLogger("lmforge.train")


def log_stability_event(trainer: TrainerView, step: int, result: Any) -> None:
    """One metrics record (prefix "stability") and one log line per skipped step (`result`: the
    trainer's StepResult)."""
    assert trainer.stability is not None and result.check is not None
    check, grad_norm = result.check, float(result.grad_norm)
    loss = result.global_loss if result.global_loss is not None else float("nan")
    event = {"skip": 1, f"event_{check.verdict}": 1, "loss": loss, "grad_norm": grad_norm,
             "zscore": check.zscore, **trainer.stability.counters()}
    trainer.metrics.log(step, event, prefix="stability")
    msg = f"step {step}: {check.verdict} (loss {loss:.4g}, grad norm {grad_norm:.4g}, z {check.zscore:.1f})"
    msg += ": rolling back" if check.verdict == "rollback" else ": optimizer step skipped"
    if check.verdict == "overflow":  # routine for fp16 loss scaling: counted, not shouted
        log.info(msg)
    elif trainer.is_main:
        log.warning(msg)
        trainer.say(f"stability: {msg}")


def rollback(trainer: TrainerView, check: StepCheck) -> bool:
    """Reload the newest valid checkpoint from before the spikes; the loader skips everything
    consumed since (the batches that led to the spikes, and the spikes). False when there is no
    such checkpoint (the spiking steps were skipped anyway; training goes on)."""
    target = rollback_target(trainer.ckpt, check.first_spike_step, trainer.is_main, trainer.info.world_size)
    if target is None:
        trainer.say(f"stability: no valid checkpoint before step {check.first_spike_step}; not rolling back")
        return False
    end = trainer.train_loader.position
    skips = list(trainer.train_loader.skips)
    state = {k: v for k, v in trainer.checkpoint_state().items() if k != "stability"}  # keep the counters
    step = trainer.ckpt.load(target, state)
    start = trainer.train_loader.position
    trainer.train_loader.skips = sorted(set(skips) | set(trainer.train_loader.skips))
    trainer.train_loader.skip_range(start, end)
    if trainer.tracer is not None:
        trainer.tracer.discard_step()
        truncate_traces(trainer.run_dir, step, [trainer.tracer.path])
    trainer.metrics.log(check.first_spike_step, {"rollback_to_step": step, "skipped_from_position": start,
                                                "skipped_samples": end - start}, prefix="stability")
    trainer.say(f"stability: rolled back to {target} (step {step}); skipping loader positions [{start}, {end})")
    return True
