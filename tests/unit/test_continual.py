"""Continual pre-training in debug-sized runs (lmforge/train/continual.py): a run started from another's
weights (`train.init_from`) has the same weights, a fresh optimizer and step 0, re-warms and
re-decays its LR; gradually unfrozen layers stay bitwise unchanged (no AdamW state) until their stage
and train after it; replay puts its exact share of old-domain windows in every global batch; a
resume mid-run serves the same batches and losses; bad init_from / unfreeze / replay settings are
one config error each."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint.weights import load_model_weights
from lmforge.config import ConfigError, DataConfig, SchedulerConfig, load_job_config, parse_override_args
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.mixing import build_mixing
from lmforge.models.registry import family_of
from lmforge.train.continual import check_init_from
from lmforge.train.lr_schedule import lr_multiplier
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")

UNFREEZE = '[{step = 0, layers = "top:0"}, {step = 2, layers = "top:1", lr_scale = 0.5}, ' \
           '{step = 4, layers = "all", lr_scale = 0.3}]'


def config(data_dir: Path, out: Path, *extra: str):
    args = tiny_run_args(data_dir, out, "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
                         "--train.eval_interval", "0", *extra)
    return load_job_config(None, parse_override_args(args))


def run(data_dir: Path, out: Path, *extra: str) -> Trainer:
    trainer = Trainer(config(data_dir, out, *extra), echo=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope="module")
def base_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run on two of the three domains (no Chinese): the model continual runs start from."""
    out = tmp_path_factory.mktemp("base")
    run(tiny_data_dir, out, "--train.steps", "4", "--data.domain_weights", "bible:1,shakespeare:1")
    return out


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_init_from_loads_weights_only_and_rewarms_the_lr(tiny_data_dir: Path, base_run: Path, tmp_path: Path) -> None:
    cfg = config(tiny_data_dir, tmp_path / "new", "--train.steps", "6", "--train.init_from", str(base_run),
                 "--scheduler.warmup_steps", "2", "--optimizer.lr", "0.004", "--checkpoint.interval", "3")
    trainer = Trainer(cfg, echo=False)
    try:
        reference = family_of(cfg.model).build(cfg.model, "cpu", 0)
        assert load_model_weights(base_run / "checkpoints" / "step-00000004", reference) == 4
        got, want = weights(trainer.model), weights(reference)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        fresh = family_of(cfg.model).build(cfg.model, "cpu", cfg.train.seed)
        assert not torch.equal(fresh.state_dict()["output.weight"], want["output.weight"])  # not a fresh init
        assert trainer.state.step == 0 and trainer.state.tokens_seen == 0
        assert len(trainer.optimizer.state) == 0 and trainer.scheduler.last_epoch == 0
        assert trainer.train_loader.position == 0
        trainer.fit()
    finally:
        trainer.close()
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "new")}
    f = lr_multiplier(SchedulerConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1), 6)
    # the lr logged at step s is the one the next step uses: f(s) x peak; warm 0.002 -> 0.004, decay to 0.0004
    assert lrs == pytest.approx({s: 0.004 * f(s) for s in range(1, 7)}, rel=1e-9)
    assert lrs[1] == pytest.approx(0.004) and lrs[6] == pytest.approx(0.0004)
    assert 0.004 * f(0) == pytest.approx(0.002)  # step 1 trained at half the peak: the re-warm
    assert [p.name for p in sorted((tmp_path / "new" / "checkpoints").iterdir())] == ["step-00000003", "step-00000006"]


def test_unfreezing_keeps_frozen_layers_bitwise_until_their_stage(tiny_data_dir: Path, base_run: Path,
                                                                  tmp_path: Path) -> None:
    cfg = config(tiny_data_dir, tmp_path / "u", "--train.steps", "6", "--train.init_from", str(base_run),
                 "--train.unfreeze", UNFREEZE, "--checkpoint.enabled", "false", "--optimizer.weight_decay", "0.5")
    trainer = Trainer(cfg, echo=False)
    groups = {"head": "output.weight", "block1": "layers.1.attention.wq.weight", "block0": "layers.0.feed_forward.w1.weight",
              "embedding": "tok_embeddings.weight"}
    first_step = {"head": 1, "block1": 3, "block0": 5, "embedding": 5}
    params = dict(trainer.model.named_parameters())
    try:
        history = [weights(trainer.model)]
        lrs = []
        for _ in range(6):
            trainer.train_step()
            trainer.state.step += 1
            history.append(weights(trainer.model))
            lrs.append({g["unfreeze_step"]: g["lr"] for g in trainer.optimizer.param_groups})
            for name, fqn in groups.items():  # AdamW state at its initial zeros, step 0, before its stage
                state = trainer.optimizer.state[params[fqn]]
                untouched = float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
                assert untouched == (trainer.state.step < first_step[name]), (name, trainer.state.step)
    finally:
        trainer.close()
    for name, fqn in groups.items():
        for step in range(1, 7):
            same = torch.equal(history[step][fqn], history[step - 1][fqn])
            assert same == (step < first_step[name]), f"{name} at step {step}: unchanged = {same}"
    # lrs[k] is what step k + 2 uses: a stage reads 0 before its step, then re-warms over warmup_steps = 2
    assert lrs[0][2] == 0 and lrs[0][4] == 0 and lrs[1][2] > 0 and lrs[2][4] == 0 and lrs[3][4] > 0
    assert lrs[1][2] < lrs[2][2] * 0.8  # half-way through its re-warm


def test_an_embeddings_stage_trains_the_token_embeddings_around_a_frozen_body(tiny_data_dir: Path, base_run: Path,
                                                                            tmp_path: Path) -> None:
    """The new-language recipe: the head from step 0, the token embeddings joining at step 2 at their
    own lr scale (`embeddings = true` with "top:0"), every block frozen until "all"."""
    stages = '[{step = 0, layers = "top:0", lr_scale = 0.5}, {step = 2, layers = "top:0", embeddings = true, ' \
             'lr_scale = 3}, {step = 4, layers = "all", lr_scale = 0.2}]'
    cfg = config(tiny_data_dir, tmp_path / "e", "--train.steps", "6", "--train.init_from", str(base_run),
                 "--train.unfreeze", stages, "--checkpoint.enabled", "false", "--optimizer.lr", "0.004")
    assert cfg.train.unfreeze[1].embeddings and not cfg.train.unfreeze[2].embeddings
    trainer = Trainer(cfg, echo=False)
    first_step = {"output.weight": 1, "norm.weight": 1, "tok_embeddings.weight": 3,
                  "layers.1.attention.wq.weight": 5, "layers.0.feed_forward.w1.weight": 5}
    try:
        assert trainer.unfreeze is not None and trainer.unfreeze.names[1] == ["tok_embeddings.weight"]
        assert "from step 2: top:0 + embeddings (+1 tensors at lr x3)" in trainer.unfreeze.describe(2)
        groups = {g["unfreeze_step"]: g["lr"] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0}
        history = [weights(trainer.model)]
        for _ in range(6):
            trainer.train_step()
            trainer.state.step += 1
            history.append(weights(trainer.model))
    finally:
        trainer.close()
    assert groups[2] == 0  # gated until its step; its peak is lr x 3 (below)
    assert trainer.optimizer.param_groups[[g["unfreeze_step"] for g in trainer.optimizer.param_groups].index(2)][
        "initial_lr"] == pytest.approx(0.012)
    for fqn, first in first_step.items():
        for step in range(1, 7):
            same = torch.equal(history[step][fqn], history[step - 1][fqn])
            assert same == (step < first), f"{fqn} at step {step}: unchanged = {same}"


def test_replay_fraction_of_every_batch_and_resume(tiny_data_dir: Path) -> None:
    data = TokenDataset(tiny_data_dir, "train")
    names = list(data.domains)
    new = names.index("chinese")

    def loader(fraction: float, batch: int = 8) -> DistributedTokenLoader:
        mixing = build_mixing(data.domains, DataConfig(domain_weights=["chinese:1"], replay_fraction=fraction), batch)
        assert mixing is not None
        return DistributedTokenLoader(data, 32, batch, seed=5, mixing=mixing.schedule, mixing_key=mixing.key,
                                      prefetch=False)

    for fraction, per_batch in ((0.25, [2] * 20), (0.1, None)):
        lo = loader(fraction)
        counts = []
        for _ in range(20):
            lo.next_batch()
            counts.append(int((lo.domain_of(lo.last_windows) != new).sum()))
        if per_batch is not None:
            assert counts == per_batch
        else:  # 0.8 per batch: 0 or 1, 16 over 20 batches (round(0.1 x 8 x j) before batch j)
            assert set(counts) <= {0, 1} and np.cumsum(counts).tolist() == [math.floor(0.8 * j + 0.5) for j in
                                                                            range(1, 21)]
        lo.close()

    whole, first = loader(0.25), loader(0.25)
    batches = [whole.next_batch()[0] for _ in range(6)]
    for _ in range(3):
        first.next_batch()
    resumed = loader(0.25)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.next_batch()[0], b) for b in batches[3:])
    with pytest.raises(Exception, match="domain mixing"):  # another replay fraction cannot resume it
        loader(0.5).load_state_dict(first.state_dict())


def test_continual_run_resumes_with_identical_losses(tiny_data_dir: Path, base_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--train.steps", "6", "--train.init_from", str(base_run), "--train.unfreeze", UNFREEZE,
              "--data.domain_weights", "chinese:1", "--data.replay_fraction", "0.25", "--checkpoint.interval", "3"]
    trainer = Trainer(config(tiny_data_dir, tmp_path / "whole", *common), echo=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    header = capsys.readouterr().out
    assert "replay 25% of each batch: bible 0." in header and "shakespeare 0." in header
    assert "unfreeze: from step 0: top:0" in header and "init_from " in header
    run(tiny_data_dir, tmp_path / "split", *common, "--train.stop_at", "3")
    resumed = Trainer(config(tiny_data_dir, tmp_path / "split", *common, "--checkpoint.resume", "auto"), echo=True)
    try:
        resumed.fit()
    finally:
        resumed.close()
    out = capsys.readouterr().out
    assert "resumed from" in out and "init_from " not in out  # its own checkpoint, not the base weights
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split")}
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole")}
    assert sorted(got) == list(range(1, 7)) and got == pytest.approx(want, rel=1e-6)


def test_init_from_with_other_shapes_names_the_first_tensor(tiny_data_dir: Path, base_run: Path, tmp_path: Path) -> None:
    cfg = config(tiny_data_dir, tmp_path / "x", "--train.steps", "2", "--train.init_from", str(base_run),
                 "--model.dim", "96")
    with pytest.raises(ConfigError) as err:
        check_init_from(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "tok_embeddings.weight has shape (512, 64)" in msg and "but (512, 96)" in msg, msg
    cfg = config(tiny_data_dir, tmp_path / "x", "--train.steps", "2", "--train.init_from", str(base_run),
                 "--model.n_layers", "3")
    with pytest.raises(ConfigError, match=r"has no tensor layers\.2\."):
        check_init_from(cfg)
    for bad, phrase in ((tmp_path / "nowhere", "no such directory"), (tmp_path, "neither a run directory"),
                        (base_run / "checkpoints" / "step-00000004" / "..", "neither")):
        with pytest.raises(ConfigError, match=phrase):
            check_init_from(config(tiny_data_dir, tmp_path / "y", "--train.steps", "2", "--train.init_from", str(bad)))
    with pytest.raises(ConfigError, match="inside train.output_dir"):
        check_init_from(config(tiny_data_dir, base_run, "--train.steps", "2", "--train.init_from", str(base_run)))


@pytest.mark.parametrize(("overrides", "phrase"), [
    (["--train.unfreeze", '[{step = 1, layers = "top:1"}]'], "train.unfreeze[0].step = 1: the first stage"),
    (["--train.unfreeze", '[{step = 0, layers = "top:3"}]'], "the model has 2 blocks"),
    (["--train.unfreeze", '[{step = 0, layers = "bottom:1"}]'], "must be 'top:N'"),
    (["--train.unfreeze", '[{step = 0, layers = "top:1"}, {step = 0, layers = "all"}]'], "greater than the previous"),
    (["--train.unfreeze", '[{step = 0, layers = "all"}, {step = 2, layers = "top:1"}]'], "more layers than"),
    (["--train.unfreeze", '[{step = 0, layers = "top:1"}, {step = 2, layers = "top:1"}]'], "more layers than"),
    (["--train.unfreeze", '[{step = 0, layers = "top:0", embeddings = true}, {step = 2, layers = "top:0", '
                          'embeddings = true}]'], "more layers than the previous stage ('top:0', embeddings)"),
    (["--train.unfreeze", '[{step = 0, layers = "top:0", embeddings = true}, {step = 2, layers = "top:1"}]'],
     "train.unfreeze[1].embeddings = False: must be true"),
    (["--train.unfreeze", '[{step = 0, layers = "top:1"}, {step = 9, layers = "all"}]'], "must be < train.steps"),
    (["--train.unfreeze", '[{step = 0, layers = "all", lr_scale = 0.0}]'], "lr_scale = 0.0: must be in (0, 10]"),
    (["--train.unfreeze", '[{step = 0, layer = "all"}]'], "train.unfreeze[0].layer = 'all': unknown key"),
    (["--data.replay_fraction", "1.0"], "must be in [0, 1)"),
    (["--data.replay_domains", "bible:1"], "needs data.replay_fraction > 0"),
])
def test_bad_continual_settings_are_one_config_error(tiny_data_dir: Path, tmp_path: Path, overrides: list[str],
                                                     phrase: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(tiny_data_dir, tmp_path, "--train.steps", "6", *overrides)
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_replay_domains_must_be_old_ones(tiny_data_dir: Path) -> None:
    domains = TokenDataset(tiny_data_dir, "train").domains
    with pytest.raises(ConfigError, match="'chinese' is also in the main mixture"):
        build_mixing(domains, DataConfig(domain_weights=["chinese:1"], replay_fraction=0.1,
                                         replay_domains=["chinese:1", "bible:1"]), 8)
    with pytest.raises(ConfigError, match="none is left to replay"):
        build_mixing(domains, DataConfig(replay_fraction=0.1), 8)


def test_unfreeze_stages_round_trip_through_a_written_recipe(tmp_path: Path) -> None:
    """`lmforge plan --out` writes whole JobConfigs as TOML: the stages come back as they were."""
    import tomllib

    from lmforge.config.job import JobConfig
    from lmforge.config.loader import build_dataclass
    from lmforge.plan.report import recipe_toml

    cfg = load_job_config(None, parse_override_args(["--train.steps", "9", "--scheduler.warmup_steps", "1",
                                                     "--train.unfreeze", UNFREEZE]))
    again = build_dataclass(JobConfig, tomllib.loads(recipe_toml(cfg, ["test"])))
    assert again.train.unfreeze == cfg.train.unfreeze and again.train.unfreeze[1].lr_scale == 0.5
    cfg.train.unfreeze[1].embeddings = True
    again = build_dataclass(JobConfig, tomllib.loads(recipe_toml(cfg, ["test"])))
    assert again.train.unfreeze[1].embeddings and not again.train.unfreeze[0].embeddings


def test_init_from_with_another_tokenizer_is_refused(base_run: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from lmforge.config import TokenizerConfig
    from lmforge.data.pack import prepare_data
    from lmforge.train.continual import check_same_tokenizer

    other = prepare_data(DataConfig(corpus="default", dir=str(tmp_path), max_documents=30, val_fraction=0.1,
                                    pipeline="none"), TokenizerConfig(vocab_size=300), log=lambda *_: None)
    step = base_run / "checkpoints" / "step-00000004"
    check_same_tokenizer(step, tiny_data_dir)  # the base run's own data: the same tokenizer
    with pytest.raises(ConfigError, match="tokenizer .* differs from .*tokenizer.json: the token ids would not match"):
        check_same_tokenizer(step, other)
