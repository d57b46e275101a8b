"""Continual pre-training: a new run that starts from another run's model weights (`train.init_from`)
and trains its layers top first (`train.unfreeze`). Replay of the old domains is the data side
(`data.replay_fraction`, lmforge/data/mixing.py: ReplaySchedule); the LR schedule re-warms and
re-decays because the run is new (step 0, lmforge/train/lr_schedule.py).

init_from: a run directory (its newest valid checkpoint) or one checkpoint step directory. Only the
model weights are read (the top-level "model" key): the optimizer, scheduler, loader and step
start fresh. `check_init_from` runs before any process group: the checkpoint is found and
verified and every tensor shape compared with the recipe's model (built on the meta device), so
a mismatch is one line naming the first tensor and both shapes. The weights are then loaded
into the parallelised model through the checkpoint manager (DCP reshards them: FSDP2, TP, PP
read the shards they hold), unless this run resumes from a checkpoint of its own.

Gradual unfreezing: each stage names the layers that train from its step on ("top:N": the output
head and final norm plus the top N blocks; "all": embeddings too; `embeddings = true`: the token
embeddings with a "top:N" stage, e.g. "top:0" with embeddings, the new-language recipe of learning
the new tokens' input and output embeddings around a frozen body before any block trains). The
parameters a stage adds form their own optimizer param groups with lr = optimizer.lr x the stage's
lr_scale, tagged with the stage's step (`unfreeze_step`). Frozen parameters keep requires_grad
(under FSDP2 the reduce dtype is fixed from the parameters trainable at its lazy init, and DDP's
reducer expects every gradient it was built with, so requires_grad must not change mid-run): their
gradients are dropped after backward (`drop_frozen_grads`, before unscaling and clipping), so AdamW
skips them entirely (no moment update, no step count, no weight decay) and they stay bitwise
unchanged; their group's lr reads 0 until the stage starts. The backward through frozen layers is
therefore not saved (a cost of keeping every parallel layout correct).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.manifest import saved_metadata, verify_checkpoint
from lmforge.checkpoint.state import ModelOptimizerState
from lmforge.checkpoint.tiers import TieredCheckpoints
from lmforge.config import ConfigError, JobConfig
from lmforge.config.train import UnfreezeStage
from lmforge.models.common.linear import MatmulKernels
from lmforge.models.registry import family_of
from lmforge.storage.layout import RunDir, step_of
from lmforge.train.start_points import init_from_kind, refuse_inside_output_dir

__all__ = ["ParamUnit", "Unfreezing", "check_init_from", "load_init_weights", "resolve_init_from"]

_WRAPPERS = {"module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}
_BLOCK = re.compile(r"layers\.(\d+)\.")


# -- init_from ---------------------------------------------------------------------------------------


def resolve_init_from(spec: str) -> Path:
    """The checkpoint step directory `train.init_from` names (a run directory: its newest valid
    checkpoint); ConfigError / CheckpointError in one line when there is none or it is invalid."""
    path = Path(spec)
    if init_from_kind(spec) == "checkpoint":
        verdict = verify_checkpoint(path)
        if not verdict.ok:
            raise CheckpointError(f"train.init_from = {spec!r}: checkpoint {path}: {verdict.reason}")
        return path
    try:
        folder = json.loads(RunDir(path).config.read_text()).get("checkpoint", {}).get("folder", "checkpoints")
    except (ValueError, AttributeError):
        folder = "checkpoints"
    found = CheckpointManager(RunDir(path, str(folder)).checkpoints, keep_last=1).latest_valid()
    if found is None:
        raise CheckpointError(f"train.init_from = {spec!r}: {RunDir(path, str(folder)).checkpoints} holds no valid "
                              "checkpoint (step-N directories with a manifest)")
    return Path(found)


def _run_of(step_dir: Path) -> Path | None:
    """The run directory of checkpoint `step_dir` (<run>/<folder>/step-N), when it has a config.json."""
    run = step_dir.parent.parent
    return run if RunDir(run).config.is_file() else None


def check_init_from(cfg: JobConfig) -> Path | None:
    """Before any process group: the init_from checkpoint (None when off), verified, outside this
    run's directory (which --overwrite would clear), each model tensor of the same shape as the
    recipe's model's. One line on the first difference."""
    if not cfg.train.init_from:
        return None
    path = resolve_init_from(cfg.train.init_from)
    refuse_inside_output_dir(cfg.train.init_from, path, cfg.train.output_dir)
    with torch.device("meta"):
        model = family_of(cfg.model).model_class(cfg.model, MatmulKernels(enabled=False))
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k[len("model."):]: md for k, md in saved_metadata(path).items() if k.startswith("model.")}
    if not saved:
        raise CheckpointError(f"train.init_from = {cfg.train.init_from!r}: checkpoint {path} holds no model weights")
    for name, shape in mine.items():
        if name not in saved:
            raise ConfigError("train.init_from", cfg.train.init_from, f"checkpoint {path.name} has no tensor {name}, "
                              "which this recipe's model has: the model sections must match the checkpoint's run")
        theirs = tuple(getattr(saved[name], "size", ()))
        if theirs != shape:
            raise ConfigError("train.init_from", cfg.train.init_from, f"tensor {name} has shape {theirs} in "
                              f"checkpoint {path.name} but {shape} in this recipe's model (model.* must match the "
                              "checkpoint's run)")
    extra = [k for k in saved if k not in mine]
    if extra:
        raise ConfigError("train.init_from", cfg.train.init_from, f"checkpoint {path.name} has tensor {extra[0]}, "
                          f"which this recipe's model lacks ({len(extra)} such): the model sections must match")
    return path


def check_same_tokenizer(init_path: Path, data_dir: Path) -> None:
    """The init_from run's tokenizer and this run's data's must map text to the same ids."""
    run = _run_of(init_path)
    theirs, mine = (RunDir(run).tokenizer if run else None), data_dir / "tokenizer.json"
    if theirs is None or not theirs.is_file() or not mine.is_file():
        return
    if json.loads(theirs.read_text()).get("model") != json.loads(mine.read_text()).get("model"):
        raise ConfigError("train.init_from", str(init_path), f"its run's tokenizer ({theirs}) differs from "
                          f"{mine}: the token ids would not match the weights; pack the new data with the old "
                          "run's tokenizer")


def load_init_weights(ckpt: TieredCheckpoints, path: Path, model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> int:
    """The model weights of checkpoint `path` into the (parallelised) `model`, in place; collective.
    Only the top-level "model" key is read: the optimizer stays as built. Returns the checkpoint's step."""
    ckpt.load(path, {"model": ModelOptimizerState(model, optimizer).parts()["model"]})
    return step_of(path)


# -- gradual unfreezing --------------------------------------------------------------------------------


@dataclass
class ParamUnit:
    """Parameters first trained by one unfreezing stage: its step and lr scale."""

    params: list[torch.Tensor]
    step: int
    lr_scale: float


def _plain_name(name: str) -> str:
    """A parameter name without wrapper segments (DDP's module., activation checkpointing's, compile's)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPERS)


def _stage_of(name: str, stages: list[UnfreezeStage], n_layers: int, head: tuple[str, ...],
              embedding: tuple[str, ...], tied: bool) -> int | None:
    """The index of the first stage that trains parameter `name` (None: no stage does)."""
    plain = _plain_name(name)
    top = plain.split(".", 1)[0]
    block = _BLOCK.match(plain)
    if block is not None:
        depth = n_layers - int(block.group(1))  # the top block has depth 1
    elif top in head or (tied and top in embedding):
        depth = 0
    elif top in embedding:  # with "all", or a stage with embeddings = true
        return next((i for i, st in enumerate(stages) if st.trains_embeddings()), None)
    else:  # anything outside the blocks, the head and the embeddings: with "all" only
        depth = n_layers + 1
    return next((i for i, st in enumerate(stages) if st.blocks(n_layers) >= depth), None)


class Unfreezing:
    """The parameters of `model` by unfreezing stage (`train.unfreeze`); see the module docstring."""

    def __init__(self, model: nn.Module, cfg: JobConfig):
        stages, m = cfg.train.unfreeze, cfg.model
        cls = family_of(m).model_class
        head, embedding = tuple(cls.last_stage_modules), tuple(cls.first_stage_modules)
        self.stages = stages
        self.units = [ParamUnit([], st.step, st.lr_scale) for st in stages]
        self.frozen: list[torch.Tensor] = []  # never trained in this run
        self.names: dict[int, list[str]] = {i: [] for i in range(len(stages))}
        for name, p in model.named_parameters():
            i = _stage_of(name, stages, m.n_layers, head, embedding, m.tie_embeddings)
            if i is None:
                self.frozen.append(p)
            else:
                self.units[i].params.append(p)
                self.names[i].append(_plain_name(name))
        self._gated = [(p, u.step) for u in self.units if u.step > 0 for p in u.params]

    @classmethod
    def for_model(cls, model: nn.Module, cfg: JobConfig) -> Unfreezing | None:
        return cls(model, cfg) if cfg.train.unfreeze else None

    def drop_frozen_grads(self, steps_done: int) -> None:
        """Before the optimizer step number `steps_done + 1`: no gradient on a parameter whose stage
        has not started (AdamW then skips it), nor on one no stage trains."""
        for p in self.frozen:
            p.grad = None
        for p, first in self._gated:
            if steps_done < first:
                p.grad = None

    def start(self, optimizer: torch.optim.Optimizer, say: Callable[[str], None], n_layers: int) -> None:
        """The header line, and AdamW's state for every parameter it optimizes created now at its
        initial values (zero moments, step 0: what AdamW creates lazily at a parameter's first
        update). Why: a parameter whose stage has not started has no gradient, so AdamW would give
        it no state, and a checkpoint saved then would lack its entries while DCP's resume (which
        fills an empty optimizer with a zero-gradient step for every parameter) expects them. The
        state is made by one AdamW step at lr 0 on zero gradients (weights bitwise unchanged), then
        reset to zero."""
        say(f"unfreeze: {self.describe(n_layers)}")
        if all(p in optimizer.state for group in optimizer.param_groups for p in group["params"]):
            return  # made eagerly already (LocalMomentsAdamW, whose step would also run a collective)
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        with torch.no_grad():
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()

    def describe(self, n_layers: int) -> str:
        """One header line: each stage's step, layers, lr scale and how many tensors it adds."""
        parts = [f"from step {st.step}: {st.layers}{' + embeddings' if st.embeddings and st.layers != 'all' else ''} "
                 f"(+{len(self.names[i])} tensors at lr x{st.lr_scale:g})"
                 for i, st in enumerate(self.stages)]
        if self.frozen:
            parts.append(f"{len(self.frozen)} tensors frozen throughout")
        return "; ".join(parts)
