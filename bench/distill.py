"""Distillation against training from scratch, in one run: a student half the teacher's depth
(teacher: the main job's model, runs/tiny-dense: 4 layers, width 192, vocab 8192; student: the same
recipe with 2 layers) trained N steps by `lmforge distill` (alpha * T^2 * KL + (1 - alpha) * CE)
and N steps by `lmforge train` (cross-entropy; the named baseline), same data, seed and schedule.
Both students and the teacher are then measured by one evaluator (lmforge/eval: `evaluate`, the
trainer's validation windows and the whole held-out split). The check: the distilled student's
validation loss is below the scratch student's (ratio scratch / distilled > 1), exit 1 otherwise.

The teacher is read only; the packed data is copied into the work directory first (the trainer's
data stage may write into its data dir), so the main job's files are never touched.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py [--teacher runs/tiny-dense] [--data-dir DIR]
                                                      [--steps 160] [--alpha 0.5] [--temperature 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402

TARGET = 1.0  # scratch student's validation loss / distilled student's: above 1 = distillation wins


def train_student(verb: str, steps: int, data_dir: Path, out: Path, extra: list[str]) -> float:
    """Seconds to train the 2-layer student with `lmforge <verb>` (train: the baseline; distill)."""
    args = [verb, str(REPO / "recipes" / "tiny-dense.toml"), "--model.n_layers", "2", "--data.dir", str(data_dir),
            "--train.output_dir", str(out), "--train.steps", str(steps), "--train.eval_interval", str(steps),
            "--checkpoint.interval", str(steps), "--metrics.progress", "plain", "--metrics.log_interval", "20",
            "--metrics.tensorboard", "false", "--metrics.plot", "false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge {verb} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(source: Path, data_dir: Path) -> dict:
    """The trainer's validation loss and the whole held-out split's, per domain too (lmforge eval)."""
    from lmforge.eval.runner import EvalOptions, evaluate

    ppl = evaluate(source, EvalOptions(data_dir=data_dir, items=0, speed=False), say=lambda _: None)
    ppl = ppl["deterministic"]["perplexity"]
    return {"validation": ppl["validation"]["loss"], "heldout": ppl["loss"],
            "domains": {k: v["loss"] for k, v in ppl["domains"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=REPO / "runs" / "tiny-dense")
    p.add_argument("--data-dir", type=Path, default=None, help="packed data (default: the teacher's data.dir)")
    p.add_argument("--steps", type=int, default=160, help="optimizer steps of each student")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    a = p.parse_args(argv)
    teacher_cfg = json.loads((a.teacher / "config.json").read_text())
    data_src = a.data_dir or (Path(teacher_cfg["data"]["dir"]) if Path(teacher_cfg["data"]["dir"]).is_absolute()
                              else REPO / teacher_cfg["data"]["dir"])
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = a.work or Path(tmp)
        data = work / "data"
        if not (data / "manifest.json").is_file():
            shutil.copytree(data_src, data)  # mtimes kept: the data stage finds every stage done
        print(f"teacher {a.teacher} ({teacher_cfg['model']['n_layers']} layers, dim {teacher_cfg['model']['dim']}); "
              f"students: 2 layers, {a.steps} steps; data {data_src} (copied to {data})", flush=True)
        scratch_s = train_student("train", a.steps, data, work / "scratch", [])
        distill_s = train_student("distill", a.steps, data, work / "distilled",
                                  ["--teacher", str(a.teacher), "--distill.alpha", str(a.alpha),
                                   "--distill.temperature", str(a.temperature)])
        results = {name: measure(path, data) for name, path in
                   (("teacher", a.teacher), ("scratch", work / "scratch"), ("distilled", work / "distilled"))}
    print(f"{'model':<10} {'val loss':>9} {'held-out':>9}  per domain (held-out loss)")
    for name, r in results.items():
        doms = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["domains"].items()))
        print(f"{name:<10} {r['validation']:>9.4f} {r['heldout']:>9.4f}  {doms}")
    print(f"training time: scratch {scratch_s:.0f} s, distilled {distill_s:.0f} s (teacher forward each step)")
    ratio = results["scratch"]["validation"] / results["distilled"]["validation"]
    print(f"validation loss: distilled {results['distilled']['validation']:.4f} vs scratch "
          f"{results['scratch']['validation']:.4f} (teacher {results['teacher']['validation']:.4f}); "
          f"scratch / distilled = {ratio:.4f}")
    status = verdict("distill", "the same 2-layer student trained from scratch, same steps and data",
                     "scratch val loss / distilled val loss", ratio, TARGET)
    return status if ratio > TARGET else 1  # "beats": a tie fails too


if __name__ == "__main__":
    sys.exit(main())
